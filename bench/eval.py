"""Benchmark: `glmtune eval` generation throughput, batch 1 (the official setting) vs batch 16.

For the tiny model and a mid config (4 layers, hidden 1024, 16 heads, kv_channels 64, 2 groups, ffn 2736,
padded vocab 65024; random weights in the official layout, written with `glmtune.model.tiny`), both with a random
P-tuning prefix of pre_seq_len 128: greedy generation of a fixed number of new tokens after the bundled dev
prompts, timed with `glmtune.evaluation.generate.generate_token_ids` at batch 1 and at batch 16. The generated token
ids must be identical (asserted). Prints a table and writes bench/results/eval.json.

    python bench/eval.py [--samples 32] [--max-new-tokens 32] [--configs tiny,mid] [--device cpu] [--threads N]

Goal: >= 4x samples/s from batching on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from glmtune.data import preprocess as data
from glmtune.evaluation.generate import GenerationSettings, generate_token_ids
from glmtune.model.loading import load_model
from glmtune.model.tiny import DATA_DIR, TinyConfig, init_model, official_config, random_state_dict, write_weights
from glmtune.families.tokenizer import load_tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "eval.json"
CONFIGS = {
    "tiny": dict(layers=2, hidden_size=64, heads=4, kv_channels=16, groups=2, ffn_hidden_size=160, vocab=None),
    "mid": dict(layers=4, hidden_size=1024, heads=16, kv_channels=64, groups=2, ffn_hidden_size=2736, vocab=65024),
}
PRE_SEQ_LEN = 128


def build_model(name: str, root: Path) -> Path:
    """A random official-layout model folder. The tokenizer comes from `init_model` (trained on the bundled
    data); for the mid config the weights are rewritten with the official 65,024-row vocabulary, whose
    projection is the main per-token cost of the real model's head."""
    spec = dict(CONFIGS[name])
    vocab = spec.pop("vocab")
    folder = init_model(root / name, **spec)
    if vocab is not None:
        cfg = TinyConfig(**spec)
        (folder / "config.json").write_text(json.dumps(official_config(cfg, vocab), indent=2) + "\n", encoding="utf-8")
        for old in folder.glob("model*.safetensors"):
            old.unlink()
        write_weights(random_state_dict(cfg, vocab, seed=0), folder)
    return folder


def timed(model, prompts, settings, batch_size, repeats):
    """Best of `repeats` runs (the machine may be shared), and the ids of the last one."""
    best, ids = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        ids = generate_token_ids(model, prompts, settings, batch_size=batch_size, progress=False)
        best = min(best, time.perf_counter() - start)
    return best, ids


def bench_config(name: str, root: Path, args) -> dict:
    folder = build_model(name, root)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, pre_seq_len=PRE_SEQ_LEN, device=args.device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.prefix_encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=generator).to(param.device))

    config = data.DataConfig(max_source_length=64, max_samples=args.samples)
    dataset = data.tokenize_eval(data.load_rows(DATA_DIR / "adgen_sample" / "dev.json", config), tokenizer, config)
    prompts = list(dataset["input_ids"])
    # Random weights almost never emit eos, so every row generates all max_new_tokens: equal work per sample.
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    generate_token_ids(model, prompts[:2], GenerationSettings(max_new_tokens=2), batch_size=2, progress=False)  # warm-up

    row = {"config": name, **{k: v for k, v in CONFIGS[name].items()}, "padded_vocab_size": model.config.vocab_size,
           "pre_seq_len": PRE_SEQ_LEN, "samples": len(prompts), "max_new_tokens": args.max_new_tokens,
           "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1)}
    results = {}
    for batch_size in (1, 16):
        seconds, ids = timed(model, prompts, settings, batch_size, args.repeats)
        results[batch_size] = ids
        new_tokens = sum(len(x) for x in ids)
        row[f"batch{batch_size}_seconds"] = round(seconds, 3)
        row[f"batch{batch_size}_samples_per_s"] = round(len(prompts) / seconds, 3)
        row[f"batch{batch_size}_new_tokens_per_s"] = round(new_tokens / seconds, 1)
    same = results[1] == results[16]
    row["same_outputs"] = same
    row["speedup"] = round(row["batch16_samples_per_s"] / row["batch1_samples_per_s"], 2)
    if not same:
        differing = sum(a != b for a, b in zip(results[1], results[16]))
        raise SystemExit(f"{name}: batch 16 and batch 1 generated different tokens for {differing} prompts")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per setting; the best counts.")
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a shared machine 1 avoids "
                             "OpenMP threads spinning against other processes' load.")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="glmtune-bench-eval-") as tmp:
        for name in args.configs.split(","):
            rows.append(bench_config(name, Path(tmp), args))

    header = f"{'config':<6}{'samples':>8}{'new tok':>8}{'b1 s':>9}{'b1 smp/s':>10}{'b16 s':>9}{'b16 smp/s':>10}{'speedup':>9}{'same':>6}"
    print(header)
    for r in rows:
        print(f"{r['config']:<6}{r['samples']:>8}{r['max_new_tokens']:>8}{r['batch1_seconds']:>9}"
              f"{r['batch1_samples_per_s']:>10}{r['batch16_seconds']:>9}{r['batch16_samples_per_s']:>10}"
              f"{r['speedup']:>8}x{str(r['same_outputs']):>6}")
    report = {
        "benchmark": "glmtune eval generation, greedy, batch 1 vs 16",
        "device": args.device,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "python": sys.version.split()[0], "machine": platform.machine(),
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
