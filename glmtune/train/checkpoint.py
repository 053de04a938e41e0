"""Training checkpoints of `glmtune train`: written atomically, found again, and read back for `--resume`.

A checkpoint `OUT/checkpoint-N/` holds what the official P-tuning trainer (THUDM/ChatGLM2-6B
`ptuning/trainer.py` with `save_prefixencoder=True`) writes, readable by the official loader snippet
(it reads `pytorch_model.bin` with torch.load, keys `transformer.prefix_encoder.*`, config.json with
`pre_seq_len`/`prefix_projection`), the tokenizer files, and the state needed to continue exactly:
`optimizer.pt`, `scheduler.pt`, `rng_state.pt` (every process) and `trainer_state.json`.

Atomicity: everything is written into `checkpoint-N.tmp/`, `trainer_state.json` last, and the folder is
renamed into place; a run killed mid-write leaves only a `.tmp` folder, which is never taken for a
checkpoint and is cleared at the next start. (Not `fsutil.atomic_dir`: its hidden random temp names would
not be found and cleared by the next run, and resuming needs the `.tmp`/`.old` names.) Single files (logs,
results, the plot) go through `fsutil.atomic_file`. Files get the modes the umask allows, as elsewhere.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from glmtune.errors import GlmtuneError
from glmtune.fsutil import _umask_modes, atomic_file, atomic_write_text

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss_curve.png"
RESULTS_FILE = "train_results.json"
RUNS_DIR = "runs"  # TensorBoard event files
PREDICTIONS_FILE = "generated_predictions.jsonl"  # --eval-generate answers, inside the checkpoint
REQUIRED = ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", STATE_FILE)
# A GLM-4 checkpoint holds its prefix as a PEFT adapter folder (glmtune.model.adapter) instead.
REQUIRED_ADAPTER = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", STATE_FILE)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^checkpoint-\d+\.(tmp|old)$")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def has_run_artifacts(output_dir: str | Path) -> list[str]:
    """Names of things a previous `glmtune train` left in `output_dir` (checkpoints, logs)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(
        c.name for c in folder.iterdir()
        if _CHECKPOINT.match(c.name) or _PARTIAL.match(c.name) or c.name in (METRICS_FILE, LOSS_PLOT, RESULTS_FILE)
        or (c.name == RUNS_DIR and _only_event_files(c))
    )


def _only_event_files(folder: Path) -> bool:
    # A `runs/` folder counts as ours (and --overwrite-output-dir may delete it) only if it holds nothing but
    # TensorBoard event files: an --output-dir of `.` must not take a project's own runs/ folder for a log.
    children = list(folder.iterdir()) if folder.is_dir() else []
    return bool(children) and all(c.is_file() and c.name.startswith("events.out.tfevents.") for c in children)


def clear_partial(output_dir: str | Path) -> None:
    """Remove half-written `checkpoint-N.tmp` folders left by a killed run."""
    for child in Path(output_dir).iterdir():
        if _PARTIAL.match(child.name):
            shutil.rmtree(child, ignore_errors=True)


def clear_run(output_dir: str | Path) -> None:
    """`--overwrite-output-dir`: remove a previous run's checkpoints and logs (and nothing else)."""
    for name in has_run_artifacts(output_dir):
        path = Path(output_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# --- RNG state ---------------------------------------------------------------------------------


def capture_rng() -> dict:
    """This process's RNG states, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    # torch.save keeps tuples, but be lenient with lists (random.setstate insists on tuples).
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- save / load -------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | Path, step: int, model, tokenizer, optimizer, scheduler, rng_states: list[dict], state: dict,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically (see the module docstring); returns its path.

    `extra_files` (name -> text) land in the same folder, e.g. the predictions of the evaluation at this step.
    """
    from glmtune.model.loading import save_prefix_checkpoint

    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    needed = _estimated_bytes(model, tokenizer, optimizer)
    free = shutil.disk_usage(out).free if out.is_dir() else None
    if free is not None and free < needed:  # known to fail: say so before writing anything
        raise DiskFull(_disk_full_message(tmp, step, needed, free))
    try:
        tmp.mkdir(parents=True)
        save_prefix_checkpoint(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"ranks": rng_states}, tmp / "rng_state.pt")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        # The completeness marker goes last: a folder without it is never resumed from.
        _write_json(tmp / STATE_FILE, state)
        _umask_modes(tmp)  # torch.save, safetensors and tokenizer files would otherwise mix 0600 and 0644
        _fsync_tree(tmp)
    except BaseException as exc:
        full = _is_disk_full(exc, shutil.disk_usage(out).free < needed)
        # Nothing half-written stays behind: a leftover .tmp folder would hold the very space a resumed run needs.
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(_disk_full_message(tmp, step, needed, shutil.disk_usage(out).free)) from None
        raise
    if final.exists():  # re-saving a step after resuming from an earlier checkpoint
        old = out / f"checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


