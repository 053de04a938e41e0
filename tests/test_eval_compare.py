"""`glmtune eval --compare-base`: base (prefix off) and tuned scores on the same rows, and how far the tuned
answers moved from the base's on a general file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmtune.data.preprocess import DataConfig
from glmtune.errors import GlmtuneError

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "data" / "adgen_sample" / "train.json"
DEV_FILE = REPO / "data" / "adgen_sample" / "dev.json"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny base and a prefix trained on it for a few steps at a high rate (so answers change)."""
    from glmtune.model.tiny import init_model
    from glmtune.train.loop import train
    from glmtune.train.config import build_config

    root = tmp_path_factory.mktemp("compare")
    model = init_model(root / "model")
    os.environ.setdefault("GLMTUNE_CACHE", str(root / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(build_config(None, dict(model_path=str(model), train_file=str(TRAIN_FILE), output_dir=str(root / "out"),
                                               pre_seq_len=4, per_device_train_batch_size=8, max_steps=10, learning_rate=0.5,
                                               disable_tqdm=True, report_to="none")))
    finally:
        torch.set_num_threads(threads)
    return model, result.final_checkpoint


def test_compare_base_scores_the_base_and_the_tuned_model_as_separate_evals_would(tuned, tmp_path):
    from glmtune.evaluation import metrics
    from glmtune.evaluation.generate import GENERAL_PREDICTIONS_FILE, GenerationSettings, compare_base, run_eval

    model, checkpoint = tuned
    config = DataConfig(max_samples=6)
    settings = GenerationSettings(max_new_tokens=12)
    comparison = compare_base(model, tmp_path / "cmp", test_file=DEV_FILE, general_file=TRAIN_FILE, config=config,
                              ptuning_checkpoint=checkpoint, settings=settings, batch_size=4, progress=False)
    base = run_eval(model, tmp_path / "base", test_file=DEV_FILE, config=config, settings=settings, batch_size=4, progress=False)
    tuned_alone = run_eval(model, tmp_path / "tuned", test_file=DEV_FILE, config=config, ptuning_checkpoint=checkpoint,
                           settings=settings, batch_size=4, progress=False)
    scores = lambda results: {k: v for k, v in results.items() if k.startswith("predict_") and "runtime" not in k and "per_second" not in k}
    assert scores(comparison["base"]) == scores(base.results)  # the prefix switched off is the plain base
    assert scores(comparison["tuned"]) == scores(tuned_alone.results)
    assert (tmp_path / "cmp" / "base" / "generated_predictions.jsonl").read_text() == base.predictions_file.read_text()
    assert base.predictions != tuned_alone.predictions  # the prefix changed something, so the comparison means something

    general = comparison["general"]
    pairs = [json.loads(line) for line in (tmp_path / "cmp" / GENERAL_PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    assert general["samples"] == len(pairs) == 6
    assert general["identical_share"] == sum(p["base"] == p["tuned"] for p in pairs) / 6 < 1
    expected = metrics.compute_metrics([p["tuned"] for p in pairs], [p["base"] for p in pairs]).mean["rouge-l"]
    assert general["rouge-l_tuned_vs_base"] == expected
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text()) == comparison
    with pytest.raises(GlmtuneError, match="--compare-base needs a tuned model"):
        compare_base(model, tmp_path / "x", test_file=DEV_FILE, config=config, settings=settings, progress=False)


@pytest.mark.slow  # ~20 s: two evaluations in a fresh process; the test above covers the numbers
def test_compare_base_through_the_cli_prints_both_columns(tuned, tmp_path):
    model, checkpoint = tuned
    done = subprocess.run([sys.executable, "-m", "glmtune", "eval", "--model-path", str(model), "--ptuning-checkpoint",
                           str(checkpoint), "--test-file", str(DEV_FILE), "--max-samples", "4", "--max-new-tokens", "8",
                           "--output-dir", str(tmp_path / "cmp"), "--compare-base", "--no-progress"],
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "tuned"]
