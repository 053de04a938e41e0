"""P-tuning checkpoints of both kinds: the official ChatGLM2/3 folder and the PEFT prefix-tuning adapter of GLM-4.

GLM-4's official P-tuning v2 (the GLM-4 fine-tune demo's `ptuning_v2.yaml`) is PEFT prefix tuning, saved by
`PeftModel.save_pretrained` as an adapter folder: `adapter_config.json` (`peft_type` PREFIX_TUNING,
`num_virtual_tokens`, `num_layers`, `num_attention_heads` = key/value groups, `token_dim` = groups * kv_channels,
...) and `adapter_model.safetensors` holding one tensor `prompt_embeddings` [virtual tokens, 2 * layers *
token_dim]. PEFT views it as [batch, tokens, 2 * layers, groups, kv_channels] with rows 2i / 2i+1 the key / value
of layer i: the very layout of the ChatGLM prefix encoder's embedding, so it loads as a plain prefix. With
`prefix_projection` PEFT saves the MLP's output, not the MLP: such a folder is a plain prefix too.

glmtune writes its GLM-4 checkpoints the same way, so the official inference
(`PeftModelForCausalLM.from_pretrained` on the official model) loads them. `adapter_config.json` stays exactly
PEFT's (peft 0.12, which the demo pins, refuses unknown fields), so what glmtune knows beyond it is recorded
beside it in `glmtune_adapter.json`: the family, layer/group/kv dims, the position convention, and for a
prefix trained with a projection MLP the encoder itself (`prefix_encoder.safetensors`, to resume training).

Position convention: glmtune numbers real tokens from 0 after an unrotated prefix, as the official ChatGLM
and GLM-4-9B-chat models do (`real-tokens-from-0`). The official PEFT inference path drops `position_ids`
(padded rows count from their first pad, every generated token sits at position 0); glmtune computes the
intended positions and says so in the docs. PEFT on transformers' own `Glm4ForCausalLM` (GLM-4-0414) numbers
real tokens after the prefix instead; an adapter recorded under another convention, or a PEFT adapter of a
0414 model that records none, is refused rather than run under the wrong positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmtune.errors import GlmtuneError
from glmtune.model.glm4 import is_hf_glm4
from glmtune.model.prefix import PrefixConfig, read_prefix_checkpoint

FAMILY_FIELD = "glmtune_family"  # the registry's name for it (glmtune.families.registry), read here without it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
GLMTUNE_ADAPTER = "glmtune_adapter.json"
ENCODER_FILE = "prefix_encoder.safetensors"
PROMPT_KEY = "prompt_embeddings"
POSITIONS_FROM_0 = "real-tokens-from-0"
POSITIONS_AFTER_PREFIX = "real-tokens-after-prefix"
POSITION_CONVENTIONS = (POSITIONS_FROM_0, POSITIONS_AFTER_PREFIX)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about the model it was made for (None where it does not say)."""

    kind: str  # "official" (ChatGLM2/3 P-tuning folder) or "peft" (adapter folder)
    family: str | None
    num_layers: int | None
    groups: int | None
    kv_channels: int | None
    positions: str | None
    raw: dict = field(default_factory=dict, repr=False)  # an official folder's config.json


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_checkpoint(path: str | Path) -> tuple[PrefixConfig, dict[str, torch.Tensor], CheckpointInfo]:
    """Any P-tuning checkpoint folder: (prefix config, encoder state keyed `embedding.weight`..., what it records)."""
    if is_adapter_folder(path):
        return read_adapter(path)
    cfg, state, raw = read_prefix_checkpoint(path)
    info = CheckpointInfo("official", _recorded_family(raw), raw.get("num_layers"), _official_groups(raw),
                          raw.get("kv_channels"), POSITIONS_FROM_0, raw)  # the official ChatGLM code's numbering
    return cfg, state, info


def _official_groups(raw: dict) -> int | None:
    if raw.get("multi_query_attention"):
        return raw.get("multi_query_group_num")
    return raw.get("num_attention_heads")


