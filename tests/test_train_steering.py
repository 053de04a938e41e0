"""`glmtune train` a practitioner can steer: validation loss, generation scores, best checkpoint,
--save-total-limit, early stopping, TensorBoard, resume of all of it, --val-size, --mix-file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtune.train.checkpoint import read_metrics
from glmtune.errors import GlmtuneError
from glmtune.train.config import build_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "data" / "adgen_sample" / "train.json"
DEV_FILE = REPO / "data" / "adgen_sample" / "dev.json"
PREFIX_KEY = "transformer.prefix_encoder.embedding.weight"

pytestmark = pytest.mark.usefixtures("single_thread_own_cache")  # fixtures: tests/conftest.py


def _train(model, out, **overrides):
    from glmtune.train.loop import train

    settings = dict(model_path=str(model), train_file=str(TRAIN_FILE), output_dir=str(out), pre_seq_len=4,
                    per_device_train_batch_size=4, max_steps=4, logging_steps=1, save_steps=100, disable_tqdm=True,
                    report_to="none")
    settings.update(overrides)
    return train(build_config(None, settings))


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """Settings of a run that overfits: 8 rows whose answers all end alike, validated on other ADGEN rows.

    The validation loss first falls (the prefix learns what answers look like), then rises (it learns the
    training answers' shared tail): the shape early stopping exists for. Measured: best at step 24 of 80.
    """
    folder = tmp_path_factory.mktemp("overfit")
    rows = [json.loads(line) for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines()[:8]]
    narrow = folder / "narrow.json"
    narrow.write_text("".join(json.dumps({"content": r["content"], "summary": r["summary"][:6] + "，好的好的好的。"},
                                         ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    validation = folder / "dev30.json"
    validation.write_text("".join(DEV_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:30]), encoding="utf-8")
    return dict(train_file=str(narrow), per_device_train_batch_size=8, learning_rate=0.5, max_steps=80,
                validation_file=str(validation), eval_steps=4, early_stopping_patience=2, per_device_eval_batch_size=30)


# --- the validation loss -----------------------------------------------------------------------------


def test_validation_loss_is_the_token_mean_of_one_big_forward(tiny_model):
    from glmtune.data.preprocess import DataConfig, collate_train, load_rows, tokenize_train
    from glmtune.model.loading import load_model
    from glmtune.families.tokenizer import load_tokenizer
    from glmtune.train.loop import Dist
    from glmtune.train.validation import validation_loss

    tokenizer = load_tokenizer(tiny_model)
    dataset = tokenize_train(load_rows(DEV_FILE, DataConfig(max_samples=13)), tokenizer).select_columns(["input_ids", "labels"])
    torch.manual_seed(0)
    model = load_model(tiny_model, pre_seq_len=4).train()  # validation must switch dropout off itself
    loss, tokens = validation_loss(model, dataset, batch_size=5, pad_id=tokenizer.pad_token_id, dist=Dist())
    assert model.training  # and switch back
    batch = collate_train([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset], tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        whole = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], labels=batch["labels"]).loss.item()
    assert tokens == int((batch["labels"][:, 1:] != -100).sum())
    assert loss == pytest.approx(whole, rel=1e-5)
    # not the mean of per-batch means (5 + 5 + 3 rows weigh differently)
    assert loss == pytest.approx(validation_loss(model, dataset, 13, tokenizer.pad_token_id, Dist())[0], rel=1e-6)


# --- best checkpoint, early stopping, limits ------------------------------------------------------


def test_an_overfitting_run_stops_early_keeps_best_and_latest_and_names_the_best(tiny_model, tmp_path, overfit):
    out = tmp_path / "out"
    result = _train(tiny_model, out, save_total_limit=1, **overfit)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    losses = [r["eval_loss"] for r in evals]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert 0 < best < len(losses) - 2, losses  # it improved, then got worse: overfitting
    best_step = evals[best]["step"]
    # stopped after 2 evaluations without improvement, well before max_steps
    assert result.global_step == evals[-1]["step"] == best_step + 2 * 4 < 80
    assert result.stop_reason.startswith("early stopping") and f"at step {best_step}" in result.stop_reason
    assert result.best_checkpoint == out / f"checkpoint-{best_step}" and result.best_metric == losses[best]
    # --save-total-limit 1 keeps exactly the best and the latest
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{best_step}", f"checkpoint-{result.global_step}"})
    state = json.loads((out / f"checkpoint-{result.global_step}" / "trainer_state.json").read_text())
    assert state["best_global_step"] == best_step and state["best_metric"] == losses[best]
    assert state["best_model_checkpoint"] == str(result.best_checkpoint)
    assert [r["eval_loss"] for r in state["eval"]["history"]] == losses and state["eval"]["bad_evaluations"] == 2
    results = json.loads((out / "train_results.json").read_text())
    assert results["best_model_checkpoint"] == str(result.best_checkpoint) and results["stop_reason"] == result.stop_reason
    # resuming a run that stopped early trains no further
    again = _train(tiny_model, out, save_total_limit=1, resume=True, **overfit)
    assert (again.global_step, again.losses, again.stop_reason) == (result.global_step, [], result.stop_reason)


def test_resume_from_a_mid_run_checkpoint_ends_with_the_same_best_and_stop_step(tiny_model, tmp_path, overfit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overfit = dict(overfit, report_to="tensorboard")
    whole = _train(tiny_model, tmp_path / "whole", **overfit)
    evals = [r["step"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "eval_loss" in r]
    # the state a run killed after its third evaluation left behind
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for path in cut.glob("checkpoint-*"):
        if int(path.name.split("-")[1]) > evals[2]:
            shutil.rmtree(path)
    (cut / "train_results.json").unlink()
    resumed = _train(tiny_model, cut, resume=True, **overfit)
    assert (resumed.global_step, resumed.best_checkpoint.name, resumed.best_metric, resumed.stop_reason) == (
        whole.global_step, whole.best_checkpoint.name, whole.best_metric, whole.stop_reason)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_second", "eval_runtime_s")} for r in rows]
    assert strip(read_metrics(cut / "metrics.jsonl")) == strip(read_metrics(tmp_path / "whole" / "metrics.jsonl"))
    a = load_file(whole.final_checkpoint / "model.safetensors")[PREFIX_KEY]
    b = load_file(resumed.final_checkpoint / "model.safetensors")[PREFIX_KEY]
    assert torch.equal(a, b)
    # TensorBoard: the resumed run purges what the killed one logged after its checkpoint
    curves = [EventAccumulator(str(out / "runs")).Reload() for out in (tmp_path / "whole", cut)]
    for tag in ("eval/loss", "train/loss"):
        assert [(e.step, e.value) for e in curves[0].Scalars(tag)] == [(e.step, e.value) for e in curves[1].Scalars(tag)]


def test_eval_generate_scores_with_the_official_metrics_and_writes_predictions_beside_the_checkpoint(tiny_model, tmp_path):
    from glmtune.evaluation import metrics

    out = tmp_path / "out"
    result = _train(tiny_model, out, max_steps=2, validation_file=str(DEV_FILE), eval_steps=2, eval_generate=3,
                    max_target_length=8, metric_for_best_model="rouge-l")
    record = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r][-1]
    predictions, labels = metrics.read_predictions(out / "checkpoint-2" / "generated_predictions.jsonl")
    assert len(predictions) == 3
    expected = metrics.compute_metrics(predictions, labels).mean
    assert {k: record[f"eval_{k}"] for k in expected} == expected
    assert result.metric == "eval_rouge-l" and result.best_metric == record["eval_rouge-l"]
    # the references are the first validation answers (cut to max_target_length tokens, decoded)
    first = json.loads(DEV_FILE.read_text(encoding="utf-8").splitlines()[0])["summary"]
    assert first.startswith(labels[0]) and labels[0]


def test_best_metric_direction_is_inferred_and_settings_are_checked():
    base = dict(model_path="m", train_file="t.json", output_dir="o", validation_file="v.json")
    assert build_config(None, base).bigger_is_better is False
    assert build_config(None, dict(base, metric_for_best_model="bleu-4", eval_generate=2)).bigger_is_better is True
    with pytest.raises(GlmtuneError, match="needs --eval-generate"):
        build_config(None, dict(base, metric_for_best_model="bleu-4"))
    with pytest.raises(GlmtuneError, match="--early-stopping-patience need validation data"):
        build_config(None, dict(base, validation_file=None, early_stopping_patience=2))
    with pytest.raises(GlmtuneError, match="--metric-for-best-model must be one of"):
        build_config(None, dict(base, metric_for_best_model="accuracy"))
    with pytest.raises(GlmtuneError, match="not both"):
        build_config(None, dict(base, val_size=0.1))


def test_early_stopping_threshold_counts_small_gains_as_no_improvement():
    from glmtune.train.validation import EvalTracker

    tracker = EvalTracker(patience=2, threshold=0.05)
    for step, loss in ((1, 1.0), (2, 0.97), (3, 0.96)):
        tracker.update({"step": step, "eval_loss": loss})
    # 0.97 and 0.96 are better (the best moves) but by less than the threshold: patience runs out
    assert tracker.best_step == 3 and tracker.should_stop and "patience 2" in tracker.stop_reason()
    restored = EvalTracker.from_state(json.loads(json.dumps(tracker.to_state())), patience=2, threshold=0.05)
    assert restored == tracker


# --- TensorBoard, the plot -----------------------------------------------------------------------


def test_tensorboard_events_and_the_plot_hold_training_and_validation_curves(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    _train(tiny_model, out, max_steps=4, validation_file=str(DEV_FILE), eval_steps=2, report_to="tensorboard")
    events = EventAccumulator(str(out / "runs")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "eval/loss"} <= tags
    logged = read_metrics(out / "metrics.jsonl")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == [
        (r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_a_runs_folder_of_event_files_counts_as_a_previous_run(tmp_path):
    from glmtune.train.checkpoint import has_run_artifacts

    (tmp_path / "runs" / "demo").mkdir(parents=True)  # e.g. a project's own runs/ folder
    assert has_run_artifacts(tmp_path) == []
    (tmp_path / "runs" / "demo").rmdir()
    (tmp_path / "runs" / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    assert has_run_artifacts(tmp_path) == ["runs"]


def test_loss_plot_draws_a_validation_line(tmp_path, monkeypatch):
    import matplotlib.axes

    from glmtune.train.checkpoint import plot_loss_curve

    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7})))
    labels = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: labels.append(k.get("label")) or plot(self, *a, **k))
    assert plot_loss_curve(metrics_file, tmp_path / "c.png") == tmp_path / "c.png"
    assert labels == ["training loss", "validation loss"]


# --- held-out and mixed rows -------------------------------------------------------------------------


def test_val_size_holds_out_a_seeded_share_of_the_training_rows(tiny_model, tmp_path, capsys):
    result = _train(tiny_model, tmp_path / "a", max_steps=1, val_size=0.05, max_train_samples=100)
    err = capsys.readouterr().err
    assert "5 of the 100 rows held out" in err and "training on 95 rows" in err
    state = json.loads((result.final_checkpoint / "trainer_state.json").read_text())
    assert state["train_rows"] == 95 and state["eval"]["history"][0]["step"] == 1
    again = _train(tiny_model, tmp_path / "b", max_steps=1, val_size=0.05, max_train_samples=100)
    assert result.best_metric == again.best_metric  # the same rows held out


def test_mix_file_adds_seeded_general_rows_to_every_epoch():
    from glmtune.train.loop import DataStream

    stream = DataStream(20, seed=3, mix_rows=50, mix_count=5)
    assert stream.epoch_rows == 25
    epochs = [[stream.row(e * 25 + i) for i in range(25)] for e in range(3)]
    for rows in epochs:
        assert sorted(r for r in rows if r < 20) == list(range(20))  # every training row once per epoch
        general = [r for r in rows if r >= 20]
        assert len(general) == len(set(general)) == 5 and all(r < 70 for r in general)
    assert len({tuple(sorted(r for r in rows if r >= 20)) for rows in epochs}) == 3  # redrawn each epoch
    assert epochs == [[DataStream(20, 3, mix_rows=50, mix_count=5).row(e * 25 + i) for i in range(25)] for e in range(3)]
    plain = DataStream(20, seed=3)
    assert [plain.row(i) for i in range(20)] == [DataStream(20, 3, mix_rows=0, mix_count=5).row(i) for i in range(20)]


def test_training_with_a_mix_file_counts_its_rows_per_epoch(tiny_model, tmp_path, capsys):
    result = _train(tiny_model, tmp_path / "out", max_steps=-1, num_train_epochs=1, max_train_samples=40,
                    mix_file=str(DEV_FILE), mix_ratio=0.5, per_device_train_batch_size=10)
    assert "training on 40 rows + 20 --mix-file rows per epoch" in capsys.readouterr().err
    assert result.global_step == math.ceil((40 + 20) / 10)
    state = json.loads((result.final_checkpoint / "trainer_state.json").read_text())
    assert state["mix_count"] == 20


# --- more than one machine ------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # ~25 s of process start-ups; the --nproc test in test_train.py covers the same code path by default
def test_two_single_process_nodes_on_loopback_equal_one_process_and_resume_on_one_node(tiny_model, tmp_path):
    """torchrun's multi-node form (two "nodes" on 127.0.0.1, gloo): the same losses and prefix as one process
    with the same global batch; only rank 0 writes; resuming on one node at the same global batch works."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    common = ["--model-path", str(tiny_model), "--train-file", str(TRAIN_FILE), "--pre-seq-len", "4", "--max-steps", "4",
              "--logging-steps", "1", "--save-steps", "2", "--disable-tqdm", "--report-to", "none"]
    port = str(_free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--master-addr", "127.0.0.1", "--master-port", port, "--nproc-per-node", "1",
                               "-m", "glmtune", "train", *common, "--output-dir", str(tmp_path / "nodes"),
                               "--per-device-train-batch-size", "2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    one = _train(tiny_model, tmp_path / "one", max_steps=4, save_steps=2, per_device_train_batch_size=4)
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "2 process(es) x batch 2" in outputs[0][1] and "training on" not in outputs[1][1]  # rank 0 speaks, and writes
    a = read_metrics(tmp_path / "one" / "metrics.jsonl")
    b = read_metrics(tmp_path / "nodes" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    prefix = lambda out: load_file(out / "checkpoint-4" / "model.safetensors")[PREFIX_KEY]
    torch.testing.assert_close(prefix(tmp_path / "nodes"), prefix(one.output_dir), rtol=1e-5, atol=1e-5)
    state = json.loads((tmp_path / "nodes" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(torch.load(tmp_path / "nodes" / "checkpoint-4" / "rng_state.pt", weights_only=True)["ranks"]) == 2
    # resume the two-node run from step 2 on one process with the same global batch (4 = 1 x 4)
    shutil.rmtree(tmp_path / "nodes" / "checkpoint-4")
    resumed = _train(tiny_model, tmp_path / "nodes", max_steps=4, save_steps=2, per_device_train_batch_size=4, resume=True)
    assert resumed.global_step == 4
    torch.testing.assert_close(prefix(tmp_path / "nodes"), prefix(one.output_dir), rtol=1e-5, atol=1e-5)
