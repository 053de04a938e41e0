"""What the conversation-format families (ChatGLM3 `conversations`, GLM-4 `messages`) share when tokenizing:
keep the usable rows, tokenize them with the family's batch encoder, and count why rows were skipped."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from glmtune.errors import GlmtuneError


def tokenize_usable_rows(rows: Sequence[dict], skip_reason: Callable[[dict, Any], str | None],
                         encode_batch: Callable, tokenizer: Any, config: Any, mode: str, title: str):
    """The rows `skip_reason` keeps, encoded by `encode_batch(batch, tokenizer, config, mode)` into a `datasets.Dataset`
    (rows travel as JSON text: their nested shapes differ from row to row, which Arrow columns cannot hold)."""
    import datasets

    kept = [row for row in rows if skip_reason(row, config) is None]
    if not kept:
        raise GlmtuneError("no usable row: every row was skipped (see the report's reasons)")
    texts = datasets.Dataset.from_dict({"row": [json.dumps(row, ensure_ascii=False) for row in kept]})
    return texts.map(encode_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "config": config, "mode": mode},
                     remove_columns=["row"], desc=f"tokenizing {title} data ({mode})")


def skip_reasons(rows: Sequence[dict], skip_reason: Callable[[dict, Any], str | None], config: Any) -> dict[str, int]:
    """How many rows were skipped for each reason."""
    reasons: dict[str, int] = {}
    for row in rows:
        reason = skip_reason(row, config)
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons
