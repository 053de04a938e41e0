"""Reading an official ChatGLM2 model folder: its config.json (checked field by field), its weight files
(single or sharded, `.bin` or `.safetensors`) and dtype names.

The lowest layer under `glmtune.model.loading` (which builds the model) and `glmtune.model.quantization` (which
rewrites a folder shard by shard): both read folders through here, so neither imports the other for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from glmtune.errors import GlmtuneError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# config.json fields the model is built from: checked here so a typo is one message naming the field, not a
# traceback from deep inside torch (a string size) or a silent nonsense model (a negative one).
_REQUIRED_SIZES = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size")
_POSITIVE_INT = (int, "a positive integer")
_FIELD_TYPES = {
    **dict.fromkeys(_REQUIRED_SIZES, _POSITIVE_INT),
    **dict.fromkeys(("kv_channels", "multi_query_group_num", "seq_length"), _POSITIVE_INT),
    **dict.fromkeys(("multi_query_attention", "add_qkv_bias"), (bool, "true or false")),
    **dict.fromkeys(("layernorm_epsilon", "rope_ratio"), ((int, float), "a positive number")),
}
# The same checks for GLM-4-0414's config.json, in transformers' own layout (model_type glm4).
_HF_REQUIRED_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
_HF_FIELD_TYPES = {
    **dict.fromkeys(_HF_REQUIRED_SIZES, _POSITIVE_INT),
    **dict.fromkeys(("num_key_value_heads", "head_dim", "max_position_embeddings"), _POSITIVE_INT),
    "attention_bias": (bool, "true or false"),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "partial_rotary_factor"), ((int, float), "a positive number")),
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise GlmtuneError(f"dtype: expected one of {sorted(set(DTYPES))}, found {dtype!r}")
    return DTYPES[dtype]


def read_chatglm_config(path: str | Path) -> dict:
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise GlmtuneError(f"{folder}: no config.json; expected a ChatGLM2 model folder")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GlmtuneError(f"{cfg_file}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(cfg, dict):
        raise GlmtuneError(f"{cfg_file}: expected a JSON object, found {type(cfg).__name__}")
    if cfg.get("model_type") not in ("chatglm", "glm4"):
        raise GlmtuneError(
            f"{cfg_file}: field model_type: expected 'chatglm' (ChatGLM2/3, GLM-4-9B-chat) or 'glm4' "
            f"(GLM-4-0414), found {cfg.get('model_type')!r}"
        )
    hf = cfg["model_type"] == "glm4"
    required, types = (_HF_REQUIRED_SIZES, _HF_FIELD_TYPES) if hf else (_REQUIRED_SIZES, _FIELD_TYPES)
    for field in required:
        if field not in cfg:
            raise GlmtuneError(f"{cfg_file}: field {field} missing")
    for field, (kind, expected) in types.items():
        value = cfg.get(field)
        if value is None and field not in required:
            continue  # optional, and the official configs write null for "not set"
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if ok and kind is not bool:
            ok = value > 0  # sizes, epsilon and rope_ratio alike
        if not ok:
            raise GlmtuneError(f"{cfg_file}: field {field}: expected {expected}, found {value!r}")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder, in the order an HF index lists them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise GlmtuneError(f"{index}: expected an HF index with a weight_map object ({exc!r})") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise GlmtuneError(f"{index}: shard files listed but not found: {missing}")
            return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise GlmtuneError(
        f"{folder}: no weights found (expected pytorch_model.bin, model.safetensors, or a sharded index)"
    )


def iter_shard(path: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, memory_mapped) for each tensor of one weight file, mapped where the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # a truncated or foreign file: one message, whatever the library raised
            raise GlmtuneError(f"{path}: cannot read the weights ({type(exc).__name__}: {exc})") from None
        with handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key), False
    else:
        try:
            try:
                state, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
            except RuntimeError:  # legacy (non-zip) .bin files cannot be memory-mapped
                state, mapped = torch.load(path, map_location="cpu", weights_only=True), False
        except Exception as exc:
            raise GlmtuneError(f"{path}: cannot read the weights ({type(exc).__name__}: {exc})") from None
        for key, tensor in state.items():
            yield key, tensor, mapped
