"""Official P-tuning preprocessing with the real tokenizer: ids, labels, history, report, errors, cache, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from glmtune.data import preprocess as data
from glmtune.data import store as dataset_store
from glmtune.cli import app
from glmtune.errors import GlmtuneError

GMASK, SOP, EOS, PAD = 64790, 64792, 2, 0


@pytest.fixture(scope="module")
def tokenizer(reference):
    from glmtune.families.tokenizer import load_tokenizer

    return load_tokenizer(reference / "chatglm2-6b")


@pytest.fixture(scope="module")
def golden(reference):
    rows = [json.loads(line) for line in (reference / "tokenizer-golden.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = {r["text"]: r for r in rows if "text" in r}
    prompts = {(r["query"], json.dumps(r["history"], ensure_ascii=False)): r["prompt_ids"] for r in rows if "query" in r}
    batch = next(r for r in rows if "batch" in r)
    return texts, prompts, batch


@pytest.fixture(scope="module")
def dev150(reference, tmp_path_factory):
    """The first 150 ADGEN dev rows: the ones whose texts tokenizer-golden.jsonl holds."""
    path = tmp_path_factory.mktemp("dev") / "dev150.json"
    lines = (reference / "AdvertiseGen" / "dev.json").read_text(encoding="utf-8").splitlines()[:150]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _no_pad(ids):
    return [-100 if t == PAD else t for t in ids]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --- ids and labels ------------------------------------------------------------------------------


def test_train_ids_and_labels_equal_the_official_rule_on_golden_token_ids(dev150, tokenizer, golden):
    texts, prompts, _ = golden
    config = data.DataConfig(max_source_length=64, max_target_length=64)
    rows = data.load_rows(dev150, config)[:20]  # the rows whose full chat prompt ids are golden
    dataset = data.tokenize_train(rows, tokenizer, config)
    cut_prompts = cut_answers = 0
    for row, got in zip(rows, dataset):
        prompt_ids = prompts[(row["prompt"], "[]")]
        answer_ids = texts[row["response"]]["ids"]
        cut_prompts += len(prompt_ids) > 64
        cut_answers += len(answer_ids) > 64
        expected_prompt = prompt_ids[:64]
        expected_answer = answer_ids[:64] + [EOS]
        assert got["input_ids"] == expected_prompt + expected_answer
        assert got["labels"] == [-100] * len(expected_prompt) + _no_pad(expected_answer)
        assert got["input_ids"][:2] == [GMASK, SOP]
    assert cut_prompts >= 1 and cut_answers >= 1  # both truncations were exercised


def test_eval_prompts_labels_and_references_follow_the_official_eval_preprocessing(dev150, tokenizer, golden):
    texts, prompts, _ = golden
    config = data.DataConfig(max_source_length=64, max_target_length=64)
    rows = data.load_rows(dev150, config)
    dataset = data.tokenize_eval(rows, tokenizer, config)
    assert len(dataset) == 150
    for i, (row, got) in enumerate(zip(rows, dataset)):
        # text_target labels: `[gMASK] sop` + ids, cut to max_target_length, pad id -> -100
        assert got["labels"] == _no_pad(texts[row["response"]]["ids_special"][:64])
        assert got["reference"] == row["response"]
        if i < 20:
            assert got["input_ids"] == prompts[(row["prompt"], "[]")][:64]


def test_every_row_equals_the_official_tokenizer_calls_with_truncation(dev150, tokenizer):
    config = data.DataConfig(source_prefix="广告：", max_source_length=48, max_target_length=40)
    rows = data.load_rows(dev150, config)
    train = data.tokenize_train(rows, tokenizer, config)
    evals = data.tokenize_eval(rows, tokenizer, config)
    for row, tr, ev in zip(rows, train, evals):
        prompt = "广告：" + tokenizer.build_prompt(row["prompt"], None)
        a_ids = tokenizer.encode(prompt, add_special_tokens=True, truncation=True, max_length=48)
        b_ids = tokenizer.encode(row["response"], add_special_tokens=False, truncation=True, max_length=40)
        assert tr["input_ids"] == a_ids + b_ids + [EOS]
        assert tr["labels"] == [-100] * len(a_ids) + _no_pad(b_ids + [EOS])
        assert ev["input_ids"] == a_ids
        target = tokenizer(text_target=[row["response"]], max_length=40, truncation=True)["input_ids"][0]
        assert ev["labels"] == _no_pad(target)


def test_multi_turn_history_builds_the_official_chat_prompt(tmp_path, tokenizer, golden):
    texts, prompts, _ = golden
    (query, history_json), prompt_ids = next((k, v) for k, v in prompts.items() if k[1] != "[]")
    answer = next(iter(texts))  # any text with golden ids
    path = _write(tmp_path / "chat.jsonl", json.dumps({"q": query, "a": answer, "h": json.loads(history_json)}, ensure_ascii=False) + "\n")
    config = data.DataConfig(prompt_column="q", response_column="a", history_column="h", max_source_length=256)
    dataset = data.tokenize_train(data.load_rows(path, config), tokenizer, config)
    assert dataset[0]["input_ids"] == prompt_ids + texts[answer]["ids"][:128] + [EOS]
    short = data.DataConfig(prompt_column="q", response_column="a", history_column="h", max_source_length=40)
    cut = data.tokenize_train(data.load_rows(path, short), tokenizer, short)
    assert cut[0]["input_ids"][:40] == prompt_ids[:40] and cut[0]["labels"][:40] == [-100] * 40


def test_bundled_multiturn_sample_uses_each_rows_history(tokenizer):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "multiturn_sample.json"
    config = data.DataConfig(prompt_column="prompt", response_column="response", history_column="history", max_source_length=1024)
    rows = data.load_rows(path, config)
    assert any(row["history"] for row in rows)
    dataset = data.tokenize_eval(rows[:10], tokenizer, config)
    for row, got in zip(rows, dataset):
        assert got["input_ids"] == tokenizer.encode(tokenizer.build_prompt(row["prompt"], row["history"]))
        assert f"[Round {len(row['history']) + 1}]" in tokenizer.decode(got["input_ids"])


def test_official_truncation_references_are_the_decoded_cut_labels(dev150, tokenizer):
    config = data.DataConfig(max_target_length=20)
    dataset = data.tokenize_eval(data.load_rows(dev150, config)[:5], tokenizer, config)
    full = data.eval_references(dataset, tokenizer)
    cut = data.eval_references(dataset, tokenizer, official_truncation=True)
    for whole, part in zip(full, cut):
        assert len(part) < len(whole) and whole.startswith(part.strip())


# --- batching ------------------------------------------------------------------------------------


def test_collate_train_pads_right_with_pad_id_and_ignored_labels():
    batch = data.collate_train([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_collate_eval_left_pads_like_the_official_batch_encoding(tokenizer, golden):
    _, _, expected = golden
    features = [{"input_ids": tokenizer.encode(text)} for text in expected["batch"]]
    batch = data.collate_eval(features, pad_token_id=tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert batch[key].tolist() == expected[key], key


# --- report --------------------------------------------------------------------------------------


def test_report_on_full_adgen_dev_matches_the_official_cut_rates(reference, tokenizer, tmp_path):
    source = reference / "AdvertiseGen" / "dev.json"
    config = data.DataConfig(max_source_length=64, max_target_length=64)
    report = dataset_store.preprocess(source, tokenizer, tmp_path / "dev-eval", config, mode="eval")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    prompt_lengths = [len(tokenizer.encode(tokenizer.build_prompt(r["content"], None))) for r in rows]
    target_lengths = [len(tokenizer.encode(r["summary"], add_special_tokens=False)) for r in rows]
    assert report["rows_read"] == report["rows_kept"] == 1070
    assert report["rows_skipped"] == {"empty_prompt": 0, "empty_response": 0, "total": 0}
    assert report["prompts_truncated"] == sum(n > 64 for n in prompt_lengths)
    assert report["targets_truncated"] == sum(n + 2 > 64 for n in target_lengths)  # + [gMASK] sop
    assert 16 < report["prompts_truncated_pct"] < 18 and 79 < report["targets_truncated_pct"] < 81
    assert report["prompt_tokens"]["max"] == max(prompt_lengths)
    assert report["target_tokens"]["p90"] == pytest.approx(np.percentile(target_lengths, 90), abs=0.05)
    saved = json.loads((tmp_path / "dev-eval" / dataset_store.REPORT_FILE).read_text(encoding="utf-8"))
    assert saved == report


def test_report_counts_rows_skipped_for_empty_prompt_or_response(tmp_path, tokenizer):
    lines = [
        {"content": "类型#裙", "summary": "好看"},
        {"content": "", "summary": "好看"},
        {"content": "类型#裤", "summary": None},
        {"content": None, "summary": ""},
        {"content": " ", "summary": "空格提示照官方保留"},
    ]
    path = _write(tmp_path / "rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    config = data.DataConfig()
    rows = data.load_rows(path, config)
    dataset = data.tokenize_train(rows, tokenizer, config)
    report = data.build_report(rows, dataset, config, "train", path)
    assert report["rows_read"] == 5 and report["rows_kept"] == 2
    assert report["rows_skipped"] == {"empty_prompt": 2, "empty_response": 1, "total": 3}


# --- input formats and errors --------------------------------------------------------------------


def test_json_array_csv_and_max_samples_are_read(tmp_path):
    array = _write(tmp_path / "a.json", json.dumps([{"content": "甲", "summary": "乙"}, {"content": "丙", "summary": "丁"}], ensure_ascii=False))
    assert [r["prompt"] for r in data.load_rows(array)] == ["甲", "丙"]
    csv_file = _write(tmp_path / "a.csv", 'q,a,h\n甲,乙,"[[""早"", ""好""]]"\n丙,丁,\n')
    config = data.DataConfig(prompt_column="q", response_column="a", history_column="h", max_samples=1)
    assert data.load_rows(csv_file, config) == [{"prompt": "甲", "response": "乙", "history": [["早", "好"]]}]


@pytest.mark.parametrize(
    "name, text, config, message",
    [
        ("bad.json", '{"content": "a", "summary": "b"}\n\n{"content": "a", \n', {}, r"bad\.json:3: not valid JSON"),
        ("bad.json", '{"content": "a", "summary": "b"}\n["a"]\n', {}, r"bad\.json:2: expected a JSON object, found list"),
        ("bad.json", '{"prompt": "a", "summary": "b"}\n', {}, r"bad\.json:1: no column 'content' \(columns present: \['prompt', 'summary'\]"),
        ("bad.json", '{"content": 3, "summary": "b"}\n', {}, r"bad\.json:1: column 'content' should be a string, found int"),
        ("bad.json", '{"content": "a", "summary": "b", "h": [["x"]]}\n', {"history_column": "h"}, r"bad\.json:1: column 'h' should be a list"),
        ("bad.json", '{"content": "a", "summary": "b"}\n', {"history_column": "hist"}, r"no column 'hist' in any row"),
        ("bad.json", "[1, 2", {}, r"bad\.json:1: not valid JSON"),
        ("bad.txt", "x", {}, r"unsupported file type '\.txt'"),
    ],
)
def test_bad_input_names_file_line_and_what_was_expected(tmp_path, name, text, config, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(GlmtuneError, match=message):
        data.load_rows(path, data.DataConfig(**config))


def test_failed_preprocess_writes_nothing_and_refuses_foreign_folders(tmp_path, tokenizer):
    bad = _write(tmp_path / "bad.jsonl", '{"content": "a", "summary": "b"}\nnope\n')
    with pytest.raises(GlmtuneError, match="bad.jsonl:2"):
        dataset_store.preprocess(bad, tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    good = _write(tmp_path / "good.jsonl", '{"content": "a", "summary": "b"}\n')
    with pytest.raises(GlmtuneError, match="not a glmtune dataset folder"):
        dataset_store.preprocess(good, tokenizer, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["bom.json", "bom.jsonl", "bom.csv", "array.json"])
def test_a_utf8_bom_is_accepted_in_every_format(tmp_path, name):
    body = {
        "bom.json": '{"content": "甲", "summary": "乙"}\n',
        "bom.jsonl": '{"content": "甲", "summary": "乙"}\n',
        "bom.csv": "content,summary\n甲,乙\n",
        "array.json": '[{"content": "甲", "summary": "乙"}]',
    }[name]
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert data.load_rows(path) == [{"prompt": "甲", "response": "乙", "history": []}]


@pytest.mark.parametrize(
    "name, body, message",
    [
        ("gbk.jsonl", b'{"content": "a", "summary": "b"}\n{"content": "\xc0\xe0", "summary": "b"}\n', r"gbk\.jsonl:2: not UTF-8 text \(byte 0xc0 at byte offset 46\)"),
        ("gbk.json", b'[{"content": "a", "summary": "b"},\n {"content": "\xc0\xe0", "summary": "b"}]', r"gbk\.json:2: not UTF-8 text"),
        ("gbk.csv", b"content,summary\na,b\n\xc0\xe0,b\n", r"gbk\.csv:3: not UTF-8 text \(byte 0xc0 at byte offset 20\)"),
    ],
    ids=["jsonl", "json-array", "csv"],
)
def test_non_utf8_input_names_the_file_line_and_byte(tmp_path, name, body, message):
    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(GlmtuneError, match=message):
        data.load_rows(path)


def test_max_samples_counts_rows_read_before_empty_rows_are_dropped_as_officially(tmp_path):
    lines = [{"content": "甲", "summary": ""}, {"content": "乙", "summary": "好"}, {"content": "丙", "summary": "好"}]
    path = _write(tmp_path / "rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    rows = data.load_rows(path, data.DataConfig(max_samples=2))
    assert [r["prompt"] for r in rows] == ["甲", "乙"]  # 2 rows read; the empty one is dropped later, leaving 1


def test_preprocess_into_an_existing_file_is_refused_clearly(tmp_path):
    good = _write(tmp_path / "good.jsonl", '{"content": "a", "summary": "b"}\n')
    taken = _write(tmp_path / "taken", "a file")
    # The tokenizer is never reached: the output path is checked before any work.
    with pytest.raises(GlmtuneError, match=r"taken: exists and is not a folder"):
        dataset_store.preprocess(good, None, taken)
    with pytest.raises(GlmtuneError, match=r"taken: exists and is not a folder"):
        dataset_store.preprocess(good, None, taken / "sub")
    assert taken.read_text() == "a file"


# --- saved datasets and the cache ----------------------------------------------------------------


def test_raw_file_is_tokenized_once_then_served_from_the_cache(dev150, tokenizer, tmp_path):
    config = data.DataConfig(max_source_length=64, max_target_length=64)
    cache = tmp_path / "cache"
    first, report = dataset_store.load_or_build_dataset(dev150, tokenizer, config, "train", cache_dir=cache)
    (entry,) = list(cache.iterdir())
    stamp = (entry / dataset_store.META_FILE).stat().st_mtime_ns
    again, _ = dataset_store.load_or_build_dataset(dev150, tokenizer, config, "train", cache_dir=cache)
    assert again["input_ids"] == first["input_ids"] and report["rows_read"] == 150
    assert list(cache.iterdir()) == [entry] and (entry / dataset_store.META_FILE).stat().st_mtime_ns == stamp
    dataset_store.load_or_build_dataset(dev150, tokenizer, data.DataConfig(max_source_length=32), "train", cache_dir=cache)
    dataset_store.load_or_build_dataset(dev150, tokenizer, config, "eval", cache_dir=cache)
    assert len(list(cache.iterdir())) == 3  # other settings or mode: new entries


def test_preprocessed_folder_is_taken_instead_of_a_raw_file_and_checked(dev150, tokenizer, tmp_path):
    out = tmp_path / "tok"
    dataset_store.preprocess(dev150, tokenizer, out, data.DataConfig(max_samples=30), mode="train")
    dataset, report = dataset_store.load_or_build_dataset(out, tokenizer, mode="train")
    assert len(dataset) == 30 and report["rows_read"] == 30
    with pytest.raises(GlmtuneError, match="tokenized for 'train'"):
        dataset_store.load_or_build_dataset(out, tokenizer, mode="eval")
    meta = json.loads((out / dataset_store.META_FILE).read_text(encoding="utf-8"))
    meta["tokenizer_sha256"] = "0" * 64
    (out / dataset_store.META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(GlmtuneError, match="different tokenizer"):
        dataset_store.load_or_build_dataset(out, tokenizer, mode="train")


def _valid_meta(**changes):
    meta = {
        "format": dataset_store.FORMAT_VERSION, "mode": "train", "config": dataclasses.asdict(data.DataConfig()),
        "source": "x.json", "source_sha256": "0" * 64, "tokenizer_sha256": "0" * 64, "skipped_rows": [],
    }
    meta.update(changes)
    return meta


def _folder(tmp_path, meta_text, report=True):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / dataset_store.META_FILE).write_text(meta_text, encoding="utf-8")
    if report:
        (folder / dataset_store.REPORT_FILE).write_text("{}", encoding="utf-8")
    return folder


def test_read_meta_returns_the_stored_settings_as_a_data_config(tmp_path):
    folder = _folder(tmp_path, json.dumps(_valid_meta(config={**dataclasses.asdict(data.DataConfig()), "max_source_length": 256})))
    meta = dataset_store.read_meta(folder)
    assert meta["mode"] == "train" and meta["config"] == data.DataConfig(max_source_length=256)


@pytest.mark.parametrize(
    "meta_text, message",
    [
        ('{"format": 1,\n "mode": ', r"glmtune_data\.json:2: not valid JSON"),
        ("[]", r"glmtune_data\.json: expected a JSON object, found list"),
        (json.dumps({k: v for k, v in _valid_meta().items() if k != "mode"}), r"glmtune_data\.json: field 'mode' should be one of \('train', 'eval'\), found nothing"),
        (json.dumps(_valid_meta(mode="test")), r"field 'mode' should be one of \('train', 'eval'\), found 'test'"),
        (json.dumps(_valid_meta(format=0)), r"field 'format' should be \d+, found 0; preprocess again"),
        (json.dumps(_valid_meta(config={**dataclasses.asdict(data.DataConfig()), "shuffle": True})), r"field 'config' has unknown setting\(s\) \['shuffle'\] \(expected "),
        (json.dumps(_valid_meta(config={"prompt_column": "content"})), r"field 'config' lacks setting\(s\) \['history_column'"),
        (json.dumps(_valid_meta(config={**dataclasses.asdict(data.DataConfig()), "max_source_length": "64"})), r"field 'config\.max_source_length' should be int, found str"),
        (json.dumps(_valid_meta(tokenizer_sha256=None)), r"field 'tokenizer_sha256' should be a sha256 hex string, found None"),
        (json.dumps(_valid_meta(skipped_rows=[3, 1])), r"field 'skipped_rows' should be increasing row numbers"),
    ],
    ids=["corrupt", "not-object", "no-mode", "bad-mode", "old-format", "unknown-key", "missing-keys", "bad-type", "no-tokenizer", "skipped"],
)
def test_damaged_dataset_metadata_names_the_file_and_the_field(tmp_path, meta_text, message):
    folder = _folder(tmp_path, meta_text)
    for read in (lambda: dataset_store.read_meta(folder), lambda: dataset_store.load_or_build_dataset(folder, None, mode="train")):
        with pytest.raises(GlmtuneError, match=message):
            read()


def test_eval_reads_a_damaged_dataset_folder_through_the_same_checks(tmp_path):
    from glmtune.evaluation import generate as evaluate

    folder = _folder(tmp_path, json.dumps(_valid_meta(mode="eval", config={**dataclasses.asdict(data.DataConfig()), "seed": 1})))
    with pytest.raises(GlmtuneError, match=r"glmtune_data\.json: field 'config' has unknown setting\(s\) \['seed'\]"):
        evaluate.load_eval_data(None, None, folder, data.DataConfig())


def test_a_dataset_folder_without_its_report_is_a_clear_error(tmp_path):
    folder = _folder(tmp_path, json.dumps(_valid_meta()), report=False)
    with pytest.raises(GlmtuneError, match=r"preprocess_report\.json: missing; preprocess again"):
        dataset_store.load_preprocessed(folder)


def test_max_samples_on_a_preprocessed_folder_follows_the_raw_file_rule_without_a_warning(tmp_path, tokenizer, caplog):
    lines = [{"content": f"问{i}", "summary": "" if i in (1, 2) else f"答{i}"} for i in range(6)]
    raw = _write(tmp_path / "rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    out = tmp_path / "tok"
    dataset_store.preprocess(raw, tokenizer, out, data.DataConfig(max_samples=5), mode="train")  # rows 0..4 read, 1 and 2 dropped
    assert dataset_store.read_meta(out)["skipped_rows"] == [1, 2]
    for n in (1, 2, 3, 4, 9):
        config = data.DataConfig(max_samples=n)
        from_raw, _ = dataset_store.load_or_build_dataset(raw, tokenizer, config, "train", cache_dir=tmp_path / "cache")
        with caplog.at_level("WARNING", logger="glmtune.data.store"):
            caplog.clear()
            from_folder, _ = dataset_store.load_or_build_dataset(out, tokenizer, config, "train")
        assert not caplog.records  # only max_samples differs from the stored settings: nothing to warn about
        expected = from_raw["input_ids"] if n <= 5 else from_raw["input_ids"][:3]
        assert from_folder["input_ids"] == expected, n


# --- CLI -----------------------------------------------------------------------------------------


def test_preprocess_command_writes_a_loadable_dataset_and_report(reference, dev150, tmp_path):
    out = tmp_path / "out"
    args = [
        "preprocess", "--model_name_or_path", str(reference / "chatglm2-6b"), "--train_file", str(dev150),
        "--output_dir", str(out), "--max_source_length", "64", "--max-target-length", "64", "--max_train_samples", "40",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "40 rows read" in result.output and "prompt" in result.output
    import datasets

    dataset = datasets.load_from_disk(str(out))
    assert len(dataset) == 40 and dataset[0]["input_ids"][:2] == [GMASK, SOP]
    report = json.loads((out / dataset_store.REPORT_FILE).read_text(encoding="utf-8"))
    assert report["mode"] == "train" and report["max_target_length"] == 64


def test_preprocess_command_on_a_bad_file_exits_2_with_the_line_and_writes_nothing(reference, tmp_path):
    bad = _write(tmp_path / "bad.json", '{"content": "a", "summary": "b"}\n{"content": "a"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "glmtune", "preprocess", "--model-path", str(reference / "chatglm2-6b"),
         "--validation-file", str(bad), "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert f"error: {bad}:2: no column 'summary'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]
