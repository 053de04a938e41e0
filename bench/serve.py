"""Benchmark: `glmtune serve` continuous batching, N concurrent streaming clients vs the same requests one at a time.

A live server (subprocess, loopback) on the mid config (4 layers, hidden 1024, vocab 65024; random weights,
written as in bench/eval.py) with three random P-tuning adapters: A and B with pre_seq_len 128, C with 64.
Requests are greedy chat completions of the bundled dev prompts, streamed with the OpenAI chunk format
(httpx). For each setting: total completion tokens/s, p50/p95 time to first token (the first chunk, which
the server sends once the first token exists), errors. Settings:

* `sequential`   — the N requests one after another, adapter A;
* `concurrent`   — N clients at once, adapter A (a single-adapter batch);
* `mixed`        — N clients at once, adapters A and B alternating (a mixed-adapter batch, same lengths);
* `mixed-len`    — N clients at once, A, C and the base model in turn (prefixes of 128, 64 and 0).

Every request's answer must be identical to the same request served alone (asserted). Each setting is run
`--repeats` times and every run is reported (the machine may be shared: see load_average in the JSON).
Prints a table and writes bench/results/serve.json.

    python bench/serve.py [--clients 8] [--max-tokens 64] [--repeats 2] [--threads N] [--dtype float32|bfloat16] [--output F]

Goals: concurrent >= 4x the tokens/s of sequential; mixed within +-10% of concurrent.

Answer length: 64 new tokens by default, the official ADGEN evaluation's `--max_target_length 64`
(THUDM/ChatGLM2-6B ptuning/evaluate.sh); ADGEN dev answers are 55 / 74 / 99 tokens at p10 / p50 / p90
with the real ChatGLM2 tokenizer. With random weights every answer runs to the limit. Shorter answers
weigh the prompts more: the joint prefill of 8 prompts is ~0.2 s against ~30 ms a batched step, so at
32 tokens the ratio is lower (the README gives both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval as eval_bench  # noqa: E402  (the mid model builder)
import serve_engine  # noqa: E402  (the in-process engine figures)

from glmtune.model.prefix import PrefixConfig, PrefixEncoder, official_prefix_state  # noqa: E402
from glmtune.model.tiny import DATA_DIR  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
MID = eval_bench.CONFIGS["mid"]


def write_adapter(out: Path, pre_seq_len: int, seed: int) -> Path:
    """A random P-tuning checkpoint for the mid config, in the official layout."""
    torch.manual_seed(seed)
    encoder = PrefixEncoder(PrefixConfig(pre_seq_len), MID["layers"], MID["groups"], MID["kv_channels"], MID["hidden_size"])
    with torch.no_grad():
        encoder.embedding.weight.normal_()
    out.mkdir(parents=True, exist_ok=True)
    save_file(official_prefix_state(encoder), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"pre_seq_len": pre_seq_len, "prefix_projection": False}), encoding="utf-8")
    return out


def start_server(model: Path, adapters: dict[str, Path], args, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "glmtune", "serve", "--model-path", str(model), "--served-name", "base",
           "--device", "cpu", "--dtype", args.dtype, "--port", str(port), "--max-batch-size", str(args.clients),
           "--max-new-tokens", str(args.max_tokens), "--log-level", "warning"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def one_request(url: str, model: str, prompt: str, max_tokens: int, client: httpx.Client | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, text, tokens, error = None, [], 0, None
    try:
        with (client or httpx).stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}"
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    continue
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                # The server sends the first chunk (role) once the first token exists. Content is not
                # a good clock here: random weights over a 65k vocabulary and the tiny tokenizer's
                # ~2k pieces make many tokens decode to nothing.
                ttft = ttft if ttft is not None else time.perf_counter() - start
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        text.append(choice["delta"]["content"])
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"model": model, "prompt": prompt, "text": "".join(text), "tokens": tokens,
            "ttft": ttft if ttft is not None else time.perf_counter() - start, "error": error}


def run_setting(url: str, jobs: list[tuple[str, str]], max_tokens: int, concurrent: bool) -> tuple[float, list[dict]]:
    """Serve `jobs` at once or one after another; seconds from the first request sent to the last answer.

    Each client has its connection open before the clock starts and the concurrent ones are released
    together (a barrier): otherwise thread start-up and TCP connects in this process spread the 8
    arrivals over ~70 ms on 2 cores, and the benchmark measures its own clients.
    """
    results: list[dict | None] = [None] * len(jobs)
    clients = [httpx.Client(timeout=600) for _ in jobs] if concurrent else [httpx.Client(timeout=600)]
    for client in clients:
        client.get(url + "/health")  # opens the keep-alive connection
    try:
        if concurrent:
            barrier = threading.Barrier(len(jobs) + 1)

            def work(i):
                barrier.wait()
                results[i] = one_request(url, *jobs[i], max_tokens, client=clients[i])

            threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
            for t in threads:
                t.start()
            barrier.wait()
            start = time.perf_counter()
            for t in threads:
                t.join()
        else:
            start = time.perf_counter()
            for i, job in enumerate(jobs):
                results[i] = one_request(url, *job, max_tokens, client=clients[0])
        return time.perf_counter() - start, results
    finally:
        for client in clients:
            client.close()


def soak(url: str, requests: int, clients: int, seed: int = 0) -> dict:
    """`requests` streamed chats from `clients` threads: adapters mixed, random lengths, 10% cancelled after the
    first chunk, 5% malformed. Stranded: a request with no final event (no [DONE], no error, no 4xx)."""
    rng = random.Random(seed)
    kinds = rng.choices(["ok", "cancel", "bad"], weights=[85, 10, 5], k=requests)
    jobs = [(kind, rng.choice(["A", "B", "C", "base"]), rng.randint(1, 48), rng.randint(1, 40)) for kind in kinds]
    outcome = {"ok": 0, "cancelled": 0, "bad_4xx": 0, "stranded": 0, "5xx_well_formed": 0, "other": []}
    lock = threading.Lock()
    todo = iter(range(requests))

    def one(kind, model, prompt_len, max_tokens):
        body = {"model": model, "messages": [{"role": "user", "content": "字" * prompt_len}], "temperature": 0.7,
                "seed": prompt_len, "max_tokens": max_tokens, "stream": True}
        if kind == "bad":
            body = rng.choice([{**body, "max_tokens": "many"}, {**body, "messages": []}, {**body, "stream": "yes"},
                               {"model": model}])
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            if r.status_code >= 400:
                return "bad_4xx" if kind == "bad" and r.status_code < 500 else f"HTTP {r.status_code}"
            for line in r.iter_lines():
                if kind == "cancel" and line.startswith("data: "):
                    return "cancelled"
                if line == "data: [DONE]":
                    return "ok"
                if line.startswith("data: ") and '"error"' in line:
                    return "5xx_well_formed"
        return "stranded"

    def worker():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                result = one(*jobs[i])
            except httpx.HTTPError as exc:
                result = f"{type(exc).__name__}"
            with lock:
                if result in outcome and result != "other":
                    outcome[result] += 1
                else:
                    outcome["other"].append(result)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def engine_parts(model: Path, adapters: dict, args, parts: list[str]) -> dict:
    """The in-process figures (bench/serve_engine.py) on the same model and adapters."""
    import serve_engine

    from glmtune.serve.models import load_served_models

    if args.threads:
        torch.set_num_threads(args.threads)
    served = load_served_models(model, adapters=adapters, device="cpu", dtype=args.dtype)
    vocab = served.model.config.vocab_size
    out = {}
    if "chunked" in parts:
        out["chunked_prefill"] = serve_engine.chunked(served, vocab, args.prefill_chunk)
        print(f"  chunked prefill: {out['chunked_prefill']}", flush=True)
    if "prefix" in parts:
        out["prefix_cache"] = serve_engine.prefix(served, vocab, served.tokenizer)
        print(f"  prefix cache: {out['prefix_cache']}", flush=True)
    if "long" in parts:
        out["long_answer"] = serve_engine.long_answer(served, vocab)
        print(f"  long answer: {out['long_answer']}", flush=True)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64, help="New tokens per answer (see the docstring).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per setting; all are reported.")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the server (default: torch's choice). On a shared machine 1 avoids "
                             "OpenMP threads spinning against other processes' load.")
    parser.add_argument("--dtype", default="float32", help="Server --dtype (bfloat16: faster CPU matmuls where supported).")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--parts", default="throughput,chunked,prefix,long,soak",
                        help="Comma-separated: throughput (HTTP, the settings above), chunked, prefix, long (in-process), "
                             "soak (HTTP).")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="Engine --prefill-chunk for the chunked part.")
    parser.add_argument("--soak-requests", type=int, default=2000)
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    isa = serve_engine.cpu_isa()
    print(f"CPU: {platform.processor() or platform.machine()}, {isa}, {os.cpu_count()} cpus", flush=True)

    rows = [json.loads(line) for line in (DATA_DIR / "adgen_sample" / "dev.json").read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [r["content"] for r in rows[: args.clients]]
    n = len(prompts)
    settings = {
        "sequential": ([("A", p) for p in prompts], False),
        "concurrent": ([("A", p) for p in prompts], True),
        "mixed": ([(("A", "B")[i % 2], p) for i, p in enumerate(prompts)], True),
        "mixed-len": ([(("A", "C", "base")[i % 3], p) for i, p in enumerate(prompts)], True),
    }
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="glmtune-bench-serve-") as tmp:
        tmp = Path(tmp)
        model = eval_bench.build_model("mid", tmp)
        adapters = {"A": write_adapter(tmp / "A", 128, 1), "B": write_adapter(tmp / "B", 128, 2),
                    "C": write_adapter(tmp / "C", 64, 3)}
        runs, stats, extra = [], {}, {}
        if "throughput" in parts or "soak" in parts:
            proc, url = start_server(model, adapters, args, tmp / "server.log")
            try:
                if "throughput" in parts:
                    one_request(url, "A", prompts[0], 2)  # warm-up: first-use allocations and kernel choices
                    run_setting(url, settings["mixed-len"][0], args.max_tokens, True)
                    # Reference answers: every (model, prompt) pair used anywhere, served alone.
                    alone = {job: one_request(url, *job, args.max_tokens)["text"]
                             for job in {j for jobs, _ in settings.values() for j in jobs}}
                    runs = []
                    for repeat in range(args.repeats):
                        for name, (jobs, concurrent) in settings.items():
                            before = httpx.get(url + "/health").json()["stats"]
                            seconds, results = run_setting(url, jobs, args.max_tokens, concurrent)
                            after = httpx.get(url + "/health").json()["stats"]
                            steps = after["steps"] - before["steps"]
                            tokens = sum(r["tokens"] for r in results)
                            ttfts = [r["ttft"] for r in results]
                            mismatched = sum(r["text"] != alone[(r["model"], r["prompt"])] for r in results)
                            runs.append({"setting": name, "repeat": repeat, "requests": n, "seconds": round(seconds, 3),
                                         "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
                                         "ttft_p50_s": round(statistics.median(ttfts), 3),
                                         "ttft_p95_s": round(percentile(ttfts, 0.95), 3),
                                         "errors": sum(r["error"] is not None for r in results),
                                         # Server-side decode time per batch step: the cost of a mixed batch without
                                         # the client and HTTP side of the wall clock.
                                         "decode_steps": steps,
                                         "ms_per_step": round(1000 * (after["step_seconds"] - before["step_seconds"]) / max(steps, 1), 1),
                                         "prefill_s": round(after["prefill_seconds"] - before["prefill_seconds"], 3),
                                         "outputs_differ_from_alone": mismatched})
                            print(f"  {name:<11} run {repeat}: {runs[-1]['tokens_per_s']} tok/s", flush=True)
                if "soak" in parts:
                    soak(url, 40, args.clients, seed=1)  # warm-up: allocator pools reach their working size
                    before = rss_kb(proc.pid)
                    started = time.perf_counter()
                    outcome = soak(url, args.soak_requests, args.clients)
                    after = rss_kb(proc.pid)
                    extra["soak"] = {"requests": args.soak_requests, **outcome, "seconds": round(time.perf_counter() - started, 1),
                                     "rss_kb_before": before, "rss_kb_after": after,
                                     "rss_growth": round(after / before - 1, 4),
                                     "live_after": httpx.get(url + "/health").json()["active_rows"]}
                    print(f"  soak: {extra['soak']}", flush=True)
                stats = httpx.get(url + "/health").json()["stats"]
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        extra.update(engine_parts(model, adapters, args, parts))

    def mean_of(setting: str) -> float:
        return statistics.mean(r["tokens_per_s"] for r in runs if r["setting"] == setting)

    ratios = []
    for repeat in range(args.repeats if runs else 0):  # ratios inside one repeat: the load is most alike there
        of = {r["setting"]: r["tokens_per_s"] for r in runs if r["repeat"] == repeat}
        ratios.append({"repeat": repeat, "concurrent_vs_sequential": round(of["concurrent"] / of["sequential"], 2),
                       "mixed_vs_concurrent": round(of["mixed"] / of["concurrent"], 3),
                       "mixed_len_vs_concurrent": round(of["mixed-len"] / of["concurrent"], 3)})
        step = {r["setting"]: r["ms_per_step"] for r in runs if r["repeat"] == repeat}
        ratios[-1]["mixed_step_time_vs_concurrent"] = round(step["mixed"] / step["concurrent"], 3)
    print(f"\n{'setting':<12}{'run':>4}{'seconds':>9}{'tokens':>8}{'tok/s':>9}{'ttft p50':>10}{'ttft p95':>10}{'errors':>8}{'differ':>8}{'ms/step':>9}")
    for r in runs:
        print(f"{r['setting']:<12}{r['repeat']:>4}{r['seconds']:>9}{r['completion_tokens']:>8}{r['tokens_per_s']:>9}"
              f"{r['ttft_p50_s']:>10}{r['ttft_p95_s']:>10}{r['errors']:>8}{r['outputs_differ_from_alone']:>8}{r['ms_per_step']:>9}")
    for r in ratios:
        print(f"run {r['repeat']}: concurrent / sequential {r['concurrent_vs_sequential']}x, mixed / concurrent "
              f"{r['mixed_vs_concurrent']}, mixed-len / concurrent {r['mixed_len_vs_concurrent']}; server step time "
              f"mixed / concurrent {r['mixed_step_time_vs_concurrent']}")
    report = {
        "benchmark": "glmtune serve: concurrent streaming clients vs one at a time (greedy chat completions)",
        "model": {**MID, "padded_vocab_size": 65024, "dtype": args.dtype, "device": "cpu"},
        "adapters": {"A": 128, "B": 128, "C": 64}, "clients": n, "max_tokens": args.max_tokens,
        "torch": torch.__version__, "cpus": os.cpu_count(), "server_threads": args.threads or "default",
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "python": sys.version.split()[0], "machine": platform.machine(),
        "runs": runs, "ratios": ratios,
        "mean_tokens_per_s": {s: round(mean_of(s), 2) for s in settings} if runs else {},
        "server_stats": stats, "cpu_isa": isa, **extra,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.output.with_name(f".{args.output.name}.tmp")
    tmp_out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp_out, args.output)
    print(f"wrote {args.output}")
    print(f"CPU instruction set: {isa}")
    if any(r["outputs_differ_from_alone"] or r["errors"] for r in runs):
        raise SystemExit("some answers differed from the same request served alone, or failed")
    soaked = extra.get("soak")
    if soaked and (soaked["stranded"] or soaked["5xx_well_formed"] or soaked["other"]):
        raise SystemExit(f"soak: stranded or failed requests: {soaked}")


if __name__ == "__main__":
    main()
