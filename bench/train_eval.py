"""What validation during `glmtune train` costs: seconds per evaluation vs seconds per training step, mid config.

Mid config as bench/eval.py and bench/train_step.py (4 layers, hidden 1024, 16 heads, kv_channels 64, 2 groups,
ffn 2736, padded vocab 65024, pre_seq_len 128, fp32, random weights), rows from the bundled ADGEN-style dev
file in train format (max_source_length 64, max_target_length 128). Measured with the functions
`glmtune train` runs:

* a training step: `glmtune.train.loop.train_step`, batch 8, gradient checkpointing on (the default);
* the validation loss: `glmtune.train.validation.validation_loss` over `--val-rows` rows, eval batch 8;
* `--eval-generate K`: `glmtune.train.validation.generation_scores` (batched greedy + BLEU/ROUGE) for K rows.

Every round measures all three in turn (so machine load hits them alike); all rounds are printed and
written to bench/results/train_eval.json.

    python bench/train_eval.py [--rounds 3 --val-rows 100 --generate 8 --max-new-tokens 64 --threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from glmtune.data import preprocess as data
from glmtune.model.loading import load_model
from glmtune.model.tiny import DATA_DIR
from glmtune.families.tokenizer import load_tokenizer
from glmtune.train.loop import Dist, train_step
from glmtune.train.validation import generation_scores, prompts_and_references, validation_loss

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "train_eval.json"


def _bench_eval_module():
    # bench/ is not a package: load bench/eval.py (its mid-config model builder) by path.
    spec = importlib.util.spec_from_file_location("bench_eval", HERE.parent / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--val-rows", type=int, default=100)
    parser.add_argument("--generate", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_eval = _bench_eval_module()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="glmtune-bench-train-eval-") as tmp:
        folder = bench_eval.build_model("mid", Path(tmp))
        tokenizer = load_tokenizer(folder)
        torch.manual_seed(0)
        model = load_model(folder, pre_seq_len=128).train()
        model.enable_gradient_checkpointing()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        config = data.DataConfig(max_samples=args.val_rows)
        dataset = data.tokenize_train(data.load_rows(DATA_DIR / "adgen_sample" / "dev.json", config), tokenizer, config)
        dataset = dataset.select_columns(["input_ids", "labels"])
        batch = data.collate_train([dataset[i] for i in range(8)], tokenizer.pad_token_id)
        prompts, references = prompts_and_references(dataset, tokenizer, args.generate)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            train_step(model, params, optimizer, scheduler, [(batch, list(range(8)))], Dist(), 1.0, seed=42)
            t1 = time.perf_counter()
            loss, tokens = validation_loss(model, dataset, 8, tokenizer.pad_token_id, Dist())
            t2 = time.perf_counter()
            scores, _ = generation_scores(model, tokenizer, prompts, references, args.max_new_tokens, 8)
            t3 = time.perf_counter()
            row = {"round": r + 1, "train_step_s": round(t1 - t0, 3), "validation_loss_s": round(t2 - t1, 3),
                   "generate_s": round(t3 - t2, 3), "val_rows": len(dataset), "val_label_tokens": tokens,
                   "generate_rows": len(prompts), "max_new_tokens": args.max_new_tokens,
                   "loss_eval_in_steps": round((t2 - t1) / (t1 - t0), 2),
                   "generate_in_steps": round((t3 - t2) / (t1 - t0), 2)}
            rounds.append(row)
            print(json.dumps(row))
    result = {"benchmark": "train_eval", "config": "mid (4 layers, hidden 1024, vocab 65024, pre_seq_len 128, fp32)",
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "load_average_before": os.getloadavg()[0], "rounds": rounds}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{'round':>5} {'step s':>8} {'val loss s':>11} {'= steps':>8} {'generate s':>11} {'= steps':>8}")
    for row in rounds:
        print(f"{row['round']:>5} {row['train_step_s']:>8} {row['validation_loss_s']:>11} {row['loss_eval_in_steps']:>8} "
              f"{row['generate_s']:>11} {row['generate_in_steps']:>8}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
