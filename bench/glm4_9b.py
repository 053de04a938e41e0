"""GLM-4-9B-chat at its full shape with random weights: loading memory and an int4 P-tuning step's memory.

The checkpoint is written once (`GLMTUNE_BENCH_CACHE`, ~18.8 GB; a seeded random block repeated, written at
memory speed): the real config
(../shared/reference/glm-4-9b-chat/config.json: 40 layers, hidden 4096, 2 KV groups, ffn 13696, padded vocab
151552) in bfloat16 safetensors shards, as the release ships it (10 shards). Each case runs in a fresh
interpreter and reports the peak RSS above the interpreter's baseline (torch + transformers imported):

* load: `glmtune.model.loading.load_model(..., quantization_bit=B, dtype="bfloat16", pre_seq_len=128)`, which
  converts and quantizes shard by shard, tensor by tensor; goal: peak <= 1.1 x the final model's size;
* step: one P-tuning forward + backward as `glmtune train` runs it (`loss_only`, gradient checkpointing, bf16
  compute, pre_seq_len 128, 1,024 tokens, half of them labelled); goal: peak <= 8 GB for int4 (the official
  GLM-4 demo needed 21 GB of GPU memory for P-tuning in bf16);
* decode (--decode-repeats, 0 skips it): greedy decoding of the int4 model (a quantized copy written once with
  `glmtune.model.quantization.quantize_checkpoint`, the model `load_model(..., quantization_bit=4)` builds), 64 new
  tokens after a 64-token prompt, bf16, through bench/quant.py's decode child: tokens/s next to the
  memory-bandwidth bound measured in the same process, and the share of that bound; glmtune's AVX2 int4 kernel
  and torch's alternate in fresh processes.

    python bench/glm4_9b.py [--bits 4 --tokens 1024 --threads 2 --shards 10 --decode-repeats 2]

Writes bench/results/glm4_9b.json and prints a table. A full-precision (bf16) load of the 9B is not run by
default: its 18.8 GB would not leave room on a 24 GB machine (`--bits 0` runs it where it fits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CACHE, instruction_set, print_table, run_isolated, write_random_checkpoint,  # noqa: E402
                    write_results)
from quant import DECODE_CHILD, decode_figures, native_kernel_built  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

CHILD = r"""
import json, sys, time, torch
import glmtune.model.loading as L
torch.set_num_threads(int(sys.argv[4]))


def status(field):
    # VmHWM is this process's own peak: unlike ru_maxrss it does not inherit the parent's size at fork.
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


base = status("VmRSS")
bits = int(sys.argv[2]) or None
t0 = time.perf_counter()
model = L.load_model(sys.argv[1], quantization_bit=bits, dtype="bfloat16", pre_seq_len=128)
load_s = time.perf_counter() - t0
with torch.no_grad():  # touch every tensor: count the model as used, not only what loading allocated
    for t in model.state_dict().values():
        t.float().sum() if t.dtype == torch.int8 else t.sum()
load_peak, after_load = status("VmHWM"), status("VmRSS")
model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
row = {"baseline": base, "load_peak": load_peak, "after_load": after_load, "model_bytes": model_bytes,
       "load_s": load_s, "rope_theta": model.config.rope_parameters["rope_theta"],
       "prefix_shape": list(model.prefix_encoder.embedding.weight.shape)}
tokens = int(sys.argv[3])
if tokens:
    model.enable_gradient_checkpointing()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, so the next peak is the training step's own
    ids = torch.randint(5, 150000, (1, tokens), generator=torch.Generator().manual_seed(0))
    labels = ids.clone(); labels[:, : tokens // 2] = -100
    model.train()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=labels, loss_only=True).loss  # as glmtune train calls it
    loss.backward()
    row.update(step_s=time.perf_counter() - t0, step_peak=status("VmHWM"), loss=loss.item(),
               prefix_grad_norm=float(model.prefix_encoder.embedding.weight.grad.norm()))
