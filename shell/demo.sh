#!/usr/bin/env bash
# The main job end to end on the embedded tiny model (CPU, a few minutes):
#   init-model -> preprocess -> train (loss goes down) -> eval (BLEU/ROUGE table) -> chat (one shot).
# Usage: bash shell/demo.sh [OUT_DIR]   (default runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash shell/setup.sh
OUT=${1:-runs/demo}
STEPS=${STEPS:-300}
mkdir -p "$OUT"

echo "== 1/5 a tiny random ChatGLM2 in the official layout, with a SentencePiece tokenizer trained on data/"
glmtune init-model "$OUT/model" --layers 2 --hidden-size 128 --heads 4 --kv-channels 32 --groups 2 \
  --ffn-hidden-size 344 --overwrite

echo "== 2/5 preprocess the bundled ADGEN-style sample"
glmtune preprocess --model-path "$OUT/model" --train-file data/adgen_sample/train.json \
  --output-dir "$OUT/data-train" --max-source-length 64 --max-target-length 128

echo "== 3/5 P-tuning v2 training (only the prefix trains)"
glmtune train --model-path "$OUT/model" --dataset "$OUT/data-train" --output-dir "$OUT/ptuning" \
  --pre-seq-len 32 --prefix-projection --per-device-train-batch-size 16 --max-steps "$STEPS" --learning-rate 2e-2 \
  --logging-steps 25 --save-steps 100 --no-gradient-checkpointing --overwrite-output-dir

CKPT="$OUT/ptuning/checkpoint-$STEPS"
echo "== 4/5 batched greedy eval of $CKPT on data/adgen_sample/dev.json"
glmtune eval --model-path "$OUT/model" --ptuning-checkpoint "$CKPT" --test-file data/adgen_sample/dev.json \
  --output-dir "$OUT/eval" --batch-size 16 --max-new-tokens 64 --no-progress

echo "== 5/5 one-shot chat through the trained prefix"
glmtune chat --model-path "$OUT/model" --ptuning-checkpoint "$CKPT" --greedy --max-new-tokens 64 \
  --query "$(head -n 1 data/adgen_sample/dev.json | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["content"])')"
