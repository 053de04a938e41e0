"""Speed (and, with --full-6b, memory) of weight-only int8/int4 quantization (`glmtune.model.quantization`).

(a) model: a mid-size ChatGLM2 (4 layers, hidden 1024, 16 heads, kv_channels 64, 2 groups, ffn 2736;
    vocab 4096 so the unquantized lm_head does not hide the layers) — forward time of int8/int4 in
    the default `auto` mode relative to the dense model, fp32 and bf16, 1 and 64 tokens.
(b) layers: one linear at each full ChatGLM2-6B shape (qkv 4096→4608, o 4096→4096, gate_up
    4096→27392, down 13696→4096), 1 and 64 tokens: dense vs the exact path vs the kernel path.
(c) crossover: kernel vs exact path over the number of rows at the down shape, which is what
    `AUTO_KERNEL_MAX_ROWS` in glmtune/model/quantization.py is set from.
(c2) native: int4 at each 6B shape with bf16 rows, glmtune's AVX2 kernel (glmtune.model.native) against
    torch's int4 kernel and the exact path, interleaved call by call (skipped where it is not built).
(d) --full-6b: a random 7-shard fp16 checkpoint of the real 6B shape (~12.5 GB, written once to the
    cache), loaded with `glmtune.model.loading.load_model(..., quantization_bit=4)`, then one P-tuning
    training step (pre_seq_len 128, --tokens tokens); absolute peak RSS (VmHWM) of each, in a fresh
    interpreter.
(e) --decode-6b: greedy decoding of that model quantized (--new-tokens after --prompt-tokens, 64 and 64 by default, bf16),
    --repeats fresh processes; each prints its decode speed next to the bound memory allows in the
    same run (read bandwidth measured before and after decoding / bytes a decoding step reads), the
    share of that bound, and the load average (the machine may be shared: compare shares, not speeds).
    It also times the int4 kernel alone on one row (each layer's gate/up projection) and prints the
    "kernel bound": the step with the int4 bytes read at that speed, the rest at memory speed.
    What it found on a quiet machine: the memory this virtual machine gets varies from minute to
    minute (the same sum reads 32-75 GB/s), the int4 kernel does not follow (~35 GB/s on 2 cores,
    compute-bound), so the share of the memory bound is 0.70-0.73 when memory gives <= ~45 GB/s and
    ~0.45 when it gives 50-70; decoding stays at 0.77-0.89 of the kernel bound.
    What it found earlier (2-core AVX-512 machine shared with other jobs, load average 5-9):
    * threads: with 2 threads and other runnable processes, every parallel region (~170 kernel calls
      a token) waits for a descheduled thread: 0.33 tokens/s against 5.1 on 1 thread at the same load.
      Pass --threads 1 on a busy machine; 2 only pays when both cores are free;
    * the int4 kernel, not memory, limits a core: `_weight_int4pack_mm_for_cpu` on one row reads
      its weight at 0.4-0.5x the speed `sum` reads memory on the same threads, so on one core decoding
      stays near 40-55% of the bound;
    * the output layer (0.53 GB of the 3.39 GB a step reads): oneDNN's bf16 GEMV ran at 2/3 of
      torch's own, now used for one row (glmtune/model/modeling.py);
    * the prompt: the last position's logits copied the whole output-layer weight transposed (a
      batched matmul on a 3-D input; 9.4 s against 0.09 s in one run), now a 2-D product. At 64
      rows the int4 kernel still beats dequantize + matmul at every 6B shape (see
      `AUTO_KERNEL_MAX_ROWS` in glmtune/model/quantization.py);
    * Python per step: the same 28 layers with tiny matrices still take 38-64 ms a step at load 9
      (transformers' layers and generate, and 168 QuantizedLinear calls of which glmtune's Python
      was trimmed from ~54 to ~47 us a call over a ~15 us kernel): a real share on a busy core;
    * not it: page cache (the int4 weights are repacked into anonymous memory at the first step),
      the KV cache (28 KB a position).

    python bench/quant.py [--only model,layers,crossover,native] [--full-6b] [--decode-6b] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CACHE, RESULTS, instruction_set, print_table, run_isolated, write_random_checkpoint,  # noqa: E402
                    write_results)

from glmtune.model.quantization import QuantizedLinear, quantize_model, quantize_weight  # noqa: E402

MID = dict(num_layers=4, hidden_size=1024, num_attention_heads=16, kv_channels=64, multi_query_group_num=2,
           ffn_hidden_size=2736, padded_vocab_size=4096)
SIX_B = dict(num_layers=28, hidden_size=4096, num_attention_heads=32, kv_channels=128, multi_query_group_num=2,
             ffn_hidden_size=13696, padded_vocab_size=65024)
SHAPES = {"qkv": (4096, 4608), "o": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096)}


def chatglm_cfg(dims: dict) -> dict:
    return dict(dims, model_type="chatglm", multi_query_attention=True, add_qkv_bias=True, seq_length=32768,
                layernorm_epsilon=1e-5, eos_token_id=2, pad_token_id=0)


def timed(fn, min_time: float = 0.3, max_reps: int = 20) -> float:
    """Median milliseconds of `fn()` after one warm-up call (which also does one-time repacking)."""
    fn()
    times: list[float] = []
    while len(times) < max_reps and (len(times) < 3 or sum(times) < min_time):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def bench_model() -> list[dict]:
    from glmtune.model.modeling import ChatGLM2ForCausalLM, glm_config_from_chatglm

    torch.manual_seed(0)
    dense = ChatGLM2ForCausalLM(glm_config_from_chatglm(chatglm_cfg(MID))).eval()
    models = {"dense": dense}
    for bits in (8, 4):
        models[f"int{bits}"] = quantize_model(_copy(dense), bits)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (1, 64):
            ids = torch.randint(0, MID["padded_vocab_size"], (1, tokens))
            base = None
            for name, model in models.items():
                model.to(dtype)
                with torch.no_grad():
                    ms = timed(lambda: model(input_ids=ids))
                base = base or ms
                rows.append({"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "weights": name,
                             "forward_ms": ms, "vs_dense": round(ms / base, 2)})
                print(rows[-1], flush=True)
    return rows


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _layer(k: int, n: int, bits: int) -> QuantizedLinear:
    layer = QuantizedLinear(k, n, bits, bias=False)
    q, scale = quantize_weight((torch.randn(n, k) * 0.02).half(), bits)
    layer.weight, layer.weight_scale = q, scale
    return layer


def bench_layers() -> list[dict]:
    rows = []
    for name, (k, n) in SHAPES.items():
        weight = torch.randn(n, k) * 0.02
        layers = {bits: _layer(k, n, bits) for bits in (8, 4)}
        for tokens in (1, 64):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(tokens, k).to(dtype)
                w = weight.to(dtype)
                row = {"layer": name, "in→out": f"{k}→{n}", "tokens": tokens,
                       "dtype": str(dtype).removeprefix("torch."), "dense_ms": timed(lambda: x @ w.t())}
                for bits, layer in layers.items():
                    for mode in ("exact", "kernel"):
                        layer.mode = mode
                        with torch.no_grad():
                            row[f"int{bits}_{mode}_ms"] = timed(lambda: layer(x), max_reps=5 if tokens > 1 else 20)
                rows.append(row)
                print(row, flush=True)
    return rows


def bench_crossover() -> list[dict]:
    k, n = SHAPES["down"]
    layers = {bits: _layer(k, n, bits) for bits in (8, 4)}
    rows = []
    for dtype, counts in ((torch.bfloat16, (1, 16, 64, 128, 256, 512)), (torch.float32, (1, 2, 4, 8)),
                          (torch.float16, (1, 2, 4, 8))):
        for tokens in counts:
            x = torch.randn(tokens, k).to(dtype)
            row = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens}
            for bits, layer in layers.items():
                for mode in ("exact", "kernel"):
                    layer.mode = mode
                    with torch.no_grad():
                        row[f"int{bits}_{mode}_ms"] = timed(lambda: layer(x), max_reps=5)
            rows.append(row)
            print(row, flush=True)
    return rows


def bench_native() -> list[dict]:
    """int4 at each 6B shape, bf16 activations: glmtune's AVX2 kernel (`native`) against torch's int4 kernel
    (`kernel`) and dequantize + matmul (`exact`), 1 to 128 rows, interleaved call by call so a shared
    machine's load weighs on all three alike. GB/s: int4 weight bytes read per second."""
    from glmtune.model import native

    if not native.available():
        print("native kernel not built or not usable here (python -m glmtune.model.native build): skipped")
        return []
    rows = []
    for name, (k, n) in SHAPES.items():
        layer = _layer(k, n, 4)
        for tokens in (1, 16, 64, 128):
            x = torch.randn(tokens, k).to(torch.bfloat16)
            times: dict[str, list[float]] = {m: [] for m in ("native", "kernel", "exact")}
            for rep in range(5 if tokens == 1 else 2):
                for mode in times:
                    layer.mode = mode
                    with torch.no_grad():
                        if rep == 0:
                            layer(x)  # warm-up, and the kernel path's one-time repacking
                        start = time.perf_counter()
                        layer(x)
                        times[mode].append(time.perf_counter() - start)
            ms = {m: statistics.median(t) * 1e3 for m, t in times.items()}
            row = {"layer": name, "in→out": f"{k}→{n}", "tokens": tokens,
                   **{f"{m}_ms": round(v, 2) for m, v in ms.items()},
                   "native_GB_s": round(n * k / 2 / ms["native"] / 1e6, 1),
                   "kernel_GB_s": round(n * k / 2 / ms["kernel"] / 1e6, 1),
                   "native_vs_kernel": round(ms["kernel"] / ms["native"], 2),
                   "load_avg": float(open("/proc/loadavg").read().split()[0])}
            rows.append(row)
            print(row, flush=True)
    return rows


