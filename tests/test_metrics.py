"""Official BLEU-4 / ROUGE parity (metrics-golden.json), blank-pair handling, prediction files, `glmtune score`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from glmtune.cli import app
from glmtune.errors import GlmtuneError
from glmtune.evaluation.metrics import METRIC_KEYS, compute_metrics, read_predictions, score_pair


@pytest.fixture(scope="module")
def golden(reference):
    predictions, labels = read_predictions(reference / "metric-pairs.jsonl")
    expected = json.loads((reference / "metrics-golden.json").read_text(encoding="utf-8"))
    return predictions, labels, expected


def _write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"labels": l, "predict": p}, ensure_ascii=False) + "\n" for p, l in pairs), encoding="utf-8")
    return path


def test_every_pair_and_the_means_match_the_official_compute_metrics(golden):
    predictions, labels, expected = golden
    result = compute_metrics(predictions, labels)
    assert len(result.per_pair) == len(expected["per_pair"]) == 200
    for i, (got, want) in enumerate(zip(result.per_pair, expected["per_pair"])):
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(want[key], abs=1e-4), (i, key)
    for key in METRIC_KEYS:
        assert result.mean[key] == pytest.approx(expected["mean"][key], abs=1e-4), key
    assert result.empty == 0


def test_process_pool_gives_the_same_numbers_as_serial(golden):
    predictions, labels, _ = golden
    serial = compute_metrics(predictions, labels, num_workers=1)
    parallel = compute_metrics(predictions, labels, num_workers=2)
    assert parallel.per_pair == serial.per_pair
    assert parallel.mean == serial.mean


def test_blank_prediction_or_reference_scores_zero_with_a_counted_warning(caplog):
    text = "简约而不简单的牛仔外套，白色的衣身十分百搭。"
    preds = [text, "", "   \n", text]
    labels = [text, text, text, " \t"]
    with caplog.at_level(logging.WARNING, logger="glmtune.evaluation.metrics"):
        result = compute_metrics(preds, labels)
    assert result.empty == 3
    assert result.per_pair[0] == {key: 100.0 for key in METRIC_KEYS}
    for row in result.per_pair[1:]:
        assert row == {key: 0.0 for key in METRIC_KEYS}
    assert result.mean == {key: 25.0 for key in METRIC_KEYS}
    assert "3 of 4 pairs" in caplog.text


def test_score_pair_differs_for_unrelated_texts():
    scores = score_pair("这款连衣裙很好看", "牛仔外套十分百搭")
    assert set(scores) == set(METRIC_KEYS)
    assert all(0.0 <= v < 50.0 for v in scores.values())


def test_mismatched_lengths_and_empty_input_are_user_errors():
    with pytest.raises(GlmtuneError, match="2 predictions but 1 labels"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(GlmtuneError, match="0 prediction/label pairs"):
        compute_metrics([], [])


@pytest.mark.parametrize("name", ["generated_predictions.jsonl", "generated_predictions.txt"])
def test_read_predictions_accepts_glmtune_and_official_files(tmp_path, name):
    path = _write_pairs(tmp_path / name, [("预测一", "参考一"), ("预测二", "参考二")])
    path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # a trailing blank line is fine
    assert read_predictions(path) == (["预测一", "预测二"], ["参考一", "参考二"])


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"labels": "a", "predict": "b"', r"bad\.txt:2: not valid JSON"),
        ('["a", "b"]', r"bad\.txt:2: expected a JSON object, found list"),
        ('{"labels": "a"}', r"bad\.txt:2: missing field 'predict'"),
        ('{"labels": "a", "predict": 3}', r"bad\.txt:2: field 'predict' should be a string, found int"),
    ],
)
def test_malformed_prediction_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.txt"
    path.write_text('{"labels": "a", "predict": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(GlmtuneError, match=message):
        read_predictions(path)


def test_score_command_prints_a_table_and_writes_official_keys(golden, tmp_path):
    predictions, labels, expected = golden
    path = _write_pairs(tmp_path / "generated_predictions.txt", list(zip(predictions, labels)))
    out = tmp_path / "results" / "scores.json"
    result = CliRunner().invoke(app, ["score", str(path), "--output", str(out), "--num-workers", "2"])
    assert result.exit_code == 0, result.output
    assert "rouge-l" in result.output and "bleu-4" in result.output
    written = json.loads(out.read_text(encoding="utf-8"))
    assert set(written) == {
        "predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_samples", "empty_predictions"
    }
    assert written["predict_samples"] == 200 and written["empty_predictions"] == 0
    for key in METRIC_KEYS:
        assert written[f"predict_{key}"] == pytest.approx(expected["mean"][key], abs=1e-4)
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_score_command_defaults_output_beside_the_file_and_warns_on_blank_predictions(tmp_path):
    path = _write_pairs(tmp_path / "generated_predictions.jsonl", [("", "参考文本"), ("相同的文本", "相同的文本")])
    proc = subprocess.run(
        [sys.executable, "-m", "glmtune", "score", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 of 2 pairs have an empty prediction" in proc.stderr
    assert "Building prefix dict" not in proc.stderr  # jieba loads quietly
    written = json.loads((tmp_path / "generated_predictions.scores.json").read_text(encoding="utf-8"))
    assert written["empty_predictions"] == 1 and written["predict_rouge-1"] == 50.0


def test_score_command_on_a_malformed_file_exits_2_and_writes_nothing(tmp_path):
    path = tmp_path / "generated_predictions.txt"
    path.write_text('{"labels": "a", "predict": "b"}\nnot json\n', encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "glmtune", "score", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert f"error: {path}:2: not valid JSON" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated_predictions.txt"]
