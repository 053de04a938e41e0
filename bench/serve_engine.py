"""The engine's latency figures, in-process on the mid config (no HTTP: the engine's own clock per token).

* `chunked` — 7 greedy streams decode; a 2,000-token prompt arrives. The 7 streams' p95 inter-token latency
  while it is prefilled, against the same streams undisturbed, with chunked prefill (`--prefill-chunk`) and
  without it (the whole prompt in one step). Goal: within 2x of undisturbed.
* `prefix`  — a shared 1,000-token system prompt, then a different short question: time to first token of the
  first request (prefix computed) and of the second (prefix reused). Goal: second >= 3x faster.
* `long`    — one 1,024-token answer: the engine's time per token around token 900 against around token 50
  (goal within 10%).

The engine runs on this (main) thread, as in `glmtune serve`; requests are submitted from a helper thread.
"""

from __future__ import annotations

import random
import statistics
import threading
import time

import torch

from glmtune.serve.engine import Engine
from glmtune.serve.request import Request, SamplingParams


class Clock:
    """Engine observer: every request's token times (engine thread)."""

    def __init__(self):
        self.times: dict[int, list[float]] = {}
        self.arrival: dict[int, float] = {}

    def first_token(self, request, seconds):
        now = time.monotonic()
        self.arrival[request.id] = now - seconds
        self.times[request.id] = [now]

    def token_gap(self, request, seconds):
        self.times[request.id].append(time.monotonic())

    def finished(self, request, event):
        pass


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_engine(engine: Engine, script) -> None:
    """Run `script(engine)` on a helper thread while the engine loops here until it returns."""
    done = threading.Event()
    error = []

    def body():
        try:
            script(engine)
        except BaseException as exc:  # noqa: BLE001
            error.append(exc)
        finally:
            done.set()

    threading.Thread(target=body, daemon=True).start()
    engine.run(keep_running=lambda: not done.is_set())
    if error:
        raise error[0]


def submit(engine, ids, adapter, max_tokens):
    finished = threading.Event()
    final = []

    def notify(event):
        if event.finish_reason is not None:
            final.append(event)
            finished.set()

    handle = engine.submit(Request(ids, adapter, SamplingParams(max_tokens=max_tokens, temperature=0), notify))
    return handle.request, finished, final


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def make_engine(served, clock, **kw):
    return Engine(served.model, served.tokenizer, served.adapters, served.stop_ids, max_batch_size=8,
                  observer=clock, **kw)


def gaps_between(times: list[float], start: float, end: float) -> list[float]:
    """Gaps between consecutive tokens that overlap [start, end] (the one spanning a whole prefill included)."""
    return [b - a for a, b in zip(times, times[1:]) if b >= start and a <= end]


def chunked(served, vocab: int, prefill_chunk: int, decode_tokens: int = 160) -> dict:
    """p95 inter-token latency of 7 decoding streams, undisturbed and while a 2,000-token prompt is prefilled."""
    out = {}
    for label, chunk in (("chunked", prefill_chunk), ("whole", 100_000)):
        clock = Clock()
        engine = make_engine(served, clock, prefill_chunk=chunk, prefix_cache_tokens=0)
        window: dict = {}

        def script(engine):
            streams = [submit(engine, random_ids(vocab, 40, i), "A", decode_tokens) for i in range(7)]
            while min((len(clock.times.get(r.id, [])) for r, _, _ in streams), default=0) < 40:
                time.sleep(0.005)
            window["quiet_end"] = time.monotonic()
            long_req, long_done, _ = submit(engine, random_ids(vocab, 2000, 99), "A", 4)
            window["arrived"] = time.monotonic()
            while long_req.id not in clock.times:
                time.sleep(0.002)
            window["first"] = time.monotonic()
            for _, done, _ in streams:
                done.wait(600)
            long_done.wait(600)
            window["streams"] = [r.id for r, _, _ in streams]
            window["long"] = long_req.id

        run_engine(engine, script)
        quiet, busy = [], []
        for rid in window["streams"]:
            times = clock.times[rid]
            quiet += [b - a for a, b in zip(times[5:], times[6:]) if b <= window["quiet_end"]]
            busy += gaps_between(times, window["arrived"], window["first"])
        out[label] = {"undisturbed_p95_ms": round(1000 * percentile(quiet, 0.95), 1),
                      "during_prefill_p95_ms": round(1000 * percentile(busy, 0.95), 1),
                      "during_prefill_max_ms": round(1000 * max(busy), 1),
                      "ratio_p95": round(percentile(busy, 0.95) / percentile(quiet, 0.95), 2),
                      "long_prompt_ttft_s": round(clock.times[window["long"]][0] - clock.arrival[window["long"]], 3),
                      "prefill_chunk": chunk}
    return out


def prefix(served, vocab: int, tokenizer) -> dict:
    """Time to first token with a shared 1,000-token start: first request vs the next ones."""
    clock = Clock()
    engine = make_engine(served, clock)
    system = random_ids(vocab, 1000, 7)
    ttft = []

    def script(engine):
        for i in range(4):
            request, done, _ = submit(engine, system + random_ids(vocab, 12, 100 + i), "A", 2)
            done.wait(600)
            ttft.append(clock.times[request.id][0] - clock.arrival[request.id])

    run_engine(engine, script)
    return {"ttft_first_s": round(ttft[0], 3), "ttft_next_s": [round(t, 3) for t in ttft[1:]],
            "speedup": round(ttft[0] / statistics.median(ttft[1:]), 1),
            "reused_tokens": engine.stats["prefix_cache_tokens"]}


def long_answer(served, vocab: int, tokens: int = 1024) -> dict:
    clock = Clock()
    engine = make_engine(served, clock)
    ids = []

    def script(engine):
        request, done, _ = submit(engine, random_ids(vocab, 20, 5), "A", tokens)
        done.wait(1200)
        ids.append(request.id)

    run_engine(engine, script)
    times = clock.times[ids[0]]
    gaps = [b - a for a, b in zip(times, times[1:])]

    def around(i):
        return statistics.median(gaps[i - 20:i + 20])

    if len(gaps) < 920:
        return {"tokens": len(times), "note": "answer ended early"}
    return {"tokens": len(times), "ms_per_token_at_50": round(1000 * around(50), 2),
            "ms_per_token_at_900": round(1000 * around(900), 2), "ratio": round(around(900) / around(50), 3)}


def cpu_isa() -> str:
    """The CPU's vector instruction set as torch uses it, and as /proc/cpuinfo says."""
    flags = set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    has = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{has} (torch uses {torch.backends.cpu.get_cpu_capability()})"
