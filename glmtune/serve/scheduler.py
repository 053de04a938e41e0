"""Continuous batching with one P-tuning prefix per row, on the model's forward and a DynamicCache.

Why not `generate`: it runs a fixed batch to the end. Here requests that arrive while others are
decoding are prefilled together (a request alone: exactly what `glmtune chat` computes) and join the
running batch before the next step; a row that finishes, or whose client went away, leaves it.

Cache layout, per layer [rows, groups, slots + real, kv_channels]:

    | prefix block (slots)           | real tokens (left-padded)         |
    | row 0:  . . P P P P            | . . t t t t t t                   |
    | row 1:  P P P P P P            | t t t t t t t t                   |
    | row 2:  . . . . . .  (base)    | . . . . t t t t                   |

Each row's prefix is right-aligned in the shared block and the unused slots are masked for that row
(`prefix_mask`); real tokens are left-padded (`real_mask`) and keep position ids counted from 0 per
row. Prefix keys carry no rotary embedding, so where a prefix sits in the block does not matter.
Masked slots get weight exp(finfo.min) = 0 in softmax: a row's logits do not depend on its neighbours
beyond float rounding, and its greedy tokens equal decoding it alone (tested).

All model work happens on one scheduler thread; `submit` and `cancel` are thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from glmtune.inference.chat import INVALID_SCORE_TOKEN

# --- requests and events -------------------------------------------------------------------------


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What a request's consumer receives: text deltas, then one event with `finish_reason` set.

    The first event comes once the first token is generated (with empty text if it shows none yet).
    """

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)  # the answer's ids (final event only)


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str
    params: SamplingParams
    notify: Callable[[Event], None]
    # Decoded ids -> the text shown (chat applies the official post-processing; raw completions none).
    postprocess: Callable[[str], str] = lambda s: s
    window: int = 0  # prompt + answer tokens allowed (0: no limit besides max_tokens)
    cancelled: bool = False


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text already handed to the consumer
    real: int = 0  # real tokens in the cache for this row
    done: bool = False  # final event sent; leaves the batch before the next step


class Handle:
    """Returned by `submit`: cancel it when the client goes away."""

    def __init__(self, request: Request, scheduler: "Scheduler"):
        self._request, self._scheduler = request, scheduler

    def cancel(self) -> None:
        self._request.cancelled = True
        self._scheduler._wake()


# --- text ----------------------------------------------------------------------------------------


