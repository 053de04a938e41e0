"""What a person hears about their data: the layout a row looks like when a field is missing, ChatGLM3 data
given to a ChatGLM2 model, --family against what a folder says, and answers cut by the length limits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from glmtune.data.preprocess import DataConfig, build_report, format_report, load_rows, tokenize_train
from glmtune.errors import GlmtuneError

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "data" / "adgen_sample" / "train.json"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from glmtune.families.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_alpaca_rows_without_output_name_the_missing_output_not_a_content_column(tmp_path):
    rows = _write(tmp_path / "a.jsonl", [{"instruction": "写一句", "input": "衬衫"}, {"instruction": "再写", "input": ""}])
    with pytest.raises(GlmtuneError) as caught:
        load_rows(rows, DataConfig())
    message = str(caught.value)
    assert "a.jsonl:1" in message and "alpaca" in message and "'output'" in message
    assert "content" not in message


def test_chatglm3_data_given_to_a_chatglm2_model_is_named_chatglm3_data(tmp_path):
    tool_call = [{"role": "user", "content": "北京天气？"},
                 {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "晴"},
                 {"role": "assistant", "content": "晴。"}]
    cases = {
        "tool": {"conversations": tool_call},
        "tools": {"tools": [{"name": "get_weather"}], "conversations": tool_call[:1] + tool_call[2:]},
        "loss": {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss": False}]},
        "observation": {"conversations": [{"role": "user", "content": "a"}, {"role": "observation", "content": "b"},
                                          {"role": "assistant", "content": "c"}]},
    }
    for name, record in cases.items():
        path = _write(tmp_path / f"{name}.jsonl", [record])
        with pytest.raises(GlmtuneError, match=r"ChatGLM3 fine-tuning data .*not a ChatGLM3 model") as caught:
            load_rows(path, DataConfig(family="chatglm2"))
        assert f"{name}.jsonl:1" in str(caught.value), name
    # Plain role conversations stay sharegpt data for ChatGLM2.
    plain = _write(tmp_path / "plain.jsonl", [{"conversations": tool_call[:1] + tool_call[2:]}])
    assert load_rows(plain, DataConfig()) == [{"prompt": "北京天气？", "response": "晴。", "history": []}]


def test_family_option_against_what_the_folder_says_is_said_loudly(tiny_model, tmp_path, caplog):
    import shutil

    from glmtune.families.tokenizer import load_tokenizer

    official = tmp_path / "chatglm2"  # names its release in config.json, as THUDM/chatglm2-6b does
    shutil.copytree(tiny_model, official)
    config = json.loads((official / "config.json").read_text(encoding="utf-8"))
    (official / "config.json").write_text(json.dumps({"_name_or_path": "THUDM/chatglm2-6b", **config}), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        tokenizer = load_tokenizer(official, family="chatglm3")
    assert tokenizer.family == "chatglm3"  # still an override, as for a mislabelled folder
    assert "--family chatglm3 overrides" in caplog.text and "is a chatglm2 model" in caplog.text
    assert "'THUDM/chatglm2-6b'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_tokenizer(official, family="chatglm2")
        load_tokenizer(tiny_model, family="chatglm3")  # a folder that says nothing: what --family is for
    assert "overrides" not in caplog.text


def test_the_report_says_loudly_how_many_rows_lost_how_many_answer_tokens(tokenizer):
    config = DataConfig(max_target_length=14, max_samples=40)
    rows = load_rows(TRAIN_FILE, config)
    dataset = tokenize_train(rows, tokenizer, config)
    report = build_report(rows, dataset, config, "train", TRAIN_FILE)
    full = [len(tokenizer.encode(r["response"], add_special_tokens=False)) for r in rows if r["prompt"] and r["response"]]
    lost = [n - 14 for n in full if n > 14]
    assert lost and report["answers_cut"] == len(lost) and report["answer_tokens_cut"] == sum(lost)
    assert report["answer_tokens_cut_max"] == max(lost)
    text = format_report(report)
    assert f"WARNING: {len(lost)} of {len(full)} training rows" in text and f"{sum(lost):,} trained tokens" in text
    assert "--max-target-length" in text

    roomy = DataConfig(max_target_length=4096, max_samples=40)
    report = build_report(rows, tokenize_train(rows, tokenizer, roomy), roomy, "train", TRAIN_FILE)
    assert report["answers_cut"] == 0 and "WARNING" not in format_report(report)
