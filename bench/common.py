"""Helpers shared by the benchmarks: random official-layout checkpoints, peak-RSS measurement, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("GLMTUNE_BENCH_CACHE", Path.home() / ".cache" / "glmtune-bench"))


def official_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Official ChatGLM2 tensor names and shapes for a config dict, in checkpoint order."""
    h, ffn, vocab = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    kv, heads, groups = cfg["kv_channels"], cfg["num_attention_heads"], cfg["multi_query_group_num"]
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (vocab, h),
        "transformer.rotary_pos_emb.inv_freq": (kv // 4,),
    }
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.query_key_value.weight"] = ((heads + 2 * groups) * kv, h)
        shapes[p + "self_attention.query_key_value.bias"] = ((heads + 2 * groups) * kv,)
        shapes[p + "self_attention.dense.weight"] = (h, heads * kv)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * ffn, h)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (h, ffn)
    shapes["transformer.encoder.final_layernorm.weight"] = (h,)
    shapes["transformer.output_layer.weight"] = (vocab, h)
    return shapes


def write_random_checkpoint(out: Path, cfg: dict, n_shards: int = 7, dtype: str = "float16", seed: int = 0,
                            fmt: str = "bin", tiled: bool = False) -> Path:
    """Random weights in the official sharded layout (`.bin` as ChatGLM2-6B, or `.safetensors` as GLM-4-9B-chat),
    written one shard at a time (low memory).

    Skipped when `out` already holds a complete checkpoint (the index is written last)."""
    import torch

    out = Path(out)
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    index_file = out / f"{stem}.{ext}.index.json"
    if index_file.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    shapes = official_shapes(cfg)
    sizes = {k: int(torch.Size(s).numel()) * torch.tensor([], dtype=torch_dtype).element_size() for k, s in shapes.items()}
    per_shard = sum(sizes.values()) / n_shards
    gen = torch.Generator().manual_seed(seed)
    # 16M values + 1, so consecutive rows of a repeated block do not line up.
    block = (torch.randn((1 << 24) + 1, generator=gen) * 0.02).to(torch_dtype) if tiled else None
    groups: list[list[str]] = [[]]
    acc = 0
    for key in shapes:
        if acc >= per_shard * len(groups) and len(groups) < n_shards:
            groups.append([])
        groups[-1].append(key)
        acc += sizes[key]
    weight_map = {}
    for i, keys in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}"
        state = {}
        for key in keys:
            if key.endswith("layernorm.weight"):
                state[key] = torch.ones(shapes[key], dtype=torch_dtype)
            elif key.endswith("inv_freq"):
                dim = cfg["kv_channels"] // 2
                state[key] = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            elif tiled:
                # A seeded random block repeated: as good as fresh noise for memory and speed figures, and
                # written at memory speed (a 9B model's worth of randn takes an hour on a busy 2-core machine).
                numel = int(torch.Size(shapes[key]).numel())
                reps = -(-numel // block.numel())
                state[key] = block.repeat(reps)[:numel].view(shapes[key]).clone()
            else:
                state[key] = (torch.randn(shapes[key], generator=gen) * 0.02).to(torch_dtype)
        if fmt == "bin":
            torch.save(state, out / name)
        else:
            from safetensors.torch import save_file

            save_file(state, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del state
    config = dict(cfg, torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    index_file.write_text(json.dumps(index, indent=2))
    return out


def instruction_set() -> str:
    """The x86 vector extensions this CPU has that matter to the CPU kernels, e.g. "avx2 fma (no avx512)"."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        import platform

        return platform.machine()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    have = [f for f in wanted if f in flags]
    return " ".join(have) + ("" if "avx512f" in flags else " (no avx512)")


def run_isolated(code: str, *args: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter (so peak RSS is its own) and parse the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False,
                          env=None if env is None else dict(os.environ, **env))
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(widths[c]) for c in columns))
