"""`glmtune eval`: batched generation equal to one-by-one, official output files and keys, reference
truncation, empty predictions, seeded sampling, and an end-to-end eval of a checkpoint trained by
`glmtune train` on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from glmtune.data import preprocess as data
from glmtune.data import store as dataset_store
from glmtune.cli import app
from glmtune.errors import GlmtuneError
from glmtune.evaluation.generate import (
    PREDICTIONS_FILE,
    RESULTS_FILE,
    GenerationSettings,
    evaluate,
    generate_texts,
    length_sorted_batches,
)
from glmtune.model.loading import load_model
from glmtune.model.tiny import DATA_DIR, init_model
from glmtune.families.tokenizer import load_tokenizer

DEV = DATA_DIR / "adgen_sample" / "dev.json"
TRAIN = DATA_DIR / "adgen_sample" / "train.json"
MULTITURN = DATA_DIR / "multiturn_sample.json"
OFFICIAL_KEYS = {
    "predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l",
    "predict_runtime", "predict_samples", "predict_samples_per_second",
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A P-tuning checkpoint trained by the real `glmtune train` (a few steps on the bundled data)."""
    out = tmp_path_factory.mktemp("run")
    env = {**os.environ, "GLMTUNE_CACHE": str(out / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "glmtune", "train", "--model-path", str(tiny), "--train-file", str(TRAIN),
         "--output-dir", str(out / "run"), "--pre-seq-len", "8", "--max-steps", "4", "--max-train-samples", "32",
         "--per-device-train-batch-size", "4", "--save-steps", "100", "--device", "cpu", "--disable-tqdm"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "run" / "checkpoint-4"
    assert (ckpt / "pytorch_model.bin").is_file(), sorted(p.name for p in (out / "run").iterdir())
    return ckpt


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(tiny)


def _eval_set(tokenizer, path=DEV, **config):
    config = data.DataConfig(**config)
    return data.tokenize_eval(data.load_rows(path, config), tokenizer, config)


def test_length_sorted_batches_cover_every_index_once_longest_first():
    lengths = [3, 9, 5, 9, 1, 7, 2]
    batches = length_sorted_batches(lengths, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    with pytest.raises(GlmtuneError, match="batch_size"):
        length_sorted_batches(lengths, 0)


def test_batched_greedy_with_a_prefix_equals_one_by_one_in_input_order(tiny, checkpoint, tokenizer):
    model = load_model(tiny, ptuning_checkpoint=checkpoint)
    # Single-turn and multi-turn prompts: lengths from ~30 to ~100 tokens, so batches are really left-padded.
    prompts = list(_eval_set(tokenizer, max_samples=6)["input_ids"])
    prompts += list(_eval_set(tokenizer, MULTITURN, prompt_column="prompt", response_column="response",
                              history_column="history", max_source_length=128, max_samples=6)["input_ids"])
    assert max(map(len, prompts)) - min(map(len, prompts)) > 20
    settings = GenerationSettings(max_new_tokens=10)
    batched = generate_texts(model, tokenizer, prompts, settings, batch_size=5, progress=False)
    single = [generate_texts(model, tokenizer, [p], settings, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(batched)
    base = load_model(tiny)
    without_prefix = generate_texts(base, tokenizer, prompts[:3], settings, batch_size=3, progress=False)
    assert without_prefix != batched[:3]  # the prefix is applied


def test_eval_of_a_glmtune_train_checkpoint_writes_official_files_keys_and_full_references(tiny, checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "eval", "--model-path", str(tiny), "--ptuning-checkpoint", str(checkpoint), "--test-file", str(DEV),
        "--output-dir", str(out), "--max-samples", "7", "--batch-size", "4", "--max-new-tokens", "8", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert "rouge-l" in result.output and "samples/s" in result.output

    raw = (out / PREDICTIONS_FILE).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in raw.splitlines()]
    assert len(rows) == 7 and all(list(row) == ["labels", "predict"] for row in rows)
    summaries = [json.loads(line)["summary"] for line in DEV.read_text(encoding="utf-8").splitlines()[:7]]
    assert json.dumps(summaries[0], ensure_ascii=False) in raw  # UTF-8, Chinese not \u-escaped
    assert [row["labels"] for row in rows] == summaries

    results = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
    assert OFFICIAL_KEYS <= set(results)
    assert results["predict_samples"] == 7 and results["predict_runtime"] > 0
    assert 0 <= results["predict_rouge-1"] <= 100
    assert sorted(p.name for p in out.iterdir()) == [PREDICTIONS_FILE, RESULTS_FILE]  # no temp files left

    # The same rows preprocessed into a dataset folder give the same file.
    folder = tmp_path / "dev-eval"
    dataset_store.preprocess(DEV, load_tokenizer(tiny), folder, data.DataConfig(), mode="eval")
    again = tmp_path / "eval-dataset"
    result = CliRunner().invoke(app, [
        "eval", "--model-path", str(tiny), "--ptuning-checkpoint", str(checkpoint), "--dataset", str(folder),
        "--output-dir", str(again), "--max-samples", "7", "--batch-size", "3", "--max-new-tokens", "8", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert (again / PREDICTIONS_FILE).read_text(encoding="utf-8") == raw


def test_official_truncation_scores_against_cut_and_redecoded_labels(tiny, tokenizer, tmp_path):
    model = load_model(tiny)
    dataset = _eval_set(tokenizer, max_samples=4, max_target_length=12)
    summaries = [json.loads(line)["summary"] for line in DEV.read_text(encoding="utf-8").splitlines()[:4]]
    settings = GenerationSettings(max_new_tokens=4)
    full = evaluate(model, tokenizer, dataset, tmp_path / "full", settings, progress=False)
    cut = evaluate(model, tokenizer, dataset, tmp_path / "cut", settings, official_truncation=True, progress=False)
    assert full.labels == summaries
    # Official: `[gMASK] sop` + target ids, 12 tokens in all, decoded without specials -> 10 target tokens.
    expected = [tokenizer.decode(tokenizer.encode(s, add_special_tokens=False)[:10]).strip() for s in summaries]
    assert cut.labels == expected
    assert all(c != s and s.startswith(c) for c, s in zip(cut.labels, summaries))
    assert full.predictions == cut.predictions
    written = [json.loads(line)["labels"] for line in (tmp_path / "cut" / PREDICTIONS_FILE).read_text("utf-8").splitlines()]
    assert written == expected


def test_empty_predictions_score_zero_instead_of_crashing(tiny, tokenizer, tmp_path, caplog):
    model = load_model(tiny)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit equal: greedy picks id 0 (<unk>/pad), which decodes to ""
    dataset = _eval_set(tokenizer, max_samples=3)
    out = evaluate(model, tokenizer, dataset, tmp_path, GenerationSettings(max_new_tokens=3), progress=False)
    assert out.predictions == ["", "", ""]
    assert out.results["empty_predictions"] == 3
    assert all(out.results[f"predict_{k}"] == 0.0 for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"))
    assert "3 of 3 pairs" in caplog.text


def test_sampling_is_reproducible_with_a_seed(tiny, checkpoint, tokenizer):
    model = load_model(tiny, ptuning_checkpoint=checkpoint)
    prompts = list(_eval_set(tokenizer, max_samples=4)["input_ids"])

    def sample(seed):
        settings = GenerationSettings(max_new_tokens=12, do_sample=True, top_p=0.9, temperature=1.0, seed=seed)
        return generate_texts(model, tokenizer, prompts, settings, batch_size=2, progress=False)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_test_file_and_dataset_are_mutually_exclusive(tiny, tmp_path):
    for extra in ([], ["--test-file", str(DEV), "--dataset", str(tmp_path)]):
        result = CliRunner().invoke(app, ["eval", "--model-path", str(tiny), "--output-dir", str(tmp_path / "o"), *extra])
        assert isinstance(result.exception, GlmtuneError)
        assert "exactly one of --test-file" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_missing_column_is_a_clear_error_before_anything_is_written(tiny, tmp_path):
    result = CliRunner().invoke(app, [
        "eval", "--model-path", str(tiny), "--test-file", str(DEV), "--output-dir", str(tmp_path / "o"),
        "--response-column", "answer",
    ])
    assert isinstance(result.exception, GlmtuneError)
    assert "no column 'answer'" in str(result.exception) and "summary" in str(result.exception)
    assert not (tmp_path / "o").exists()
