"""What `glmtune train` tells a person while it runs: metrics.jsonl, TensorBoard, the progress bar or log lines,
and the Ctrl-C / SIGTERM handling that saves a checkpoint before leaving.

* metrics.jsonl: one JSON object per logging step (`loss`, `learning_rate`, ...) and per evaluation
  (`eval_loss`, `eval_bleu-4`, ...), the keys of transformers' `log_history`.
* TensorBoard (`--report-to tensorboard`): torch's `SummaryWriter` under `OUTPUT/runs/`; a resumed run
  opens it with `purge_step` so the events after the checkpoint are discarded, as the lines of metrics.jsonl are.
* On a terminal: a tqdm bar. When stderr is not a terminal (a log file, a job scheduler) a bar would be one
  ever-growing `\\r` line, so a plain line is written every `--logging-steps` steps instead.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path

TB_TAGS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
           "tokens_per_second": "train/tokens_per_second", "eval_loss": "eval/loss", "eval_bleu-4": "eval/bleu-4",
           "eval_rouge-1": "eval/rouge-1", "eval_rouge-2": "eval/rouge-2", "eval_rouge-l": "eval/rouge-l"}


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class RunLog:
    """The sinks of one training run on the main process (the others get `RunLog(None, ...)`, which does nothing)."""

    def __init__(self, out: Path | None, tensorboard: bool, start_step: int, total_steps: int, show_bar: bool, say):
        self.out, self.say, self.total = out, say, total_steps
        self.writer = None
        if out is not None and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides events at steps >= purge_step: those a killed run logged after its checkpoint.
            self.writer = SummaryWriter(log_dir=str(out / "runs"), purge_step=start_step + 1 if start_step else None)
        self.bar = None
        if out is not None and show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
        self.lines = out is not None and not show_bar

    def step(self, result) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.learning_rate:.2e}", refresh=False)

    def record(self, record: dict) -> None:
        """A logging-step or evaluation record: metrics.jsonl, TensorBoard, and the bar or a log line."""
        if self.out is None:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, tag in TB_TAGS.items():
                if isinstance(record.get(key), (int, float)):
                    self.writer.add_scalar(tag, record[key], record["step"])
            self.writer.flush()
        shown = {k: v for k, v in record.items() if k in TB_TAGS}
        text = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
        if "eval_loss" in record:
            self.say(f"step {record['step']}/{self.total}: {text}")
            if self.bar is not None:
                self.bar.set_postfix(eval_loss=f"{record['eval_loss']:.4f}", refresh=False)
        elif self.lines:
            self.say(f"step {record['step']}/{self.total}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def resume_command() -> str:
    """The command that continues this run: the one that started it, with `--resume`."""
    # A worker started by `--nproc` sees only `--config TMPFILE`; the launcher passes the typed command.
    command = os.environ.get("GLMTUNE_COMMAND") if "WORLD_SIZE" in os.environ else None
    args = shlex.split(command) if command else ["glmtune", *sys.argv[1:]]
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--resume-from-checkpoint", "--resume_from_checkpoint"):
            skip = True
            continue
        if arg == "--resume" or arg.startswith(("--resume-from-checkpoint=", "--resume_from_checkpoint=")):
            continue
        kept.append(arg)
    return shlex.join([*kept, "--resume"])


class Interrupts:
    """First SIGINT/SIGTERM: finish the current step, save a checkpoint, stop; a second one exits at once."""

    def __init__(self, say):
        self.say, self.requested, self._previous = say, None, {}

    def __enter__(self) -> Interrupts:
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            # The second one: leave now (a half-written checkpoint stays a .tmp folder, cleared by the next run).
            # os.write: the one output call that is safe inside a signal handler.
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting at once, without saving this step. Continue "
                        "from the last saved checkpoint with --resume; if none was saved, start over with "
                        "--overwrite-output-dir\n".encode())
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        self.say(f"{self.requested}: saving a checkpoint after this step (send it again to exit at once)")

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