FULL_CHILD = r"""
import json, sys, time, torch
import glmtune.model.loading as L
torch.set_num_threads(int(sys.argv[4]))


def status(field):
    # VmHWM is this process's own peak: unlike ru_maxrss it does not inherit the parent's size at fork.
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


base = status("VmRSS")
t0 = time.perf_counter()
model = L.load_model(sys.argv[1], quantization_bit=int(sys.argv[6]), dtype=sys.argv[2], pre_seq_len=128)
load_s = time.perf_counter() - t0
if sys.argv[5] == "1":
    model.enable_gradient_checkpointing()
load_peak, after_load = status("VmHWM"), status("VmRSS")
model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM, so the next peak is the training step's own
tokens = int(sys.argv[3])
ids = torch.randint(5, 60000, (1, tokens))
labels = ids.clone(); labels[:, : tokens // 2] = -100
model.train()
t0 = time.perf_counter()
loss = model(input_ids=ids, labels=labels, loss_only=True).loss  # as glmtune train calls it
loss.backward()
step_s = time.perf_counter() - t0
print(json.dumps({"baseline": base, "load_peak": load_peak, "after_load": after_load, "step_peak": status("VmHWM"),
                  "model_bytes": model_bytes, "load_s": load_s, "step_s": step_s,
                  "prefix_grad_norm": float(model.prefix_encoder.embedding.weight.grad.norm())}))
"""


