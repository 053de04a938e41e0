"""Seconds per P-tuning v2 optimizer step and tokens/s: glmtune vs the official ChatGLM2 code, on CPU.

Model (issue 3): 4 layers, hidden 1024, 16 heads, kv_channels 64, 2 key/value groups, ffn 2736, vocab 65024,
pre_seq_len 128, fp32, random weights, prefix trained and the rest frozen, with and without gradient
checkpointing. A step is forward + backward + grad-norm clip + AdamW + schedule, as the official Trainer runs it.

Two scenarios (`--scenario fixed|adgen|both`):

* fixed: batch 4 x 193 tokens (64 prompt + 128 answer + eos, loss on the last 129), no padding: the
  compute-bound case, where only the LM head (glmtune projects labelled positions only) differs.
* adgen: batches of 4 rows whose (prompt, answer) token lengths are drawn, seeded, from the real ADGEN
  train-mode lengths (glmtune's preprocessing of the reference AdvertiseGen/dev.json with the real tokenizer,
  max_source_length 64, max_target_length 128); ids are random. glmtune gets the batches its trainer builds
  (`glmtune.data.preprocess.collate_train`: right padding to the batch's longest row, masked). The official model gets
  what THUDM/ChatGLM2-6B `ptuning/main.py` feeds it: `preprocess_function_train` pads every row with id 0 to
  max_source_length + max_target_length = 192 (a row whose prompt and answer are both cut is 193 long and
  stays so; upstream's collator, `padding=False`, could not stack it with 192-long rows, so such a batch is
  given 193 here), labels -100 on the prompt and the padding, and the tokenizer's `pad()` adds an all-ones
  attention mask, so the padding runs as tokens. Tokens/s counts real (non-pad) tokens only.

glmtune's step is `glmtune.train.loop.train_step` (what `glmtune train` runs). The official step runs
`modeling_chatglm.py` from THUDM/chatglm2-6b (fetched by you into a folder outside this repository; it is
never part of glmtune) in an interpreter with the transformers version its remote code needs, as
ptuning/main.py drives it: `model(input_ids, labels=...)`, gradient checkpointing through
`gradient_checkpointing_enable()` + `enable_input_require_grads()`.

    python bench/train_step.py [--scenario both --steps 5 --warmup 1 --rounds 2 --threads 1] \
        [--official-code /tmp/official-chatglm2 --official-python /tmp/official-venv/bin/python]

Every measurement runs in a fresh process over the same sequence of batches, and the implementations
alternate, so load from other processes on the machine hits both alike. Writes bench/results/train_step.json
(both scenarios) and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "train_step.json"
REFERENCE = HERE.parents[2] / "shared" / "reference"  # ../shared/reference from the project root
CONFIG = dict(num_layers=4, hidden_size=1024, num_attention_heads=16, kv_channels=64, multi_query_group_num=2,
              ffn_hidden_size=2736, padded_vocab_size=65024, pre_seq_len=128, batch=4, prompt_tokens=64,
              answer_tokens=129)
ADGEN = dict(max_source_length=64, max_target_length=128, seed=0)
PAD_ID, IGNORE = 0, -100


# --- shared by both workers (plain torch, no glmtune import) ------------------------------------


def _fixed_inputs(torch):
    """The fixed scenario's batch: random ids, labels -100 on the prompt."""
    g = torch.Generator().manual_seed(0)
    length = CONFIG["prompt_tokens"] + CONFIG["answer_tokens"]
    ids = torch.randint(5, 64789, (CONFIG["batch"], length), generator=g)
    labels = ids.clone()
    labels[:, : CONFIG["prompt_tokens"]] = IGNORE
    return ids, labels


def _adgen_rows(torch, spec: dict) -> list[list[tuple]]:
    """Per batch, unpadded (ids, labels) rows of the drawn lengths; the same ids for both implementations."""
    batches = []
    for b, rows in enumerate(spec["batches"]):
        out = []
        for r, (prompt, answer) in enumerate(rows):
            g = torch.Generator().manual_seed(1000 * b + r + 7)
            ids = torch.randint(5, 64789, (prompt + answer,), generator=g)  # >= 5: never the pad id
            labels = ids.clone()
            labels[:prompt] = IGNORE
            out.append((ids, labels))
        batches.append(out)
    return batches


