"""`glmtune train` when things go wrong in the first hour: a full disk during a checkpoint save, a run stopped
before its first checkpoint, a missing TensorBoard, a --mix-ratio that repeats the mix file, and answers cut
by the length limits (every length option of `preprocess` works on `train`)."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


# --- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_during_a_save_is_one_error_keeps_earlier_checkpoints_and_resume_works_once_freed(
        tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if "checkpoint-4.tmp" in str(f):
            Path(f).write_bytes(b"\0" * 4096)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.raises(GlmtuneError) as caught:
        _train(tiny_model, out, save_steps=2)
    message = str(caught.value)
    assert f"{out / 'checkpoint-4.tmp'}: no space left on device" in message
    assert "needs about" in message and "free on that disk" in message
    assert "checkpoint-2, is intact" in message and "--resume" in message
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]

    from glmtune.train.checkpoint import load_checkpoint_state

    assert load_checkpoint_state(out / "checkpoint-2")["state"]["global_step"] == 2
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    resumed = _train(tiny_model, out, save_steps=2, resume=True)
    assert resumed.global_step == 4 and [s for s, _ in resumed.losses] == [3, 4]
    whole = _train(tiny_model, tmp_path / "whole", save_steps=2)
    assert torch.equal(load_file(out / "checkpoint-4" / "model.safetensors")[PREFIX_KEY],
                       load_file(tmp_path / "whole" / "checkpoint-4" / "model.safetensors")[PREFIX_KEY])


def test_a_torch_write_failure_counts_as_a_full_disk_only_when_the_disk_is_short_of_space():
    from glmtune.train.checkpoint import _is_disk_full

    torch_style = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
    assert _is_disk_full(torch_style, short_of_space=True)
    assert not _is_disk_full(torch_style, short_of_space=False)
    assert _is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), short_of_space=False)
    assert not _is_disk_full(OSError(errno.EACCES, "Permission denied"), short_of_space=True)


# --- a run stopped before its first checkpoint (a second Ctrl-C) -------------------------------------


def test_a_run_that_saved_no_checkpoint_says_to_start_over_rather_than_resume(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n", encoding="utf-8")
    (out / "checkpoint-2.tmp").mkdir()  # what a second Ctrl-C during the first save leaves
    with pytest.raises(GlmtuneError, match=r"saved no complete checkpoint, so it cannot be resumed; pass "
                                           r"--overwrite-output-dir") as caught:
        _train(tiny_model, out)
    assert "--resume" not in str(caught.value)
    with pytest.raises(GlmtuneError, match=r"second Ctrl-C.*start over with --overwrite-output-dir instead of --resume"):
        _train(tiny_model, out, resume=True)
    assert _train(tiny_model, out, overwrite_output_dir=True, max_steps=1).global_step == 1
    assert not (out / "checkpoint-2.tmp").exists()


def test_a_second_signal_says_how_to_continue_before_it_exits(monkeypatch, capfd):
    import glmtune.train.log as train_log

    def fake_exit(code):  # os._exit would end pytest too
        raise SystemExit(code)

    monkeypatch.setattr(train_log.os, "_exit", fake_exit)
    with train_log.Interrupts(lambda message: None):
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)
    err = capfd.readouterr().err
    assert "SIGTERM again: exiting at once, without saving" in err
    assert "--resume" in err and "--overwrite-output-dir" in err


# --- flags checked before anything loads; warnings about the data -----------------------------------


def test_report_to_tensorboard_without_the_package_fails_before_anything_loads(tiny_model, tmp_path, monkeypatch):
    import glmtune.families.tokenizer
    import glmtune.train.log

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the flags were checked")

    monkeypatch.setattr(glmtune.train.log, "tensorboard_available", lambda: False)
    monkeypatch.setattr(glmtune.families.tokenizer, "load_tokenizer", must_not_load)
    from typer.testing import CliRunner

    from glmtune.cli import app

    result = CliRunner().invoke(app, ["train", "--model-path", str(tiny_model), "--train-file", str(TRAIN_FILE),
                                      "--output-dir", str(tmp_path / "out"), "--report-to", "tensorboard"])
    assert isinstance(result.exception, GlmtuneError), result.output
    assert "tensorboard package is not installed" in str(result.exception) and "--report-to none" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_a_mix_ratio_that_repeats_the_mix_file_warns(tiny_model, tmp_path, capsys):
    mix = tmp_path / "general.json"
    mix.write_text("".join(TRAIN_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[-5:]), encoding="utf-8")
    _train(tiny_model, tmp_path / "out", mix_file=str(mix), mix_ratio=2.0, max_train_samples=20, max_steps=1)
    err = capsys.readouterr().err
    assert f"WARNING: --mix-ratio 2 asks for 40 --mix-file rows per epoch (2 x 20 training rows), but {mix} has 5" in err
    assert "about 8.0 times per epoch" in err and "at most 0.25" in err


def _glm3_conversations(path: Path, n: int) -> Path:
    rows = [json.loads(line) for line in TRAIN_FILE.open(encoding="utf-8")][:n]
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            turns = [{"role": "user", "content": row["content"]}, {"role": "assistant", "content": row["summary"]}] * 3
            out.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    return path


def test_train_takes_every_length_option_of_preprocess_and_says_loudly_when_answers_are_cut(tmp_path, monkeypatch,
                                                                                             capsys):
    import typer.main
    from typer.testing import CliRunner

    import glmtune.train.loop
    from glmtune.cli import app
    from glmtune.families.tokenizer import load_tokenizer
    from glmtune.model.tiny import init_model
    from glmtune.train.data import load_train_data

    commands = typer.main.get_command(app).commands
    names = lambda command: {o for p in command.params for o in p.opts if "length" in o}  # noqa: E731
    assert names(commands["preprocess"]) and names(commands["preprocess"]) <= names(commands["train"])

    model = init_model(tmp_path / "glm3", family="chatglm3", seq_length=1024)
    train_file = _glm3_conversations(tmp_path / "train.jsonl", 8)
    captured = []

    def capture(config):  # the trainer's input, without training
        captured.append(config)
        raise GlmtuneError("captured")

    monkeypatch.setattr(glmtune.train.loop, "train", capture)
    base = ["train", "--model-path", str(model), "--train-file", str(train_file), "--output-dir", str(tmp_path / "out"),
            "--max-source-length", "16", "--max-target-length", "16", "--report-to", "none"]
    for extra in ([], ["--max-seq-length", "1000", "--chatglm3-rules", "2023"]):
        result = CliRunner().invoke(app, [*base, *extra])
        assert str(result.exception) == "captured", result.output
    short, long = captured
    assert (short.max_seq_length, long.max_seq_length, long.data_config().max_seq_length) == (None, 1000, 1000)

    from glmtune.train.loop import Dist

    tokenizer = load_tokenizer(model)
    capsys.readouterr()
    load_train_data(short, tokenizer, Dist(), print)
    cut = capsys.readouterr().out
    assert "WARNING: 8 of 8 training rows (100.0%) lost answer tokens to the length limit" in cut
    assert "--max-seq-length" in cut
    load_train_data(long, tokenizer, Dist(), print)
    assert "WARNING" not in capsys.readouterr().out