print(json.dumps(row))
"""


def _gb(nbytes: int) -> float:
    return round(nbytes / 1e9, 2)


def bench_decode(folder: Path, repeats: int, threads: int, prompt_len: int = 64, new_tokens: int = 64) -> list[dict]:
    from glmtune.model.quantization import quantize_checkpoint

    quantized = CACHE / f"{folder.name}-int4"
    if not (quantized / "config.json").is_file():
        quantize_checkpoint(folder, quantized, 4, force=True, dtype="bfloat16")
    kernels = ("native", "torch") if native_kernel_built() else ("torch",)
    rows = []
    for run, kernel in [(run, kernel) for run in range(1, repeats + 1) for kernel in kernels]:
        r = run_isolated(DECODE_CHILD, str(quantized), "4", str(threads), str(prompt_len), str(new_tokens),
                         env={"GLMTUNE_NATIVE": "1" if kernel == "native" else "0"})
        rows.append({"bits": 4, "kernel": kernel, "threads": threads, "run": run, "prompt": prompt_len,
                     "new": new_tokens, **decode_figures(r)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="4", help="comma-separated: 4, 8, 0 (bf16, ~19 GB)")
    ap.add_argument("--tokens", type=int, default=1024, help="training-step length; 0 measures loading only")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--decode-repeats", type=int, default=2, help="int4 decode runs per kernel (0: none)")
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    args = ap.parse_args()
    cfg = json.loads((args.reference / "glm-4-9b-chat" / "config.json").read_text())
    folder = CACHE / f"glm-4-9b-chat-tiled-bf16-{args.shards}"
    if not (folder / "model.safetensors.index.json").is_file():
        free = shutil.disk_usage(CACHE.parent if CACHE.parent.exists() else Path.home()).free
        if free < 21e9:
            raise SystemExit(f"the 9B checkpoint needs ~18.8 GB in {CACHE}; {free / 1e9:.1f} GB free")
    write_random_checkpoint(folder, cfg, n_shards=args.shards, dtype="bfloat16", fmt="safetensors", tiled=True)
    ckpt_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    isa = instruction_set()
    print(f"instruction set: {isa}", flush=True)
    rows = []
    for bits in (int(b) for b in args.bits.split(",") if b):
        r = run_isolated(CHILD, str(folder), str(bits), str(args.tokens), str(args.threads))
        load_above = r["load_peak"] - r["baseline"]
        row = {"bits": bits or "bf16", "checkpoint_GB": _gb(ckpt_bytes), "model_GB": _gb(r["model_bytes"]),
               "load_peak_above_baseline_GB": _gb(load_above),
               "load_peak_over_model": round(load_above / r["model_bytes"], 3), "load_s": round(r["load_s"], 1),
               "import_baseline_GB": _gb(r["baseline"]), "rope_theta": r["rope_theta"], "prefix": r["prefix_shape"]}
        if args.tokens:
            row.update(tokens=args.tokens, step_peak_GB=_gb(r["step_peak"]), step_s=round(r["step_s"], 1),
                       loss=round(r["loss"], 3), prefix_grad_norm=round(r["prefix_grad_norm"], 4))
        rows.append(row)
        print(row, flush=True)
    if rows:
        print_table(rows, ["bits", "checkpoint_GB", "model_GB", "load_peak_above_baseline_GB", "load_peak_over_model",
                           "load_s", "step_peak_GB", "step_s"])
    decode = bench_decode(folder, args.decode_repeats, args.threads) if args.decode_repeats else []
    if decode:
        print_table(decode, ["kernel", "run", "load_avg", "prefill_s", "decode_tok_s", "median_step_ms", "bw_GB_s",
                             "bound_tok_s", "share_of_bound", "kernel_GB_s", "share_of_kernel_bound"])
    path = write_results("glm4_9b", {"threads": args.threads, "shards": args.shards, "instruction_set": isa,
                                     "rows": rows, "decode": decode})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