def _init_(torch, named_params, skip):
    """N(0, 0.02) matrices, unit norms, zero biases (the official model leaves memory uninitialised)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in named_params:
            if skip(name):
                continue
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _time_steps(step, batches: list, warmup: int) -> list[float]:
    """Run `step` on every batch; the first `warmup` are untimed."""
    for batch in batches[:warmup]:
        step(batch)
    times = []
    for batch in batches[warmup:]:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    return times


def worker_glmtune(gc: bool, steps: int, warmup: int, spec: dict | None) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from glmtune.data.preprocess import collate_train
    from glmtune.model.modeling import ChatGLM2ForCausalLM, glm_config_from_chatglm
    from glmtune.model.prefix import PrefixConfig
    from glmtune.model.tiny import TinyConfig, official_config
    from glmtune.train.loop import Dist, train_step

    c = CONFIG
    cfg = official_config(TinyConfig(c["num_layers"], c["hidden_size"], c["num_attention_heads"], c["kv_channels"],
                                     c["multi_query_group_num"], c["ffn_hidden_size"]), c["padded_vocab_size"])
    torch.manual_seed(0)
    model = ChatGLM2ForCausalLM(glm_config_from_chatglm(cfg), prefix=PrefixConfig(c["pre_seq_len"]))
    model.chatglm_config = cfg
    _init_(torch, model.named_parameters(), skip=lambda n: n.startswith("prefix_encoder."))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("prefix_encoder."))
    model.train()
    if gc:
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 1000)
    if spec is None:
        ids, labels = _fixed_inputs(torch)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                 "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
        batches = [batch] * (warmup + steps)
    else:  # exactly what glmtune.train.loop.make_batch builds from tokenized rows
        batches = [collate_train([{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in rows], pad_token_id=PAD_ID)
                   for rows in _adgen_rows(torch, spec)]
    counter = iter(range(10**9))

    def step(batch):
        first = next(counter) * batch["input_ids"].shape[0]
        train_step(model, params, optimizer, scheduler, [(batch, list(range(first, first + batch["input_ids"].shape[0])))],
                   Dist(), 1.0, seed=42)

    return {"times": _time_steps(step, batches, warmup), "widths": [int(b["input_ids"].shape[1]) for b in batches],
            "torch": torch.__version__}


def worker_official(code_dir: str, gc: bool, steps: int, warmup: int, spec: dict | None) -> dict:
    import importlib.util

    import torch
    import transformers

    # Import the upstream files as a package (they use a relative import), without trust_remote_code.
    spec_ = importlib.util.spec_from_file_location("official_chatglm2", Path(code_dir) / "__init__.py",
                                                   submodule_search_locations=[code_dir])
    package = importlib.util.module_from_spec(spec_)
    sys.modules["official_chatglm2"] = package
    spec_.loader.exec_module(package)
    from official_chatglm2.configuration_chatglm import ChatGLMConfig
    from official_chatglm2.modeling_chatglm import ChatGLMForConditionalGeneration

    c = CONFIG
    config = ChatGLMConfig(num_layers=c["num_layers"], padded_vocab_size=c["padded_vocab_size"],
                           hidden_size=c["hidden_size"], ffn_hidden_size=c["ffn_hidden_size"],
                           kv_channels=c["kv_channels"], num_attention_heads=c["num_attention_heads"],
                           multi_query_attention=True, multi_query_group_num=c["multi_query_group_num"],
                           add_qkv_bias=True, seq_length=2048, original_rope=True, pre_seq_len=c["pre_seq_len"],
                           prefix_projection=False, torch_dtype=torch.float32, use_cache=True)
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(config, empty_init=False)
    _init_(torch, model.named_parameters(), skip=lambda n: "prefix_encoder" in n)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["transformer.prefix_encoder.embedding.weight"], trainable
    if gc:  # what ptuning/main.py does before trainer.train()
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 0, 1000)
    if spec is None:
        batches = [_fixed_inputs(torch)] * (warmup + steps)
    else:  # preprocess_function_train: every row right-padded with id 0 to the fixed width, labels -100 there
        batches = []
        for rows, width in zip(_adgen_rows(torch, spec), spec["official_widths"]):
            ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            for i, (row_ids, row_labels) in enumerate(rows):
                ids[i, : len(row_ids)], labels[i, : len(row_labels)] = row_ids, row_labels
            batches.append((ids, labels))

    def step(batch):
        ids, labels = batch
        # The official ChatGLM2 tokenizer's pad() adds an all-ones attention mask and 0..L-1 position ids.
        mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids)
        loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise RuntimeError("official step produced a non-finite loss")

    return {"times": _time_steps(step, batches, warmup), "widths": [int(b[0].shape[1]) for b in batches],
            "torch": torch.__version__, "transformers": transformers.__version__}


# --- the adgen length distribution (driver only) --------------------------------------------------


def adgen_spec(reference: Path, n_batches: int, grouped: bool = False) -> dict:
    """Train-mode (prompt, answer + eos) token lengths of ADGEN dev, and `n_batches` seeded draws of them.

    `grouped` models `glmtune train --group-by-length`: 50 batches' worth of rows drawn, sorted by length,
    cut into batches, and `n_batches` of them taken evenly spaced from longest to shortest."""
    import numpy as np

    from glmtune.data.preprocess import DataConfig, load_rows, tokenize_train
    from glmtune.families.tokenizer import load_tokenizer

    config = DataConfig(max_source_length=ADGEN["max_source_length"], max_target_length=ADGEN["max_target_length"])
    tokenizer = load_tokenizer(reference / "chatglm2-6b")
    dataset = tokenize_train(load_rows(reference / "AdvertiseGen" / "dev.json", config), tokenizer, config)
    # The prompt is the first min(prompt_tokens, max_source_length) ids; the rest is answer + eos.
    prompts = [min(n, config.max_source_length) for n in dataset["prompt_tokens"]]
    pairs = [(p, len(ids) - p) for p, ids in zip(prompts, dataset["input_ids"])]
    rng = random.Random(ADGEN["seed"])
    if grouped:
        pool = sorted((list(rng.choice(pairs)) for _ in range(50 * CONFIG["batch"])), key=lambda r: -(r[0] + r[1]))
        cut = [pool[i: i + CONFIG["batch"]] for i in range(0, len(pool), CONFIG["batch"])]
        picks = [round(k * (len(cut) - 1) / max(1, n_batches - 1)) for k in range(n_batches)]
        batches = [cut[i] for i in picks]
    else:
        batches = [[list(rng.choice(pairs)) for _ in range(CONFIG["batch"])] for _ in range(n_batches)]
    # Official rows are padded to max_source + max_target; a 193-long row (both parts cut) cannot be padded.
    fixed = ADGEN["max_source_length"] + ADGEN["max_target_length"]
    widths = [max([fixed] + [p + a for p, a in rows]) for rows in batches]

    def pct(values):
        p = np.percentile(values, [10, 50, 90, 99])
        return {"p10": float(p[0]), "p50": float(p[1]), "p90": float(p[2]), "p99": float(p[3]), "max": int(max(values))}

    return {
        "source": str(reference / "AdvertiseGen" / "dev.json"), "rows": len(pairs), **ADGEN,
        "lengths_sha256": hashlib.sha256(json.dumps(pairs).encode()).hexdigest(),
        "prompt_tokens": pct([p for p, _ in pairs]), "answer_tokens_with_eos": pct([a for _, a in pairs]),
        "row_tokens": pct([p + a for p, a in pairs]),
        "batches": batches, "official_widths": widths,
    }


# --- driver ------------------------------------------------------------------------------------


def _run_worker(python: str, impl: str, gc: bool, args, spec_file: Path | None) -> dict:
    cmd = [python, str(HERE), "--worker", impl, "--gc", str(int(gc)), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if impl == "official":
        cmd += ["--official-code", str(args.official_code)]
    if spec_file is not None:
        cmd += ["--spec", str(spec_file)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = str(HERE.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_scenario(name: str, spec: dict | None, impls: list[str], args, versions: dict) -> dict:
    """Alternate implementations (and checkpointing) over `args.rounds` rounds; summarise per case."""
    timed = range(args.warmup, args.warmup + args.steps)
    if spec is None:
        real = [CONFIG["batch"] * (CONFIG["prompt_tokens"] + CONFIG["answer_tokens"])] * len(timed)
        label = [CONFIG["batch"] * CONFIG["answer_tokens"]] * len(timed)
    else:
        real = [sum(p + a for p, a in spec["batches"][i]) for i in timed]
        label = [sum(a for _, a in spec["batches"][i]) for i in timed]
    times: dict[tuple[str, bool], list[float]] = {}
    widths: dict[str, list[int]] = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = None
        if spec is not None:
            spec_file = Path(tmp) / "spec.json"
            spec_file.write_text(json.dumps(spec))
        for _ in range(args.rounds):
            for gc in (False, True):
                for impl in impls:
                    python = args.official_python if impl == "official" else sys.executable
                    out = _run_worker(python, impl, gc, args, spec_file)
                    times.setdefault((impl, gc), []).extend(out.pop("times"))
                    widths[impl] = out.pop("widths")
                    versions[impl] = out
                    print(f"  {name:5s} {impl:8s} gradient checkpointing {'on ' if gc else 'off'}: "
                          f"{statistics.median(times[(impl, gc)]):.3f} s/step", file=sys.stderr)
                    load.append(os.getloadavg()[0])

    rows, tokens_per_s, medians = [], {}, {}
    for (impl, gc), ts in times.items():
        # Same batches every round, so total real tokens / total time is the throughput over the sequence.
        total_tokens = sum(real) * args.rounds
        tokens_per_s[(impl, gc)] = total_tokens / sum(ts)
        medians[(impl, gc)] = statistics.median(ts)
        processed = sum(widths[impl][i] for i in timed) * CONFIG["batch"]
        rows.append({"impl": impl, "gradient_checkpointing": gc, "median_step_s": round(medians[(impl, gc)], 4),
                     "mean_step_s": round(statistics.fmean(ts), 4), "real_tokens_per_s": round(tokens_per_s[(impl, gc)], 1),
                     "padded_tokens_per_step": round(processed / len(timed), 1),
                     "step_times_s": [round(t, 4) for t in ts]})
    ratio, median_ratio = {}, {}
    for gc in (False, True):
        key = "gc_on" if gc else "gc_off"
        if ("glmtune", gc) in times and ("official", gc) in times:
            ratio[key] = round(tokens_per_s[("glmtune", gc)] / tokens_per_s[("official", gc)], 2)
            median_ratio[key] = round(medians[("official", gc)] / medians[("glmtune", gc)], 2)
    # ptuning/main.py always turns gradient checkpointing on; glmtune makes it a choice (--no-gradient-checkpointing).
    as_shipped = None
    if ("glmtune", False) in times and ("official", True) in times:
        as_shipped = round(tokens_per_s[("glmtune", False)] / tokens_per_s[("official", True)], 2)
    result = {
        "real_tokens_per_timed_step": real, "label_tokens_per_timed_step": label,
        "batch_widths": widths, "load_avg_1min": load, "results": rows,
        "speedup_vs_official": ratio, "median_step_speedup_vs_official": median_ratio,
        "speedup_glmtune_no_checkpointing_vs_official_as_shipped": as_shipped,
    }
    if spec is not None:
        result["lengths"] = spec
    return result


def print_table(name: str, scenario: dict) -> None:
    print(f"\n[{name}]  real tokens/timed step: {scenario['real_tokens_per_timed_step']}")
    print(f"{'impl':10}{'grad ckpt':>10}{'s/step':>9}{'padded tok':>12}{'real tok/s':>12}{'speedup':>9}")
    for row in scenario["results"]:
        key = "gc_on" if row["gradient_checkpointing"] else "gc_off"
        ratio = scenario["speedup_vs_official"].get(key) if row["impl"] == "glmtune" else None
        print(f"{row['impl']:10}{'on' if row['gradient_checkpointing'] else 'off':>10}{row['median_step_s']:>9.3f}"
              f"{row['padded_tokens_per_step']:>12.1f}{row['real_tokens_per_s']:>12.1f}"
              f"{f'{ratio:.2f}x' if ratio else '':>9}")
    if scenario["speedup_glmtune_no_checkpointing_vs_official_as_shipped"] is not None:
        print("glmtune without checkpointing vs the official script (always checkpointing): "
              f"{scenario['speedup_glmtune_no_checkpointing_vs_official_as_shipped']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=["fixed", "adgen", "adgen-grouped", "both", "all"], default="both",
                    help="both = fixed + adgen; all adds adgen-grouped (glmtune --group-by-length batches)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (adgen: distinct batches)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the alternating measurements")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reference", type=Path, default=REFERENCE, help="folder with AdvertiseGen/dev.json and chatglm2-6b/")
    ap.add_argument("--official-code", type=Path, help="folder with upstream modeling_chatglm.py + configuration_chatglm.py")
    ap.add_argument("--official-python", default=sys.executable, help="interpreter with transformers 4.3x for the official code")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=["glmtune", "official"], help=argparse.SUPPRESS)
    ap.add_argument("--gc", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        sys.exit("--steps and --rounds must be at least 1, --warmup at least 0")

    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        spec = json.loads(args.spec.read_text()) if args.spec else None
        result = (worker_glmtune(bool(args.gc), args.steps, args.warmup, spec) if args.worker == "glmtune"
                  else worker_official(str(args.official_code), bool(args.gc), args.steps, args.warmup, spec))
        print(json.dumps(result))
        return

    if args.official_code is not None:
        missing = [f for f in ("modeling_chatglm.py", "configuration_chatglm.py") if not (args.official_code / f).is_file()]
        if missing:
            sys.exit(f"--official-code {args.official_code}: missing {missing}")
        if args.official_code.resolve().is_relative_to(HERE.parents[1]):
            sys.exit("--official-code must be outside the glmtune repository (upstream code is not part of it)")
        (args.official_code / "__init__.py").touch()
    impls = ["glmtune"] + (["official"] if args.official_code else [])
    versions: dict[str, dict] = {}
    scenarios: dict[str, dict] = {}
    if args.scenario in ("fixed", "both", "all"):
        scenarios["fixed"] = run_scenario("fixed", None, impls, args, versions)
    wanted = {"both": ["adgen"], "all": ["adgen", "adgen-grouped"]}.get(args.scenario, [args.scenario])
    for name in [n for n in wanted if n != "fixed"]:
        needed = [args.reference / "AdvertiseGen" / "dev.json", args.reference / "chatglm2-6b" / "tokenizer.model"]
        absent = [str(p) for p in needed if not p.is_file()]
        if absent:
            reason = f"reference data absent ({', '.join(absent)}); pass --reference"
            print(f"{name} scenario skipped: {reason}", file=sys.stderr)
            scenarios[name] = {"skipped": reason}
        else:
            spec = adgen_spec(args.reference, args.warmup + args.steps, grouped=name == "adgen-grouped")
            scenarios[name] = run_scenario(name, spec, impls, args, versions)

    if args.output.is_file():  # scenarios not run this time keep their previous figures
        previous = json.loads(args.output.read_text()).get("scenarios", {})
        scenarios = {**{k: v for k, v in previous.items() if k not in scenarios}, **scenarios}
    payload = {
        "benchmark": "train_step", "config": CONFIG, "dtype": "float32", "device": "cpu",
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions, "official_code": str(args.official_code) if args.official_code else None,
        "scenarios": scenarios,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, args.output)
    for name, scenario in scenarios.items():
        if "results" in scenario:
            print_table(name, scenario)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
