"""The one place that uses private transformers / torch names, so an upgrade is checked here.

Each function wraps one private attribute, method or operator that glmtune relies on, with a comment
on why the public API does not do the job. A transformers or torch upgrade that renames one of them
breaks here (and in tests/test_compat.py), not somewhere deep in a training run.
"""

from __future__ import annotations

from typing import Any

# --- tokenizer (glmtune.tokenizer: the ChatGLM2/ChatGLM3 Python-backend tokenizers) ----------------
#
# transformers 5's `PreTrainedTokenizer` (the Python backend) keeps its added-token tables and special-token
# map in private attributes and has no public, non-copying accessor for them: `added_tokens_encoder` (public)
# rebuilds and sorts a dict on every access, which the per-text fast path cannot afford. glmtune's tokenizer
# also overrides the backend's hooks `_tokenize`, `_convert_token_to_id`, `_convert_id_to_token`, `_decode`,
# `_encode_plus` and `_pad`; `TOKENIZER_HOOKS` names them so tests/test_compat_tokenizer.py checks they exist.

TOKENIZER_HOOKS = ("_tokenize", "_convert_token_to_id", "_convert_id_to_token", "_decode", "_encode_plus", "_pad")


def seed_added_tokens(tokenizer: Any, decoder: dict) -> None:
    """Pre-register added tokens before `PreTrainedTokenizer.__init__` (which reads this attribute if set)."""
    tokenizer._added_tokens_decoder = decoder


def added_tokens_encoder(tokenizer: Any) -> dict[str, int]:
    """The live {content: id} table of added tokens (not a copy)."""
    return tokenizer._added_tokens_encoder


def added_tokens_decoder(tokenizer: Any) -> dict:
    """The live {id: AddedToken} table of added tokens (not a copy)."""
    return tokenizer._added_tokens_decoder


def special_tokens_state(tokenizer: Any) -> tuple[dict, list]:
    """(special token map, extra special tokens) as stored; they change when special tokens are set."""
    return tokenizer._special_tokens_map, tokenizer._extra_special_tokens


def stored_pad_token(tokenizer: Any) -> Any:
    """The pad token as stored, without the base class's `__getattr__` (several µs a read)."""
    return tokenizer.__dict__.get("_special_tokens_map", {}).get("pad_token")


def warn_if_too_long(tokenizer: Any, ids: list[int]) -> None:
    """The over-long-sequence warning `prepare_for_model` gives, for ids built without it."""
    tokenizer._eventual_warn_about_too_long_sequence(ids, None, True)
