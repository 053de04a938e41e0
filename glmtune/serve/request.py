"""What flows between the HTTP layer and the engine: a request's settings, the request, and its events.

No torch and no HTTP here: the scheduler, the output processor and the API all read these.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

# How an answer ended. "error" carries `Event.error` and `Event.error_kind`; "cancelled" is the client's doing
# (or the server stopping before the request could finish).
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Event:
    """What a request's consumer receives: text deltas, then exactly one event with `finish_reason` set.

    The first event comes once the first token is generated (with empty text if it shows none yet).
    """

    text: str = ""
    finish_reason: str | None = None  # one of FINISH_REASONS
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_kind: str | None = None  # "prefill", "forward", "sampling", "detokenize", "notify", "timeout", "shutdown", ...
    token_ids: list[int] = field(default_factory=list)  # the answer's ids (final event only)


_ids = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str
    params: SamplingParams
    notify: Callable[[Event], None]
    # Decoded text -> the text shown: None (raw), or a `glmtune.serve.output.TextRules` (chat post-processing).
    postprocess: object = None
    window: int = 0  # prompt + answer tokens allowed (0: no limit besides max_tokens)
    deadline: float | None = None  # time.monotonic() after which the request ends with a timeout error
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))
