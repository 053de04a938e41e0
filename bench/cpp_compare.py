"""chatglm.cpp against glmtune on the same CPU: 6B greedy decoding, q4_0 (chatglm.cpp) vs int4 (glmtune).

The chatglm.cpp side is built from glmtune's own export: the random ChatGLM2-6B checkpoint of bench/quant.py
(full shape, fp16, cached in ~/.cache/glmtune-bench) with the real ChatGLM2-6B tokenizer from
../shared/reference, written by `glmtune.export.chatglm_cpp` as q4_0 (~3.6 GB, in the bench cache, deleted
at the end), then run by the `chatglm-cpp` 0.4.2 package in its venv (`bash shell/chatglm_cpp.sh`) in a fresh
process per run: a 64-token prompt, 64 greedy tokens; prefill = the first `generate_next_token` call (the
whole prompt), decode = the following steps. glmtune's side is `bench_decode_6b` of bench/quant.py (the same prompt
length, new tokens and model), called run for run in alternation with chatglm.cpp's, so both see the same
machine load; the table gives each run and the ratio of medians.

Threads: chatglm.cpp 0.4.2 does not let its caller choose; it takes the CPU count when that is at most 4, else
half of it (`get_num_physical_cores`). The table shows that number beside `--threads` (glmtune's); on a 2-core
machine both are 2.

Run it on a quiet machine: ggml's worker threads wait for each other by spinning at every operation of the
graph, so with more runnable processes than cores chatglm.cpp's step time collapses far more than glmtune's
(measured here at load average ~14 on 2 cores: 11 s a step, against 0.29 s on the quiet machine).

    python bench/cpp_compare.py [--threads 2] [--repeats 3] [--cpp-only] [--keep-export]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, print_table, write_random_checkpoint, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE_TOKENIZER = REPO.parent / "shared" / "reference" / "chatglm2-6b" / "tokenizer.model"
DEFAULT_CPP_PYTHON = Path.home() / ".cache" / "glmtune" / "cpp-venv" / "bin" / "python"
PROMPT_LEN, NEW_TOKENS = 64, 64

CPP_CHILD = r"""
import json, statistics, sys, time
import chatglm_cpp
t0 = time.perf_counter()
pipe = chatglm_cpp.Pipeline(sys.argv[1], max_length=256)
load_s = time.perf_counter() - t0
prompt_len, new = int(sys.argv[2]), int(sys.argv[3])
import random
rng = random.Random(0)
ids = [rng.randrange(5, 60000) for _ in range(prompt_len)]
config = chatglm_cpp._C.GenerationConfig(max_length=256, max_new_tokens=new, do_sample=False)
stamps, n_past = [time.perf_counter()], 0
for _ in range(new):
    token = pipe.model.generate_next_token(ids, None, config, n_past, len(ids))
    stamps.append(time.perf_counter())
    n_past = len(ids)
    ids.append(token)
steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
print(json.dumps({"load_s": load_s, "prefill_s": stamps[1] - stamps[0], "decode_s": stamps[-1] - stamps[1],
                  "decode_steps": len(steps), "median_step_s": statistics.median(steps)}))
"""


def instruction_set() -> str:
    """The widest x86 vector extensions this CPU reports (what decides ggml's and torch's kernels)."""
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "unknown"
    names = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2", "fma", "f16c", "avx_vnni")
             if f in flags]
    family = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{family} ({' '.join(names)})"


def cpp_threads() -> int:
    """chatglm.cpp 0.4.2's own choice (`get_num_physical_cores`): std::thread::hardware_concurrency rules."""
    n = os.cpu_count() or 4
    return n if n <= 4 else n // 2


def six_b_folder() -> Path:
    """The bench's random 6B checkpoint plus the real tokenizer, as a folder of links (nothing copied)."""
    from quant import SIX_B, chatglm_cfg

    source = write_random_checkpoint(CACHE / "chatglm2-6b-random-fp16-7", chatglm_cfg(SIX_B), n_shards=7, dtype="float16")
    if not REFERENCE_TOKENIZER.is_file():
        raise SystemExit(f"needs the ChatGLM2-6B tokenizer at {REFERENCE_TOKENIZER} (../shared/reference)")
    folder = Path(tempfile.mkdtemp(prefix="cpp-compare-", dir=CACHE))
    for path in source.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / "tokenizer.model").symlink_to(REFERENCE_TOKENIZER)
    return folder