DECODE_CHILD = r"""
import json, os, statistics, sys, time, torch
from transformers import StoppingCriteria
import glmtune.model.loading as L
torch.set_num_threads(int(sys.argv[3]))


def loadavg():
    return float(open("/proc/loadavg").read().split()[0])


# Read bandwidth in this process, with its threads: the sum of a 256 MiB fp32 tensor (8x the L3
# cache; torch's vectorised sum is memory-bound on 1+ cores). Sampled before, during (every 8th
# decoding step, its time left out of the step's) and after decoding, so a shared machine's load
# weighs on the bound as it weighs on decoding.
BUF = torch.ones(1 << 26)
def bandwidth(reps=3):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter(); BUF.sum(); times.append(time.perf_counter() - t0)
    return BUF.numel() * 4 / statistics.median(times)


class Clock(StoppingCriteria):
    # generate() calls this once per new token: timestamps of every step inside one generate call.
    def __init__(self):
        self.stamps, self.samples, self.excluded = [], [], 0.0
    def __call__(self, input_ids, scores, **kwargs):
        now = time.perf_counter()
        self.stamps.append(now - self.excluded)
        if len(self.stamps) % 8 == 0:
            self.samples.append(bandwidth(1))
            self.excluded += time.perf_counter() - now
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


load0 = loadavg()
t0 = time.perf_counter()
model = L.load_model(sys.argv[1], quantization_bit=int(sys.argv[2]), dtype="bfloat16")
load_s = time.perf_counter() - t0
# Bytes one decoding step must read: every weight except the embedding table (one row of it), plus
# the KV cache at the mean length. Quantized layers count their packed weight and scales.
weights = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if "embed_tokens" not in n)
cfg = model.config
prompt_len, new = int(sys.argv[4]), int(sys.argv[5])
kv_per_pos = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
step_bytes = weights + kv_per_pos * (prompt_len + new // 2)
prompt = torch.randint(5, 60000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model.generate(input_ids=prompt, do_sample=False, max_new_tokens=4)  # warm-up (kernel repacking)
    # What the int4 kernel itself reads on one row, same threads: every layer's gate/up projection in turn
    # (56 MB each, so each call reads from memory, as in decoding). A step's int4 layers cannot go faster.
    gate_ups = [layer.mlp.gate_up_proj for layer in model.model.layers]
    row = torch.randn(1, cfg.hidden_size, dtype=torch.bfloat16)
    kernel_times = []
    for rep in range(3):
        for layer in gate_ups:
            t0 = time.perf_counter(); layer(row); kernel_times.append(time.perf_counter() - t0)
    gate_up_bytes = sum(t.numel() * t.element_size() for t in gate_ups[0].state_dict().values())
    kernel_bw = gate_up_bytes / statistics.median(kernel_times)
    bw_before = bandwidth()
    clock = Clock()
    t0 = time.perf_counter()
    out = model.generate(input_ids=prompt, do_sample=False, min_new_tokens=new, max_new_tokens=new,
                         stopping_criteria=[clock])
    total_s = time.perf_counter() - t0
    bw_after = bandwidth()
bw_all = [bw_before, *clock.samples, bw_after]
steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
print(json.dumps({"new_tokens": out.shape[1] - prompt_len, "load_s": load_s, "prefill_s": clock.stamps[0] - t0,
                  "decode_s": clock.stamps[-1] - clock.stamps[0], "decode_steps": len(steps),
                  "median_step_s": statistics.median(steps), "total_s": total_s,
                  "bw_before": bw_before, "bw_after": bw_after, "bw_median": statistics.median(bw_all),
                  "bw_min": min(bw_all), "bw_max": max(bw_all), "step_bytes": step_bytes, "kernel_bw": kernel_bw,
                  "int4_bytes": sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                                    if ".layers." in n and "_proj." in n),
                  "load_before": load0, "load_after": loadavg(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}))
"""


