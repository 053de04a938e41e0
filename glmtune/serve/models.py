"""The models a server offers: one frozen base and P-tuning prefixes that run on it.

A served model id is the base (the folder's name, or `--served-name`) or an adapter (`--adapter NAME=C`,
or `--ptuning-checkpoint C`, named after the checkpoint folder). The prefix of each is computed once
at start (the encoder's output, projection MLP included, in the compute dtype), so a request only
copies it into the batch cache; the base weights are shared by all. A folder written by
`glmtune merge` carries its prefix: its base id then serves with that prefix.

A checkpoint trained for another base shape, or whose weights disagree with its own pre_seq_len, is
refused at start, naming both values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmtune.errors import GlmtuneError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
# Fields an official P-tuning checkpoint's config.json copies from its base, and the base's value for each.
_SHAPE_FIELDS = ("num_layers", "hidden_size", "kv_channels", "multi_query_group_num", "padded_vocab_size")


@dataclass
class Adapter:
    """One served model id: the base alone (`kv` None) or the base with a prefix."""

    name: str
    source: str
    pre_seq_len: int = 0
    # Per layer (key, value), each [1, groups, pre_seq_len, kv_channels].
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class ServedModels:
    model: object
    tokenizer: object
    adapters: dict[str, Adapter] = field(default_factory=dict)
    base_name: str = ""
    stop_ids: frozenset[int] = frozenset()


def parse_adapter_specs(specs: list[str] | None) -> dict[str, Path]:
    """`NAME=PATH` strings -> {name: path}; a malformed or repeated name is an error."""
    out: dict[str, Path] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not path:
            raise GlmtuneError(f"--adapter {spec!r}: expected NAME=CHECKPOINT_FOLDER")
        if not NAME.match(name):
            raise GlmtuneError(f"--adapter {spec!r}: name {name!r} must be letters, digits and ._:/- (at most 128)")
        if name in out:
            raise GlmtuneError(f"--adapter: name {name!r} given twice")
        out[name] = Path(path)
    return out


def stop_token_ids(model, tokenizer) -> frozenset[int]:
    """The ids that end an answer. The one place serving decides this (a model family adds its own here)."""
    ids = set()
    eos = model.config.eos_token_id
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    from glmtune.families.registry import stop_ids_for

    ids.update(stop_ids_for(tokenizer))  # ChatGLM3 also stops on <|user|> and <|observation|>
    return frozenset(int(i) for i in ids)


def prefix_kv(encoder, dtype: torch.dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The encoder's keys/values for one row, computed once (eval mode: no dropout)."""
    encoder.eval()
    with torch.no_grad():
        return [(k.to(device).contiguous(), v.to(device).contiguous()) for k, v in encoder(1, dtype)]


def check_checkpoint_shape(model, raw: dict, state: dict, source: str, pre_seq_len: int) -> None:
    """Refuse a checkpoint made for another base, or whose weights disagree with its pre_seq_len."""
    base = model.chatglm_config
    for key in _SHAPE_FIELDS:
        if key in raw and key in base and raw[key] != base[key]:
            raise GlmtuneError(f"{source}: made for a base with {key} {raw[key]}, this base has {key} {base[key]}")
    weight = state.get("embedding.weight")
    if weight is None:
        return  # load_prefix_state names the missing tensor
    cfg = model.config
    per_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    if weight.shape[0] != pre_seq_len:
        raise GlmtuneError(
            f"{source}: config.json says pre_seq_len {pre_seq_len}, the prefix weights have {weight.shape[0]} positions"
        )
    if weight.ndim != 2 or weight.shape[1] != per_position:
        raise GlmtuneError(
            f"{source}: prefix has {tuple(weight.shape)[1:]} values per position, this base needs {per_position} "
            f"(layers {cfg.num_hidden_layers} x 2 x groups {cfg.num_key_value_heads} x kv_channels {cfg.head_dim})"
        )


def load_adapter(model, name: str, path: str | Path) -> Adapter:
    from glmtune.model.adapter import check_checkpoint_fits, read_checkpoint
    from glmtune.model.prefix import load_prefix_state

    source = f"adapter {name} ({path})"
    # Official ChatGLM folders and PEFT adapter folders (GLM-4) alike; the same family, dims and position
    # convention checks as load_model's for --ptuning-checkpoint (the prefix shapes can match across families).
    cfg, state, info = read_checkpoint(path)
    check_checkpoint_shape(model, info.raw, {}, source, cfg.pre_seq_len)  # an official config's fields first
    check_checkpoint_fits(info, model, source)
    check_checkpoint_shape(model, {}, state, source, cfg.pre_seq_len)
    encoder = model.make_prefix_encoder(cfg)
    load_prefix_state(encoder, state, source)
    return Adapter(name, str(path), cfg.pre_seq_len, prefix_kv(encoder, model.compute_dtype, model.device))


def load_served_models(
    model_path: str | Path,
    *,
    adapters: dict[str, Path] | None = None,
    ptuning_checkpoint: str | Path | None = None,
    served_name: str | None = None,
    quantization_bit: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
) -> ServedModels:
    """Load the base once and every adapter onto it; names must be unique."""
    from glmtune.inference.chat import find_tokenizer
    from glmtune.model.loading import load_model, resolve_device
    from glmtune.model.weights import read_chatglm_config

    model_path = Path(model_path)
    read_chatglm_config(model_path)  # "not a model folder" first
    adapters = dict(adapters or {})
    if ptuning_checkpoint is not None:
        name = Path(ptuning_checkpoint).resolve().name
        if name in adapters:
            raise GlmtuneError(f"--ptuning-checkpoint {ptuning_checkpoint}: name {name!r} is also an --adapter name")
        adapters[name] = Path(ptuning_checkpoint)
    base_name = served_name or model_path.resolve().name
    if not NAME.match(base_name):
        raise GlmtuneError(f"served name {base_name!r} must be letters, digits and ._:/- (use --served-name)")
    if base_name in adapters:
        raise GlmtuneError(f"adapter name {base_name!r} is also the base model's name (use --served-name)")
    tokenizer = find_tokenizer(model_path, *adapters.values())
    device, dtype = resolve_device(device, dtype)
    model = load_model(model_path, quantization_bit=quantization_bit, dtype=dtype, device=device)
    served = ServedModels(model, tokenizer, base_name=base_name, stop_ids=stop_token_ids(model, tokenizer))
    if model.prefix_encoder is not None:  # a merged folder: its prefix is part of the base id
        served.adapters[base_name] = Adapter(base_name, str(model_path), model.pre_seq_len,
                                             prefix_kv(model.prefix_encoder, model.compute_dtype, model.device))
        # The scheduler places prefixes itself; the encoder's weights are no longer needed.
        model.prefix_encoder, model.prefix_config = None, None
    else:
        served.adapters[base_name] = Adapter(base_name, str(model_path))
    for name, path in adapters.items():
        served.adapters[name] = load_adapter(model, name, path)
    return served
