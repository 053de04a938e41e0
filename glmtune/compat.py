"""The one place that uses private transformers / torch names, so an upgrade is checked here.

Each function or mixin wraps one private attribute, method, operator or behaviour that glmtune relies on, with a
comment on why the public API does not do the job. `missing_private_names` asks the installed versions for all
of them; a transformers or torch upgrade that renames one breaks there (tests/test_hardening.py,
tests/test_compat_tokenizer.py, tests/test_quantization.py), not somewhere deep in a training run. Nothing here
imports torch or transformers at import time: the tokenizer imports this module and must stay torch-free.
"""

from __future__ import annotations

from typing import Any

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


# --- quantization: the nn.Module hooks QuantizedLinear needs (glmtune.model.quantization) -------------------
# torch has no public way to change how a module's tensors are saved, loaded or moved; QuantizedLinear keeps
# the official layout on disk and the kernel layout in memory through these private nn.Module methods. The
# mixin below is the only code that overrides them; an upgrade that renamed one would silently bypass it,
# which `missing_private_names` reports instead.
TORCH_MODULE_HOOKS = ("_save_to_state_dict", "_load_from_state_dict", "_apply")


class ModuleStateHooks:
    """Mixin, listed before `nn.Module`: saving, loading and tensor moves go through `save_state`, `load_state`
    and `apply_to_tensors`, which a subclass overrides (calling `super()` for torch's own behaviour)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.save_state(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.load_state(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        return self.apply_to_tensors(fn, recurse)

    def save_state(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def load_state(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def apply_to_tensors(self, fn, recurse=True):
        return super()._apply(fn, recurse)


def missing_private_names() -> list[str]:
    """Private transformers / torch names glmtune relies on that the installed versions lack ([] = all there)."""
    import torch
    from transformers import PreTrainedTokenizer

    missing = [f"torch.nn.Module.{name}" for name in TORCH_MODULE_HOOKS if not hasattr(torch.nn.Module, name)]
    missing += [f"transformers PreTrainedTokenizer.{name}" for name in TOKENIZER_HOOKS + TOKENIZER_STATE_METHODS
                if not callable(getattr(PreTrainedTokenizer, name, None))]
    if not checkpointing_layer_reads_cache_flag():
        missing.append(f"transformers GradientCheckpointingLayer.{CHECKPOINT_WITH_CACHE}")
    if not hasattr(torch.ops.mkldnn, ONEDNN_LINEAR_OP):  # glmtune.model.cpu_linear falls back to F.linear, 2-3x slower
        missing.append(f"torch.ops.mkldnn.{ONEDNN_LINEAR_OP}")
    try:
        _trie()
    except ImportError:
        missing.append("transformers.tokenization_python.Trie")
    try:
        _length_grouped_indices()
    except ImportError:
        missing.append("transformers.trainer_pt_utils.get_length_grouped_indices")
    if not ready_mask_passes_through():
        missing.append("transformers create_causal_mask returning a ready 4-D mask as it is")
    return missing


# --- tokenizer (glmtune.families: the ChatGLM2/ChatGLM3 Python-backend tokenizers) -------------------------
#
# transformers 5's `PreTrainedTokenizer` (the Python backend) is customised by overriding private hooks: there is
# no public way to give it a SentencePiece vocabulary with ChatGLM's command tokens. `TokenizerHooks` is the only
# code that overrides them, and hands each to a method glmtune names. The backend also keeps its added-token
# tables and special-token map in private attributes with no public, non-copying accessor: `added_tokens_encoder`
# (public) rebuilds and sorts a dict on every access, which the per-text fast path cannot afford.

TOKENIZER_HOOKS = ("_tokenize", "_convert_token_to_id", "_convert_id_to_token", "_decode", "_encode_plus", "_pad")
TOKENIZER_STATE_METHODS = ("_eventual_warn_about_too_long_sequence",)


class TokenizerHooks:
    """Mixin, listed before `PreTrainedTokenizer`: the backend's hooks call methods glmtune names.

    A subclass defines `text_pieces(text)` (SentencePiece pieces of plain text), `piece_id(piece)`,
    `id_piece(index)` and `decode_ids(ids, skip_special_tokens)`, and may override `encode_single` (one text or
    pair to a BatchEncoding) and `pad_single` (one encoding padded), calling `super()` for the backend's own.
    """

    def _tokenize(self, text, **kwargs):
        return self.text_pieces(text)

    def _convert_token_to_id(self, token):
        return self.piece_id(token)

    def _convert_id_to_token(self, index):
        return self.id_piece(index)

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        return self.decode_ids(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def _encode_plus(self, *args, **kwargs):
        return self.encode_single(*args, **kwargs)

    def _pad(self, *args, **kwargs):
        return self.pad_single(*args, **kwargs)

    def encode_single(self, *args, **kwargs):
        return super()._encode_plus(*args, **kwargs)

    def pad_single(self, *args, **kwargs):
        return super()._pad(*args, **kwargs)


def _trie():
    # transformers' Trie (what its tokenizers use to split added tokens out of text) lives in the Python
    # backend's module and is not exported at the top level.
    from transformers.tokenization_python import Trie

    return Trie


def split_around(text: str, tokens) -> list[str]:
    """`text` cut before and after each occurrence of one of `tokens` (longest match first), as transformers'
    tokenizers split added tokens out of text; the chunks joined give `text` back."""
    trie = _trie()()
    for token in tokens:
        trie.add(token)
    return trie.split(text)


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


# --- training data order (glmtune.train.data) ------------------------------------------------------------------
# `--group-by-length` orders an epoch exactly as transformers' LengthGroupedSampler does; the function behind it is
# importable only from `transformers.trainer_pt_utils`, a module of Trainer internals (no top-level export).


def _length_grouped_indices():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return get_length_grouped_indices


def length_grouped_order(lengths: list[int], batch_size: int, generator) -> list[int]:
    """Indices of `lengths` in transformers' `group_by_length` order (mega-batches sorted by length, the
    longest batch first), drawn with `generator`."""
    return list(_length_grouped_indices()(lengths, batch_size, generator=generator))


# --- the ready 4-D attention mask (glmtune.model.modeling) ------------------------------------------------------
# ChatGLM2's mask (every real token sees the whole prefix, causal among real tokens, left padding masked) is not
# what transformers derives from a 2-D mask and the cache length: it would count the prefix as positions. So the
# model passes a ready additive [B, 1, q, kv] mask. `create_causal_mask` documents that such a mask "is returned
# as-is", but that is an early exit in its private `_preprocess_mask_arguments`; `ready_mask_passes_through` checks
# the installed transformers still takes it.


def ready_attention_mask(allowed, dtype):
    """[B, q, kv] bool (True = may attend) -> the additive [B, 1, q, kv] mask transformers passes on untouched."""
    import torch

    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    # finfo.min rather than -inf: a fully padded query row then stays finite instead of NaN.
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def ready_mask_passes_through() -> bool:
    """Whether transformers' causal-mask builder returns a ready 4-D mask unchanged (what the model relies on)."""
    import torch
    from transformers import GlmConfig
    from transformers.masking_utils import create_causal_mask

    config = GlmConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                       attn_implementation="sdpa")
    allowed = torch.tensor([[[True, True, False], [True, False, True]]])
    mask = ready_attention_mask(allowed, torch.float32)
    got = create_causal_mask(config=config, inputs_embeds=torch.zeros(1, 2, 8), attention_mask=mask, cache=None)
    return got is mask


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
