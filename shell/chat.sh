#!/usr/bin/env bash
# Chat in the terminal with a P-tuning v2 checkpoint: glmtune's counterpart of the official
# ptuning/web_demo.sh. pre_seq_len and prefix_projection are read from the checkpoint.
# CHECKPOINT and STEP mean what they mean in shell/evaluate.sh (and the official evaluate.sh): the run name
# under output/ and the step, i.e. output/$CHECKPOINT/checkpoint-$STEP; PTUNING_CHECKPOINT names a folder directly.
#   MODEL_PATH=... CHECKPOINT=... STEP=... shell/chat.sh          # interactive ('clear', 'stop', Ctrl-D)
#   PTUNING_CHECKPOINT=out/checkpoint-500 shell/chat.sh           # any checkpoint folder
#   shell/chat.sh --query "类型#裙*颜色#蓝色" --greedy            # one-shot
#   MERGED=out/merged shell/chat.sh                              # a folder written by `glmtune merge`
# Optional: QUANTIZATION_BIT=4|8, DEVICE=cpu|cuda|auto; extra arguments go to `glmtune chat`.
set -euo pipefail
cd "$(dirname "$0")/.."
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-2e-2}
MODEL_PATH=${MODEL_PATH:-chatglm2-6b}
CHECKPOINT=${CHECKPOINT:-adgen-chatglm2-6b-pt-$PRE_SEQ_LEN-$LR}
STEP=${STEP:-3000}
PTUNING_CHECKPOINT=${PTUNING_CHECKPOINT:-output/$CHECKPOINT/checkpoint-$STEP}
PY=${PYTHON:-python3}

args=(--device "${DEVICE:-auto}")
if [[ -n "${MERGED:-}" ]]; then
  args+=(--model-path "$MERGED")
else
  args+=(--model-path "$MODEL_PATH" --ptuning-checkpoint "$PTUNING_CHECKPOINT")
fi
if [[ -n "${QUANTIZATION_BIT:-}" ]]; then
  args+=(--quantization-bit "$QUANTIZATION_BIT")
fi
exec "$PY" -m glmtune chat "${args[@]}" "$@"