def decode_figures(r: dict) -> dict:
    """A DECODE_CHILD run's speeds next to the bounds measured in the same run."""
    bw = r["bw_median"]
    bound = bw / r["step_bytes"]
    kernel_bound = 1 / (r["int4_bytes"] / r["kernel_bw"] + (r["step_bytes"] - r["int4_bytes"]) / bw)
    decode = r["decode_steps"] / r["decode_s"]
    return {"load_avg": f"{r['load_before']:.1f}/{r['load_after']:.1f}",
            "prefill_s": round(r["prefill_s"], 2), "decode_tok_s": round(decode, 2),
            "median_step_ms": round(r["median_step_s"] * 1e3),
            "median_step_tok_s": round(1 / r["median_step_s"], 2),
            "GB_per_token": _gb(r["step_bytes"]), "bw_GB_s": round(bw / 1e9, 1),
            "bw_range": f"{r['bw_min'] / 1e9:.0f}-{r['bw_max'] / 1e9:.0f}",
            "bound_tok_s": round(bound, 2), "share_of_bound": round(decode / bound, 2),
            # The same step if every int4 byte went at the kernel's own one-row speed and the
            # rest (output layer, KV cache) at memory speed: what this torch's int4 kernel allows.
            "kernel_GB_s": round(r["kernel_bw"] / 1e9, 1),
            "kernel_bound_tok_s": round(kernel_bound, 2),
            "share_of_kernel_bound": round(decode / kernel_bound, 2),
            "overall_tok_s": round(r["new_tokens"] / r["total_s"], 2)}


