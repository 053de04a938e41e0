#!/usr/bin/env bash
# P-tuning v2 on multi-turn chat data: glmtune's counterpart of the official ptuning/train_chat.sh, with
# its settings (pre_seq_len 128, lr 1e-2, prompt / response / history columns, 256/256 source/target
# tokens, batch 1 x 16 gradient accumulation, 3000 steps, log every 10, checkpoint every 1000, int4 base
# model), launched the same way (torchrun, NUM_GPUS processes). Rows are
# {"prompt": ..., "response": ..., "history": [[query, answer], ...]}, e.g. data/multiturn_sample.json.
#   CHAT_TRAIN_DATA=data/multiturn_sample.json CHECKPOINT_NAME=output/chat-pt shell/train_chat.sh
# Optional: MODEL_PATH (a local folder with the official files), QUANTIZATION_BIT (empty: no
# quantization), PRE_SEQ_LEN, LR, NUM_GPUS; extra arguments go to `glmtune train` (e.g. --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CHAT_TRAIN_DATA:?set CHAT_TRAIN_DATA to a JSON Lines file of prompt/response/history rows}"
: "${CHECKPOINT_NAME:?set CHECKPOINT_NAME to the output folder}"
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-1e-2}
NUM_GPUS=${NUM_GPUS:-1}
MODEL_PATH=${MODEL_PATH:-chatglm2-6b}
QUANTIZATION_BIT=${QUANTIZATION_BIT-4}

args=(
  --train_file "$CHAT_TRAIN_DATA"
  --preprocessing_num_workers 10
  --prompt_column prompt
  --response_column response
  --history_column history
  --model_name_or_path "$MODEL_PATH"
  --output_dir "$CHECKPOINT_NAME"
  --max_source_length 256
  --max_target_length 256
  --per_device_train_batch_size 1
  --gradient_accumulation_steps 16
  --max_steps 3000
  --logging_steps 10
  --save_steps 1000
  --learning_rate "$LR"
  --pre_seq_len "$PRE_SEQ_LEN"
)
if [[ -n "$QUANTIZATION_BIT" ]]; then
  args+=(--quantization_bit "$QUANTIZATION_BIT")
fi
if [[ " $* " != *" --resume"* ]]; then
  args+=(--overwrite_output_dir)
fi
exec torchrun --standalone --nnodes=1 --nproc-per-node="$NUM_GPUS" -m glmtune train "${args[@]}" "$@"
