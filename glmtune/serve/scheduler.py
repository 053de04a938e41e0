"""Decides, each step, what the engine does: which finished, cancelled or timed-out requests leave, which
waiting prompts are prefilled (together, or a long one chunk by chunk) and whether running rows decode.

It holds only request bookkeeping (the waiting queue, the running set, the chunked prefills in flight)
and returns a `Plan`; it touches no tensor, no text and no thread (the engine calls it under its lock).

Prefill budget: while rows are decoding, one step prefills at most `prefill_chunk` prompt tokens, so a
2,000-token prompt arriving while others stream is prefilled over several steps, each followed by their
decode step, instead of freezing them for its whole prefill. With nothing decoding there is no one to
keep waiting, and a prompt goes in whole. A prompt whose start is in the prefix cache, or one longer than
the budget, is prefilled alone (the runner's chunked path); the others together in one forward.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from glmtune.serve.request import Request


class QueueFull(Exception):
    """The waiting queue is at `max_queue`: the client should retry later (HTTP 429)."""


@dataclass
class Plan:
    leave: list[tuple[Request, str]] = field(default_factory=list)  # (request, "cancelled" | "timeout")
    prefill: list[Request] = field(default_factory=list)  # whole prompts, in one forward
    chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, prefill up to this token)
    decode: bool = False  # the running rows take one step

    def __bool__(self) -> bool:
        return bool(self.leave or self.prefill or self.chunks or self.decode)


class Scheduler:
    """`cached_tokens(request)`: prompt tokens the runner already holds for it (a cached start, or chunks done)."""

    def __init__(self, max_batch_size: int = 8, max_queue: int = 256, prefill_chunk: int = 512,
                 cached_tokens: Callable[[Request], int] = lambda r: 0, clock: Callable[[], float] = time.monotonic):
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue = max(0, int(max_queue))
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.cached_tokens, self.clock = cached_tokens, clock
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # decoding rows, by request id
        self.chunking: dict[int, Request] = {}  # prompts part-way through a chunked prefill

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.chunking)

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit is {self.max_queue})")
        self.waiting.append(request)

    def all_requests(self) -> list[Request]:
        return [*self.running.values(), *self.chunking.values(), *self.waiting]

    def joined(self, request: Request) -> None:
        """The request's prompt is prefilled and its row is in the running batch."""
        self.chunking.pop(request.id, None)
        self.running[request.id] = request

    def finished(self, request: Request) -> None:
        """The request got its final event: forget it wherever it is."""
        self.running.pop(request.id, None)
        self.chunking.pop(request.id, None)
        try:
            self.waiting.remove(request)
        except ValueError:
            pass

    def schedule(self) -> Plan:
        plan = Plan()
        now = self.clock()
        for request in self.all_requests():
            if request.cancelled:
                plan.leave.append((request, "cancelled"))
            elif request.deadline is not None and now >= request.deadline:
                plan.leave.append((request, "timeout"))
        for request, _ in plan.leave:
            self.finished(request)
        busy = bool(self.running)
        budget = self.prefill_chunk if busy else float("inf")
        for request in list(self.chunking.values()):  # prompts already part-way go on first
            if budget <= 0:
                break
            done = self.cached_tokens(request)
            end = min(len(request.prompt_ids), done + int(min(budget, len(request.prompt_ids))))
            plan.chunks.append((request, end))
            budget -= end - done
        rows = len(self.running) + len(self.chunking)
        while self.waiting and rows < self.max_batch_size and budget > 0:
            request = self.waiting[0]
            cached = self.cached_tokens(request)
            need = len(request.prompt_ids) - cached
            if cached or need > min(budget, self.prefill_chunk):
                # Alone, chunk by chunk (from its cached start): the rest waits for later steps.
                end = cached + int(min(budget, need))
                plan.chunks.append((request, end))
                self.chunking[request.id] = request
            else:
                plan.prefill.append(request)
            budget -= need
            rows += 1
            self.waiting.popleft()
        plan.decode = busy
        return plan
