"""Issue 9's training items: each test fails on the code before the fix.

3 first-step gradient guard · 6 resume with another learning rate · 8 output dir that is a file, truncated
resume state · 9 SIGINT saves and resumes bitwise · 11 --max-steps · 12 quantized banner · 15 report once,
no progress bars off a terminal, checkpoint file modes · 18 single-file writes through fsutil."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtune.train.checkpoint import read_metrics
from glmtune.errors import GlmtuneError
from glmtune.train.config import build_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "data" / "adgen_sample" / "train.json"
PREFIX_KEY = "transformer.prefix_encoder.embedding.weight"

pytestmark = pytest.mark.usefixtures("single_thread_own_cache")  # fixtures: tests/conftest.py


def _settings(model, out, **overrides) -> dict:
    settings = dict(model_path=str(model), train_file=str(TRAIN_FILE), output_dir=str(out), pre_seq_len=4,
                    per_device_train_batch_size=4, max_steps=4, logging_steps=1, save_steps=100, disable_tqdm=True,
                    report_to="none")
    settings.update(overrides)
    return settings


def _train(model, out, **overrides):
    from glmtune.train.loop import train

    return train(build_config(None, _settings(model, out, **overrides)))


def _env(tmp_path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), GLMTUNE_CACHE=str(tmp_path / "cache"))


def _cli_args(model, **flags) -> list[str]:
    args = []
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return [sys.executable, "-m", "glmtune", "train", "--model-path", str(model), "--train-file", str(TRAIN_FILE), *args]


# --- item 3: the prefix must get a gradient --------------------------------------------------------


@pytest.mark.parametrize("how", ["detached", "zero"])
def test_a_prefix_that_gets_no_gradient_stops_training_with_a_clear_error(tiny_model, tmp_path, monkeypatch, how):
    from glmtune.model.prefix import PrefixEncoder

    forward = PrefixEncoder.forward

    def dropped(self, batch_size, dtype, dropout_keys=None):  # what a cache dropped under gradient checkpointing looks like
        pairs = forward(self, batch_size, dtype, dropout_keys)
        if how == "detached":
            return [(k.detach(), v.detach()) for k, v in pairs]
        return [(k - k + k.detach(), v - v + v.detach()) for k, v in pairs]  # connected, but zero gradient

    monkeypatch.setattr(PrefixEncoder, "forward", dropped)
    with pytest.raises(GlmtuneError, match="the prefix got no gradient on the first step"):
        _train(tiny_model, tmp_path / "out")
    assert not list((tmp_path / "out").glob("checkpoint-*"))


# --- item 6: resume with another learning rate ----------------------------------------------------


def test_resume_with_a_different_learning_rate_is_refused_with_both_values(tiny_model, tmp_path):
    _train(tiny_model, tmp_path / "out", max_steps=4, save_steps=2)
    with pytest.raises(GlmtuneError, match=r"--learning-rate 0\.001 differs from the interrupted run's 0\.02.*--learning-rate 0\.02"):
        _train(tiny_model, tmp_path / "out", max_steps=4, resume=True, learning_rate=1e-3)
    assert _train(tiny_model, tmp_path / "out", max_steps=4, resume=True).global_step == 4


# --- item 8: clear errors --------------------------------------------------------------------------


def test_an_output_dir_that_is_a_file_fails_before_anything_loads(tiny_model, tmp_path, monkeypatch):
    import glmtune.model.loading
    import glmtune.families.tokenizer

    blocker = tmp_path / "out"
    blocker.write_text("mine")
    for module, name in ((glmtune.model.loading, "load_model"), (glmtune.families.tokenizer, "load_tokenizer")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("loaded before checking --output-dir"))
    with pytest.raises(GlmtuneError, match=r"--output-dir .*out exists and is not a folder"):
        _train(tiny_model, blocker)
    with pytest.raises(GlmtuneError, match="exists and is not a folder"):
        _train(tiny_model, blocker / "sub")
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pt"])
def test_resume_from_a_truncated_state_file_is_one_clear_error(tiny_model, tmp_path, name):
    out = tmp_path / "out"
    _train(tiny_model, out, max_steps=2, save_steps=1)
    path = out / "checkpoint-2" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GlmtuneError, match=rf"{re.escape(str(path))}: unreadable .*truncated or corrupt"):
        _train(tiny_model, out, max_steps=2, resume=True)


# --- item 9: Ctrl-C saves ---------------------------------------------------------------------------


def _wait_for_step(out: Path, step: int, process, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in read_metrics(out / "metrics.jsonl")):
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}")


def test_sigint_saves_a_checkpoint_prints_the_resume_command_and_resuming_is_bitwise_exact_and_logs_plain_lines(tiny_model, tmp_path):
    flags = dict(pre_seq_len=4, per_device_train_batch_size=4, max_steps=40, logging_steps=1, save_steps=1000,
                 report_to="none")
    cut = tmp_path / "cut"
    victim = subprocess.Popen(_cli_args(tiny_model, output_dir=cut, **flags), env=_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(cut, 5, victim)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err[-2000:]
    saved = [p.name for p in cut.glob("checkpoint-*")]
    assert len(saved) == 1 and 5 <= int(saved[0].split("-")[1]) < 40, saved
    assert f"saved {cut / saved[0]}" in err and "Traceback" not in err
    # item 15: stderr is a pipe here, not a terminal: progress is a line per logging step, no `\r` bars
    # (neither tqdm's nor datasets' "tokenizing" one), and the data report is printed once
    assert "\r" not in err and err.count("rows read") == 1
    assert re.search(r"^step 1/40: loss [\d.]+, learning_rate", err, re.M) and re.search(r"^step 5/40: loss", err, re.M)
    command = err.split("continue with:\n", 1)[1].strip().splitlines()[0]
    args = shlex.split(command)
    assert args[0] == "glmtune" and args[-1] == "--resume" and args[1] == "train"
    resumed = subprocess.run([sys.executable, "-m", "glmtune", *args[1:]], env=_env(tmp_path), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _train(tiny_model, tmp_path / "whole", **flags)  # uninterrupted, in this process (same threads)
    a = load_file(whole.final_checkpoint / "model.safetensors")[PREFIX_KEY]
    b = load_file(cut / "checkpoint-40" / "model.safetensors")[PREFIX_KEY]
    assert torch.equal(a, b)


def test_a_second_signal_exits_at_once(monkeypatch):
    import glmtune.train.log as train_log

    said, exits = [], []

    def fake_exit(code):  # os._exit would end pytest too
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(train_log.os, "_exit", fake_exit)
    previous = signal.getsignal(signal.SIGTERM)
    with train_log.Interrupts(said.append) as interrupts:
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.requested == "SIGTERM" and not exits
        assert said == ["SIGTERM: saving a checkpoint after this step (send it again to exit at once)"]
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored after the run


# --- item 11: --max-steps ------------------------------------------------------------------------------


def test_max_steps_minus_one_means_epochs_and_other_non_positive_values_are_rejected(tiny_model, tmp_path):
    base = _settings(tiny_model, tmp_path / "o")
    for bad in (0, -2, -100):
        with pytest.raises(GlmtuneError, match=rf"--max-steps must be a positive number of steps, or -1 .*found {bad}"):
            build_config(None, dict(base, max_steps=bad))
    result = _train(tiny_model, tmp_path / "out", max_steps=-1, num_train_epochs=1, max_train_samples=12)
    assert result.global_step == 3  # 12 rows / batch 4, one epoch


# --- item 12: the banner says the base is quantized -------------------------------------------------


def test_the_train_banner_says_when_the_base_is_quantized(tiny_model, tmp_path, capsys):
    _train(tiny_model, tmp_path / "q", max_steps=1, quantization_bit=8)
    assert "base weights int8 (quantized)" in capsys.readouterr().err
    _train(tiny_model, tmp_path / "f", max_steps=1)
    assert "base weights not quantized" in capsys.readouterr().err


# --- item 15: output ------------------------------------------------------------------------------------


def test_disable_tqdm_also_silences_the_datasets_progress_bars(tiny_model, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    datasets.enable_progress_bars()
    try:
        _train(tiny_model, tmp_path / "out", max_steps=1, disable_tqdm=True)
        assert not datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()


def test_checkpoint_files_all_get_the_umask_modes(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        _train(tiny_model, tmp_path / "out", max_steps=1)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out" / "checkpoint-1").iterdir()}
    assert set(modes.values()) == {0o644}, modes
    for name in ("metrics.jsonl", "train_results.json", "loss_curve.png"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


# --- item 18: one atomic-write helper ------------------------------------------------------------------


def test_checkpoint_single_file_writes_go_through_fsutil(tmp_path, monkeypatch):
    import glmtune.train.checkpoint as checkpoint
    from glmtune import fsutil

    calls = []
    for name in ("atomic_write_text", "atomic_file"):
        original = getattr(fsutil, name)
        monkeypatch.setattr(checkpoint, name, lambda path, *a, _o=original, _n=name, **k: calls.append((_n, Path(path).name)) or _o(path, *a, **k))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    checkpoint.truncate_metrics(metrics, 1)
    checkpoint.write_results(tmp_path / "r.json", {"a": 1})
    checkpoint.plot_loss_curve(metrics, tmp_path / "c.png")
    assert calls == [("atomic_write_text", "metrics.jsonl"), ("atomic_write_text", "r.json"), ("atomic_file", "c.png")]
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1} and metrics.read_text().count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "metrics.jsonl", "r.json"]
