"""The loop: ties the scheduler (what to do), the runner (tensors), the sampler (next tokens) and the output
processor (text, finish) on the thread that loaded the model; `submit` and `Handle.cancel` are thread-safe.

Failure semantics: every submitted request gets exactly one final event, whatever raises where. A fault
fails only the requests it concerns: a prefill or a merge the rows being added, a decode forward the
running rows, sampling or text the one row, a consumer's `notify` that consumer (it is told once more
with an error, and its row leaves). Anything else fails the rows in flight, and the loop goes on.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable

import torch

from glmtune.serve.output import RequestOutput
from glmtune.serve.request import Event, Request
from glmtune.serve.runner import PrefixCache, Runner
from glmtune.serve.sampler import RowSampler, sample
from glmtune.serve.scheduler import QueueFull, Scheduler  # noqa: F401

STATS = ("steps", "max_batch", "joined_running", "mixed_steps", "finished", "cancelled", "errors", "timeouts",
         "prefill_seconds", "step_seconds", "prefill_chunks", "prefix_cache_hits", "prefix_cache_tokens")


class _State:
    """A live request: its output, its sampler (once prefilled) and its timings."""

    def __init__(self, request: Request, tokenizer, stop_ids):
        self.request = request
        self.output = RequestOutput(request, tokenizer, stop_ids)
        self.sampler: RowSampler | None = None
        self.done = False
        self.arrived = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None


class Handle:
    """Returned by `submit`: cancel it when the client goes away."""

    def __init__(self, request: Request, engine: "Engine"):
        self.request, self._engine = request, engine

    def cancel(self) -> None:
        self.request.cancelled = True
        self._engine._wake()


class Engine:
    """Owns the model on one thread. `adapters` maps a served id to its prefix (`glmtune.serve.models`).

    `observer`, if given, is told about tokens and finished requests (the server's metrics): it gets
    `first_token(request, seconds)`, `token_gap(request, seconds)` and `finished(request, event)`."""

    def __init__(self, model, tokenizer, adapters: dict, stop_ids, max_batch_size: int = 8, *,
                 max_queue: int = 256, prefill_chunk: int = 512, prefix_cache_tokens: int = 16384,
                 prefix_cache_min: int = 64, observer=None):
        # The engine's own tokenizer: the HTTP side keeps the original, so each object is used by one thread.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.adapters = adapters
        self.stop_ids = frozenset(stop_ids)
        self.runner = Runner(model, adapters, PrefixCache(prefix_cache_tokens, prefix_cache_min))
        self.scheduler = Scheduler(max_batch_size, max_queue, prefill_chunk, cached_tokens=self._cached_tokens)
        self.device = model.device
        self.observer = observer
        self._cond = threading.Condition()
        self._live: dict[int, _State] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = {name: 0 for name in STATS}
        self.stats["prefill_seconds"] = self.stats["step_seconds"] = 0.0

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    # --- any thread ---

    def start(self) -> "Engine":
        """Run the loop on a new thread (tests, scripts). `glmtune serve` runs it on the main thread: `run`."""
        self._thread = threading.Thread(target=self.run, name="glmtune-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> Handle:
        """Queue a request; KeyError for an unknown adapter, QueueFull when the queue is at its limit."""
        if request.adapter not in self.adapters:
            raise KeyError(request.adapter)
        state = _State(request, self.tokenizer, self.stop_ids)
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            self.scheduler.add(request)
            self._live[request.id] = state
            self._cond.notify_all()
        return Handle(request, self)

    @property
    def active_rows(self) -> int:
        """Requests prefilled and still generating."""
        return sum(not s.done for s in list(self._live.values()) if s.sampler is not None)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def live(self) -> int:
        """Requests submitted and not yet given their final event."""
        return len(self._live)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- the loop, engine thread only ---

    def run(self, keep_running: Callable[[], bool] = lambda: True) -> None:
        """The loop, on the calling thread, until `close()` or until `keep_running()` is false.

        `glmtune serve` calls this on the main thread, the thread that loaded the model, and runs HTTP on
        another one. Measured (bench/serve.py shapes, torch 2.13 with GNU OpenMP, 2 cores): once one
        thread has run parallel torch ops, the same model steps run on a second thread take ~25% longer
        (1 row 23-29 vs 18-20 ms, 8 rows 42-49 vs 32-36 ms), as if the two threads' OpenMP teams
        competed for the cores; one thread doing all model work avoids it.
        """
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and not len(self.scheduler) and keep_running():
                        self._cond.wait(timeout=0.5)
                    if self._stop or not keep_running():
                        break
                    plan = self.scheduler.schedule()
                try:
                    self.step(plan)
                except Exception as exc:  # noqa: BLE001 - keep serving: fail the rows in flight, not the server
                    self._fail([s for s in self._live.values() if s.sampler is not None or
                                s.request.id in self.scheduler.chunking], exc, "internal")
                    self.runner.reset()
        self.shutdown("the server is shutting down")

    def shutdown(self, message: str) -> None:
        """End every live request with a final error event (the server is stopping)."""
        with self._cond:
            self._stop = True
            states = list(self._live.values())
        for state in states:
            self._finish(state, state.output.final("error", message, "shutdown"))

    def step(self, plan) -> None:
        """Carry out one plan."""
        for request, why in plan.leave:
            state = self._live.get(request.id)
            if state is None:
                continue
            if why == "timeout":
                self.stats["timeouts"] += 1
                self._finish(state, state.output.final("error", "the request took longer than the server's "
                                                        "request timeout", "timeout"))
            else:
                self.stats["cancelled"] += 1
                self._finish(state, state.output.final("cancelled"))
        if plan.prefill:
            self._prefill([self._live[r.id] for r in plan.prefill if r.id in self._live])
        for request, end in plan.chunks:
            if request.id in self._live:
                self._chunk(self._live[request.id], end)
        self._remove_done()
        if plan.decode and self.runner.batch is not None:
            self._decode_rows()
            self._remove_done()

    def _prefill(self, states: list[_State]) -> None:
        started = time.perf_counter()
        try:
            batch, logits = self.runner.prefill([(s.request.id, s.request.adapter, s.request.prompt_ids) for s in states])
        except Exception as exc:  # noqa: BLE001
            self._fail(states, exc, "prefill")
            return
        self.stats["prefill_seconds"] += time.perf_counter() - started
        self._joined(states, batch, logits)

    def _chunk(self, state: _State, end: int) -> None:
        request = state.request
        started = time.perf_counter()
        hits = self.runner.prefix_cache.hits
        try:
            result = self.runner.prefill_chunk(request.id, request.adapter, request.prompt_ids, end)
        except Exception as exc:  # noqa: BLE001
            self.runner.drop_chunked(request.id)
            self._fail([state], exc, "prefill")
            return
        self.stats["prefill_seconds"] += time.perf_counter() - started
        self.stats["prefill_chunks"] += 1
        self.stats["prefix_cache_hits"] += self.runner.prefix_cache.hits - hits
        self.stats["prefix_cache_tokens"] = self.runner.prefix_cache.reused_tokens
        if result is not None:
            self._joined([state], *result)

    def _joined(self, states: list[_State], batch, logits) -> None:
        """New rows: their samplers, first tokens and first events; the unfinished ones join the batch."""
        self.stats["joined_running"] += len(states) if self.runner.batch is not None else 0
        for state in states:
            try:
                state.sampler = RowSampler(state.request.params, self.device)
            except Exception as exc:  # noqa: BLE001
                self._fail([state], exc, "sampling")
        self._take([s for s in states if not s.done], logits[[i for i, s in enumerate(states) if not s.done]])
        try:
            self.runner.merge(batch)
        except Exception as exc:  # noqa: BLE001
            self._fail(states, exc, "merge")
            return
        for state in states:
            if not state.done:
                self.scheduler.joined(state.request)
        self.runner.remove([s.request.id for s in states if s.done])

    def _decode_rows(self) -> None:
        rows = self.runner.rows
        states = [self._live[rid] for rid in rows]
        started = time.perf_counter()
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
        if len({s.request.adapter for s in states}) > 1:
            self.stats["mixed_steps"] += 1
        try:
            _, logits = self.runner.decode({s.request.id: s.output.ids[-1] for s in states})
        except Exception as exc:  # noqa: BLE001
            self._fail(states, exc, "forward")
            self.runner.reset()
            return
        self._take(states, logits)
        self.stats["step_seconds"] += time.perf_counter() - started

    def _take(self, states: list[_State], logits) -> None:
        """Each row's next token, and the events it makes; a row whose sampling or text fails fails alone."""
        if not states:
            return
        try:
            tokens = sample([s.sampler for s in states], logits)
        except Exception as exc:  # noqa: BLE001
            tokens = [exc] * len(states)
        now = time.monotonic()
        for state, token in zip(states, tokens):
            if isinstance(token, Exception):
                self._fail([state], token, "sampling")
                continue
            self._timing(state, now)
            try:
                events = state.output.add(token)
            except Exception as exc:  # noqa: BLE001
                self._fail([state], exc, "detokenize")
                continue
            for event in events:
                if event.finish_reason is not None:
                    self.stats["finished"] += 1
                    self._finish(state, event)
                elif not self._send(state, event):
                    break

    def _timing(self, state: _State, now: float) -> None:
        if self.observer is None:
            return
        try:
            if state.first_token is None:
                state.first_token = now
                self.observer.first_token(state.request, now - state.arrived)
            else:
                self.observer.token_gap(state.request, now - state.last_token)
        except Exception:  # noqa: BLE001 - metrics never fail a request
            pass
        state.last_token = now

    # --- events ---

    def _send(self, state: _State, event: Event) -> bool:
        """Hand a delta to the consumer; a consumer that raises gets a final error instead (False)."""
        try:
            state.request.notify(event)
            return True
        except Exception as exc:  # noqa: BLE001
            self._fail([state], exc, "notify")
            return False

    def _finish(self, state: _State, event: Event) -> None:
        """The one final event of a request (later calls do nothing); its row leaves at the next removal."""
        if state.done:
            return
        state.done = True
        with self._cond:
            self._live.pop(state.request.id, None)
            self.scheduler.finished(state.request)
        try:
            state.request.notify(event)
        except Exception as exc:  # noqa: BLE001 - tell it once more, as an error; then it is on its own
            if event.finish_reason != "error":
                try:
                    state.request.notify(state.output.final("error", _describe(exc), "notify"))
                except Exception:  # noqa: BLE001
                    pass
        if self.observer is not None:
            try:
                self.observer.finished(state.request, event)
            except Exception:  # noqa: BLE001
                pass

    def _fail(self, states: list[_State], exc: BaseException, kind: str) -> None:
        self.stats["errors"] += sum(not s.done for s in states)
        for state in states:
            self._finish(state, state.output.final("error", _describe(exc), kind))

    def _remove_done(self) -> None:
        rows = self.runner.rows
        gone = [rid for rid in rows if rid not in self._live or self._live[rid].done]
        if gone:
            self.runner.remove(gone)

    def _cached_tokens(self, request: Request) -> int:
        return self.runner.chunked_done(request.id) or self.runner.cached_tokens(request.adapter, request.prompt_ids)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_to_completion(engine: Engine, request_args: dict, timeout: float = 120.0) -> tuple[str, Event, list[str]]:
    """Submit one request and wait: (text, final event, deltas). For tests and scripts, not the server."""
    done = threading.Event()
    deltas: list[str] = []
    final: list[Event] = []

    def notify(event: Event) -> None:
        if event.text:
            deltas.append(event.text)
        if event.finish_reason is not None:
            final.append(event)
            done.set()

    engine.submit(Request(notify=notify, **request_args))
    if not done.wait(timeout):
        raise TimeoutError("request did not finish")
    return "".join(deltas), final[0], deltas