def run_cpp(python: str, model_file: Path) -> dict:
    proc = subprocess.run([python, "-c", CPP_CHILD, str(model_file), str(PROMPT_LEN), str(NEW_TOKENS)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"chatglm.cpp run failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"side": "chatglm.cpp q4_0", "threads": cpp_threads(), "load_s": round(r["load_s"], 2),
            "prefill_s": round(r["prefill_s"], 2), "decode_tok_s": round(r["decode_steps"] / r["decode_s"], 2),
            "median_step_tok_s": round(1 / r["median_step_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="glmtune's torch threads (chatglm.cpp picks its own)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs (fresh processes) per side")
    ap.add_argument("--cpp-only", action="store_true", help="chatglm.cpp's side only")
    ap.add_argument("--keep-export", action="store_true", help="keep the q4_0 file (else deleted at the end)")
    args = ap.parse_args()
    python = os.environ.get("GLMTUNE_CHATGLM_CPP_PYTHON") or str(DEFAULT_CPP_PYTHON)
    if subprocess.run([python, "-c", "import chatglm_cpp"], capture_output=True).returncode != 0:
        raise SystemExit(f"chatglm-cpp not importable by {python}: run `bash shell/chatglm_cpp.sh` "
                         "(or set GLMTUNE_CHATGLM_CPP_PYTHON)")
    isa = instruction_set()
    print(f"CPU: {isa}; chatglm.cpp threads {cpp_threads()}, glmtune threads {args.threads}", flush=True)

    import time

    import torch

    from glmtune.export.chatglm_cpp import export_chatglm_cpp

    torch.set_num_threads(args.threads)
    folder = six_b_folder()
    model_file = CACHE / "chatglm2-6b-random-q4_0.ggml.bin"
    rows: list[dict] = []
    export_s = 0.0
    try:
        t0 = time.perf_counter()
        result = export_chatglm_cpp(folder, model_file, "q4_0", force=True)
        export_s = time.perf_counter() - t0
        print(f"{result.summary()} in {export_s:.0f} s", flush=True)
        for run in range(1, args.repeats + 1):
            rows.append({"run": run, **run_cpp(python, model_file)})
            print(rows[-1], flush=True)
            if not args.cpp_only:
                from quant import bench_decode_6b

                # glmtune's side, as bench/quant.py --decode-6b measures it: one row per int4 kernel it alternates
                for r in bench_decode_6b([4], 1):
                    rows.append({"run": run, "side": f"glmtune int4 ({r.get('kernel', 'auto')})", "threads": r["threads"],
                                 "load_s": "", "prefill_s": r["prefill_s"], "decode_tok_s": r["decode_tok_s"],
                                 "median_step_tok_s": r["median_step_tok_s"]})
    finally:
        if not args.keep_export:
            model_file.unlink(missing_ok=True)
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    print()
    print_table(rows, ["run", "side", "threads", "load_s", "prefill_s", "decode_tok_s", "median_step_tok_s"])
    summary = {}
    for side in dict.fromkeys(r["side"] for r in rows):
        mine = [r for r in rows if r["side"] == side]
        summary[side] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in mine),
                         "prefill_s": statistics.median(r["prefill_s"] for r in mine)}
    cpp = summary.get("chatglm.cpp q4_0")
    for side, figures in summary.items():
        if cpp and side.startswith("glmtune"):
            ratio = figures["decode_tok_s"] / cpp["decode_tok_s"]
            print(f"\n{side} / chatglm.cpp decode tokens/s (medians): {ratio:.2f}x; prefill "
                  f"{figures['prefill_s']} s vs {cpp['prefill_s']} s")
            figures["decode_ratio"] = round(ratio, 3)
    path = write_results("cpp_compare", {"cpu": isa, "cpp_threads": cpp_threads(), "threads": args.threads,
                                         "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                                         "export_s": round(export_s, 1), "rows": rows, "summary": summary,
                                         "load_average": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
