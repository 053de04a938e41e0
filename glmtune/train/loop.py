"""`glmtune train`: P-tuning v2 of a frozen ChatGLM2, in one process or data-parallel under torchrun.

Reproduces the training run of THUDM/ChatGLM2-6B `ptuning/main.py` + `train.sh` (transformers'
Seq2SeqTrainer): the prefix encoder is the only trainable tensor (fp32); AdamW (0.9, 0.999, 1e-8) with a
linear decay to 0 and no warmup, no weight decay, gradient-norm clipping at 1.0, seed 42; prefix dropout
0.1; rows `prompt + answer + eos` (glmtune.data.preprocess) with the loss on the answer and eos only.

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
* `--group-by-length` orders each epoch with transformers' own `get_length_grouped_indices` (the logic of
  its `LengthGroupedSampler`), called with a generator seeded by (seed, epoch), so the order stays a pure
  function of the position in the stream and resuming stays exact.

Validation, best checkpoint and early stopping are `glmtune.train.validation`; logs, TensorBoard and the
Ctrl-C handling are `glmtune.train.log`. Which rank writes what: rank 0 writes every file (checkpoints,
metrics.jsonl, TensorBoard, the plot); all ranks train, compute the validation loss on their share of the
rows, and contribute their RNG state to the checkpoint; rank 0 alone generates for `--eval-generate`.
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

from glmtune.train.checkpoint import (
    LOSS_PLOT,
    DiskFull,
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
from glmtune.model.modeling import IGNORE_INDEX
from glmtune.train.config import TrainConfig
from glmtune.train.data import DataStream, TrainData, dropout_keys, load_train_data, make_batch



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

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (decisions such as early stopping must agree)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on one (a signal may reach the ranks at different steps)."""
        if self.world == 1:
            return flag
        return bool(self.all_reduce(torch.tensor([int(flag)], device=self.device)).item())

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


# --- one optimizer step ------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    learning_rate: float
    tokens: int  # real (non-pad) tokens in the global batch
    label_tokens: int


NO_GRADIENT = ("the prefix got no gradient on the first step, so training would change nothing: the prefix "
               "key/values did not reach the loss (e.g. a transformers version whose gradient checkpointing or "
               "cache handling drops them). Try --no-gradient-checkpointing, and report it with your "
               "transformers version")


