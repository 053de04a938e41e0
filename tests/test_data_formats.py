"""alpaca and sharegpt data give exactly the ids of the equivalent column rows; detection; clear errors;
`glmtune preprocess` shows two decoded rows with the trained-on span marked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune.data.preprocess import DataConfig, load_rows, tokenize_train
from glmtune.errors import GlmtuneError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from glmtune.model.tiny import init_model

    return init_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from glmtune.families.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _ids(path, tokenizer, **config):
    dataset = tokenize_train(load_rows(path, DataConfig(**config)), tokenizer, DataConfig(**config))
    return list(zip(dataset["input_ids"], dataset["labels"]))


COLUMNS = dict(prompt_column="prompt", response_column="response", history_column="history", max_source_length=256)


def test_alpaca_rows_give_the_ids_of_the_equivalent_column_rows(tmp_path, tokenizer):
    alpaca = _write(tmp_path / "a.jsonl", [
        {"instruction": "写一句广告", "input": "类型#裤*材质#真丝", "output": "真丝面料顺滑。"},
        {"instruction": "继续", "input": "", "output": "好看又舒服。", "system": "你是文案助手",
         "history": [["你好", "你好！"]]},
        {"instruction": "总结", "output": "简洁。", "system": "简短回答"},
    ])
    columns = _write(tmp_path / "c.jsonl", [
        {"prompt": "写一句广告\n类型#裤*材质#真丝", "response": "真丝面料顺滑。", "history": []},
        {"prompt": "继续", "response": "好看又舒服。", "history": [["你是文案助手\n你好", "你好！"]]},
        {"prompt": "简短回答\n总结", "response": "简洁。", "history": []},
    ])
    assert _ids(alpaca, tokenizer, max_source_length=256) == _ids(columns, tokenizer, **COLUMNS)
    assert _ids(alpaca, tokenizer, max_source_length=256, data_format="alpaca") == _ids(columns, tokenizer, **COLUMNS)


def test_sharegpt_gives_one_row_per_assistant_turn_with_the_turns_before_as_history(tmp_path, tokenizer):
    sharegpt = _write(tmp_path / "s.json", [
        {"conversations": [{"from": "system", "value": "你是文案助手"}, {"from": "human", "value": "写裤子"},
                           {"from": "gpt", "value": "阔腿裤显瘦。"}, {"from": "human", "value": "面料呢？"},
                           {"from": "gpt", "value": "真丝。"}]},
        {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
    ])
    columns = _write(tmp_path / "c.jsonl", [
        {"prompt": "你是文案助手\n写裤子", "response": "阔腿裤显瘦。", "history": []},
        {"prompt": "面料呢？", "response": "真丝。", "history": [["你是文案助手\n写裤子", "阔腿裤显瘦。"]]},
        {"prompt": "你好", "response": "你好！", "history": []},
    ])
    assert _ids(sharegpt, tokenizer, max_source_length=256) == _ids(columns, tokenizer, **COLUMNS)


def test_the_configured_columns_win_over_detection_and_bad_turns_are_named(tmp_path):
    both = _write(tmp_path / "b.jsonl", [{"content": "c", "summary": "s", "instruction": "i", "output": "o"}])
    assert load_rows(both) == [{"prompt": "c", "response": "s", "history": []}]
    assert load_rows(both, DataConfig(data_format="alpaca")) == [{"prompt": "i", "response": "o", "history": []}]
    bad = _write(tmp_path / "bad.jsonl", [{"conversations": [{"from": "gpt", "value": "hi"}]}])
    with pytest.raises(GlmtuneError, match=r"bad\.jsonl:1: conversations\[0\]: an assistant turn without a user turn"):
        load_rows(bad)
    bad = _write(tmp_path / "bad2.jsonl", [{"conversations": [{"from": "narrator", "value": "hi"}]}])
    with pytest.raises(GlmtuneError, match=r"bad2\.jsonl:1: conversations\[0\]: field 'from'/'role': expected one of .* found 'narrator'"):
        load_rows(bad)
    bad = _write(tmp_path / "bad3.jsonl", [{"instruction": "i", "output": 3}])
    with pytest.raises(GlmtuneError, match=r"bad3\.jsonl:1: field 'output': expected a string, found int 3"):
        load_rows(bad)


def test_all_turns_labels_every_answer_of_a_conversation_in_one_row(tmp_path, tokenizer):
    conversation = {"conversations": [{"from": "human", "value": "写裤子"}, {"from": "gpt", "value": "阔腿裤显瘦。"},
                                      {"from": "human", "value": "面料呢？"}, {"from": "gpt", "value": "真丝。"},
                                      {"from": "human", "value": "颜色？"}, {"from": "gpt", "value": "黑色。"}]}
    path = _write(tmp_path / "s.jsonl", [conversation])
    each = _ids(path, tokenizer, max_source_length=256)
    [(ids, labels)] = _ids(path, tokenizer, max_source_length=256, train_on="all-turns")
    assert len(each) == 3  # each-turn: one row per answer
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    answers = ["阔腿裤显瘦。", "真丝。", "黑色。"]
    assert spans[:2] == [tokenizer.encode(a, add_special_tokens=False) for a in answers[:2]]
    assert spans[2] == tokenizer.encode(answers[2], add_special_tokens=False) + [tokenizer.eos_token_id]
    # the last answer is labelled as in the each-turn row, and the text around the answers is the official prompt
    assert [t for t in each[-1][1] if t != -100] == spans[2]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == tokenizer.build_prompt(
        "颜色？", [["写裤子", answers[0]], ["面料呢？", answers[1]]]).replace(" ", "") + answers[2]
    assert ids[:2] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    # cut on the right to max_source_length + max_target_length + 1 tokens
    [(short, short_labels)] = _ids(path, tokenizer, max_source_length=10, max_target_length=5, train_on="all-turns")
    assert short == ids[:16] and short_labels == labels[:16]


def test_preprocess_prints_two_decoded_rows_with_the_label_span_marked(tiny_model, tmp_path):
    data = _write(tmp_path / "a.jsonl", [{"instruction": f"写广告{i}", "input": "", "output": f"真丝面料{i}。"} for i in range(3)])
    done = subprocess.run([sys.executable, "-m", "glmtune", "preprocess", "--model-path", str(tiny_model),
                           "--train-file", str(data), "--output-dir", str(tmp_path / "pre")],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        text = line.split(" ", 1)[1]
        assert f"问：写广告{i}" in text and text.count("⟦") == 1
        assert text.split("⟦")[1].startswith(f"真丝面料{i}") and "问" not in text.split("⟦")[1]


def test_train_with_all_turns_runs_and_records_the_setting_for_resume(tiny_model, tmp_path, monkeypatch):
    import torch

    from glmtune.train.loop import train
    from glmtune.train.config import build_config

    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    common = dict(model_path=str(tiny_model), train_file=str(REPO / "data" / "multiturn_sample.json"), prompt_column="prompt",
                  response_column="response", history_column="history", max_source_length=256, pre_seq_len=4,
                  per_device_train_batch_size=4, max_steps=1, disable_tqdm=True, report_to="none")
    result = train(build_config(None, dict(common, output_dir=str(tmp_path / "all-turns"), train_on="all-turns")))
    assert len(result.losses) == 1 and 0 < result.losses[0][1] < 20
    state = json.loads((tmp_path / "all-turns" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["config"]["train_on"] == "all-turns"