def bench_decode_6b(bits_list: list[int], repeats: int, prompt_len: int = 64, new_tokens: int = 64) -> list[dict]:
    """Greedy decoding of the random 6B model on CPU: `new_tokens` after a `prompt_len`-token prompt, bf16 compute.

    Each run is a fresh process. Its decode speed is compared with the bound the memory allows in the
    same run: read bandwidth (median of samples before, during and after decoding, same threads) /
    bytes a step reads. The quantized checkpoint is written once (`glmtune.model.quantization.quantize_checkpoint`, the
    same model `load_model(..., quantization_bit=bits)` builds from the fp16 one) so runs load fast."""
    from glmtune.model.quantization import quantize_checkpoint

    folder = CACHE / "chatglm2-6b-random-fp16-7"
    write_random_checkpoint(folder, chatglm_cfg(SIX_B), n_shards=7, dtype="float16")
    rows = []
    for bits in bits_list:
        quantized = CACHE / f"chatglm2-6b-random-int{bits}"
        if not (quantized / "config.json").is_file():
            quantize_checkpoint(folder, quantized, bits, force=True)
        # int4: glmtune's AVX2 kernel and torch's (GLMTUNE_NATIVE=0) in alternating fresh processes.
        kernels = ("native", "torch") if bits == 4 and native_kernel_built() else ("torch",)
        for run, kernel in [(run, kernel) for run in range(1, repeats + 1) for kernel in kernels]:
            env = {"GLMTUNE_NATIVE": "1" if kernel == "native" else "0"}
            r = run_isolated(DECODE_CHILD, str(quantized), str(bits), str(torch.get_num_threads()), str(prompt_len),
                             str(new_tokens), env=env)
            rows.append({"bits": bits, "kernel": kernel, "threads": torch.get_num_threads(), "run": run,
                         "prompt": prompt_len, "new": new_tokens, **decode_figures(r)})
            print(rows[-1], flush=True)
    return rows


def native_kernel_built() -> bool:
    from glmtune.model import native

    return native.library_path().is_file() and native.cpu_has_avx2()


def _gb(nbytes: int) -> float:
    return round(nbytes / 1e9, 2)


