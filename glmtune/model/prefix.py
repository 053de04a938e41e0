"""P-tuning v2 prefix: the official ChatGLM2 `PrefixEncoder`, its checkpoints, and a read-only KV view.

Reproduces THUDM/chatglm2-6b `modeling_chatglm.py` (`PrefixEncoder`, `ChatGLMModel.get_prompt`):
an `Embedding(pre_seq_len, num_layers * 2 * groups * kv_channels)`, optionally followed by the MLP
`trans = Linear(kv, hidden) -> Tanh -> Linear(hidden, kv)`; its output is viewed as
[batch, pre, layers * 2, groups, kv_channels], rows 2i / 2i+1 are the key / value of layer i, dropout
0.1 applies in training only, and prefix keys carry no rotary embedding. State-dict keys in official
checkpoints are `transformer.prefix_encoder.*`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glmtune.errors import GlmtuneError

OFFICIAL_PREFIX = "transformer.prefix_encoder."
PREFIX_DROPOUT = 0.1  # hard-coded in the official ChatGLMModel
PEFT_PREFIX_DROPOUT = 0.0  # PEFT's prefix tuning (GLM-4's official P-tuning) has no dropout


@dataclass(frozen=True)
class PrefixConfig:
    pre_seq_len: int
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pre_seq_len, int) or self.pre_seq_len <= 0:
            raise GlmtuneError(f"pre_seq_len must be a positive integer, found {self.pre_seq_len!r}")


class PrefixEncoder(nn.Module):
    """Trainable prefix; `forward(batch)` returns one (key, value) pair per layer, [B, groups, pre, kv]."""

    def __init__(self, cfg: PrefixConfig, num_layers: int, groups: int, kv_channels: int, hidden_size: int,
                 dropout: float = PREFIX_DROPOUT):
        super().__init__()
        self.cfg = cfg
        self.num_layers, self.groups, self.kv_channels = num_layers, groups, kv_channels
        kv_size = num_layers * 2 * groups * kv_channels
        self.embedding = nn.Embedding(cfg.pre_seq_len, kv_size)
        if cfg.prefix_projection:
            self.trans = nn.Sequential(nn.Linear(kv_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, kv_size))
        self.dropout = nn.Dropout(dropout)

    def prefix_states(self) -> torch.Tensor:
        """[pre, layers*2*groups*kv]: the prefix before batching (what `--fold-prefix` stores)."""
        states = self.embedding.weight
        if self.cfg.prefix_projection:
            states = self.trans(states)
        return states

    def forward(self, batch_size: int, dtype: torch.dtype,
                dropout_keys: Sequence[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`dropout_keys` (training): one seed per row, which alone decides the row's dropout mask (`keyed_dropout`)."""
        pre = self.cfg.pre_seq_len
        states = self.prefix_states().to(dtype)
        states = states.unsqueeze(0).expand(batch_size, -1, -1)
        states = states.view(batch_size, pre, self.num_layers * 2, self.groups, self.kv_channels)
        # Dropout after batching, as the official code does: each row gets its own mask.
        if dropout_keys is None:
            states = self.dropout(states)
        elif self.training:
            states = keyed_dropout(states, self.dropout.p, dropout_keys)
        # -> [layers*2, B, groups, pre, kv]
        states = states.permute(2, 0, 3, 1, 4)
        return [(states[2 * i], states[2 * i + 1]) for i in range(self.num_layers)]


def keyed_dropout(x: torch.Tensor, p: float, keys: Sequence[int]) -> torch.Tensor:
    """Dropout whose mask for row i is drawn from a generator seeded by `keys[i]` alone.

    The distribution of `nn.Dropout(p)` over a batch (each row its own Bernoulli(1-p)/(1-p) mask), but a row
    gets the same mask whichever batch, process or restart computes it: what an exact resume needs.
    """
    if len(keys) != x.shape[0]:
        raise ValueError(f"keyed_dropout: {x.shape[0]} rows but {len(keys)} keys")
    if p == 0:
        return x
    keep = 1.0 - p
    masks = [torch.empty(x.shape[1:], device=x.device).bernoulli_(keep, generator=torch.Generator(device=x.device).manual_seed(key))
             for key in keys]
    return x * (torch.stack(masks) / keep).to(x.dtype)


