"""GLM-4 P-tuning data: ids and labels equal the official demo's process_batch (combine true and false) and
process_batch_eval (per message) on every golden row, except the documented differences."""

from __future__ import annotations

import dataclasses
import json

import pytest

from glmtune.data import store as dataset_store
from glmtune.data.preprocess import DataConfig, load_rows, tokenize
from glmtune.errors import GlmtuneError
from glmtune.families.glm4 import data as glm4_data
from glmtune.families.tokenizer import load_tokenizer

COMBINE = DataConfig(family="glm4", max_source_length=192, max_target_length=64)  # the golden's lengths
PER_MESSAGE = dataclasses.replace(COMBINE, combine=False)
SPECIAL_IDS = range(151329, 151343)


@pytest.fixture(scope="module")
def glm4(reference):
    tokenizer = load_tokenizer(reference / "glm-4-9b-chat")
    rows = load_rows(reference / "glm4-preprocess-in.jsonl", COMBINE)
    golden = [json.loads(line) for line in (reference / "glm4-preprocess-golden.jsonl").read_text(encoding="utf-8").splitlines()]
    return tokenizer, rows, golden[1:]


def special_text(row) -> bool:
    """Content holding special strings: the official tokenizer makes them control ids (glmtune keeps them text)."""
    return any(s in m["content"] for m in row["messages"] for s in ("<|", "[gMASK]"))


@pytest.mark.parametrize("config,key", [(COMBINE, "combine_true"), (PER_MESSAGE, "combine_false")])
def test_training_ids_and_labels_equal_process_batch_on_every_row(glm4, config, key):
    tokenizer, rows, golden = glm4
    assert len(rows) == len(golden) == 41
    compared = 0
    for row, expected in zip(rows, golden):
        expected = expected[key]
        reason = glm4_data.skip_reason(row, config)
        if reason is not None:
            # no messages / no assistant message: the official raises, or (combine false) trains nothing
            assert reason in ("no messages", "no assistant message"), row["where"]
            assert "error" in expected or all(t == -100 for t in expected["labels"]) or special_text(row), row["where"]
            continue
        ids, labels, _ = glm4_data.encode_train(row, tokenizer, config)
        if "error" in expected:  # process_message's KeyError on a python tool / a function without properties
            assert not config.combine and "KeyError" in expected["error"], row["where"]
            assert ids[-1] == 151336 and any(t != -100 for t in labels)
            continue
        if special_text(row):
            assert not set(ids) & set(SPECIAL_IDS) - {151331, 151333, 151335, 151336, 151337, 151338}
            assert ids != expected["input_ids"]
            continue
        assert ids == expected["input_ids"], row["where"]
        assert labels == expected["labels"], row["where"]
        compared += 1
    assert compared >= 33


def test_eval_rows_equal_process_batch_eval_per_message_where_it_works(glm4):
    tokenizer, rows, golden = glm4
    compared = 0
    for row, expected in zip(rows, golden):
        expected = expected["eval_combine_false"]
        if glm4_data.skip_reason(row, PER_MESSAGE) is not None or special_text(row):
            continue
        examples = glm4_data.encode_eval(row, tokenizer, PER_MESSAGE)
        if isinstance(expected, dict):  # the official raises: here fewer (or no) examples, never an exception
            assert "Error" in expected["error"]
            continue
        got = [(p, o) for p, o, _ in examples]
        want = [(e["input_ids"], e["output_ids"]) for e in expected]
        if any(m["role"] == "assistant" and not m["content"] for m in row["messages"]):
            # the official makes an eval example of an empty reply (a prompt without <|assistant|>): not copied
            assert got == [w for w in want if w[0][-1] == 151337]
        else:
            assert got == want, row["where"]
        compared += 1
    assert compared >= 25