def _apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut `text` at the first stop string, if any."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _safe_length(text: str, stop: tuple[str, ...]) -> int:
    """How much of `text` can be sent now: hold back a trailing partial character (U+FFFD until its
    other bytes arrive) and a tail that may be the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


# --- the scheduler -------------------------------------------------------------------------------


class Scheduler:
    """Owns the model on one thread; `adapters` maps a served id to its prefix (`glmtune.serve.models`)."""

    def __init__(self, model, tokenizer, adapters: dict, stop_ids, max_batch_size: int = 8):
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.stop_ids = frozenset(stop_ids)
        self.max_batch_size = max(1, int(max_batch_size))
        self.device = model.device
        self.dtype = model.compute_dtype
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._prefix_mask: torch.Tensor | None = None  # [rows, slots] bool
        self._real_mask: torch.Tensor | None = None  # [rows, real] long
        self._stop = False
        self._thread: threading.Thread | None = None
        # Counters for /health, tests and the benchmark.
        self.stats = {"steps": 0, "max_batch": 0, "joined_running": 0, "mixed_steps": 0, "finished": 0,
                      "cancelled": 0, "errors": 0, "prefill_seconds": 0.0, "step_seconds": 0.0}

    # --- public, any thread ---

    def start(self) -> "Scheduler":
        """Run the loop on a new thread (tests, scripts). `glmtune serve` runs it on the main thread: `run`."""
        self._thread = threading.Thread(target=self.run, name="glmtune-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> Handle:
        if request.adapter not in self.adapters:
            raise KeyError(request.adapter)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify_all()
        return Handle(request, self)

    @property
    def active_rows(self) -> int:
        """Rows still generating (a finished row leaves the batch right after its final event)."""
        return sum(not row.done for row in list(self._rows))

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- the loop, scheduler thread only ---

    def run(self, keep_running: Callable[[], bool] = lambda: True) -> None:
        """The decode loop, on the calling thread, until `close()` or until `keep_running()` is false.

        `glmtune serve` calls this on the main thread, the thread that loaded the model, and runs HTTP on
        another one. Measured (bench/serve.py shapes, torch 2.13 with GNU OpenMP, 2 cores): once one
        thread has run parallel torch ops, the same model steps run on a second thread take ~25% longer
        (1 row 23-29 vs 18-20 ms, 8 rows 42-49 vs 32-36 ms), as if the two threads' OpenMP teams
        competed for the cores; one thread doing all model work avoids it.
        """
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self._rows and keep_running():
                        self._cond.wait(timeout=0.5)
                    if self._stop or not keep_running():
                        break
                try:
                    self._admit()
                    self._drop_done()
                    if self._rows:
                        self._step()
                        self._drop_done()
                except Exception as exc:  # keep serving: fail the rows in flight, not the server
                    self.stats["errors"] += 1
                    for row in self._rows:
                        row.request.notify(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
                    self._rows, self._cache = [], None
        for row in self._rows:
            row.request.notify(Event(finish_reason="cancelled"))

    def _admit(self) -> None:
        """Prefill the waiting requests that fit, together, and merge them into the running batch."""
        joiners: list[Request] = []
        with self._cond:
            while self._waiting and len(self._rows) + len(joiners) < self.max_batch_size:
                joiners.append(self._waiting.popleft())
        for request in [r for r in joiners if r.cancelled]:
            self.stats["cancelled"] += 1
            request.notify(Event(finish_reason="cancelled"))
        joiners = [r for r in joiners if not r.cancelled]
        if not joiners:
            return
        started = time.perf_counter()
        try:
            rows, cache, prefix_mask, real_mask = self._prefill(joiners)
        except Exception as exc:
            self.stats["errors"] += 1
            for request in joiners:
                request.notify(Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
            return
        self.stats["prefill_seconds"] += time.perf_counter() - started
        self.stats["joined_running"] += len(joiners) if self._rows else 0
        for row in rows:
            self._finish_if_done(row)  # a one-token answer is done here; `_drop_done` removes it
        self._merge(rows, cache, prefix_mask, real_mask)

    def _prefill(self, requests: list[Request]):
        """One forward over the new prompts (left-padded), each after its own prefix; their first tokens.

        Same layout as the running batch, so the result merges into it. A request alone is exactly
        what `glmtune chat` computes (no padding); together, rows differ from alone only by rounding.
        """
        adapters = [self.adapters[r.adapter] for r in requests]
        n, slots = len(requests), max(a.pre_seq_len for a in adapters)
        width = max(len(r.prompt_ids) for r in requests)
        prefix_mask = torch.zeros(n, slots, dtype=torch.bool, device=self.device)
        real_mask = torch.zeros(n, width, dtype=torch.long, device=self.device)
        ids = torch.zeros(n, width, dtype=torch.long, device=self.device)  # 0 under the mask: any id would do
        for j, (request, adapter) in enumerate(zip(requests, adapters)):
            prefix_mask[j, slots - adapter.pre_seq_len:] = True
            real_mask[j, width - len(request.prompt_ids):] = 1
            ids[j, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, device=self.device)
        cache = DynamicCache(config=self.model.config)
        if slots:
            config = self.model.config
            shape = (n, config.num_key_value_heads, slots, config.head_dim)
            for layer in range(config.num_hidden_layers):
                keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
                values = torch.zeros_like(keys)
                for j, adapter in enumerate(adapters):
                    if adapter.kv is not None:
                        keys[j, :, slots - adapter.pre_seq_len:] = adapter.kv[layer][0][0]
                        values[j, :, slots - adapter.pre_seq_len:] = adapter.kv[layer][1][0]
                cache.update(keys, values, layer)
        out = self.model(input_ids=ids, attention_mask=real_mask, cache=cache, use_cache=True,
                         prefix_mask=prefix_mask, logits_to_keep=1)
        rows = []
        for j, request in enumerate(requests):
            generator = None
            if request.params.temperature > 0:
                seed = request.params.seed
                generator = torch.Generator(device=self.device)
                generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,)).item()))
            rows.append(_Row(request, generator, real=len(request.prompt_ids)))
        self._take_all(rows, out.logits[:, -1])
        return rows, out.cache, prefix_mask, real_mask

    def _merge(self, rows: list[_Row], cache: DynamicCache, prefix_mask: torch.Tensor, real_mask: torch.Tensor) -> None:
        """Add prefilled rows to the batch, widening the prefix block and the real block as needed."""
        if not self._rows:
            self._rows, self._cache, self._prefix_mask, self._real_mask = rows, cache, prefix_mask, real_mask
            return
        old_slots, old_real = self._prefix_mask.shape[1], self._real_mask.shape[1]
        add_slots, add_real = prefix_mask.shape[1], real_mask.shape[1]
        new_slots, new_real = max(old_slots, add_slots), max(old_real, add_real)

        def widen(t: torch.Tensor, have_slots: int, have_real: int) -> torch.Tensor:
            pre, real = t[:, :, :have_slots], t[:, :, have_slots:]
            return torch.cat([F.pad(pre, (0, 0, new_slots - have_slots, 0)),
                              F.pad(real, (0, 0, new_real - have_real, 0))], dim=2)

        layers = []
        for old_layer, add_layer in zip(self._cache.layers, cache.layers):
            layers.append(tuple(
                torch.cat([widen(a, old_slots, old_real), widen(b, add_slots, add_real)], dim=0)
                for a, b in ((old_layer.keys, add_layer.keys), (old_layer.values, add_layer.values))
            ))
        self._cache = DynamicCache(layers)
        self._prefix_mask = torch.cat([F.pad(self._prefix_mask, (new_slots - old_slots, 0)),
                                       F.pad(prefix_mask, (new_slots - add_slots, 0))])
        self._real_mask = torch.cat([F.pad(self._real_mask, (new_real - old_real, 0)),
                                     F.pad(real_mask, (new_real - add_real, 0))])
        self._rows = self._rows + rows

    def _step(self) -> None:
        """One decode step for every row in the batch."""
        rows = self._rows
        started = time.perf_counter()
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
        if len({r.request.adapter for r in rows}) > 1:
            self.stats["mixed_steps"] += 1
        ids = torch.tensor([[r.ids[-1]] for r in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self._real_mask, self._real_mask.new_ones(len(rows), 1)], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, cache=self._cache, use_cache=True,
                         prefix_mask=self._prefix_mask, logits_to_keep=1)
        self._real_mask = mask
        self._take_all(rows, out.logits[:, -1])
        for row in rows:
            row.real += 1
            self._finish_if_done(row)
        self.stats["step_seconds"] += time.perf_counter() - started

    def _take_all(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick every row's next token from the batch's logits [rows, vocab].

        The checks and the greedy choice run once over the batch, not once per row: per row they were
        five full passes over the vocabulary (`isfinite`) plus an `argmax`, 8 x 6 small parallel ops a
        step, a third of an 8-row step on a busy 2-core machine (issue: serve throughput). A row's sum
        is finite only if all its logits are (an inf or NaN makes it inf or NaN), so one reduction
        clears the usual case and only a row whose sum is not finite gets the exact per-element test.
        """
        scores = logits.float()
        sum_finite = torch.isfinite(scores.sum(-1)).tolist()
        greedy = scores.argmax(-1).tolist() if any(r.request.params.temperature <= 0 for r in rows) else None
        for i, row in enumerate(rows):
            finite = sum_finite[i] or bool(torch.isfinite(scores[i]).all())
            if finite and row.request.params.temperature <= 0:
                row.ids.append(int(greedy[i]))  # argmax of the row alone: same values, same first maximum
            else:
                self._take(row, scores[i:i + 1], finite)

    def _take(self, row: _Row, logits: torch.Tensor, finite: bool | None = None) -> None:
        """Pick the row's next token from its logits [1, vocab] and record it."""
        scores = logits.float()
        if finite is None:
            finite = bool(torch.isfinite(scores).all())
        if not finite:  # the official guard (see chat.InvalidScoreLogitsProcessor)
            scores = torch.zeros_like(scores)
            scores[..., INVALID_SCORE_TOKEN] = 5e4
        p = row.request.params
        if p.temperature <= 0:
            token = int(scores.argmax(-1).item())
        else:
            scores = scores / p.temperature
            if p.top_k > 0:
                kth = torch.topk(scores, min(p.top_k, scores.shape[-1])).values[..., -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=True)
                cumulative = sorted_scores.softmax(-1).cumsum(-1)
                drop = cumulative - sorted_scores.softmax(-1) >= p.top_p  # keep the token that crosses top_p
                scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=row.generator).item())
        row.ids.append(token)

    # --- finishing ---

    def _finish_if_done(self, row: _Row) -> bool:
        """Send the row's new text; True (and the final event sent) when it is done."""
        request = row.request
        if request.cancelled:
            self.stats["cancelled"] += 1
            row.done = True
            request.notify(Event(finish_reason="cancelled"))
            return True
        p = request.params
        ended = row.ids[-1] in self.stop_ids
        ids = row.ids[:-1] if ended else row.ids
        text, hit_stop = _apply_stop(request.postprocess(self.tokenizer.decode(ids)), p.stop)
        reason = None
        if ended or hit_stop:
            reason = "stop"
        elif len(row.ids) >= p.max_tokens or (request.window and len(request.prompt_ids) + len(row.ids) >= request.window):
            reason = "length"
        show = len(text) if reason else _safe_length(text, p.stop)
        if text[:show].startswith(row.sent) and show > len(row.sent):
            request.notify(Event(text=text[len(row.sent):show]))
            row.sent = text[:show]
        elif len(row.ids) == 1 and reason is None:
            request.notify(Event())  # the first token exists even if it shows no text yet
        if reason is None:
            return False
        self.stats["finished"] += 1
        row.done = True
        request.notify(Event(finish_reason=reason, prompt_tokens=len(request.prompt_ids),
                             completion_tokens=len(row.ids), token_ids=list(row.ids)))
        return True

    def _drop_done(self) -> None:
        """Remove rows that finished or whose client went away; drop cache columns no remaining row uses."""
        for row in self._rows:
            if row.request.cancelled and not row.done:
                self.stats["cancelled"] += 1
                row.done = True
                row.request.notify(Event(finish_reason="cancelled"))
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._prefix_mask, self._real_mask = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        prefix_used = self._prefix_mask[index].any(0)
        real_used = self._real_mask[index].bool().any(0)
        columns = torch.cat([prefix_used, real_used]).nonzero().squeeze(1)
        self._cache = DynamicCache([
            (layer.keys[index][:, :, columns], layer.values[index][:, :, columns]) for layer in self._cache.layers
        ])
        self._prefix_mask = self._prefix_mask[index][:, prefix_used]
        self._real_mask = self._real_mask[index][:, real_used]


def run_to_completion(scheduler: Scheduler, request_args: dict, timeout: float = 120.0) -> tuple[str, Event, list[str]]:
    """Submit one request and wait: (text, final event, deltas). For tests and scripts, not the server."""
    done = threading.Event()
    deltas: list[str] = []
    final: list[Event] = []

    def notify(event: Event) -> None:
        if event.finish_reason is None:
            deltas.append(event.text)
        else:
            if event.text:
                deltas.append(event.text)
            final.append(event)
            done.set()

    scheduler.submit(Request(notify=notify, **request_args))
    if not done.wait(timeout):
        raise TimeoutError("request did not finish")
    return "".join(deltas), final[0], deltas


