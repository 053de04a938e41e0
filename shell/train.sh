#!/usr/bin/env bash
# P-tuning v2 on ADGEN: glmtune's counterpart of the official ptuning/train.sh, with its settings
# (pre_seq_len 128, lr 2e-2, content -> summary, 64/128 source/target tokens, batch 1 x 16 gradient
# accumulation, 3000 steps, log every 10, checkpoint every 1000, int4 base model), launched the same way
# (torchrun, NUM_GPUS processes). Writes output/adgen-chatglm2-6b-pt-$PRE_SEQ_LEN-$LR/checkpoint-N/, the
# folder shell/evaluate.sh reads. The official flags glmtune does not need are left out: --do_train (this
# is the train command), --validation_file / --per_device_eval_batch_size / --predict_with_generate
# (see shell/evaluate.sh), --overwrite_cache (the token cache is keyed by file content and settings).
#   shell/train.sh                          # as published
#   NUM_GPUS=2 shell/train.sh               # data parallel (gloo on CPU, nccl on GPU)
#   shell/train.sh --resume                 # continue the run from its latest checkpoint
# Optional: MODEL_PATH (a local folder with the official files), DATA_DIR, OUTPUT_DIR,
# QUANTIZATION_BIT (empty: no quantization), PRE_SEQ_LEN, LR; extra arguments go to `glmtune train`.
set -euo pipefail
cd "$(dirname "$0")/.."
PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-2e-2}
NUM_GPUS=${NUM_GPUS:-1}
MODEL_PATH=${MODEL_PATH:-chatglm2-6b}
DATA_DIR=${DATA_DIR:-AdvertiseGen}
OUTPUT_DIR=${OUTPUT_DIR:-output/adgen-chatglm2-6b-pt-$PRE_SEQ_LEN-$LR}
QUANTIZATION_BIT=${QUANTIZATION_BIT-4}

args=(
  --train_file "$DATA_DIR/train.json"
  --preprocessing_num_workers 10
  --prompt_column content
  --response_column summary
  --model_name_or_path "$MODEL_PATH"
  --output_dir "$OUTPUT_DIR"
  --max_source_length 64
  --max_target_length 128
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
  args+=(--overwrite_output_dir)  # as the official script; a --resume run keeps its checkpoints
fi
exec torchrun --standalone --nnodes=1 --nproc-per-node="$NUM_GPUS" -m glmtune train "${args[@]}" "$@"