class PrefixKV:
    """A read-only stand-in for a transformers Cache that puts the prefix before each layer's keys/values.

    Why not a DynamicCache: gradient checkpointing re-runs each layer in backward, and a cache that
    appends on `update` would then hold the real tokens twice. This object stores nothing, so a replayed
    layer sees exactly what it saw the first time. transformers' attention only calls `update` on it.
    """

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]):
        self.prefix = prefix

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.prefix[layer_idx]
        return torch.cat([k, key_states], dim=2), torch.cat([v, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


# --- checkpoints -------------------------------------------------------------------------------


def read_prefix_checkpoint(path: str | Path) -> tuple[PrefixConfig, dict[str, torch.Tensor], dict]:
    """Read an official (or glmtune) P-tuning checkpoint folder.

    Returns the prefix config (from the folder's config.json), the prefix state dict with keys
    relative to the encoder (`embedding.weight`, `trans.0.weight`, ...), and the raw config dict.
    """
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not folder.is_dir():
        raise GlmtuneError(f"P-tuning checkpoint {folder}: not a folder")
    if not cfg_file.is_file():
        raise GlmtuneError(f"P-tuning checkpoint {folder}: no config.json (expected pre_seq_len in it)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GlmtuneError(f"{cfg_file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise GlmtuneError(f"{cfg_file}: expected a JSON object, found {type(raw).__name__}")
    pre = raw.get("pre_seq_len")
    if not isinstance(pre, int) or isinstance(pre, bool) or pre <= 0:
        raise GlmtuneError(f"{cfg_file}: field pre_seq_len: expected a positive integer, found {pre!r}"
                           + ("; not a P-tuning checkpoint" if pre is None else ""))
    cfg = PrefixConfig(pre, bool(raw.get("prefix_projection", False)))

    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise GlmtuneError(f"P-tuning checkpoint {folder}: no model.safetensors or pytorch_model.bin")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle / zip errors all mean the same to the user
        raise GlmtuneError(f"{weights}: cannot read the checkpoint weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise GlmtuneError(f"{weights}: expected a dict of tensors, found {type(state).__name__}")
    prefix_state = {k[len(OFFICIAL_PREFIX):]: v for k, v in state.items() if k.startswith(OFFICIAL_PREFIX)}
    if not prefix_state:
        raise GlmtuneError(
            f"P-tuning checkpoint {folder}: no '{OFFICIAL_PREFIX}*' tensors (found {sorted(state)[:5]}...)"
        )
    return cfg, prefix_state, raw


def resolve_prefix_config(
    checkpoint_cfg: PrefixConfig | None, pre_seq_len: int | None, prefix_projection: bool | None, source: str
) -> PrefixConfig | None:
    """Combine what the checkpoint says with what the user passed; disagreement is an error."""
    if checkpoint_cfg is None:
        if pre_seq_len is None:
            return None
        return PrefixConfig(int(pre_seq_len), bool(prefix_projection))
    if pre_seq_len is not None and int(pre_seq_len) != checkpoint_cfg.pre_seq_len:
        raise GlmtuneError(
            f"pre_seq_len mismatch: you passed {pre_seq_len}, {source} has {checkpoint_cfg.pre_seq_len}"
        )
    if prefix_projection is not None and bool(prefix_projection) != checkpoint_cfg.prefix_projection:
        raise GlmtuneError(
            f"prefix_projection mismatch: you passed {prefix_projection}, "
            f"{source} has {checkpoint_cfg.prefix_projection}"
        )
    return checkpoint_cfg


def load_prefix_state(encoder: PrefixEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load prefix tensors, naming any missing/unexpected key or shape mismatch (model vs checkpoint)."""
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise GlmtuneError(
            f"{source}: prefix tensors do not match the model "
            f"(missing {[OFFICIAL_PREFIX + k for k in missing]}, unexpected {[OFFICIAL_PREFIX + k for k in unexpected]})"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise GlmtuneError(
                f"{source}: {OFFICIAL_PREFIX}{key} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(own[key].shape)} (layers {encoder.num_layers} x 2 x groups {encoder.groups} "
                f"x kv_channels {encoder.kv_channels})"
            )
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor.to(own[key].dtype))


def official_prefix_state(encoder: PrefixEncoder) -> dict[str, torch.Tensor]:
    """The prefix under official key names, fp32 and contiguous (what the official loader reads)."""
    return {OFFICIAL_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in encoder.state_dict().items()}