class DiskFull(GlmtuneError):
    """The disk filled up while a checkpoint was written; nothing of it was left behind."""


def _is_disk_full(exc: BaseException, short_of_space: bool) -> bool:
    """Whether a failed write means a full disk. Python's own writes raise OSError ENOSPC / EDQUOT; safetensors
    names the OS error in its message; torch.save's zip writer only says "file write failed", which counts
    when the disk is indeed short of what the checkpoint needs."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if any(sign in text for sign in ("No space left on device", "StorageFull", "os error 28", "Disk quota exceeded")):
            return True
        if isinstance(exc, RuntimeError) and "write failed" in text and short_of_space:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _estimated_bytes(model, tokenizer, optimizer) -> int:
    """About what a checkpoint takes: the prefix, the optimizer's tensors and the tokenizer's files (the JSON
    files are a few kB and left out)."""
    tensors = list(model.prefix_encoder.state_dict().values())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    files = [Path(f) for f in (getattr(tokenizer, "vocab_file", None),) if f and Path(f).is_file()]
    return sum(t.numel() * t.element_size() for t in tensors) + sum(f.stat().st_size for f in files)


def _disk_full_message(tmp: Path, step: int, needed: int, free: int) -> str:
    earlier = latest_checkpoint(tmp.parent)
    kept = f"the latest complete checkpoint, {earlier.name}, is intact" if earlier else "no earlier checkpoint exists"
    return (f"{tmp}: no space left on device while saving the checkpoint of step {step} (it needs about "
            f"{_megabytes(needed)}; {_megabytes(free)} free on that disk); the partial folder was removed and {kept}")


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.1f} MB" if count >= 100_000 else f"{count / 1e3:,.1f} kB"


def load_checkpoint_state(checkpoint: str | Path) -> dict:
    """trainer_state.json + optimizer/scheduler/RNG states of a checkpoint, with errors naming what is missing."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise GlmtuneError(f"{folder}: checkpoint folder not found")
    required = REQUIRED_ADAPTER if (folder / REQUIRED_ADAPTER[0]).is_file() else REQUIRED
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise GlmtuneError(f"{folder}: not a complete glmtune training checkpoint (missing {missing})")
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GlmtuneError(f"{folder / STATE_FILE}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    for field in ("global_step", "samples_seen", "global_batch_size", "seed", "train_rows"):
        if field not in state:
            raise GlmtuneError(f"{folder / STATE_FILE}: field {field} missing")
    rng = folder / "rng_state.pt"
    return {
        "state": state,
        "optimizer": _load_tensor_file(folder / "optimizer.pt"),
        "scheduler": _load_tensor_file(folder / "scheduler.pt"),
        "rng": _load_tensor_file(rng)["ranks"] if rng.is_file() else [],
    }


def _load_tensor_file(path: Path):
    """torch.load (weights only) with one clear error for a truncated or corrupt file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise GlmtuneError(f"{path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                           "the file is truncated or corrupt: resume from an earlier checkpoint-N") from None
    if not isinstance(data, dict) or (path.name == "rng_state.pt" and "ranks" not in data):
        raise GlmtuneError(f"{path}: not a glmtune {path.stem.replace('_', ' ')} file (found {type(data).__name__})")
    return data


def prune_checkpoints(output_dir: str | Path, limit: int | None, keep: set[Path]) -> list[Path]:
    """`--save-total-limit`: delete the oldest checkpoints beyond `limit`, never one in `keep` (best, latest)."""
    if not limit:
        return []
    found = [path for _, path in checkpoints(output_dir)]
    removable = [p for p in found if p not in keep]
    removed = []
    while len(found) - len(removed) > limit and removable:
        victim = removable.pop(0)
        shutil.rmtree(victim)
        removed.append(victim)
    return removed


# --- logs --------------------------------------------------------------------------------------


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop log lines after `step` (a resumed run rewrites them), atomically."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if (record := _parse_line(line)) is not None and record.get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _parse_line(line: str) -> dict | None:
    """One metrics.jsonl record; None for a blank line or one cut short by a killed run (appends are not atomic)."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [r for line in path.read_text(encoding="utf-8").splitlines() if (r := _parse_line(line)) is not None]


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Training and validation loss against step from metrics.jsonl on one PNG (matplotlib, headless);
    None when there is nothing to plot."""
    records = read_metrics(metrics_path)
    rows = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if r.get("eval_loss") is not None]
    if not rows and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if rows:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o" if len(rows) < 50 else None, lw=1.2,
                label="training loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="s", lw=1.2, label="validation loss")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "glmtune train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_file(png_path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return png_path


def write_results(path: str | Path, results: dict) -> None:
    _write_json(Path(path), results)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fsync_tree(folder: Path) -> None:
    # Data on disk before the rename, so a crash cannot leave a renamed folder with empty files.
    for child in folder.iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