def train_step(model, params, optimizer, scheduler, micro_batches, dist: Dist = Dist(), max_grad_norm: float = 1.0,
               seed: int | None = None, check_gradient: bool = False) -> StepResult:
    """Forward/backward over this process's micro-batches [(batch, stream positions)], then one AdamW step.

    With `seed`, each row's prefix-dropout mask is keyed by (seed, its stream position) (`dropout_keys`);
    without, the model's ordinary dropout applies.
    Each micro-batch's mean loss is weighted by its share of the global batch's label tokens, and the
    gradients are summed over processes, which is the gradient of the global token-mean loss.
    `check_gradient` (the first step of a run): stop with a clear error if the prefix gets no gradient.
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
        keys = dropout_keys(seed, positions) if seed is not None else None
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=batch["labels"], loss_only=True,
                     dropout_keys=keys).loss
        if check_gradient and not loss.requires_grad:
            raise GlmtuneError(f"{NO_GRADIENT} (the loss does not depend on the prefix at all)")
        (loss * (n / n_total)).backward()
        loss_sum += loss.detach().double() * n
    if dist.world > 1:
        # One flat all-reduce: the prefix is a few tensors, so DDP's bucketing would buy nothing.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = dist.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).clone()
        dist.all_reduce(loss_sum)
    if check_gradient and all(p.grad is None or not bool(torch.any(p.grad != 0)) for p in params):
        raise GlmtuneError(f"{NO_GRADIENT} (its gradient is all zeros)")
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
    best_checkpoint: Path | None = None
    best_metric: float | None = None
    metric: str = "eval_loss"
    stop_reason: str | None = None  # early stopping, or the signal that interrupted the run
    interrupted: bool = False


def train(config: TrainConfig) -> TrainResult:
    """Run `glmtune train` with `config` (in this process, or as one rank of a torchrun job).

    While the loop runs, the first SIGINT/SIGTERM (Ctrl-C) makes it save a checkpoint after the current step
    and return with `interrupted=True` (the CLI then exits 130); a second one ends the process at once.
    """
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
        found = f"{', '.join(leftovers[:3])}{', ...' if len(leftovers) > 3 else ''}"
        if latest_checkpoint(out) is None:
            raise GlmtuneError(f"{out}: holds a previous training run ({found}) that saved no complete checkpoint, so "
                               "it cannot be resumed; pass --overwrite-output-dir to start over (or choose another --output-dir)")
        raise GlmtuneError(f"{out}: holds a previous training run ({found}); pass --resume to continue it or "
                           "--overwrite-output-dir to start over")
    # A bar is for a person at a terminal; in a log file it becomes one endless `\r` line (log lines instead).
    show_bar = dist.main and not config.disable_tqdm and sys.stderr.isatty()
    if not show_bar:
        import datasets

        datasets.disable_progress_bars()

    seed_everything(config.seed)
    from glmtune.families.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.model_path, family=config.family)  # --family, else detected (glmtune.families.registry)
    data = load_train_data(config, tokenizer, dist, say)
    model, params = _load_model(config, dist, resume_dir, tokenizer.family)
    run = _Run(config, dist, out, model, params, tokenizer, data, say)
    if resume_dir is not None:
        run.restore(resume_dir)
        say(f"resuming from {resume_dir} at step {run.step}")
    # Only now that data, model and state have loaded does anything in the output folder change.
    dist.barrier()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_dir is None and config.overwrite_output_dir:
            clear_run(out)
        clear_partial(out)
        truncate_metrics(out / METRICS_FILE, run.step)
    dist.barrier()
    say(run.banner())
    from glmtune.train.log import RunLog, tensorboard_available

    tensorboard = config.report_to == "tensorboard" or (config.report_to == "auto" and tensorboard_available())
    run.log = RunLog(out if dist.main else None, tensorboard, run.step, run.total_steps, show_bar, say)
    run.last_checkpoint = resume_dir
    try:
        run.loop()
    finally:
        run.log.close()
    return run.finish()


class _Run:
    """The state of one training run and the steps of its loop (train, log, evaluate, save, stop)."""

    def __init__(self, config: TrainConfig, dist: Dist, out: Path, model, params, tokenizer, data: TrainData, say):
        from transformers import get_linear_schedule_with_warmup

        from glmtune.train.validation import EvalTracker

        self.config, self.dist, self.out, self.say = config, dist, out, say
        self.model, self.params, self.tokenizer, self.data = model, params, tokenizer, data
        batch, accum = config.per_device_train_batch_size, config.gradient_accumulation_steps
        self.global_batch = dist.world * batch * accum
        mix_count = round(config.mix_ratio * data.rows) if data.mix_rows else 0
        lengths = [len(ids) for ids in data.train["input_ids"]] if config.group_by_length else None
        self.stream = DataStream(data.rows, config.seed, lengths, self.global_batch if lengths else 0,
                                 data.mix_rows, mix_count)
        epoch_rows = self.stream.epoch_rows
        self.total_steps = config.max_steps if config.max_steps > 0 else max(
            1, math.ceil(config.num_train_epochs * epoch_rows / self.global_batch))
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                           eps=config.adam_epsilon, weight_decay=config.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, config.warmup_steps, self.total_steps)
        self.tracker = EvalTracker(config.metric_for_best_model, config.bigger_is_better,
                                   config.early_stopping_patience, config.early_stopping_threshold)
        self.step, self.losses, self.stop_reason, self.interrupted = 0, [], None, False
        self.eval_seconds = 0.0  # kept out of the training tokens/s
        self.last_checkpoint: Path | None = None
        self.log = None

    # --- set-up ---

    def restore(self, resume_dir: Path) -> None:
        """Optimizer/scheduler/RNG state and the evaluation history; the run must see the same data stream."""
        from glmtune.train.validation import EvalTracker

        ckpt = load_checkpoint_state(resume_dir)
        state, config = ckpt["state"], self.config
        saved_lr = state.get("config", {}).get("learning_rate", config.learning_rate)
        if saved_lr != config.learning_rate:
            # The saved optimizer and scheduler carry the old rate; silently keeping it would record a lie.
            raise GlmtuneError(f"{resume_dir}: --learning-rate {config.learning_rate} differs from the interrupted run's "
                               f"{saved_lr}; the resumed schedule continues from the saved one, so resume with "
                               f"--learning-rate {saved_lr} (or start a new run with the new rate)")
        for name, saved, now in (("seed", state["seed"], config.seed), ("global batch size", state["global_batch_size"], self.global_batch),
                                 ("number of training rows", state["train_rows"], self.data.rows),
                                 ("number of --mix-file rows per epoch", state.get("mix_count", 0), self.stream.mix_count),
                                 ("group_by_length", state.get("group_by_length", False), config.group_by_length),
                                 ("total steps (the learning-rate schedule)", state["total_steps"], self.total_steps)):
            if saved != now:
                raise GlmtuneError(f"{resume_dir}: {name} was {saved} in the interrupted run, now {now}; "
                                   "resuming needs the same data, seed and processes x batch x accumulation")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.dist.rank < len(ckpt["rng"]):
            restore_rng(ckpt["rng"][self.dist.rank])
        saved_metric = (state.get("eval") or {}).get("metric", self.tracker.metric)
        if saved_metric != self.tracker.metric:
            raise GlmtuneError(f"{resume_dir}: --metric-for-best-model was {saved_metric} in the interrupted run, now "
                               f"{self.tracker.metric}; the best checkpoint so far was chosen by {saved_metric}")
        self.tracker = EvalTracker.from_state(state.get("eval"), metric=self.tracker.metric,
                                              greater_is_better=self.tracker.greater_is_better,
                                              patience=self.tracker.patience, threshold=self.tracker.threshold)
        self.step = int(state["global_step"])

    def banner(self) -> str:
        c, d = self.config, self.dist
        bits = self.model.chatglm_config.get("quantization_bit")
        base = f"base weights int{bits} (quantized)" if bits else "base weights not quantized"
        mix = f" + {self.stream.mix_count} --mix-file rows per epoch" if self.stream.mix_count else ""
        val = f"; validating on {len(self.data.validation)} rows every {c.evaluation_steps} steps" if self.data.validation is not None else ""
        return (f"training on {self.data.rows} rows{mix}: {self.total_steps} steps x {self.global_batch} rows ({d.world} process(es)"
                f" x batch {c.per_device_train_batch_size} x {c.gradient_accumulation_steps} accumulation) = "
                f"{self.total_steps * self.global_batch / self.stream.epoch_rows:.2f} epochs; "
                f"{sum(p.numel() for p in self.params):,} trainable prefix parameters; {d.device}, "
                f"{self.model.model.embed_tokens.weight.dtype}, "
                f"{base}, gradient checkpointing {'on' if c.gradient_checkpointing else 'off'}{val}")

    # --- the loop ---

    def loop(self) -> None:
        from glmtune.train.log import Interrupts

        config = self.config
        window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
        self.t0, self.tokens = time.perf_counter(), 0
        first, window_eval = True, 0.0
        if self.tracker.should_stop:  # resuming a run that had already stopped early: nothing left to do
            self.stop_reason = self.tracker.stop_reason()
            return
        with Interrupts(self.say) as interrupts:
            while self.step < self.total_steps:
                result = self._one_step(check_gradient=first)
                first = False
                self.step += 1
                step = self.step
                self.losses.append((step, result.loss))
                for key, value in (("loss", result.loss), ("steps", 1), ("tokens", result.tokens)):
                    window[key] += value
                self.tokens += result.tokens
                self.log.step(result)
                if step % config.logging_steps == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - window["t0"] - window_eval
                    window_eval = 0.0
                    self.log.record({"step": step, "epoch": round(self.epoch, 4), "loss": window["loss"] / window["steps"],
                                     "learning_rate": result.learning_rate, "grad_norm": result.grad_norm,
                                     "tokens": window["tokens"], "tokens_per_second": round(window["tokens"] / max(elapsed, 1e-9), 1),
                                     "elapsed_s": round(time.perf_counter() - self.t0, 3)})
                    window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
                before = self.eval_seconds
                evaluated, predictions = self._maybe_evaluate()
                window_eval += self.eval_seconds - before
                if self.tracker.should_stop:
                    self.stop_reason = self.tracker.stop_reason()
                if self.dist.any(interrupts.requested is not None):
                    self.interrupted = True
                    self.stop_reason = f"interrupted ({interrupts.requested or 'a signal on another process'})"
                if (step % config.save_steps == 0 or step == self.total_steps or evaluated or self.stop_reason):
                    self._save(result, predictions)
                if self.stop_reason:
                    break

    @property
    def epoch(self) -> float:
        return self.step * self.global_batch / self.stream.epoch_rows

    def _one_step(self, check_gradient: bool) -> StepResult:
        c, dist = self.config, self.dist
        batch = c.per_device_train_batch_size
        micro = []
        for a in range(c.gradient_accumulation_steps):
            first = self.step * self.global_batch + (a * dist.world + dist.rank) * batch
            positions = list(range(first, first + batch))
            micro.append((make_batch(self.data.train, self.stream, positions, self.tokenizer.pad_token_id, dist.device), positions))
        try:
            return train_step(self.model, self.params, self.optimizer, self.scheduler, micro, dist, c.max_grad_norm,
                              seed=c.seed, check_gradient=check_gradient)
        except TrainingDiverged as exc:
            if dist.main:
                plot_loss_curve(self.out / METRICS_FILE, self.out / LOSS_PLOT, title=f"{self.out.name} (stopped at step {self.step + 1})")
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint had been saved yet"
            raise TrainingDiverged(f"step {self.step + 1}: {exc}; training stopped without updating the prefix; {kept}"
                                   " (try a lower --learning-rate)") from None

    def _maybe_evaluate(self) -> tuple[bool, list[str]]:
        from glmtune.train.validation import run_validation

        if self.data.validation is None or not (self.step % self.config.evaluation_steps == 0 or self.step == self.total_steps):
            return False, []
        record, predictions, references = run_validation(self.model, self.tokenizer, self.data.validation, self.config,
                                                         self.dist, self.step, self.epoch)
        self.eval_seconds += record["eval_runtime_s"]
        best = self.tracker.update(record)
        self.log.record(record)
        if best:
            self.say(f"step {self.step}: new best {self.tracker.key} {self.tracker.best_metric:.6g}")
        lines = [json.dumps({"labels": l, "predict": p}, ensure_ascii=False) for p, l in zip(predictions, references)]
        return True, lines

    def _save(self, result: StepResult, predictions: list[str]) -> None:
        from glmtune.train.checkpoint import PREDICTIONS_FILE, prune_checkpoints

        c, step, out = self.config, self.step, self.out
        best = out / f"checkpoint-{self.tracker.best_step}" if self.tracker.best_step is not None else None
        state = {"global_step": step, "total_steps": self.total_steps, "samples_seen": step * self.global_batch,
                 "epoch": self.epoch, "global_batch_size": self.global_batch, "world_size": self.dist.world,
                 "seed": c.seed, "train_rows": self.data.rows, "mix_count": self.stream.mix_count,
                 "group_by_length": c.group_by_length, "loss": result.loss, "learning_rate": c.learning_rate,
                 "best_metric": self.tracker.best_metric, "best_global_step": self.tracker.best_step,
                 "best_model_checkpoint": str(best) if best else None, "eval": self.tracker.to_state(),
                 "stop_reason": self.stop_reason, "config": c.to_json()}
        rng = self.dist.gather(capture_rng())
        if self.dist.main:
            extra = {PREDICTIONS_FILE: "".join(line + "\n" for line in predictions)} if predictions else None
            try:
                save_checkpoint(out, step, self.model, self.tokenizer, self.optimizer, self.scheduler, rng, state, extra)
            except DiskFull as exc:
                from glmtune.train.log import resume_command

                then = (f"continue with:\n  {resume_command()}" if self.last_checkpoint
                        else "start over with --overwrite-output-dir")
                raise DiskFull(f"{exc}. Free some space, then {then}") from None
            self.last_checkpoint = out / f"checkpoint-{step}"
            for removed in prune_checkpoints(out, c.save_total_limit, {self.last_checkpoint, best}):
                self.say(f"--save-total-limit {c.save_total_limit}: removed {removed.name}")
        self.last_checkpoint = out / f"checkpoint-{step}"
        self.dist.barrier()

    def finish(self) -> TrainResult:
        out, tracker = self.out, self.tracker
        best = out / f"checkpoint-{tracker.best_step}" if tracker.best_step is not None else None
        curve = None
        if self.dist.main:
            curve = plot_loss_curve(out / METRICS_FILE, out / LOSS_PLOT, title=out.name)
            runtime = time.perf_counter() - self.t0
            write_results(out / RESULTS_FILE, {
                "global_step": self.step, "steps_this_run": len(self.losses),
                "train_loss": sum(l for _, l in self.losses) / len(self.losses) if self.losses else None,
                "train_runtime_s": round(runtime, 3), "tokens_per_second": round(self.tokens / max(runtime, 1e-9), 1),
                "final_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "best_model_checkpoint": str(best) if best else None, "best_metric": tracker.best_metric,
                "metric_for_best_model": tracker.key, "stop_reason": self.stop_reason,
            })
        return TrainResult(out, self.step, self.last_checkpoint, self.losses, curve, best, tracker.best_metric,
                           tracker.key, self.stop_reason, self.interrupted)


def _resume_dir(config: TrainConfig, out: Path) -> Path | None:
    if config.resume_from_checkpoint:
        return Path(config.resume_from_checkpoint)
    if config.resume:
        latest = latest_checkpoint(out)
        if latest is None:
            why = (" (the run there stopped before its first checkpoint was complete: e.g. a second Ctrl-C exits at "
                   "once without saving); start over with --overwrite-output-dir instead of --resume"
                   if has_run_artifacts(out) else "")
            raise GlmtuneError(f"--resume: no complete checkpoint-N folder in {out} to resume from{why}")
        return latest
    return None


def _load_model(config: TrainConfig, dist: Dist, resume_dir: Path | None, family: str):
    """The frozen model with its prefix (fresh and seeded, or the checkpoint's) and the trainable params.

    `family` is the tokenizer's (--family or detected): it decides the rope rule, is recorded in every checkpoint's
    config.json, and a checkpoint of another family is refused on resume (glmtune.model.loading.load_model)."""
    from glmtune.model.loading import load_model, resolve_device

    _, dtype = resolve_device(str(dist.device), config.dtype)
    torch.manual_seed(config.seed)  # a fresh prefix starts from the same values on every process
    # Resuming reads the prefix shape from the checkpoint (flags given must agree with it).
    pre_seq_len, projection = config.prefix_shape(resuming=resume_dir is not None)
    model = load_model(config.model_path, ptuning_checkpoint=resume_dir, pre_seq_len=pre_seq_len,
                       prefix_projection=projection, quantization_bit=config.quantization_bit,
                       dtype=dtype, device=dist.device, family=family)
    model.train()
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named or any(not n.startswith("prefix_encoder.") for n, _ in named):
        raise RuntimeError(f"only the prefix may train, found trainable {[n for n, _ in named]}")
    return model, [p for _, p in named]
