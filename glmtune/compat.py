"""The one place that uses private transformers / torch names, so an upgrade is checked here.

Each function wraps one private attribute, method or operator that glmtune relies on, with a comment
on why the public API does not do the job. A transformers or torch upgrade that renames one of them
breaks here (and in tests/test_compat.py), not somewhere deep in a training run.
"""

from __future__ import annotations

# --- modeling: gradient checkpointing with the prefix cache (harden) -----------------------------------
# transformers' GradientCheckpointingLayer drops the `cache` argument under checkpointing unless the layer
# declares `_can_checkpoint_with_cache`; there is no public switch (5.24, 5.25). glmtune's prefix reaches
# every layer through a read-only cache (glmtune.model.prefix.PrefixKV), so it must stay.
CHECKPOINT_WITH_CACHE = "_can_checkpoint_with_cache"


def allow_checkpointing_with_cache(layer) -> None:
    """Let a checkpointed decoder layer keep its cache argument (see the comment above)."""
    if not hasattr(layer, CHECKPOINT_WITH_CACHE):
        raise RuntimeError(f"transformers {_transformers_version()} has no {CHECKPOINT_WITH_CACHE} on "
                           f"{type(layer).__name__}: gradient checkpointing would drop the P-tuning prefix")
    setattr(layer, CHECKPOINT_WITH_CACHE, True)


def checkpointing_layer_reads_cache_flag() -> bool:
    """Whether the installed transformers still consults the flag (what tests/test_hardening.py checks)."""
    import inspect

    from transformers.modeling_layers import GradientCheckpointingLayer

    return (hasattr(GradientCheckpointingLayer, CHECKPOINT_WITH_CACHE)
            and f"self.{CHECKPOINT_WITH_CACHE}" in inspect.getsource(GradientCheckpointingLayer))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --- quantization: nn.Module hooks QuantizedLinear overrides (harden; checked here, overridden there) -----
# torch has no public way to change how a module's tensors are saved, loaded or moved; QuantizedLinear
# overrides these private nn.Module methods (keeping the official layout on disk and the kernel layout in
# memory), so an upgrade that renames one would silently bypass it. tests/test_hardening.py checks them.
TORCH_MODULE_HOOKS = ("_save_to_state_dict", "_load_from_state_dict", "_apply")


def missing_private_names() -> list[str]:
    """Private transformers / torch names glmtune relies on that the installed versions lack ([] = all there)."""
    import torch

    missing = [f"torch.nn.Module.{name}" for name in TORCH_MODULE_HOOKS if not hasattr(torch.nn.Module, name)]
    if not checkpointing_layer_reads_cache_flag():
        missing.append(f"transformers GradientCheckpointingLayer.{CHECKPOINT_WITH_CACHE}")
    if not hasattr(torch.ops.mkldnn, ONEDNN_LINEAR_OP):  # glmtune.model.cpu_linear falls back to F.linear, 2-3x slower
        missing.append(f"torch.ops.mkldnn.{ONEDNN_LINEAR_OP}")
    return missing

from typing import Any

# --- tokenizer (glmtune.families.tokenizer: the ChatGLM2/ChatGLM3 Python-backend tokenizers) ----------------
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


# --- quantized CPU kernels (glmtune.model.qkernels) ----------------------------------------------------
# torch has no public weight-only int4/int8 matmul for CPU: these aten operators (used by torchao and
# gpt-fast) are the only vectorised ones. Imported lazily: `glmtune --help` must not import torch.

INT4_MM_OP = "_weight_int4pack_mm_for_cpu"
INT8_MM_OP = "_weight_int8pack_mm"
INT4_PACK_OP = "_convert_weight_to_int4pack_for_cpu"
QUANTIZED_CPU_OPS = (INT4_MM_OP, INT8_MM_OP, INT4_PACK_OP)


_OPS: dict = {}


def _aten(name: str, namespace: str = "aten"):
    # Looked up once: a 6B decoding step calls these 168 times, and the lookup costs as much as a
    # small kernel call.
    op = _OPS.get((namespace, name))
    if op is None:
        import torch

        op = _OPS[namespace, name] = getattr(getattr(torch.ops, namespace), name)
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


# --- fp32 linear layers on CPU (glmtune.model.cpu_linear) ------------------------------------------------
# torch's CPU F.linear in fp32 goes to MKL's sgemm, which on this AMD EPYC runs 2-3x slower than oneDNN
# for the shapes of a model (and does not use the second core for one row). oneDNN's fp32 inner
# product is reachable only through this operator of torch's mkldnn fusion passes (it takes a plain
# dense weight as well as a prepacked one); there is no public switch (`torch.backends.mkldnn` routes
# fp32 matmuls to oneDNN only when allowed to compute them in bf16/tf32). It has no autograd formula.
ONEDNN_LINEAR_OP = "_linear_pointwise"


def onednn_linear(x, weight, bias):
    """F.linear(x, weight, bias) by oneDNN (fp32, CPU, no autograd; any leading dims)."""
    return _aten(ONEDNN_LINEAR_OP, "mkldnn")(x, weight, bias, "none", [], "")


# --- serving: a KV cache built from and read as plain tensors (glmtune.serve.runner) ----------------------
# The serving runner places each row's P-tuning prefix in the cache itself, widens, joins and trims the
# batch's cache between steps, and keeps prompt prefixes for reuse. transformers' `DynamicCache` has no
# public accessor for a layer's tensors: `.layers[i].keys` / `.values` are its (5.x) internal layout, and
# building one from tensors uses its `ddp_cache_data` argument. Both go through here.


def new_dynamic_cache(config=None, layers=None):
    """An empty `DynamicCache` for `config`, or one holding `layers` [(keys, values), ...]."""
    from transformers import DynamicCache

    if layers is not None:
        return DynamicCache(list(layers))
    return DynamicCache(config=config)


def cache_tensors(cache) -> list[tuple]:
    """A `DynamicCache`'s [(keys, values), ...] per layer, each [batch, heads, positions, head_dim] (not copies)."""
    return [(layer.keys, layer.values) for layer in cache.layers]
