"""`glmtune train`: only the prefix trains, checkpoints in the official format, exact resume after SIGKILL,
data-parallel equivalence, NaN stop, and the CLI (snake_case flags, --config files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from glmtune.train.checkpoint import latest_checkpoint, read_metrics
from glmtune.errors import GlmtuneError
from glmtune.train.config import TrainConfig, build_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "data" / "adgen_sample" / "train.json"
CHAT_FILE = REPO / "data" / "multiturn_sample.json"
PREFIX_KEY = "transformer.prefix_encoder.embedding.weight"

pytestmark = pytest.mark.usefixtures("single_thread_own_cache")  # fixtures: tests/conftest.py


def _config(model, out, **overrides) -> TrainConfig:
    settings = dict(model_path=str(model), train_file=str(TRAIN_FILE), output_dir=str(out), pre_seq_len=4,
                    per_device_train_batch_size=4, max_steps=4, logging_steps=1, save_steps=100, disable_tqdm=True)
    settings.update(overrides)
    return build_config(None, settings)


def _train(model, out, **overrides):
    from glmtune.train.loop import train

    return train(_config(model, out, **overrides))


def _cli_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmtune", "train", *map(str, args)], env=_cli_env(),
                          capture_output=True, text=True, timeout=300, **kw)


def _losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(Path(out) / "metrics.jsonl")]


# --- what trains ---------------------------------------------------------------------------------


def test_frozen_weights_never_change_and_only_the_prefix_is_optimized(tiny_model, tmp_path, monkeypatch):
    import glmtune.model.loading

    original, captured = glmtune.model.loading.load_model, {}

    def capturing(*args, **kwargs):  # keep a handle on the model the trainer trains
        captured["model"] = original(*args, **kwargs)
        captured["initial"] = captured["model"].prefix_encoder.embedding.weight.detach().clone()
        return captured["model"]

    monkeypatch.setattr(glmtune.model.loading, "load_model", capturing)
    _train(tiny_model, tmp_path / "out", max_steps=3)

    trained = captured["model"]
    torch.manual_seed(42)  # the trainer seeds the fresh prefix the same way
    fresh = original(tiny_model, pre_seq_len=4)
    base = {k: v for k, v in fresh.state_dict().items() if not k.startswith("prefix_encoder.")}
    after = trained.state_dict()
    assert len(base) > 10 and all(torch.equal(after[k], v) for k, v in base.items())
    assert [n for n, p in trained.named_parameters() if p.requires_grad] == ["prefix_encoder.embedding.weight"]
    saved = load_file(tmp_path / "out" / "checkpoint-3" / "model.safetensors")[PREFIX_KEY]
    assert torch.equal(saved, after["prefix_encoder.embedding.weight"])
    # the prefix did train, from the seeded start every process shares
    assert torch.equal(captured["initial"], fresh.prefix_encoder.embedding.weight)
    assert not torch.allclose(saved, captured["initial"])
    optimizer = torch.load(tmp_path / "out" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert [g["params"] for g in optimizer["param_groups"]] == [[0]]
    assert optimizer["state"][0]["exp_avg"].shape == saved.shape


def test_loss_goes_down_on_the_tiny_model(tiny_model, tmp_path):
    result = _train(tiny_model, tmp_path / "out", max_steps=40, per_device_train_batch_size=8, save_steps=1000)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_keyed_dropout_mask_depends_only_on_the_row_key():
    from glmtune.model.prefix import keyed_dropout
    from glmtune.train.data import dropout_keys

    x = torch.ones(3, 64, 32)
    together = keyed_dropout(x, 0.1, dropout_keys(42, [5, 6, 7]))
    alone = keyed_dropout(x[:1], 0.1, dropout_keys(42, [6]))
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(together[1], keyed_dropout(x[:1], 0.1, dropout_keys(43, [6]))[0])  # the seed counts too
    kept = (together > 0).float().mean().item()
    assert 0.85 < kept < 0.95 and torch.allclose(together[together > 0], torch.tensor(1 / 0.9))


def test_the_trainer_passes_dropout_keys_to_the_forward_and_eval_mode_ignores_them(tiny_model):
    from glmtune.model.loading import load_model

    torch.manual_seed(0)
    model = load_model(tiny_model, pre_seq_len=4).train()
    keys_a, keys_b = [11, 12], [13, 12]
    first = model.prefix_encoder(2, torch.float32, keys_a)[0][0]
    again = model.prefix_encoder(2, torch.float32, keys_a)[0][0]
    other = model.prefix_encoder(2, torch.float32, keys_b)[0][0]
    assert torch.equal(first, again) and torch.equal(first[1], other[1]) and not torch.equal(first[0], other[0])
    model.eval()
    plain = model.prefix_encoder(2, torch.float32)[0][0]
    assert torch.equal(model.prefix_encoder(2, torch.float32, keys_a)[0][0], plain)
    assert not hasattr(model.prefix_encoder.dropout, "keys")  # no attribute set before a forward


def test_gradient_accumulation_equals_one_big_batch(tiny_model, tmp_path):
    big = _train(tiny_model, tmp_path / "big", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    split = _train(tiny_model, tmp_path / "split", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert [s for s, _ in big.losses] == [s for s, _ in split.losses] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(big.losses, split.losses):
        assert a == pytest.approx(b, rel=1e-5)
    prefix = [load_file(r.final_checkpoint / "model.safetensors")[PREFIX_KEY] for r in (big, split)]
    torch.testing.assert_close(prefix[0], prefix[1], rtol=1e-5, atol=1e-6)


def test_group_by_length_uses_transformers_length_grouping_seeded_by_epoch():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from glmtune.train.loop import DataStream

    lengths = [(i * 37) % 101 for i in range(250)]
    plain, grouped = DataStream(250, 7), DataStream(250, 7, lengths, batch_size=10)
    mega = min(250 // 40, 50) * 10  # transformers' default mega-batch: 50 batches or a quarter of the data
    for epoch in range(2):
        rows = [grouped.row(epoch * 250 + i) for i in range(250)]
        assert sorted(rows) == list(range(250))
        # exactly transformers' order for this (seed, epoch): a resumed run recomputes the same one
        expected = get_length_grouped_indices(lengths, 10, generator=torch.Generator().manual_seed(7 + epoch))
        assert rows == expected
        for start in range(0, 250, mega):
            group = rows[start: start + mega]
            # each mega-batch is sorted longest first (its head may be swapped to put the longest row first)
            tail = [lengths[r] for r in group[1:]]
            assert tail == sorted(tail, reverse=True)
        assert lengths[rows[0]] == max(lengths)

    def padded_tokens(stream):  # batches of 10, each padded to its longest row
        return sum(10 * max(lengths[stream.row(p)] for p in range(b, b + 10)) for b in range(0, 250, 10))

    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)


def test_training_with_group_by_length_runs_and_records_it_for_resume(tiny_model, tmp_path):
    plain = _train(tiny_model, tmp_path / "plain", per_device_train_batch_size=4, max_steps=6)
    grouped = _train(tiny_model, tmp_path / "grouped", per_device_train_batch_size=4, max_steps=6, group_by_length=True)
    assert len(grouped.losses) == len(plain.losses) == 6
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in grouped.losses)
    state = json.loads((grouped.final_checkpoint / "trainer_state.json").read_text())
    assert state["group_by_length"] is True


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True])
def test_checkpoints_every_save_steps_and_at_the_end_in_the_official_format(tiny_model, tmp_path, projection):
    from glmtune.model.loading import load_model
    from glmtune.families.tokenizer import load_tokenizer

    out = tmp_path / "out"
    _train(tiny_model, out, max_steps=5, save_steps=2, prefix_projection=projection)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    ckpt = out / "checkpoint-5"
    for name in ("pytorch_model.bin", "model.safetensors", "config.json", "tokenizer.model", "optimizer.pt",
                 "scheduler.pt", "rng_state.pt", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["pre_seq_len"] == 4 and cfg["prefix_projection"] is projection
    # The official loader: torch.load the .bin, strip the prefix, load into the prefix encoder.
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    expected = {PREFIX_KEY} | ({f"transformer.prefix_encoder.trans.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")} if projection else set())
    assert set(state) == expected
    model_cfg = json.loads((tiny_model / "config.json").read_text())
    kv = model_cfg["num_layers"] * 2 * model_cfg["multi_query_group_num"] * model_cfg["kv_channels"]
    assert state[PREFIX_KEY].shape == (4, kv) and state[PREFIX_KEY].dtype == torch.float32
    assert all(torch.equal(v, load_file(ckpt / "model.safetensors")[k]) for k, v in state.items())
    loaded = load_model(tiny_model, ptuning_checkpoint=ckpt)
    assert torch.equal(loaded.prefix_encoder.embedding.weight, state[PREFIX_KEY])
    assert load_tokenizer(ckpt).encode("你好") == load_tokenizer(tiny_model).encode("你好")
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    assert trainer_state["global_step"] == 5 and trainer_state["samples_seen"] == 20
    assert not list(out.glob("*.tmp"))


def test_latest_checkpoint_ignores_half_written_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-9.tmp", "checkpoint-12"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-9.tmp" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12" / "model.safetensors").write_text("")  # no completeness marker
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_resume_after_sigkill_gives_the_same_losses_and_prefix(tiny_model, tmp_path):
    args = ["--model_name_or_path", tiny_model, "--train_file", TRAIN_FILE, "--pre_seq_len", 4,
            "--per_device_train_batch_size", 4, "--max_steps", 80, "--logging_steps", 1, "--save_steps", 10,
            "--disable-tqdm"]
    cmd = [sys.executable, "-m", "glmtune", "train", *map(str, args)]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    reference = subprocess.Popen([*cmd, "--output-dir", str(whole)], env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen([*cmd, "--output-dir", str(cut)], env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (cut / "checkpoint-10").is_dir() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (cut / "checkpoint-80").exists() and not (cut / "train_results.json").exists(), "killed too late"
    done = max(s for s, _ in _losses(cut))
    assert 10 <= done < 80

    resumed = _cli(*args, "--output-dir", cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-" in resumed.stderr
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]

    assert _losses(cut) == _losses(whole) and len(_losses(whole)) == 80
    a = load_file(whole / "checkpoint-80" / "model.safetensors")
    b = load_file(cut / "checkpoint-80" / "model.safetensors")
    assert torch.equal(a[PREFIX_KEY], b[PREFIX_KEY])
    assert not list(cut.glob("checkpoint-*.tmp"))


def test_resume_takes_the_prefix_shape_from_the_checkpoint_and_survives_a_cut_log_line(tiny_model, tmp_path):
    import shutil

    out = tmp_path / "out"
    _train(tiny_model, out, max_steps=4, save_steps=2, prefix_projection=True)
    shutil.rmtree(out / "checkpoint-4")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as log:
        log.write('{"step": 5, "lo')  # a run killed in the middle of a log write
    resumed = _train(tiny_model, out, max_steps=4, save_steps=2, resume=True, pre_seq_len=None)
    assert resumed.global_step == 4
    cfg = json.loads((out / "checkpoint-4" / "config.json").read_text())
    assert cfg["pre_seq_len"] == 4 and cfg["prefix_projection"] is True
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4]


def test_resume_refuses_a_different_schedule_length(tiny_model, tmp_path):
    _train(tiny_model, tmp_path / "out", max_steps=2, save_steps=1)
    with pytest.raises(GlmtuneError, match=r"total steps \(the learning-rate schedule\) was 2 .* now 6"):
        _train(tiny_model, tmp_path / "out", max_steps=6, resume=True)


def test_resume_refuses_a_different_global_batch(tiny_model, tmp_path):
    _train(tiny_model, tmp_path / "out", max_steps=2, save_steps=1)
    with pytest.raises(GlmtuneError, match="global batch size was 4 .* now 8"):
        _train(tiny_model, tmp_path / "out", max_steps=4, resume=True, per_device_train_batch_size=8)


def test_an_existing_run_is_not_overwritten_without_a_flag(tiny_model, tmp_path):
    out = tmp_path / "out"
    _train(tiny_model, out, max_steps=1)
    with pytest.raises(GlmtuneError, match="holds a previous training run.*--resume.*--overwrite-output-dir"):
        _train(tiny_model, out, max_steps=1)
    keep = out / "notes.txt"
    keep.write_text("mine")
    result = _train(tiny_model, out, max_steps=2, overwrite_output_dir=True)
    assert result.global_step == 2 and keep.read_text() == "mine"
    assert [s for s, _ in _losses(out)] == [1, 2]


# --- failure -------------------------------------------------------------------------------------


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path, monkeypatch):
    from glmtune.model.modeling import ChatGLM2ForCausalLM
    from glmtune.train.loop import TrainingDiverged

    forward = ChatGLM2ForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:  # the third optimizer step (one micro-batch per step) diverges
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ChatGLM2ForCausalLM, "forward", poisoned)
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=r"step 3: loss is nan.*last good checkpoint is .*checkpoint-2"):
        _train(tiny_model, out, max_steps=6, save_steps=2)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    prefix = load_file(out / "checkpoint-2" / "model.safetensors")[PREFIX_KEY]
    assert torch.isfinite(prefix).all()
    assert [s for s, _ in _losses(out)] == [1, 2]


# --- data parallel -------------------------------------------------------------------------------


def test_two_processes_give_the_same_losses_as_one_with_double_batch(tiny_model, tmp_path):
    common = ["--model-path", tiny_model, "--train-file", TRAIN_FILE, "--pre-seq-len", 4, "--max-steps", 5,
              "--logging-steps", 1, "--disable-tqdm"]
    one = _cli(*common, "--output-dir", tmp_path / "one", "--per-device-train-batch-size", 4)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(*common, "--output-dir", tmp_path / "two", "--per-device-train-batch-size", 2, "--nproc", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) x batch 2" in two.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5]
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5)
    pa = load_file(tmp_path / "one" / "checkpoint-5" / "model.safetensors")[PREFIX_KEY]
    pb = load_file(tmp_path / "two" / "checkpoint-5" / "model.safetensors")[PREFIX_KEY]
    torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)


# --- CLI and config ------------------------------------------------------------------------------


def test_cli_end_to_end_with_config_file_snake_case_keys_and_flag_override(tiny_model, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model), "train_file": str(CHAT_FILE), "prompt_column": "prompt",
        "response-column": "response", "history_column": "history", "max_source_length": 128,
        "pre_seq_len": 4, "per_device_train_batch_size": 2, "max_steps": 50, "learning_rate": "2e-2",
        "logging_steps": 2, "save_steps": 2, "--gradient-checkpointing": False, "disable_tqdm": True,
    }))
    out = tmp_path / "out"
    done = _cli("--config", cfg, "--output_dir", out, "--max_steps", 3)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gradient checkpointing off" in done.stderr and "3 steps x 2 rows" in done.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 3]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch"} <= set(records[0])
    assert records[0]["learning_rate"] == pytest.approx(2e-2 * (1 - 1 / 3))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 3 and results["final_checkpoint"].endswith("checkpoint-3")
    assert f"checkpoint: {out / 'checkpoint-3'}" in done.stdout


def test_cli_reports_bad_settings_as_one_error(tiny_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_path": str(tiny_model), "per_device_batch": 2}))
    done = _cli("--config", bad, "--train-file", TRAIN_FILE, "--output-dir", tmp_path / "out")
    assert done.returncode == 2
    assert "bad.json: unknown key 'per_device_batch'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    done = _cli("--model-path", tiny_model, "--train-file", TRAIN_FILE, "--output-dir", tmp_path / "out",
                "--prompt_column", "question")
    assert done.returncode == 2
    assert "train.json:1: no column 'question' (columns present: ['content', 'summary']" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a run that could not start


def test_config_values_are_type_checked_and_flags_override_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_path: m\ntrain_file: t.json\noutput_dir: o\nmax_steps: 7\nseed: 1\n")
    config = build_config(cfg, {"seed": 3, "max-steps": None})
    assert (config.max_steps, config.seed, config.learning_rate, config.max_grad_norm) == (7, 3, 2e-2, 1.0)
    cfg.write_text("model_path: m\ntrain_file: t.json\noutput_dir: o\nmax_steps: many\n")
    with pytest.raises(GlmtuneError, match=r"c\.yaml: key 'max_steps': expected int, found str 'many'"):
        build_config(cfg)
    with pytest.raises(GlmtuneError, match="exactly one of --train-file"):
        build_config(None, {"model_path": "m", "output_dir": "o"})
