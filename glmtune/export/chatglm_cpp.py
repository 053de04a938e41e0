"""`glmtune export --format chatglm.cpp`: a ChatGLM2/ChatGLM3 model (+ P-tuning prefix) as a chatglm.cpp model file.

li-plus/chatglm.cpp (0.3 - 0.4) memory-maps one file: the magic `ggml`, the model type (int32: 2 ChatGLM2,
3 ChatGLM3), the config version (int32, 2), a config record (int32 weight type, vocab size, hidden size,
heads, key/value heads, layers, MLP size, float32 norm epsilon, int32 prefix length, float32 rotary base,
int32 max length, eos id, pad id), the SentencePiece model (int32 length + the serialized `tokenizer.model`),
then tensor records to the end of the file (`glmtune.export.ggml`) under the official ChatGLM2 names:
matrices (embedding, fused qkv, dense, dense_h_to_4h, dense_4h_to_h, output layer) in the chosen type,
norms and the qkv bias in f32. A P-tuning v2 prefix goes in as `past_key_values` [layers·2, groups,
pre_seq_len, kv_channels] (f16, the dtype of chatglm.cpp's cache): the prefix encoder's output computed
once (through the projection MLP when there is one), keys without rotary, layer i's keys at row 2i and
values at 2i+1 (the official `get_prompt` order); chatglm.cpp copies it into its key/value cache ahead of
the prompt and numbers the real tokens from 0, as the official model and glmtune do.

chatglm.cpp derives its special tokens from the SentencePiece size (ChatGLM2: `[MASK] [gMASK] [sMASK] sop
eop` after the pieces; ChatGLM3: the same, then `<|system|> <|user|> <|assistant|> <|observation|>`, and it
also stops on `<|user|>` / `<|observation|>`), so the model type is the one whose layout equals the
tokenizer's command tokens and stop ids; anything else is refused rather than exported wrong.

The source folder is read shard by shard (official layout, full precision or the official int4/int8
layout, dequantized as the official code does), one tensor at a time, so exporting the 6B model needs
about one shard of memory. The file is written beside the output and renamed into place when complete.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from glmtune.errors import GlmtuneError
from glmtune.export import ggml
from glmtune.families.registry import check_same_family, resolve_family
from glmtune.fsutil import atomic_file
from glmtune.model.modeling import attention_dims
from glmtune.model.prefix import OFFICIAL_PREFIX, PrefixConfig, PrefixEncoder, load_prefix_state, read_prefix_checkpoint
from glmtune.model.weights import iter_shard, read_chatglm_config, weight_files

logger = logging.getLogger(__name__)

MAGIC = b"ggml"
CONFIG_VERSION = 2
PREFIX_TENSOR = "past_key_values"
PREFIX_TYPE = ggml.F16
_COMMANDS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# chatglm.cpp model type -> (tokens it places after the SentencePiece pieces, extra stop tokens besides eos).
MODEL_TYPES = {2: (_COMMANDS, ()), 3: (_COMMANDS + _ROLES, ("<|observation|>", "<|user|>"))}
MODEL_TYPE_NAMES = {2: "ChatGLM2", 3: "ChatGLM3"}
_LAYER = "transformer.encoder.layers.{}."
_DROPPED = ("transformer.rotary_pos_emb.inv_freq",)
# Official config fields whose other values chatglm.cpp's ChatGLM2 graph cannot compute (field, required value).
_ARCHITECTURE = (("add_bias_linear", False), ("add_qkv_bias", True), ("rmsnorm", True), ("post_layer_norm", True),
                 ("apply_residual_connection_post_layernorm", False), ("original_rope", True))


@dataclass
class ExportResult:
    output: Path
    model_type: int
    ggml_type: str
    pre_seq_len: int
    tensors: int
    total_bytes: int

    def summary(self) -> str:
        prefix = f"prefix of {self.pre_seq_len} tokens" if self.pre_seq_len else "no prefix"
        return (f"wrote {self.output}: chatglm.cpp {MODEL_TYPE_NAMES[self.model_type]} model, {self.ggml_type} weights, "
                f"{prefix}, {self.tensors} tensors, {self.total_bytes / 2**20:,.1f} MiB")


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Official tensor name -> shape for the tensors chatglm.cpp loads (the rotary buffer is not one)."""
    heads, groups, kv = attention_dims(cfg)
    h, ffn, vocab = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    shapes = {"transformer.embedding.word_embeddings.weight": (vocab, h)}
    for i in range(cfg["num_layers"]):
        p = _LAYER.format(i)
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attention.query_key_value.weight": ((heads + 2 * groups) * kv, h),
            p + "self_attention.query_key_value.bias": ((heads + 2 * groups) * kv,),
            p + "self_attention.dense.weight": (h, heads * kv),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.dense_h_to_4h.weight": (2 * ffn, h),
            p + "mlp.dense_4h_to_h.weight": (h, ffn),
        })
    shapes["transformer.encoder.final_layernorm.weight"] = (h,)
    shapes["transformer.output_layer.weight"] = (vocab, h)
    return shapes


