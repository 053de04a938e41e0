"""Peak memory of loading a sharded official-layout checkpoint, relative to its size.

Writes a random ChatGLM2-shaped checkpoint in 7 `.bin` shards (the official release's layout) once,
then loads it with `glmtune.load_model` in a fresh interpreter per case and reports the peak RSS
above the interpreter's baseline (torch + transformers imported). The loader converts one shard at a
time, so the goal is peak ≈ one model copy + one shard, never two model copies.

    python bench/load_memory.py [--layers 8 --hidden 2048 --ffn 5472]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, print_table, run_isolated, write_random_checkpoint, write_results  # noqa: E402

CHILD = r"""
import json, sys, torch, transformers
import glmtune.model.loading as L


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


base = status("VmRSS")
model = L.load_model(sys.argv[1], dtype=sys.argv[2])
# Weights that needed no conversion stay memory-mapped from the shard files; touch every tensor so
# the figure counts the model as it is when used, not only what loading itself allocated.
with torch.no_grad():
    for t in model.state_dict().values():
        t.sum()
peak = status("VmHWM")  # this process's own peak (ru_maxrss would inherit the parent's at fork)
model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"baseline": base, "peak": peak, "model_bytes": model_bytes}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5472)
    ap.add_argument("--shards", type=int, default=7)
    args = ap.parse_args()
    cfg = {
        "model_type": "chatglm", "num_layers": args.layers, "hidden_size": args.hidden, "ffn_hidden_size": args.ffn,
        "num_attention_heads": args.hidden // 128, "kv_channels": 128, "multi_query_attention": True,
        "multi_query_group_num": 2, "padded_vocab_size": 65024, "seq_length": 32768, "layernorm_epsilon": 1e-5,
        "add_qkv_bias": True, "eos_token_id": 2, "pad_token_id": 0,
    }
    folder = write_random_checkpoint(CACHE / f"load-{args.layers}x{args.hidden}x{args.ffn}-{args.shards}", cfg, args.shards)
    ckpt_bytes = sum(p.stat().st_size for p in Path(folder).glob("*.bin"))
    largest_shard = max(p.stat().st_size for p in Path(folder).glob("*.bin"))
    rows = []
    for dtype in ("float16", "float32"):
        r = run_isolated(CHILD, str(folder), dtype)
        delta = r["peak"] - r["baseline"]
        rows.append({
            "dtype": dtype,
            "checkpoint_GB": round(ckpt_bytes / 1e9, 3),
            "largest_shard_GB": round(largest_shard / 1e9, 3),
            "model_GB": round(r["model_bytes"] / 1e9, 3),
            "peak_above_baseline_GB": round(delta / 1e9, 3),
            "peak/checkpoint": round(delta / ckpt_bytes, 3),
            "peak/(model+shard)": round(delta / (r["model_bytes"] + largest_shard), 3),
        })
    print_table(rows, list(rows[0]))
    print("results:", write_results("load_memory", {"config": cfg, "shards": args.shards, "rows": rows}))


if __name__ == "__main__":
    main()
