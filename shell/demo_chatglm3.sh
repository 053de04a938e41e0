#!/usr/bin/env bash
# The ChatGLM3 path end to end on a tiny ChatGLM3 (CPU; 14 minutes measured on a 2-core machine under heavy load):
#   init-model --family chatglm3 -> conversations (system prompt, a tool call + observation) -> preprocess
#   -> train -> eval (one example per assistant reply) -> chat with --tools: the tuned tiny model answers the
#   weather question with a get_weather call, returned as JSON (shown, never run; the script fails if it is not).
# Usage: bash shell/demo_chatglm3.sh [OUT_DIR]   (default runs/demo-chatglm3; SKIP_SETUP=1 uses the glmtune installed)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n "${SKIP_SETUP:-}" ]] || bash shell/setup.sh
# One thread per process: the tiny model gains nothing from more (see shell/demo.sh).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${1:-runs/demo-chatglm3}
STEPS=${STEPS:-300}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-300}
mkdir -p "$OUT"

echo "== 1/6 the bundled ADGEN-style sample as ChatGLM3 conversations (every other one a weather question that calls a tool)"
cat > "$OUT/tools.json" <<'JSON'
[{"name": "get_weather", "description": "查询城市天气",
  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
JSON
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
tools = json.load(open(f"{out}/tools.json", encoding="utf-8"))
for split in ("train", "dev"):
    with open(f"data/adgen_sample/{split}.json", encoding="utf-8") as src, \
            open(f"{out}/{split}.jsonl", "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            row = json.loads(line)
            conv = [{"role": "system", "content": "你是一位服装文案写手。"},
                    {"role": "user", "content": row["content"]}, {"role": "assistant", "content": row["summary"]}]
            record = {"conversations": conv}
            if i % (2 if split == "train" else 50) == 1:
                record = {"tools": tools, "conversations": [
                    {"role": "user", "content": "北京天气怎么样？"},
                    {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"weather": "晴"}},
                    {"role": "assistant", "content": "北京今天晴，适合穿这条裙子出门。"}]}
            dst.write(json.dumps(record, ensure_ascii=False) + "\n")
# The texts the base is pre-trained on, each on its own: every message of the training conversations (the
# system prompt with the tools, the tool call as the 2023 rules write it). The base learns to write such text
# but never sees a conversation, so when to call the tool is what the prefix has to learn.
system = ("Answer the following questions as best as you can. You have access to the following tools:\n"
          + json.dumps(tools, indent=4, ensure_ascii=False))
with open(f"{out}/texts.jsonl", "w", encoding="utf-8") as dst:
    for line in open(f"{out}/train.jsonl", encoding="utf-8"):
        row = json.loads(line)
        texts = [system] if "tools" in row else []
        for m in row["conversations"]:
            texts += ["get_weather\n```python\ntool_call(city='北京')\n```"] if m["role"] == "tool" else [m["content"]]
        dst.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
PY

echo "== 2/6 a tiny ChatGLM3 (the ChatGLM2 network, a tokenizer with <|system|> <|user|> <|assistant|> <|observation|>),"
echo "       its tokenizer and a short language-model pre-training on those texts"
glmtune init-model "$OUT/model" --family chatglm3 --layers 2 --hidden-size 128 --heads 4 --kv-channels 32 \
  --groups 2 --ffn-hidden-size 344 --text-file "$OUT/texts.jsonl" --pretrain-steps "$PRETRAIN_STEPS" --overwrite

echo "== 3/6 preprocess (official ChatGLM3 demo rules of 2023: loss on assistant replies and tool calls)"
glmtune preprocess --model-path "$OUT/model" --train-file "$OUT/train.jsonl" --output-dir "$OUT/data-train" \
  --max-seq-length 640

echo "== 4/6 P-tuning v2 training (only the prefix trains)"
glmtune train --model-path "$OUT/model" --dataset "$OUT/data-train" --output-dir "$OUT/ptuning" \
  --pre-seq-len 32 --prefix-projection --per-device-train-batch-size 8 --max-steps "$STEPS" --learning-rate 2e-2 \
  --logging-steps 20 --save-steps "$STEPS" --no-gradient-checkpointing --overwrite-output-dir --disable-tqdm

CKPT="$OUT/ptuning/checkpoint-$STEPS"
echo "== 5/6 batched greedy eval of $CKPT: one example per assistant reply"
glmtune eval --model-path "$OUT/model" --ptuning-checkpoint "$CKPT" --test-file "$OUT/dev.jsonl" \
  --output-dir "$OUT/eval" --batch-size 16 --max-source-length 640 --max-new-tokens 64 --no-progress

echo "== 6/6 one-shot chat with --tools: the tuned model's tool call comes back as JSON (nothing is executed)"
glmtune chat --model-path "$OUT/model" --ptuning-checkpoint "$CKPT" --greedy --max-new-tokens 64 \
  --tools "$OUT/tools.json" --query "北京天气怎么样？" --json | tee "$OUT/chat.json"
python3 - "$OUT/chat.json" <<'PY'
import json, sys
response = json.load(open(sys.argv[1], encoding="utf-8"))["response"]
if not (isinstance(response, dict) and "parameters" in response):
    sys.exit(f"the tuned model answered with text, not a tool call: {response!r}")
print("tool call by the tuned model:", json.dumps(response, ensure_ascii=False))
PY
