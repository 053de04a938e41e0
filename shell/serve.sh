#!/usr/bin/env bash
# Serve a base model and P-tuning checkpoints over an OpenAI-compatible API, with a chat page at /.
#   MODEL_PATH=chatglm2-6b CHECKPOINT=out/checkpoint-3000 shell/serve.sh          # base + one adapter
#   MODEL_PATH=chatglm2-6b shell/serve.sh --adapter ad=out/ad/checkpoint-3000 --adapter qa=out/qa/checkpoint-1000
#   MERGED=out/merged shell/serve.sh                                               # a `glmtune merge` folder
# Optional: PORT (8000), HOST (127.0.0.1), API_KEY, QUANTIZATION_BIT=4|8, DEVICE=cpu|cuda|auto;
# extra arguments go to `glmtune serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

args=(--device "${DEVICE:-auto}" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}")
if [[ -n "${MERGED:-}" ]]; then
  args+=(--model-path "$MERGED")
else
  args+=(--model-path "${MODEL_PATH:-chatglm2-6b}")
  if [[ -n "${CHECKPOINT:-}" ]]; then
    args+=(--ptuning-checkpoint "$CHECKPOINT")
  fi
fi
if [[ -n "${QUANTIZATION_BIT:-}" ]]; then
  args+=(--quantization-bit "$QUANTIZATION_BIT")
fi
if [[ -n "${API_KEY:-}" ]]; then
  export GLMTUNE_API_KEY="$API_KEY"   # through the environment: not visible in `ps`
fi
exec "$PY" -m glmtune serve "${args[@]}" "$@"