def bench_full_6b(tokens: int, dtypes: list[str], checkpointing: bool, bits_list: list[int]) -> list[dict]:
    try:
        import glmtune.model.loading as loading
    except ImportError:
        loading = None
    if loading is None or not hasattr(loading, "load_model"):
        print("glmtune.model.loading.load_model not available: skipping --full-6b")
        return []
    free = shutil.disk_usage(CACHE.parent if CACHE.parent.exists() else Path.home()).free
    folder = CACHE / "chatglm2-6b-random-fp16-7"
    if not (folder / "pytorch_model.bin.index.json").is_file() and free < 14e9:
        raise SystemExit(f"--full-6b needs ~12.5 GB free for the checkpoint cache; {free / 1e9:.1f} GB free")
    write_random_checkpoint(folder, chatglm_cfg(SIX_B), n_shards=7, dtype="float16")
    if dtypes == ["auto"]:  # what the CPU calls for (glmtune.model.cpu_linear.cpu_compute_dtype), said with the reason
        from glmtune.model.cpu_linear import cpu_compute_dtype

        chosen, reason = cpu_compute_dtype()
        dtypes = [str(chosen).removeprefix("torch.")]
        print(f"compute dtype {reason}", flush=True)
    else:
        print(f"compute dtype as given: {', '.join(dtypes)}", flush=True)
    rows = []
    for bits, dtype in [(b, d) for b in bits_list for d in dtypes]:
        r = run_isolated(FULL_CHILD, str(folder), dtype, str(tokens), str(torch.get_num_threads()),
                         str(int(checkpointing)), str(bits))
        rows.append({"bits": bits, "dtype": dtype, "tokens": tokens, "grad_ckpt": checkpointing, "load_s": round(r["load_s"], 1), "step_s": round(r["step_s"], 1),
                     "model_GB": _gb(r["model_bytes"]), "rss_after_load_GB": _gb(r["after_load"]),
                     "load_peak_GB": _gb(r["load_peak"]), "step_peak_GB": _gb(r["step_peak"]),
                     "import_baseline_GB": _gb(r["baseline"]), "prefix_grad_norm": round(r["prefix_grad_norm"], 4)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="model,layers,crossover", help="comma-separated parts to run")
    ap.add_argument("--full-6b", action="store_true", help="also load a random 6B checkpoint and train one step")
    ap.add_argument("--tokens", type=int, default=192, help="sequence length of the --full-6b training step")
    ap.add_argument("--dtypes", "--dtype", default="auto",
                    help="compute dtypes of the --full-6b runs (auto: bfloat16 where the CPU has bf16 instructions, else float32)")
    ap.add_argument("--bits", default="4,8", help="comma-separated bits of the --full-6b runs")
    ap.add_argument("--grad-ckpt", action="store_true", help="--full-6b training step with gradient checkpointing")
    ap.add_argument("--decode-6b", action="store_true", help="greedy decode speed of the random 6B model (bf16)")
    ap.add_argument("--decode-bits", default="4", help="comma-separated bits for --decode-6b")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="--decode-6b prompt length")
    ap.add_argument("--new-tokens", type=int, default=64, help="--decode-6b tokens generated")
    ap.add_argument("--repeats", type=int, default=3, help="--decode-6b runs (fresh processes) per bits")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a shared machine 1 gives stable figures: with "
                         "more threads than free cores every parallel region waits for descheduled threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.only.split(",")) if args.only else set()
    # Parts not run this time keep their previous figures.
    previous = RESULTS / "quant.json"
    payload = json.loads(previous.read_text()) if previous.is_file() else {}
    payload |= {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                "instruction_set": instruction_set()}
    print(f"instruction set: {payload['instruction_set']}; torch dispatch {payload['cpu_capability']}", flush=True)
    payload.pop("threads", None)
    threads = payload.setdefault("threads_by_section", {})
    sections = [("model", bench_model), ("layers", bench_layers), ("crossover", bench_crossover), ("native", bench_native)]
    for name, fn in sections:
        if name in parts:
            print(f"\n== {name} ==", flush=True)
            payload[name] = fn()
            threads[name] = torch.get_num_threads()
            print_table(payload[name], list(payload[name][0]))
    if args.full_6b:
        print("\n== full-6b ==", flush=True)
        key = "full_6b_grad_ckpt" if args.grad_ckpt else "full_6b"
        payload[key] = bench_full_6b(args.tokens, args.dtypes.split(","), args.grad_ckpt,
                                     [int(b) for b in args.bits.split(",")])
        threads[key] = torch.get_num_threads()
        if payload[key]:
            print_table(payload[key], list(payload[key][0]))
    if args.decode_6b:
        print("\n== decode-6b ==", flush=True)
        key = f"decode_6b_threads{torch.get_num_threads()}"  # runs at other thread counts are kept
        payload.pop("decode_6b", None)  # the single-run figure of earlier versions
        payload[key] = bench_decode_6b([int(b) for b in args.decode_bits.split(",")], args.repeats,
                                       args.prompt_tokens, args.new_tokens)
        threads[key] = torch.get_num_threads()
        print_table(payload[key], list(payload[key][0]))
    print("results:", write_results("quant", payload))


if __name__ == "__main__":
    main()
