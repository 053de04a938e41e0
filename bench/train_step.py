"""Seconds per P-tuning v2 optimizer step and tokens/s: glmtune vs the official ChatGLM2 code, on CPU.

Config (issue 3): 4 layers, hidden 1024, 16 heads, kv_channels 64, 2 key/value groups, ffn 2736,
vocab 65024, pre_seq_len 128, batch 4 x 193 tokens (64 prompt + 128 answer + eos, loss on the last
129), fp32, random weights, prefix trained and the rest frozen, with and without gradient checkpointing.
A step is forward + backward + grad-norm clip + AdamW + schedule, as the official Trainer runs it.

glmtune's step is `glmtune.train.train_step` (what `glmtune train` runs). The official step runs
`modeling_chatglm.py` from THUDM/chatglm2-6b (fetched by you into a folder outside this repository; it is
never part of glmtune) in an interpreter with the transformers version its remote code needs, as
ptuning/main.py drives it: `model(input_ids, labels=...)`, gradient checkpointing through
`gradient_checkpointing_enable()` + `enable_input_require_grads()`.

    python bench/train_step.py [--steps 5 --warmup 1] \
        [--official-code /tmp/official-chatglm2 --official-python /tmp/official-venv/bin/python]

Every measurement runs in a fresh process and the implementations alternate, so load from other
processes on the machine hits both alike. Writes bench/results/train_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "train_step.json"
CONFIG = dict(num_layers=4, hidden_size=1024, num_attention_heads=16, kv_channels=64, multi_query_group_num=2,
              ffn_hidden_size=2736, padded_vocab_size=65024, pre_seq_len=128, batch=4, prompt_tokens=64,
              answer_tokens=129)


# --- shared by both workers (plain torch, no glmtune import) ------------------------------------


def _inputs(torch):
    """The same batch for both implementations: random ids, labels -100 on the prompt."""
    g = torch.Generator().manual_seed(0)
    length = CONFIG["prompt_tokens"] + CONFIG["answer_tokens"]
    ids = torch.randint(5, 64789, (CONFIG["batch"], length), generator=g)
    labels = ids.clone()
    labels[:, : CONFIG["prompt_tokens"]] = -100
    return ids, labels


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


def _time_steps(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def worker_glmtune(gc: bool, steps: int, warmup: int) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from glmtune.modeling import ChatGLM2ForCausalLM, glm_config_from_chatglm
    from glmtune.prefix import PrefixConfig
    from glmtune.tiny import TinyConfig, official_config
    from glmtune.train import Dist, SampleKeyedDropout, train_step

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
    dropout = SampleKeyedDropout(0.1, seed=42)
    model.prefix_encoder.dropout = dropout
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 1000)
    ids, labels = _inputs(torch)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
    counter = iter(range(10**9))

    def step():
        first = next(counter) * ids.shape[0]
        train_step(model, params, optimizer, scheduler, [(batch, list(range(first, first + ids.shape[0])))],
                   Dist(), 1.0, dropout)

    return {"times": _time_steps(step, steps, warmup), "torch": torch.__version__}


def worker_official(code_dir: str, gc: bool, steps: int, warmup: int) -> dict:
    import importlib.util

    import torch
    import transformers

    # Import the upstream files as a package (they use a relative import), without trust_remote_code.
    spec = importlib.util.spec_from_file_location("official_chatglm2", Path(code_dir) / "__init__.py",
                                                  submodule_search_locations=[code_dir])
    package = importlib.util.module_from_spec(spec)
    sys.modules["official_chatglm2"] = package
    spec.loader.exec_module(package)
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
    ids, labels = _inputs(torch)
    # The official ChatGLM2 tokenizer's pad() adds an all-ones attention mask and 0..L-1 position ids.
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise RuntimeError("official step produced a non-finite loss")

    return {"times": _time_steps(step, steps, warmup), "torch": torch.__version__, "transformers": transformers.__version__}


# --- driver ------------------------------------------------------------------------------------


def _run_worker(python: str, impl: str, gc: bool, args) -> dict:
    cmd = [python, str(HERE), "--worker", impl, "--gc", str(int(gc)), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if impl == "official":
        cmd += ["--official-code", str(args.official_code)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = str(HERE.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the alternating measurements")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--official-code", type=Path, help="folder with upstream modeling_chatglm.py + configuration_chatglm.py")
    ap.add_argument("--official-python", default=sys.executable, help="interpreter with transformers 4.3x for the official code")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=["glmtune", "official"], help=argparse.SUPPRESS)
    ap.add_argument("--gc", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        result = (worker_glmtune(bool(args.gc), args.steps, args.warmup) if args.worker == "glmtune"
                  else worker_official(str(args.official_code), bool(args.gc), args.steps, args.warmup))
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
    times: dict[tuple[str, bool], list[float]] = {}
    versions: dict[str, dict] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for gc in (False, True):
            for impl in impls:
                python = args.official_python if impl == "official" else sys.executable
                out = _run_worker(python, impl, gc, args)
                times.setdefault((impl, gc), []).extend(out.pop("times"))
                versions[impl] = out
                print(f"  {impl:8s} gradient checkpointing {'on ' if gc else 'off'}: "
                      f"{statistics.median(times[(impl, gc)]):.3f} s/step", file=sys.stderr)
                load.append(os.getloadavg()[0])

    tokens = CONFIG["batch"] * (CONFIG["prompt_tokens"] + CONFIG["answer_tokens"])
    rows = []
    for (impl, gc), ts in times.items():
        median = statistics.median(ts)
        rows.append({"impl": impl, "gradient_checkpointing": gc, "median_step_s": round(median, 4),
                     "tokens_per_s": round(tokens / median, 1), "step_times_s": [round(t, 4) for t in ts]})
    speedup = {}
    for gc in (False, True):
        own, ref = times.get(("glmtune", gc)), times.get(("official", gc))
        if own and ref:
            speedup["gc_on" if gc else "gc_off"] = round(statistics.median(ref) / statistics.median(own), 2)
    # ptuning/main.py always turns gradient checkpointing on; glmtune makes it a choice (--no-gradient-checkpointing).
    as_shipped = None
    if times.get(("glmtune", False)) and times.get(("official", True)):
        as_shipped = round(statistics.median(times[("official", True)]) / statistics.median(times[("glmtune", False)]), 2)
    payload = {
        "benchmark": "train_step", "config": CONFIG, "tokens_per_step": tokens, "dtype": "float32", "device": "cpu",
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1min": load},
        "versions": versions, "results": rows, "speedup_vs_official": speedup,
        "speedup_glmtune_no_checkpointing_vs_official_as_shipped": as_shipped,
        "official_code": str(args.official_code) if args.official_code else None,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, args.output)

    print(f"{'impl':10}{'grad ckpt':>10}{'s/step':>10}{'tokens/s':>10}{'speedup':>9}")
    for row in rows:
        key = "gc_on" if row["gradient_checkpointing"] else "gc_off"
        ratio = f"{speedup[key]:.2f}x" if row["impl"] == "glmtune" and key in speedup else ""
        print(f"{row['impl']:10}{'on' if row['gradient_checkpointing'] else 'off':>10}"
              f"{row['median_step_s']:>10.3f}{row['tokens_per_s']:>10.1f}{ratio:>9}")
    if as_shipped is not None:
        print(f"glmtune without checkpointing vs the official script (always checkpointing): {as_shipped:.2f}x")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
