"""`glmtune train`: P-tuning v2 of a frozen ChatGLM2, in one process or data-parallel under torchrun.

Reproduces the training run of THUDM/ChatGLM2-6B `ptuning/main.py` + `train.sh` (transformers'
Seq2SeqTrainer): the prefix encoder is the only trainable tensor (fp32); AdamW (0.9, 0.999, 1e-8) with a
linear decay to 0 and no warmup, no weight decay, gradient-norm clipping at 1.0, seed 42; prefix dropout
0.1; rows `prompt + answer + eos` (glmtune.data) with the loss on the answer and eos only.

Why an own loop rather than transformers' Trainer: what this command guarantees sits where the Trainer
is least flexible: checkpoints that hold only the prefix in the official format and appear atomically
(the Trainer writes `checkpoint-N/` in place, as whole models), a resumed run bitwise equal to an
uninterrupted one, the `loss_only` forward, and a loss that does not depend on how a global batch is
split over processes. The optimiser and schedule are still the libraries' (torch AdamW, transformers'
`get_linear_schedule_with_warmup`), and processes are torchrun + torch.distributed (gloo on CPU, nccl on GPU).

Deliberate differences from the official run:
* Loss normalisation: a step minimises the summed token cross-entropy of the global batch (all processes,
  all accumulation micro-batches) divided by its number of label tokens, as transformers' Trainer does since
  4.46 (`num_items_in_batch`). So 2 processes x batch b equal 1 process x batch 2b, and any accumulation
  split. (Official train.sh, batch 1 x 16 accumulation, averages per-row means: long answers weigh less.)
* Prefix dropout: the official Bernoulli(0.9)/0.9 mask per row, drawn from a generator seeded by
  (seed, the row's position in the data stream), so neither the process split nor a restart changes it.
* Data order: one seeded permutation per epoch; global batch k is positions [kG, (k+1)G) of the
  concatenated epochs, so every step is a full batch (epochs may end mid-batch).
* Batches are right-padded to their longest row, not to 64+128 tokens: real tokens never see padding,
  so the loss is the same and the batches shorter.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from glmtune.checkpoint import (
    LOSS_PLOT,
    METRICS_FILE,
    RESULTS_FILE,
    capture_rng,
    clear_partial,
    clear_run,
    has_run_artifacts,
    latest_checkpoint,
    load_checkpoint_state,
    plot_loss_curve,
    restore_rng,
    save_checkpoint,
    truncate_metrics,
    write_results,
)
from glmtune.errors import GlmtuneError
from glmtune.modeling import IGNORE_INDEX
from glmtune.train_config import TrainConfig


DEFAULT_PRE_SEQ_LEN = 128  # the official train.sh


class TrainingDiverged(GlmtuneError):
    """The loss or the gradient norm stopped being finite."""


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the job; world 1 means no process group at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun job if there is one (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise GlmtuneError(f"--device {device}: torch sees no CUDA device")
    if world == 1:
        return Dist(device=torch.device(("cuda" if cuda else "cpu") if device == "auto" else device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(target)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local, target)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- data order and dropout --------------------------------------------------------------------


class DataStream:
    """Global sample positions -> dataset rows; epoch e is a permutation seeded by seed + e.

    With `lengths` and `group_size` (transformers' `group_by_length`): the permutation is cut into
    mega-batches of `group_size` rows, each sorted by length (longest first), so a global batch holds
    rows of similar length and per-batch padding shrinks; still a pure function of (seed, epoch).
    """

    def __init__(self, rows: int, seed: int, lengths: list[int] | None = None, group_size: int = 0):
        self.rows, self.seed = rows, seed
        self.lengths, self.group_size = lengths, group_size
        self._epoch, self._perm = -1, []

    def row(self, position: int) -> int:
        epoch, offset = divmod(position, self.rows)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.rows, generator=generator).tolist()
            if self.lengths is not None and self.group_size > 1:
                perm = [i for start in range(0, self.rows, self.group_size)
                        for i in sorted(perm[start: start + self.group_size], key=lambda r: -self.lengths[r])]
            self._perm, self._epoch = perm, epoch
        return self._perm[offset]


class SampleKeyedDropout(nn.Module):
    """Dropout over the batched prefix whose mask for row i depends only on (seed, keys[i]).

    Same distribution as the official `Dropout(0.1)` after batching (each row its own mask), but the
    trainer sets `keys` to the rows' stream positions before each forward, so a row gets the same mask
    whichever process or restart computes it.
    """

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p, self.seed = p, seed
        self.keys: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.keys is None or len(self.keys) != x.shape[0]:
            raise RuntimeError(f"SampleKeyedDropout: {x.shape[0]} rows but keys {self.keys!r}")
        keep = 1.0 - self.p
        masks = []
        for key in self.keys:
            generator = torch.Generator(device=x.device).manual_seed(hash((self.seed, key)) & (2**63 - 1))
            masks.append(torch.empty(x.shape[1:], device=x.device).bernoulli_(keep, generator=generator))
        return x * (torch.stack(masks) / keep).to(x.dtype)


def make_batch(dataset, stream: DataStream, positions: list[int], pad_id: int, device: torch.device) -> dict:
    from glmtune.data import collate_train

    columns = dataset[[stream.row(p) for p in positions]]
    features = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    return {k: v.to(device) for k, v in collate_train(features, pad_token_id=pad_id).items()}


# --- one optimizer step ------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    learning_rate: float
    tokens: int  # real (non-pad) tokens in the global batch
    label_tokens: int


def train_step(model, params, optimizer, scheduler, micro_batches, dist: Dist = Dist(), max_grad_norm: float = 1.0,
               dropout: SampleKeyedDropout | None = None) -> StepResult:
    """Forward/backward over this process's micro-batches [(batch, stream positions)], then one AdamW step.

    Each micro-batch's mean loss is weighted by its share of the global batch's label tokens, and the
    gradients are summed over processes, which is the gradient of the global token-mean loss.
    """
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b, _ in micro_batches]
    totals = torch.tensor([sum(counts), sum(int(b["attention_mask"].sum()) for b, _ in micro_batches)],
                          dtype=torch.float64, device=dist.device)
    n_total, tokens = (int(v) for v in dist.all_reduce(totals).tolist())
    if n_total == 0:
        raise GlmtuneError("a global batch has no label tokens (every answer truncated away?)")
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    for (batch, positions), n in zip(micro_batches, counts):
        if n == 0:
            continue
        if dropout is not None:
            dropout.keys = positions
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=batch["labels"], loss_only=True).loss
        (loss * (n / n_total)).backward()
        loss_sum += loss.detach().double() * n
    if dist.world > 1:
        # One flat all-reduce: the prefix is a few tensors, so DDP's bucketing would buy nothing.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = dist.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).clone()
        dist.all_reduce(loss_sum)
    step_loss = loss_sum.item() / n_total
    if not math.isfinite(step_loss):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss is {step_loss}")
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"gradient norm is {norm.item()} (loss {step_loss:.4f})")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, float(norm), lr, tokens, n_total)


# --- the run -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_checkpoint: Path | None
    losses: list[tuple[int, float]]  # (step, loss) of the steps this call ran
    loss_curve: Path | None = None


def train(config: TrainConfig) -> TrainResult:
    """Run `glmtune train` with `config` (in this process, or as one rank of a torchrun job)."""
    config.validate()
    dist = setup_distributed(config.device)
    try:
        return _train(config, dist)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, dist: Dist) -> TrainResult:
    from tqdm.auto import tqdm

    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if dist.main else (lambda msg: None)
    out = Path(config.output_dir)
    resume_dir = _resume_dir(config, out)
    leftovers = has_run_artifacts(out)
    if resume_dir is None and leftovers and not config.overwrite_output_dir:
        raise GlmtuneError(f"{out}: holds a previous training run ({', '.join(leftovers[:3])}"
                           f"{', ...' if len(leftovers) > 3 else ''}); pass --resume to continue it or --overwrite-output-dir to start over")

    seed_everything(config.seed)
    from glmtune.loading import load_model
    from glmtune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.model_path)
    dataset = _load_dataset(config, tokenizer, dist, say)
    from glmtune.loading import resolve_device

    _, dtype = resolve_device(str(dist.device), config.dtype)
    torch.manual_seed(config.seed)  # a fresh prefix starts from the same values on every process
    # Resuming reads the prefix shape from the checkpoint (flags given must agree with it).
    pre_seq_len, projection = config.pre_seq_len, config.prefix_projection
    if resume_dir is None:
        pre_seq_len, projection = pre_seq_len or DEFAULT_PRE_SEQ_LEN, bool(projection)
    model = load_model(config.model_path, ptuning_checkpoint=resume_dir, pre_seq_len=pre_seq_len,
                       prefix_projection=projection, quantization_bit=config.quantization_bit,
                       dtype=dtype, device=dist.device)
    model.train()
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    dropout = SampleKeyedDropout(model.prefix_encoder.dropout.p, config.seed)
    model.prefix_encoder.dropout = dropout
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named or any(not n.startswith("prefix_encoder.") for n, _ in named):
        raise RuntimeError(f"only the prefix may train, found trainable {[n for n, _ in named]}")
    params = [p for _, p in named]

    from transformers import get_linear_schedule_with_warmup

    batch, accum = config.per_device_train_batch_size, config.gradient_accumulation_steps
    global_batch, rows = dist.world * batch * accum, len(dataset)
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * rows / global_batch))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, total_steps)

    step = 0
    if resume_dir is not None:
        step = _restore(resume_dir, config, dist, optimizer, scheduler, global_batch, rows, total_steps)
        say(f"resuming from {resume_dir} at step {step}")
    # Only now that data, model and state have loaded does anything in the output folder change.
    dist.barrier()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_dir is None and config.overwrite_output_dir:
            clear_run(out)
        clear_partial(out)
        truncate_metrics(out / METRICS_FILE, step)
    dist.barrier()
    say(f"training on {rows} rows: {total_steps} steps x {global_batch} rows ({dist.world} process(es) x batch {batch}"
        f" x {accum} accumulation) = {total_steps * global_batch / rows:.2f} epochs; {sum(p.numel() for p in params):,}"
        f" trainable prefix parameters; {dist.device}, {dtype}, gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}")

    if config.group_by_length:
        # Mega-batches of 50 global batches, as transformers' LengthGroupedSampler.
        lengths = [len(ids) for ids in dataset["input_ids"]]
        stream = DataStream(rows, config.seed, lengths, group_size=50 * global_batch)
    else:
        stream = DataStream(rows, config.seed)
    pad_id = tokenizer.pad_token_id
    last_checkpoint = resume_dir
    losses: list[tuple[int, float]] = []
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
    run_t0, run_tokens = time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, desc="train",
               disable=not dist.main or config.disable_tqdm)
    try:
        while step < total_steps:
            micro = []
            for a in range(accum):
                first = step * global_batch + (a * dist.world + dist.rank) * batch
                positions = list(range(first, first + batch))
                micro.append((make_batch(dataset, stream, positions, pad_id, dist.device), positions))
            try:
                result = train_step(model, params, optimizer, scheduler, micro, dist, config.max_grad_norm, dropout)
            except TrainingDiverged as exc:
                if dist.main:
                    plot_loss_curve(out / METRICS_FILE, out / LOSS_PLOT, title=f"{out.name} (stopped at step {step + 1})")
                kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint had been saved yet"
                raise TrainingDiverged(f"step {step + 1}: {exc}; training stopped without updating the prefix; {kept}"
                                       " (try a lower --learning-rate)") from None
            step += 1
            losses.append((step, result.loss))
            window["loss"] += result.loss
            window["steps"] += 1
            window["tokens"] += result.tokens
            run_tokens += result.tokens
            elapsed = time.perf_counter() - window["t0"]
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.learning_rate:.2e}",
                            tok_s=f"{window['tokens'] / max(elapsed, 1e-9):.0f}", refresh=False)
            if step % config.logging_steps == 0 or step == total_steps:
                record = {"step": step, "epoch": round(step * global_batch / rows, 4),
                          "loss": window["loss"] / window["steps"], "learning_rate": result.learning_rate,
                          "grad_norm": result.grad_norm, "tokens": window["tokens"],
                          "tokens_per_second": round(window["tokens"] / max(elapsed, 1e-9), 1),
                          "elapsed_s": round(time.perf_counter() - run_t0, 3)}
                if dist.main:
                    with open(out / METRICS_FILE, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
            if step % config.save_steps == 0 or step == total_steps:
                state = {"global_step": step, "total_steps": total_steps, "samples_seen": step * global_batch,
                         "epoch": step * global_batch / rows, "global_batch_size": global_batch,
                         "world_size": dist.world, "seed": config.seed, "train_rows": rows,
                         "group_by_length": config.group_by_length, "loss": result.loss, "config": config.to_json()}
                rng = dist.gather(capture_rng())
                if dist.main:
                    save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, rng, state)
                last_checkpoint = out / f"checkpoint-{step}"
                dist.barrier()
    finally:
        bar.close()

    curve = None
    if dist.main:
        curve = plot_loss_curve(out / METRICS_FILE, out / LOSS_PLOT, title=out.name)
        runtime = time.perf_counter() - run_t0
        write_results(out / RESULTS_FILE, {
            "global_step": step, "steps_this_run": len(losses),
            "train_loss": sum(l for _, l in losses) / len(losses) if losses else None,
            "train_runtime_s": round(runtime, 3), "tokens_per_second": round(run_tokens / max(runtime, 1e-9), 1),
            "final_checkpoint": str(last_checkpoint) if last_checkpoint else None,
        })
    return TrainResult(out, step, last_checkpoint, losses, curve)


def _resume_dir(config: TrainConfig, out: Path) -> Path | None:
    if config.resume_from_checkpoint:
        return Path(config.resume_from_checkpoint)
    if config.resume:
        latest = latest_checkpoint(out)
        if latest is None:
            raise GlmtuneError(f"--resume: no complete checkpoint-N folder in {out} to resume from")
        return latest
    return None


def _restore(resume_dir: Path, config: TrainConfig, dist: Dist, optimizer, scheduler, global_batch: int, rows: int,
             total_steps: int) -> int:
    """Load optimizer/scheduler/RNG state; the run must see the same data stream to continue exactly."""
    ckpt = load_checkpoint_state(resume_dir)
    state = ckpt["state"]
    for name, saved, now in (("seed", state["seed"], config.seed), ("global batch size", state["global_batch_size"], global_batch),
                             ("number of training rows", state["train_rows"], rows),
                             ("group_by_length", state.get("group_by_length", False), config.group_by_length),
                             ("total steps (the learning-rate schedule)", state["total_steps"], total_steps)):
        if saved != now:
            raise GlmtuneError(f"{resume_dir}: {name} was {saved} in the interrupted run, now {now}; "
                               "resuming needs the same data, seed and processes x batch x accumulation")
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if dist.rank < len(ckpt["rng"]):
        restore_rng(ckpt["rng"][dist.rank])
    return int(state["global_step"])


def _load_dataset(config: TrainConfig, tokenizer, dist: Dist, say):
    from glmtune.data import DataConfig, format_report
    from glmtune.dataset_store import load_or_build_dataset

    if config.dataset and not Path(config.dataset).is_dir():
        raise GlmtuneError(f"--dataset {config.dataset}: not a folder (pass raw files with --train-file)")
    if config.train_file and Path(config.train_file).is_dir():
        raise GlmtuneError(f"--train-file {config.train_file}: is a folder (pass `glmtune preprocess` output with --dataset)")
    data_config = DataConfig(
        prompt_column=config.prompt_column, response_column=config.response_column,
        history_column=config.history_column, source_prefix=config.source_prefix,
        max_source_length=config.max_source_length, max_target_length=config.max_target_length,
        max_samples=config.max_train_samples,
    )
    source = config.dataset or config.train_file

    def build():
        return load_or_build_dataset(source, tokenizer, data_config, mode="train",
                                     num_workers=config.preprocessing_num_workers)

    # The main process tokenizes and fills the cache first; the others then read it.
    if dist.main:
        dataset, report = build()
    dist.barrier()
    if not dist.main:
        dataset, report = build()
    say(format_report(report))  # max_train_samples was applied by the dataset store (official rule)
    return dataset.select_columns(["input_ids", "labels"])
