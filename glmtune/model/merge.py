"""`glmtune merge`: bake a P-tuning v2 checkpoint into a self-contained ChatGLM2 model folder.

The official ptuning workflow (THUDM/ChatGLM2-6B ptuning/README.md, "模型部署") loads the base model
and then the checkpoint's `transformer.prefix_encoder.*` on every start. A merged folder holds both:
the base weights in the official layout (safetensors, sharded for large models, via
`glmtune.model.loading.save_model`), config.json with `pre_seq_len` / `prefix_projection`, the prefix
tensors, and the tokenizer, so `load_model(OUT)` (and `glmtune chat/eval --model-path OUT`) need no
further flags and compute exactly what base + checkpoint computes.

`fold`: with `prefix_projection`, the prefix is `trans(embedding)` and that MLP only ever sees the same
`pre_seq_len` rows; chatglm.cpp's converter evaluates it once at convert time. Here too: the folded
folder stores `PrefixEncoder.prefix_states()` as a plain embedding with `prefix_projection: false`.
Same numbers (the MLP runs in fp32 either way), without the 2·kv·hidden MLP weights and its per-forward cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmtune.errors import GlmtuneError
from glmtune.fsutil import check_output_dir

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


@dataclass
class MergeResult:
    output_dir: Path
    pre_seq_len: int
    prefix_projection: bool  # as stored in the merged folder
    folded: bool
    quantization_bit: int | None
    files: int
    total_bytes: int

    def summary(self) -> str:
        prefix = f"prefix pre_seq_len {self.pre_seq_len}, prefix_projection {str(self.prefix_projection).lower()}"
        if self.folded:
            prefix += " (projection folded)"
        quant = f", {self.quantization_bit}-bit weights" if self.quantization_bit else ""
        return (f"wrote {self.output_dir}: {self.files} files, {self.total_bytes / 2**20:.1f} MiB; {prefix}{quant}")


def fold_prefix(model) -> bool:
    """Replace a projected prefix by its output, as a plain embedding; False if there was no projection."""
    import torch

    from glmtune.model.prefix import PrefixConfig

    encoder = model.prefix_encoder
    if encoder is None:
        raise GlmtuneError("fold_prefix: the model has no prefix")
    if not encoder.cfg.prefix_projection:
        return False
    with torch.no_grad():
        states = encoder.prefix_states().detach().float().clone()
    cfg = PrefixConfig(encoder.cfg.pre_seq_len, prefix_projection=False)
    folded = model.make_prefix_encoder(cfg)
    with torch.no_grad():
        folded.embedding.weight.copy_(states)
    folded.to(states.device).eval()
    folded.requires_grad_(False)
    model.prefix_encoder = folded
    model.prefix_config = cfg
    return True


def _source_dtype(model_path: Path) -> str:
    """The base folder's weight dtype (config torch_dtype), so merging neither loses nor inflates precision."""
    from glmtune.model.weights import read_chatglm_config
    from glmtune.model.weights import DTYPES

    name = read_chatglm_config(model_path).get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def merge_checkpoint(
    model_path: str | Path,
    ptuning_checkpoint: str | Path,
    output_dir: str | Path,
    *,
    quantization_bit: int | None = None,
    fold: bool = False,
    force: bool = False,
    dtype: str | None = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    family: str | None = None,
) -> MergeResult:
    """Write base model + P-tuning checkpoint (+ tokenizer) as one folder; see the module docstring.

    `dtype` "auto" keeps the base folder's dtype (fp16 for the official release). With
    `quantization_bit` the base weights are quantized while loading and stored quantized.
    """
    from glmtune.model.loading import find_tokenizer, load_model, save_model

    model_path, ptuning_checkpoint = Path(model_path), Path(ptuning_checkpoint)
    out = check_output_dir(output_dir, force, model_path, ptuning_checkpoint)
    if not model_path.is_dir():
        raise GlmtuneError(f"--model-path {model_path}: folder not found")
    if dtype in (None, "auto"):
        dtype = _source_dtype(model_path)  # also checks that it is a ChatGLM2 folder
    tokenizer = find_tokenizer(model_path, ptuning_checkpoint, family=family)  # family: glmtune.families.registry
    model = load_model(model_path, ptuning_checkpoint=ptuning_checkpoint, quantization_bit=quantization_bit,
                       dtype=dtype, device="cpu", family=tokenizer.family)
    folded = fold_prefix(model) if fold else False
    save_model(model, out, include_prefix=True, max_shard_bytes=max_shard_bytes, dtype=dtype, tokenizer=tokenizer,
               overwrite=force)
    files = [p for p in out.iterdir() if p.is_file()]
    return MergeResult(
        output_dir=out,
        pre_seq_len=model.prefix_config.pre_seq_len,
        prefix_projection=model.prefix_config.prefix_projection,
        folded=folded,
        quantization_bit=model.chatglm_config.get("quantization_bit"),
        files=len(files),
        total_bytes=sum(p.stat().st_size for p in files),
    )