def check_architecture(cfg: dict, cfg_file: Path, ggml_type: int) -> None:
    """Refuse, before writing anything, a config chatglm.cpp would compute differently or cannot store."""
    for field, required in _ARCHITECTURE:
        if field in cfg and cfg[field] is not None and cfg[field] != required:
            raise GlmtuneError(f"{cfg_file}: field {field}: chatglm.cpp supports only {str(required).lower()}, "
                               f"found {cfg[field]!r}")
    heads, _, kv = attention_dims(cfg)
    if heads * kv != cfg["hidden_size"]:
        raise GlmtuneError(f"{cfg_file}: chatglm.cpp needs kv_channels x num_attention_heads = hidden_size, "
                           f"found {kv} x {heads} = {heads * kv}, hidden_size {cfg['hidden_size']}")
    if ggml_type in ggml.QUANTIZED:
        for field in ("hidden_size", "ffn_hidden_size"):
            if cfg[field] % ggml.BLOCK:
                raise GlmtuneError(f"{cfg_file}: field {field} = {cfg[field]}: --type {ggml.TYPE_NAMES[ggml_type]} "
                                   f"needs a multiple of {ggml.BLOCK} (use --type f16 or f32)")


def model_type_of(tokenizer, family) -> int:
    """The chatglm.cpp model type whose token layout and stop tokens are this tokenizer's."""
    commands = tuple(tokenizer.command_tokens)
    stops = set(family.stop_token_ids(tokenizer))
    for model_type, (layout, extra_stops) in MODEL_TYPES.items():
        if commands == layout and stops == {tokenizer.eos_token_id, *(tokenizer.get_command(t) for t in extra_stops)}:
            return model_type
    raise GlmtuneError(f"family {family.name}: chatglm.cpp has no model type with the command tokens {list(commands)} "
                       "and these stop tokens")


def rope_theta(family, cfg: dict, cfg_file: Path) -> float:
    """chatglm.cpp's rotary base; it has no position interpolation (chatglm2-6b-32k's rule)."""
    ratio = float(cfg.get("rope_ratio") or 1.0)
    params = family.rope_parameters(ratio)
    if params.get("rope_type", "default") != "default":
        raise GlmtuneError(f"{cfg_file}: field rope_ratio {cfg.get('rope_ratio')}: the {family.title} rule divides "
                           "positions by it, which chatglm.cpp cannot compute (it only scales the rotary base)")
    return float(params["rope_theta"])


def prefix_cache(encoder: PrefixEncoder) -> torch.Tensor:
    """[layers·2, groups, pre_seq_len, kv_channels]: every layer's prefix keys (unrotated) and values."""
    with torch.no_grad():
        states = encoder.prefix_states().detach().float()
    pre = encoder.cfg.pre_seq_len
    return states.view(pre, encoder.num_layers * 2, encoder.groups, encoder.kv_channels).permute(1, 2, 0, 3).contiguous()


