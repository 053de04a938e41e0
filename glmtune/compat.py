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


# --- quantized CPU kernels (glmtune.qkernels) ----------------------------------------------------
# torch has no public weight-only int4/int8 matmul for CPU: these aten operators (used by torchao and
# gpt-fast) are the only vectorised ones. Imported lazily: `glmtune --help` must not import torch.

INT4_MM_OP = "_weight_int4pack_mm_for_cpu"
INT8_MM_OP = "_weight_int8pack_mm"
INT4_PACK_OP = "_convert_weight_to_int4pack_for_cpu"
QUANTIZED_CPU_OPS = (INT4_MM_OP, INT8_MM_OP, INT4_PACK_OP)


_OPS: dict = {}


def _aten(name: str):
    # Looked up once: a 6B decoding step calls these 168 times, and the lookup costs as much as a
    # small kernel call.
    op = _OPS.get(name)
    if op is None:
        import torch

        op = _OPS[name] = getattr(torch.ops.aten, name)
    return op


def int4pack_mm_cpu(x, packed, group_size: int, scales_and_zeros):
    """x [M, K] @ dequantized(packed)^T with torch's CPU int4 layout; scales_and_zeros [K/group, N, 2]."""
    return _aten(INT4_MM_OP)(x, packed, group_size, scales_and_zeros)


def int8pack_mm(x, q, scale):
    """x [M, K] @ (q [N, K] int8 * scale [N])^T."""
    return _aten(INT8_MM_OP)(x, q, scale)


def convert_weight_to_int4pack_cpu(values, inner_k_tiles: int):
    """int32 [N, K] nibbles 0..15 -> torch's CPU int4 layout (uint8 [N, K/2]); used to verify ours."""
    return _aten(INT4_PACK_OP)(values, inner_k_tiles)


def missing_quantized_cpu_ops() -> list[str]:
    """The kernel operators this torch build lacks (then int4/int8 run the exact path only)."""
    import torch

    return [name for name in QUANTIZED_CPU_OPS if not hasattr(torch.ops.aten, name)]
