#!/usr/bin/env bash
# Evaluate a P-tuning v2 checkpoint on ADGEN dev: glmtune's counterpart of the official
# ptuning/evaluate.sh, with its settings (pre_seq_len 128, checkpoint-3000 of the lr 2e-2 run,
# content -> summary, 64/64 source/target tokens, int4 base model). Writes
# $OUTPUT_DIR/generated_predictions.jsonl and predict_results.json (the official key names).
#   shell/evaluate.sh                                  # greedy, batch 16, full references
#   OFFICIAL=1 shell/evaluate.sh                       # as published: sampling (top_p 0.7, temperature
#                                                      # 0.95), batch 1, references cut to 64 tokens
# CHECKPOINT is the run name under output/ and STEP the step, as in the official script and shell/chat.sh:
# output/$CHECKPOINT/checkpoint-$STEP; PTUNING_CHECKPOINT names a checkpoint folder directly.
# Optional: MODEL_PATH, DATA_DIR, OUTPUT_DIR, QUANTIZATION_BIT (empty: no quantization),
# BATCH_SIZE, DEVICE=cpu|cuda|auto; extra arguments go to `glmtune eval`.
set -euo pipefail
cd "$(dirname "$0")/.."
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-2e-2}
CHECKPOINT=${CHECKPOINT:-adgen-chatglm2-6b-pt-$PRE_SEQ_LEN-$LR}
STEP=${STEP:-3000}
MODEL_PATH=${MODEL_PATH:-chatglm2-6b}
DATA_DIR=${DATA_DIR:-AdvertiseGen}
PTUNING_CHECKPOINT=${PTUNING_CHECKPOINT:-output/$CHECKPOINT/checkpoint-$STEP}
OUTPUT_DIR=${OUTPUT_DIR:-output/$CHECKPOINT}
QUANTIZATION_BIT=${QUANTIZATION_BIT-4}
PY=${PYTHON:-python3}

args=(
  --test-file "$DATA_DIR/dev.json"
  --prompt-column content
  --response-column summary
  --model-path "$MODEL_PATH"
  --ptuning-checkpoint "$PTUNING_CHECKPOINT"
  --output-dir "$OUTPUT_DIR"
  --max-source-length 64
  --max-target-length 64
  --pre-seq-len "$PRE_SEQ_LEN"
  --device "${DEVICE:-auto}"
)
if [[ -n "$QUANTIZATION_BIT" ]]; then
  args+=(--quantization-bit "$QUANTIZATION_BIT")
fi
if [[ -n "${OFFICIAL:-}" ]]; then
  # The official run: one prompt at a time, sampled, scored against the truncated labels. Its
  # generation budget was max_source + max_target + 1 tokens including the prompt; 64 new tokens here.
  args+=(--batch-size "${BATCH_SIZE:-1}" --do-sample --top-p 0.7 --temperature 0.95 --official-truncation)
else
  args+=(--batch-size "${BATCH_SIZE:-16}")
fi
exec "$PY" -m glmtune eval "${args[@]}" "$@"
