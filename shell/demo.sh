#!/usr/bin/env bash
# The main job end to end on the embedded tiny model (CPU; 19 minutes measured on a 2-core machine under heavy load):
#   init-model (+ a short LM pre-training of the base on the sample answers) -> preprocess -> train (loss goes
#   down) -> eval of the base alone and of base + prefix (scores side by side) -> chat (one shot).
# The base is pre-trained on the answer texts only (it writes sample-like sentences but has never seen a
# prompt with its answer), so the difference in the table is what the prefix learned. The tokenizer has 1000
# pieces, so an attribute word (白色) is one token in the prompt and in the answer alike (with more pieces whole
# phrases such as 干净的白色清爽耐看 become single tokens, the base never sees the attribute words, and no prefix
# can make it name them). "input followed" is the share of the prompt's attribute values the answer names.
# Usage: bash shell/demo.sh [OUT_DIR]   (default runs/demo; SKIP_SETUP=1 uses the glmtune already installed)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n "${SKIP_SETUP:-}" ]] || bash shell/setup.sh
# One thread per process: the tiny model's matrices are too small to gain from more, and on a shared machine
# two OpenMP threads spin against each other (a pre-training step measured 20x slower with 2 under load).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${1:-runs/demo}
STEPS=${STEPS:-300}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-300}
mkdir -p "$OUT"

echo "== 1/5 a tiny ChatGLM2 in the official layout, a SentencePiece tokenizer and a short LM pre-training on data/"
glmtune init-model "$OUT/model" --layers 2 --hidden-size 128 --heads 4 --kv-channels 32 --groups 2 \
  --ffn-hidden-size 344 --vocab-size 1000 --pretrain-steps "$PRETRAIN_STEPS" --overwrite

echo "== 2/5 preprocess the bundled ADGEN-style sample"
glmtune preprocess --model-path "$OUT/model" --train-file data/adgen_sample/train.json \
  --output-dir "$OUT/data-train" --max-source-length 64 --max-target-length 128

echo "== 3/5 P-tuning v2 training (only the prefix trains)"
glmtune train --model-path "$OUT/model" --dataset "$OUT/data-train" --output-dir "$OUT/ptuning" \
  --pre-seq-len 32 --prefix-projection --per-device-train-batch-size 16 --max-steps "$STEPS" --learning-rate 2e-2 \
  --logging-steps 25 --save-steps 100 --no-gradient-checkpointing --overwrite-output-dir

CKPT="$OUT/ptuning/checkpoint-$STEPS"
echo "== 4/5 batched greedy eval on data/adgen_sample/dev.json: the base alone, then base + $CKPT"
glmtune eval --model-path "$OUT/model" --test-file data/adgen_sample/dev.json \
  --output-dir "$OUT/eval-base" --batch-size 16 --max-new-tokens 64 --no-progress > /dev/null
glmtune eval --model-path "$OUT/model" --ptuning-checkpoint "$CKPT" --test-file data/adgen_sample/dev.json \
  --output-dir "$OUT/eval" --batch-size 16 --max-new-tokens 64 --no-progress > /dev/null
python3 - "$OUT/eval-base" "$OUT/eval" <<'PY'
import json, sys
base, tuned = (json.load(open(f"{d}/predict_results.json", encoding="utf-8")) for d in sys.argv[1:3])
preds = [[json.loads(l)["predict"] for l in open(f"{d}/generated_predictions.jsonl", encoding="utf-8")] for d in sys.argv[1:3]]
rows = [json.loads(l) for l in open("data/adgen_sample/dev.json", encoding="utf-8")]


def follows(content, answer):
    """Share of the prompt's attribute values (`颜色#白色` -> 白色) that the answer names."""
    values = [pair.split("#", 1)[1] for pair in content.split("*") if "#" in pair]
    return sum(v in answer for v in values) / max(1, len(values))


print(f"{'score (x100)':<16}{'base':>10}{'base+prefix':>14}")
for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
    print(f"{key:<16}{base['predict_' + key]:>10.2f}{tuned['predict_' + key]:>14.2f}")
share = [100 * sum(follows(r["content"], p) for r, p in zip(rows, ps)) / len(rows) for ps in preds]
print(f"{'input followed':<16}{share[0]:>10.2f}{share[1]:>14.2f}   % of the prompt's attribute values named in the answer")
print(f"{'distinct':<16}{len(set(preds[0])):>10d}{len(set(preds[1])):>14d}   predictions of {len(preds[1])}")
print("first row, input: ", rows[0]["content"])
print("first row, base:  ", preds[0][0])
print("first row, tuned: ", preds[1][0])
PY

echo "== 5/5 one-shot chat through the trained prefix"
glmtune chat --model-path "$OUT/model" --ptuning-checkpoint "$CKPT" --greedy --max-new-tokens 64 \
  --query "$(head -n 1 data/adgen_sample/dev.json | python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["content"])')"
