"""Load and save ChatGLM2 models in the official THUDM/chatglm2-6b layout, with no remote code.

Official checkpoints (`pytorch_model*.bin` or `model*.safetensors`, single or sharded with an HF
index) are renamed onto transformers' native `GlmForCausalLM` (mapping in `official_to_native`).
The model skeleton is built on the meta device and each shard's tensors are converted and placed as
they are read, so peak memory is about one model copy plus one shard. `quantization_bit` in the
folder's config.json (the official int4/int8 releases) or passed by the caller selects the
weight-only quantized linear layers of `glmtune.model.quantization`; a full-precision folder is then
quantized shard by shard while it loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from glmtune.errors import GlmtuneError
from glmtune.families.registry import FAMILY_FIELD, resolve_family
from glmtune.fsutil import atomic_dir
from glmtune.model import glm4
from glmtune.model.adapter import check_checkpoint_fits, read_checkpoint, save_adapter
from glmtune.model.modeling import ChatGLM2ForCausalLM, attention_dims, model_class, model_config
from glmtune.model.prefix import (
    OFFICIAL_PREFIX,
    PrefixConfig,
    load_prefix_state,
    official_prefix_state,
    resolve_prefix_config,
)
# Folder reading lives one layer down (shared with glmtune.model.quantization).
from glmtune.model.weights import iter_shard, parse_dtype, read_chatglm_config, weight_files

logger = logging.getLogger(__name__)

_LAYER = "transformer.encoder.layers."
_SIMPLE = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.gate_up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}
_DROPPED = ("transformer.rotary_pos_emb.inv_freq",)
def resolve_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    """The one `auto` rule of train, eval and chat: CUDA when available; there bf16 where the card
    supports it (safer than fp16 for the prefix's gradients), else fp16; fp32 on CPU."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype in (None, "auto"):
        if torch.device(device).type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return device, dtype


# --- memory-mapped shards ------------------------------------------------------------------------------


def release_pages(tensor: torch.Tensor) -> None:
    """Drop a memory-mapped tensor's resident pages once it has been converted (Linux; else a no-op).

    A memory-mapped shard's pages stay resident, and counted in RSS, until the whole shard is
    unmapped, so converting a 1.8 GB shard of the 6B release would hold all of it next to the growing
    model. torch has no per-tensor unmap, hence madvise(MADV_DONTNEED) on the tensor's whole pages:
    for a private read-only file mapping this only forgets the cached copy; reading the tensor again
    would fault it back in from the file, so it is safe even if something still referenced it.
    """
    global _MADVISE
    if _MADVISE is None:
        try:
            import ctypes
            import mmap

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _MADVISE = (libc.madvise, mmap.PAGESIZE, getattr(mmap, "MADV_DONTNEED", 4))
        except (OSError, AttributeError):
            _MADVISE = False
    if not _MADVISE or tensor.device.type != "cpu":
        return
    madvise, page, dontneed = _MADVISE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        madvise(first, last - first, dontneed)


_MADVISE = None


# --- name mapping ------------------------------------------------------------------------------


def official_to_native(key: str, tensor: torch.Tensor, cfg: dict) -> list[tuple[str, torch.Tensor]]:
    """Native (name, tensor) pairs for one official tensor; [] for dropped ones; KeyError if unknown.
    A GLM-4-0414 folder is already in transformers' layout: its names pass through."""
    if key in _DROPPED:
        return []
    if glm4.is_hf_glm4(cfg):
        return [("prefix_encoder." + key[len(OFFICIAL_PREFIX):] if key.startswith(OFFICIAL_PREFIX) else key, tensor)]
    if key in _SIMPLE:
        return [(_SIMPLE[key], tensor)]
    if key.startswith(OFFICIAL_PREFIX):
        return [("prefix_encoder." + key[len(OFFICIAL_PREFIX):], tensor)]
    if not key.startswith(_LAYER):
        raise KeyError(key)
    idx, rest = key[len(_LAYER):].split(".", 1)
    base = f"model.layers.{idx}."
    if rest.startswith("self_attention.query_key_value."):
        suffix = rest.rsplit(".", 1)[1]  # weight, bias, weight_scale
        heads, groups, kv = attention_dims(cfg)
        sizes = [heads * kv, groups * kv, groups * kv]
        if tensor.shape[0] != sum(sizes):
            raise GlmtuneError(
                f"{key}: shape {tuple(tensor.shape)}, expected {sum(sizes)} rows (q {sizes[0]} | k {sizes[1]} | v {sizes[2]})"
            )
        q, k, v = torch.split(tensor, sizes, dim=0)
        return [(f"{base}self_attn.{n}_proj.{suffix}", t) for n, t in zip("qkv", (q, k, v))]
    for official, native in _LAYER_SIMPLE.items():
        if rest.startswith(official):
            return [(base + native + rest[len(official):], tensor)]
    raise KeyError(key)


def native_to_official(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Inverse of `official_to_native` over a whole (native) state dict; q/k/v are fused again."""
    out: dict[str, torch.Tensor] = {}
    if glm4.is_hf_glm4(cfg):  # GLM-4-0414: transformers' own names are the official ones
        return {(OFFICIAL_PREFIX + k[len("prefix_encoder."):] if k.startswith("prefix_encoder.") else k): v
                for k, v in state.items() if not k.startswith("model.rotary_emb.")}
    inverse_simple = {v: k for k, v in _SIMPLE.items()}
    for name, tensor in state.items():
        if name in inverse_simple:
            out[inverse_simple[name]] = tensor
        elif name.startswith("prefix_encoder."):
            out[OFFICIAL_PREFIX + name[len("prefix_encoder."):]] = tensor
        elif name.startswith("model.layers."):
            idx, rest = name[len("model.layers."):].split(".", 1)
            base = f"{_LAYER}{idx}."
            if rest.startswith("self_attn.q_proj."):
                suffix = rest[len("self_attn.q_proj."):]
                parts = [state[f"model.layers.{idx}.self_attn.{n}_proj.{suffix}"] for n in "qkv"]
                out[f"{base}self_attention.query_key_value.{suffix}"] = torch.cat(parts, dim=0)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            else:
                for official, native in _LAYER_SIMPLE.items():
                    if rest.startswith(native):
                        out[base + official + rest[len(native):]] = tensor
                        break
                else:
                    raise KeyError(name)
        elif name.startswith("model.rotary_emb."):
            continue
        else:
            raise KeyError(name)
    rotary_dim = attention_dims(cfg)[2] // 2
    # Base 10000 whatever `rope_ratio` and family: both official 32k codes keep this buffer as the plain
    # model's and apply rope_ratio in their forward (their released weights hold the base-10000 values).
    out["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (
        10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    )
    return out


# --- loading -----------------------------------------------------------------------------------


def _set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    # Assigning a Parameter (or a tensor to a registered buffer name) replaces the meta placeholder through
    # nn.Module.__setattr__, which keeps a buffer's persistence.
    module_name, leaf = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    if leaf in dict(module.named_parameters(recurse=False)):
        setattr(module, leaf, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(module, leaf, tensor)


def load_model(
    path: str | Path,
    ptuning_checkpoint: str | Path | None = None,
    pre_seq_len: int | None = None,
    prefix_projection: bool | None = None,
    quantization_bit: int | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    family: str | None = None,
) -> ChatGLM2ForCausalLM:
    """Load a ChatGLM2 folder (official layout, or one written by `save_model` / `glmtune merge`).

    The base model is frozen. With `ptuning_checkpoint`, or `pre_seq_len` for a fresh prefix, the
    model carries a trainable prefix encoder (kept in fp32 whatever `dtype`, as the official trainer
    does). `pre_seq_len` / `prefix_projection` default to what the checkpoint or folder says; a
    disagreement is an error naming both values. `family` (`glmtune.families.registry`) overrides the detected one; it
    decides the rope rule and is recorded in what is saved from the model; a checkpoint of another family
    is refused.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise GlmtuneError(f"{folder}: model folder not found")
    cfg = read_chatglm_config(folder)
    cfg[FAMILY_FIELD] = family_name(folder, cfg, family)
    compute_dtype = parse_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GlmtuneError("device 'cuda' requested but torch sees no CUDA device")
    bits = _quantization_bits(folder, cfg, quantization_bit)
    prefix, ckpt_state, source = _prefix_source(folder, cfg, ptuning_checkpoint, pre_seq_len, prefix_projection)

    config = model_config(cfg)
    with torch.device("meta"):
        model = model_class(config)(config, prefix=None)
        if bits:
            from glmtune.model.quantization import replace_linears_with_quantized

            replace_linears_with_quantized(model, bits, compute_dtype)
    folder_prefix = _load_weights(model, folder, cfg, bits, compute_dtype, device)
    if folder_prefix and not cfg.get("pre_seq_len"):
        raise GlmtuneError(f"{folder}: weights hold a prefix encoder but config.json has no pre_seq_len")
    if ptuning_checkpoint is None and cfg.get("pre_seq_len"):
        if not folder_prefix:
            raise GlmtuneError(f"{folder}: config.json has pre_seq_len but the weights hold no prefix encoder")
        ckpt_state = (folder_prefix, None)

    model.chatglm_config = {k: v for k, v in cfg.items() if k not in ("pre_seq_len", "prefix_projection")}
    if bits:
        model.chatglm_config["quantization_bit"] = bits
    _finish(model, config, prefix, ckpt_state, source, device)
    model.source_path = str(folder)
    return model


def family_name(folder: Path, cfg: dict, family: str | None) -> str:
    """The model's family: `family` when given, else GLM-4 when the config says so (glmtune.model.glm4: the
    registry's detection reads tokenizers, and a GLM-4 tokenizer names ChatGLM3's role tokens too), else
    what the registry detects. A recorded family of another model than the config describes is refused."""
    if family is not None:
        name = family if family == glm4.FAMILY else resolve_family(folder, family).name
    elif glm4.is_glm4_config(cfg, FAMILY_FIELD):
        name = glm4.FAMILY
    else:
        name = resolve_family(folder).name
    if glm4.is_hf_glm4(cfg) and name != glm4.FAMILY:
        raise GlmtuneError(f"{folder}/config.json: a GLM-4-0414 model (model_type glm4), but the family is {name}")
    return name


def _quantization_bits(folder: Path, cfg: dict, quantization_bit: int | None) -> int | None:
    """4, 8 or None: what the caller asked for, or what the folder's config.json says (they must agree)."""
    folder_bits = cfg.get("quantization_bit")
    if quantization_bit is not None and quantization_bit not in (4, 8):
        raise GlmtuneError(f"quantization_bit: expected 4 or 8, found {quantization_bit}")
    if folder_bits and quantization_bit and int(folder_bits) != int(quantization_bit):
        raise GlmtuneError(
            f"{folder}/config.json has quantization_bit {folder_bits}, but --quantization-bit {quantization_bit} was passed"
        )
    return int(quantization_bit or folder_bits or 0) or None


def _prefix_source(folder: Path, cfg: dict, ptuning_checkpoint, pre_seq_len, prefix_projection):
    """(PrefixConfig or None, checkpoint state or None, where it came from): from a P-tuning checkpoint,
    from the folder itself (a merged model), or fresh."""
    ckpt_cfg, ckpt_state, source = None, None, ""
    if ptuning_checkpoint is not None:
        ckpt_cfg, ckpt_state, info = read_checkpoint(ptuning_checkpoint)
        source = f"P-tuning checkpoint {ptuning_checkpoint}"
        ckpt_state = (ckpt_state, info)
        if cfg.get("pre_seq_len"):
            logger.warning("warning: %s is a merged model with its own prefix (pre_seq_len %s); --ptuning-checkpoint %s "
                           "replaces it", folder, cfg["pre_seq_len"], ptuning_checkpoint)
    elif cfg.get("pre_seq_len"):
        ckpt_cfg = PrefixConfig(int(cfg["pre_seq_len"]), bool(cfg.get("prefix_projection", False)))
        source = f"{folder}/config.json"
    return resolve_prefix_config(ckpt_cfg, pre_seq_len, prefix_projection, source), ckpt_state, source


def _load_weights(model, folder: Path, cfg: dict, bits, compute_dtype, device) -> dict[str, torch.Tensor]:
    """Convert and place every shard's tensors into the meta-device `model`; return the prefix tensors the
    folder holds (a merged model), keyed relative to the encoder. Every expected weight must appear."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("model.rotary_emb.")}
    seen: set[str] = set()
    folder_prefix: dict[str, torch.Tensor] = {}
    for shard in weight_files(folder):
        for key, tensor, mapped in iter_shard(shard):
            try:
                pairs = official_to_native(key, tensor, cfg)
            except KeyError:
                raise GlmtuneError(f"{shard}: unexpected weight {key!r} (not part of a ChatGLM2 model)") from None
            kept_mapped = False
            for name, value in pairs:
                if name.startswith("prefix_encoder."):
                    folder_prefix[name[len("prefix_encoder."):]] = value.clone()
                else:
                    placed = _place(model, name, value, expected, bits, compute_dtype, device, shard, key)
                    seen.update(placed)
                    kept_mapped |= any(_shares_memory(model, n, tensor) for n in placed)
            if mapped and not kept_mapped:
                release_pages(tensor)  # converted: the mapped original is no longer needed
            del tensor, pairs
    missing = sorted(set(expected) - seen)
    if missing:
        raise GlmtuneError(f"{folder}: missing weights: {missing[:12]}{' ...' if len(missing) > 12 else ''}")
    return folder_prefix


def _shares_memory(model, name: str, source: torch.Tensor) -> bool:
    placed = model.get_submodule(name.rsplit(".", 1)[0])
    placed = getattr(placed, name.rsplit(".", 1)[1])
    lo = source.data_ptr()
    hi = lo + source.numel() * source.element_size()
    return placed.device.type == "cpu" and lo <= placed.data_ptr() < hi


def _place(model, name, value, expected, bits, compute_dtype, device, shard, key) -> list[str]:
    if name not in expected:
        raise GlmtuneError(f"{shard}: unexpected weight {key!r} (maps to {name!r}, which this model does not have)")
    target = expected[name]
    if bits and name.endswith(".weight") and target.dtype == torch.int8 and value.dtype != torch.int8:
        # A full-precision folder loaded with --quantization-bit: quantize this tensor now, so the
        # full-precision model never exists in memory.
        from glmtune.model.quantization import quantize_weight

        # In the checkpoint's own dtype: the official scheme's arithmetic depends on it (see quantize_weight).
        value, scale = quantize_weight(value, bits)
        _check_shape(name, value, target, shard, key)
        _set_tensor(model, name + "_scale", scale.to(device))
        _set_tensor(model, name, value.to(device))
        return [name, name + "_scale"]
    _check_shape(name, value, target, shard, key)
    if bits and value.is_floating_point() and not name.endswith("_scale"):
        # The official quantized model keeps its unquantized tensors (embeddings, norms, biases, output
        # layer) in half precision; round them the same way so quantizing at load equals loading the
        # official quantized release.
        value = value.to(torch.float16)
    if value.is_floating_point():
        # Quantization scales keep their fp16 storage; everything else computes in the chosen dtype.
        keep = target.dtype if target.dtype == torch.float16 and name.endswith("_scale") else compute_dtype
        value = value.to(dtype=keep)
    _set_tensor(model, name, value.to(device).contiguous())
    return [name]


def _check_shape(name, value, target, shard, key) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise GlmtuneError(
            f"{shard}: {key}: shape {tuple(value.shape)} in the checkpoint, the config expects {tuple(target.shape)}"
            + (f" (as {name})" if name != key else "")
        )


def _finish(model, config, prefix, ckpt_state, source, device) -> None:
    # Non-persistent buffers (rotary inverse frequencies) were created on the meta device: build the
    # model's own rotary class again for real (its class, so no internal transformers module path).
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    model.prefix_config = prefix
    if prefix is not None:
        model.prefix_encoder = model.make_prefix_encoder(prefix).to(device)
        state, info = ckpt_state or (None, None)
        if info is not None:
            check_checkpoint_fits(info, model, source)
        if state:
            load_prefix_state(model.prefix_encoder, state, source or "prefix")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("prefix_encoder."))
    model.eval()


def find_tokenizer(*folders: str | Path | None, family: str | None = None):
    """The tokenizer of the first folder holding `tokenizer.model` (model folder, then checkpoint);
    its family is `family`, else detected from the first folder (the model's)."""
    from glmtune.families.registry import resolve_family
    from glmtune.families.family import TOKENIZER_FILE
    from glmtune.families.tokenizer import load_tokenizer

    candidates = [Path(f) for f in folders if f is not None]
    for folder in candidates:
        if not folder.is_dir():
            raise GlmtuneError(f"{folder}: folder not found")
    family = resolve_family(candidates[0], family).name if candidates else family
    for folder in candidates:
        if (folder / TOKENIZER_FILE).is_file():
            return load_tokenizer(folder, family=family)
    raise GlmtuneError(
        f"no {TOKENIZER_FILE} in {' or '.join(map(str, candidates))}: the tokenizer of ChatGLM2 is needed "
        "(copy it from the base model folder)"
    )


# --- saving ------------------------------------------------------------------------------------


def save_model(
    model: ChatGLM2ForCausalLM,
    out_dir: str | Path,
    *,
    include_prefix: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: str | torch.dtype | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as an official-layout folder: sharded `model-0000N-of-0000M.safetensors` + index.

    The folder is written next to `out_dir` and renamed into place, so a failure never leaves a
    half-written model. With a prefix and `include_prefix`, config.json carries `pre_seq_len` and
    `prefix_projection` and the weights carry `transformer.prefix_encoder.*`. An existing non-empty
    `out_dir` is refused unless `overwrite` (then it is replaced whole, once the new folder is complete).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GlmtuneError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GlmtuneError(f"{out}: folder exists and is not empty; pass overwrite=True to replace it")
    save_dtype = parse_dtype(dtype) if dtype is not None else None
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.rotary_emb.")}
    if not include_prefix:
        state = {k: v for k, v in state.items() if not k.startswith("prefix_encoder.")}
    official = native_to_official(state, model.chatglm_config)
    cfg = dict(model.chatglm_config)
    if model.prefix_config is not None and include_prefix:
        cfg["pre_seq_len"] = model.prefix_config.pre_seq_len
        cfg["prefix_projection"] = model.prefix_config.prefix_projection

    with atomic_dir(out) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, tensor in official.items():
            t = tensor.detach()
            if save_dtype is not None and t.is_floating_point() and not key.startswith(OFFICIAL_PREFIX) \
                    and not key.endswith("_scale") and key != "transformer.rotary_pos_emb.inv_freq":
                t = t.to(save_dtype)
            t = t.contiguous().cpu()
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = t
            size += nbytes
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        if save_dtype is not None:
            cfg["torch_dtype"] = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[save_dtype]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def save_prefix_checkpoint(model: ChatGLM2ForCausalLM, out_dir: str | Path) -> None:
    """The prefix alone in its family's official P-tuning layout: for ChatGLM2/3 `pytorch_model.bin` +
    `model.safetensors` + config.json with pre_seq_len / prefix_projection; for GLM-4 a PEFT adapter folder
    (glmtune.model.adapter). Writes into an existing folder; the caller (the trainer) makes the folder itself
    appear atomically."""
    from safetensors.torch import save_file

    if model.prefix_encoder is None:
        raise GlmtuneError("the model has no prefix to save")
    out = Path(out_dir)
    if model.chatglm_config.get(FAMILY_FIELD) == glm4.FAMILY:
        save_adapter(model, out, base_model_name_or_path=getattr(model, "source_path", None))
        return
    state = official_prefix_state(model.prefix_encoder)
    torch.save(state, out / "pytorch_model.bin")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(model.chatglm_config)
    cfg.pop("quantization_bit", None)
    cfg["pre_seq_len"] = model.prefix_config.pre_seq_len
    cfg["prefix_projection"] = model.prefix_config.prefix_projection
    (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