def _recorded_family(raw: dict) -> str | None:
    value = raw.get(FAMILY_FIELD)
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GlmtuneError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise GlmtuneError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise GlmtuneError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _positive(cfg_file: Path, cfg: dict, field: str) -> int:
    value = cfg.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GlmtuneError(f"{cfg_file}: field {field}: expected a positive integer, found {value!r}")
    return value


def read_adapter(path: str | Path) -> tuple[PrefixConfig, dict[str, torch.Tensor], CheckpointInfo]:
    """A PEFT prefix-tuning adapter folder (the GLM-4 demo's, or glmtune's); see the module docstring."""
    folder = Path(path)
    cfg_file = folder / ADAPTER_CONFIG
    cfg = _read_json(cfg_file)
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise GlmtuneError(f"{cfg_file}: field peft_type: expected 'PREFIX_TUNING' (a P-tuning v2 prefix), "
                           f"found {cfg.get('peft_type')!r}")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise GlmtuneError(f"{cfg_file}: field task_type: expected 'CAUSAL_LM', found {cfg.get('task_type')!r}")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise GlmtuneError(f"{cfg_file}: field num_transformer_submodules: expected 1 (a decoder-only model), "
                           f"found {cfg.get('num_transformer_submodules')!r}")
    tokens, layers, groups, token_dim = (_positive(cfg_file, cfg, f) for f in
                                         ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"))
    if token_dim % groups:
        raise GlmtuneError(f"{cfg_file}: field token_dim {token_dim} is not a multiple of num_attention_heads {groups}")
    own = _read_json(folder / GLMTUNE_ADAPTER) if (folder / GLMTUNE_ADAPTER).is_file() else {}
    positions = own.get("positions")
    if positions is not None and positions not in POSITION_CONVENTIONS:
        raise GlmtuneError(f"{folder / GLMTUNE_ADAPTER}: field positions: expected one of "
                           f"{list(POSITION_CONVENTIONS)}, found {positions!r}")
    info = CheckpointInfo("peft", _recorded_family(own), layers, groups, token_dim // groups, positions)

    if own.get("prefix_projection") and (folder / ENCODER_FILE).is_file():
        # glmtune's own projected prefix: the encoder with its MLP (for resuming training).
        from glmtune.model.prefix import OFFICIAL_PREFIX

        state = _load_tensors(folder / ENCODER_FILE)
        state = {k[len(OFFICIAL_PREFIX):]: v for k, v in state.items() if k.startswith(OFFICIAL_PREFIX)}
        return PrefixConfig(tokens, True), state, info

    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        weights = folder / ADAPTER_WEIGHTS_BIN
    if not weights.is_file():
        raise GlmtuneError(f"P-tuning adapter {folder}: no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")
    tensors = _load_tensors(weights)
    if PROMPT_KEY not in tensors:
        raise GlmtuneError(f"{weights}: no '{PROMPT_KEY}' tensor (found {sorted(tensors)[:5]}); "
                           "not a PEFT prefix-tuning adapter")
    prompt = tensors[PROMPT_KEY]
    expected = (tokens, 2 * layers * token_dim)
    if tuple(prompt.shape) != expected:
        raise GlmtuneError(f"{weights}: {PROMPT_KEY} has shape {tuple(prompt.shape)}, {cfg_file} implies {expected} "
                           f"(num_virtual_tokens {tokens}, 2 x num_layers {layers} x token_dim {token_dim})")
    # A projected prefix is stored by PEFT as the MLP's output: a plain prefix from here on.
    return PrefixConfig(tokens, False), {"embedding.weight": prompt.float()}, info


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle / zip errors all mean the same to the user
        raise GlmtuneError(f"{path}: cannot read the weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise GlmtuneError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def check_checkpoint_fits(info: CheckpointInfo, model, source: str) -> None:
    """Refuse a checkpoint made for another family, layer count, group count, kv width or position convention,
    naming both values (instead of a shape error, or worse, a prefix that loads and computes nonsense)."""
    c = model.config
    family = (model.chatglm_config or {}).get(FAMILY_FIELD)
    if info.family is not None and family is not None and info.family != family:
        raise GlmtuneError(f"{source}: P-tuning checkpoint of a {info.family} model, but the base model is {family} "
                           f"(pass the {info.family} base model, or --family if the base folder was detected wrongly)")
    for what, theirs, ours in (("layers", info.num_layers, c.num_hidden_layers),
                               ("key/value groups", info.groups, c.num_key_value_heads),
                               ("kv width (kv_channels)", info.kv_channels, c.head_dim)):
        if theirs is not None and theirs != ours:
            raise GlmtuneError(f"{source}: the prefix was made for {theirs} {what}, the base model has {ours} "
                               "(a checkpoint of another model)")
    positions = info.positions
    if positions is None and is_hf_glm4(model.chatglm_config or {}):
        raise GlmtuneError(
            f"{source}: a PEFT adapter for a GLM-4-0414 model that does not record its position convention: PEFT "
            f"on transformers' Glm4ForCausalLM numbers real tokens after the prefix ({POSITIONS_AFTER_PREFIX}), "
            f"glmtune from 0 ({POSITIONS_FROM_0}); refusing to guess (write {{\"positions\": ...}} into "
            f"{GLMTUNE_ADAPTER} beside it if you know which)")
    if positions is not None and positions != POSITIONS_FROM_0:
        raise GlmtuneError(f"{source}: the prefix was trained with positions {positions}, glmtune computes "
                           f"{POSITIONS_FROM_0} (real tokens numbered from 0 after an unrotated prefix)")


# --- saving ------------------------------------------------------------------------------------


def peft_adapter_config(model, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json exactly as peft 0.12's `PeftModel.save_pretrained` writes it for the GLM-4 demo's
    prefix (inference mode, `token_dim` = groups * kv_channels, `num_attention_heads` = groups)."""
    c, prefix = model.config, model.prefix_config
    token_dim = c.num_key_value_heads * c.head_dim
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": token_dim,
        "inference_mode": True,
        "num_attention_heads": c.num_key_value_heads,
        "num_layers": c.num_hidden_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prefix.pre_seq_len,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": prefix.prefix_projection,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": token_dim,
    }


def save_adapter(model, out_dir: str | Path, base_model_name_or_path: str | None = None) -> None:
    """The prefix as a PEFT adapter folder (into an existing folder; the caller makes it appear atomically).

    `prompt_embeddings` is the prefix as the model uses it (projected when there is a projection), fp32,
    as PEFT saves it; a projected prefix also keeps its encoder in `prefix_encoder.safetensors`.
    """
    from safetensors.torch import save_file

    from glmtune.model.prefix import official_prefix_state

    if model.prefix_encoder is None:
        raise GlmtuneError("the model has no prefix to save")
    out = Path(out_dir)
    with torch.no_grad():
        prompt = model.prefix_encoder.prefix_states().detach().float().contiguous().cpu()
    save_file({PROMPT_KEY: prompt}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(model, base_model_name_or_path), indent=2),
                                      encoding="utf-8")
    c = model.config
    own = {
        FAMILY_FIELD: (model.chatglm_config or {}).get(FAMILY_FIELD),
        "positions": POSITIONS_FROM_0,
        "num_layers": c.num_hidden_layers,
        "groups": c.num_key_value_heads,
        "kv_channels": c.head_dim,
        "prefix_projection": model.prefix_config.prefix_projection,
    }
    if model.prefix_config.prefix_projection:
        save_file(official_prefix_state(model.prefix_encoder), str(out / ENCODER_FILE), metadata={"format": "pt"})
        own["encoder_file"] = ENCODER_FILE
    (out / GLMTUNE_ADAPTER).write_text(json.dumps(own, indent=2), encoding="utf-8")