def test_combined_eval_prompt_ends_at_the_last_assistant_instead_of_holding_the_reply(glm4):
    tokenizer, rows, golden = glm4
    checked = 0
    for row, expected in zip(rows, golden):
        if glm4_data.skip_reason(row, COMBINE) or special_text(row) or not isinstance(expected["eval_combine_false"], list):
            continue
        ((prompt, labels, reference),) = glm4_data.encode_eval(row, tokenizer, COMBINE)
        official = expected["eval_combine_true"][0]
        assert official["input_ids"][-1] == 151331  # the official appends [gMASK] after the whole conversation
        last = expected["eval_combine_false"][-1]
        tools = any("tools" in m for m in row["messages"])  # process_message (per message only) may rewrite them
        if not tools and len(last["input_ids"]) < COMBINE.max_source_length and len(expected["eval_combine_false"]) == len(
                [m for m in row["messages"] if m["role"] == "assistant"]):
            # the conversation up to the last <|assistant|>: the per-message eval prompt of the last reply
            assert prompt == last["input_ids"], row["where"]
            assert labels == last["output_ids"], row["where"]
            checked += 1
        assert prompt[-1] == 151337 and len(prompt) <= COMBINE.max_source_length
        assert reference == [m for m in row["messages"] if m["role"] == "assistant"][-1]["content"]
    assert checked >= 15


def test_alpaca_sharegpt_and_prompt_response_rows_become_messages(glm4, tmp_path):
    tokenizer, _, _ = glm4
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"instruction": "翻译", "input": "我爱你", "output": "I love you."},
    ]) + "\n", encoding="utf-8")
    (row,) = load_rows(source, COMBINE)
    assert row["messages"][-1] == {"role": "assistant", "content": "I love you."}
    assert row["messages"][0]["role"] == "user" and "我爱你" in row["messages"][0]["content"]
    columns = tmp_path / "adgen.jsonl"
    columns.write_text(json.dumps({"content": "类型#裙", "summary": "好看"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (row,) = load_rows(columns, COMBINE)
    assert row["messages"] == [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "好看"}]
    ids, labels, _ = glm4_data.encode_train(row, tokenizer, COMBINE)
    assert ids == tokenizer.apply_chat_template(row["messages"]) + [151336]
    assert [t for t in labels if t != -100] == ids[ids.index(151337) + 2:]


def test_bad_messages_are_one_clear_error_naming_the_line_and_field(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [{"role": "bot", "content": "b"}]}\n',
                      encoding="utf-8")
    with pytest.raises(GlmtuneError, match=r"bad.jsonl:2.*messages\[0\]: field role"):
        load_rows(source, COMBINE)


def test_preprocess_stores_glm4_rows_through_the_family_and_skips_rows_without_a_reply(glm4, reference, tmp_path):
    tokenizer, _, _ = glm4
    source = reference / "glm4-preprocess-in.jsonl"
    # The family comes from the tokenizer, whatever the config says: no command code decides it.
    report = dataset_store.preprocess(source, tokenizer, tmp_path / "ds", dataclasses.replace(COMBINE, family="chatglm2"))
    assert report["family"] == "glm4" and report["rows_skipped"]["reasons"] == {"no assistant message": 2, "no messages": 1}
    dataset, _, _ = dataset_store.load_preprocessed(tmp_path / "ds", tokenizer, "train", None)
    assert len(dataset) == 38
    direct = tokenize(load_rows(source, COMBINE), tokenizer, COMBINE, "train")
    assert dataset["input_ids"] == direct["input_ids"] and dataset["labels"] == direct["labels"]


def test_glmtune_preprocess_reads_glm4_messages_for_a_glm4_model_folder(glm4, reference, tmp_path):
    from typer.testing import CliRunner

    from glmtune.cli import app

    tokenizer, _, _ = glm4
    source = reference / "glm4-preprocess-in.jsonl"
    for flag, config in (("--combine", COMBINE), ("--no-combine", PER_MESSAGE)):
        out = tmp_path / flag.strip("-")
        result = CliRunner().invoke(app, ["preprocess", "--model-path", str(reference / "glm-4-9b-chat"), "--train-file",
                                          str(source), "--output-dir", str(out), "--max-source-length", "192",
                                          "--max-target-length", "64", flag])
        assert result.exit_code == 0, result.output[-2000:]
        dataset, report, _ = dataset_store.load_preprocessed(out, tokenizer, "train", None)
        assert report["rules"] == ("combine" if config.combine else "per-message")
        direct = tokenize(load_rows(source, config), tokenizer, config, "train")
        assert dataset["labels"] == direct["labels"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": 3}]}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["preprocess", "--model-path", str(reference / "glm-4-9b-chat"), "--train-file",
                                      str(bad), "--output-dir", str(tmp_path / "bad")])
    # one GlmtuneError naming file, line and field (the console entry point turns it into exit code 2)
    assert isinstance(result.exception, GlmtuneError) and "bad.jsonl:1: messages[0]: field content" in str(result.exception)