def _prefix_encoder(cfg: dict, prefix_cfg: PrefixConfig, state: dict, source: str) -> PrefixEncoder:
    """The prefix encoder of `state`, its shapes checked against the model (an error names both)."""
    _, groups, kv = attention_dims(cfg)
    encoder = PrefixEncoder(prefix_cfg, cfg["num_layers"], groups, kv, cfg["hidden_size"])
    load_prefix_state(encoder, state, source)
    return encoder.eval()


def _dequantized(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The official int4/int8 layout back to float32 values (what the official code computes with)."""
    from glmtune.model.quantization import dequantize_weight

    return dequantize_weight(weight, scale, bits, torch.float32)


def _config_record(ggml_type: int, cfg: dict, tokenizer, pre_seq_len: int, theta: float) -> bytes:
    heads, groups, _ = attention_dims(cfg)
    eos = cfg.get("eos_token_id")
    pad = cfg.get("pad_token_id")
    return struct.pack(
        "<iiiiiiififiii", ggml_type, cfg["padded_vocab_size"], cfg["hidden_size"], heads, groups, cfg["num_layers"],
        cfg["ffn_hidden_size"], float(cfg.get("layernorm_epsilon") or 1e-5), pre_seq_len, theta,
        int(cfg.get("seq_length") or 32768), tokenizer.eos_token_id if eos is None else int(eos),
        -1 if pad is None else int(pad),
    )


def export_chatglm_cpp(model_path: str | Path, output: str | Path, ggml_type: str = "q4_0", *,
                       ptuning_checkpoint: str | Path | None = None, family: str | None = None,
                       force: bool = False) -> ExportResult:
    """Write `model_path` (+ `ptuning_checkpoint`, or the prefix a merged folder holds) as a chatglm.cpp file."""
    from glmtune.model.loading import find_tokenizer

    folder, output = Path(model_path), Path(output)
    type_id = ggml.type_id(ggml_type)
    if not folder.is_dir():
        raise GlmtuneError(f"--model-path {folder}: folder not found")
    if output.is_dir():
        raise GlmtuneError(f"--output {output}: is a folder; expected a file name")
    if output.exists() and not force:
        raise GlmtuneError(f"--output {output}: file exists (pass --force to replace it)")
    cfg_file = folder / "config.json"
    cfg = read_chatglm_config(folder)
    check_architecture(cfg, cfg_file, type_id)
    model_family = resolve_family(folder, family)
    if ptuning_checkpoint is not None:
        check_same_family(model_family, ptuning_checkpoint)
    tokenizer = find_tokenizer(folder, ptuning_checkpoint, family=model_family.name)
    model_type = model_type_of(tokenizer, model_family)
    if tokenizer.n_pieces + len(tokenizer.command_tokens) > cfg["padded_vocab_size"]:
        raise GlmtuneError(f"{cfg_file}: padded_vocab_size {cfg['padded_vocab_size']} is smaller than the tokenizer's "
                           f"{tokenizer.n_pieces} pieces + {len(tokenizer.command_tokens)} command tokens")
    theta = rope_theta(model_family, cfg, cfg_file)

    prefix_cfg, prefix_state, prefix_source = None, None, ""
    if ptuning_checkpoint is not None:
        prefix_cfg, prefix_state, _ = read_prefix_checkpoint(ptuning_checkpoint)
        prefix_source = f"P-tuning checkpoint {ptuning_checkpoint}"
        _prefix_encoder(cfg, prefix_cfg, prefix_state, prefix_source)  # shapes checked before any writing
    elif cfg.get("pre_seq_len"):
        prefix_cfg = PrefixConfig(int(cfg["pre_seq_len"]), bool(cfg.get("prefix_projection", False)))
        prefix_source = str(cfg_file)
    bits = int(cfg.get("quantization_bit") or 0)
    if bits not in (0, 4, 8):
        raise GlmtuneError(f"{cfg_file}: field quantization_bit: expected 4 or 8, found {cfg['quantization_bit']!r}")
    shapes = expected_shapes(cfg)
    shards = weight_files(folder)
    proto = Path(tokenizer.vocab_file).read_bytes()

    written: set[str] = set()
    folder_prefix: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}  # quantized weights waiting for their scale (or scales for their weight)
    with atomic_file(output, "wb") as handle:
        handle.write(MAGIC + struct.pack("<ii", model_type, CONFIG_VERSION))
        handle.write(_config_record(type_id, cfg, tokenizer, prefix_cfg.pre_seq_len if prefix_cfg else 0, theta))
        handle.write(struct.pack("<i", len(proto)) + proto)

        def put(name: str, tensor: torch.Tensor, shard: Path) -> None:
            if name in written:
                raise GlmtuneError(f"{shard}: weight {name!r} appears twice in {folder}")
            if not tensor.is_floating_point():
                raise GlmtuneError(f"{shard}: {name} holds {tensor.dtype} values, but {cfg_file} has no quantization_bit")
            if tuple(tensor.shape) != shapes[name]:
                raise GlmtuneError(f"{shard}: {name}: shape {tuple(tensor.shape)}, config.json implies {shapes[name]}")
            ggml.write_tensor(handle, name, tensor, type_id if tensor.dim() == 2 else ggml.F32)
            written.add(name)

        for shard in shards:
            for key, tensor, _ in iter_shard(shard):
                if key in _DROPPED:
                    continue
                if key.startswith(OFFICIAL_PREFIX):
                    folder_prefix[key[len(OFFICIAL_PREFIX):]] = tensor.float().clone()
                    continue
                base = key[: -len("_scale")] if key.endswith("_scale") else key
                if base not in shapes:
                    raise GlmtuneError(f"{shard}: unexpected weight {key!r} (not part of a ChatGLM2 model)")
                if bits and tensor.dtype == torch.int8 or key.endswith("_scale"):
                    other = base if key.endswith("_scale") else key + "_scale"
                    if other not in pending:
                        pending[key] = tensor
                        continue
                    weight, scale = (pending.pop(other), tensor) if key.endswith("_scale") else (tensor, pending.pop(other))
                    if weight.dtype != torch.int8:
                        raise GlmtuneError(f"{shard}: {base}_scale given for a weight that is not quantized")
                    tensor = _dequantized(weight, scale, bits)
                put(base, tensor, shard)
                del tensor

        if pending:
            raise GlmtuneError(f"{folder}: quantized weights without their scale, or scales without a weight: "
                               f"{sorted(pending)[:6]}")
        missing = sorted(set(shapes) - written)
        if missing:
            raise GlmtuneError(f"{folder}: missing weights: {missing[:12]}{' ...' if len(missing) > 12 else ''}")
        if prefix_cfg is not None:
            if prefix_state is None:
                if not folder_prefix:
                    raise GlmtuneError(f"{cfg_file}: config.json has pre_seq_len but the weights hold no prefix encoder")
                prefix_state = folder_prefix
            elif folder_prefix:
                logger.warning("warning: %s holds its own prefix; --ptuning-checkpoint %s replaces it", folder,
                               ptuning_checkpoint)
            encoder = _prefix_encoder(cfg, prefix_cfg, prefix_state, prefix_source)
            ggml.write_tensor(handle, PREFIX_TENSOR, prefix_cache(encoder), PREFIX_TYPE)
        elif folder_prefix:
            raise GlmtuneError(f"{folder}: weights hold a prefix encoder but config.json has no pre_seq_len")
        total = handle.tell()
    return ExportResult(output=output, model_type=model_type, ggml_type=ggml_type,
                        pre_seq_len=prefix_cfg.pre_seq_len if prefix_cfg else 0,
                        tensors=len(written) + (1 if prefix_cfg else 0), total_bytes=total)
