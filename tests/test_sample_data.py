"""The bundled synthetic data: reproducible from data/make_sample.py and in the promised shape."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
FILES = ("adgen_sample/train.json", "adgen_sample/dev.json", "multiturn_sample.json")


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def test_make_sample_regenerates_the_committed_files_byte_for_byte(tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample", DATA / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_adgen_sample_rows_are_attribute_strings_and_ad_sentences():
    train, dev = rows("adgen_sample/train.json"), rows("adgen_sample/dev.json")
    assert (len(train), len(dev)) == (600, 100)
    assert not {r["content"] for r in train} & {r["content"] for r in dev}
    for row in train + dev:
        assert set(row) == {"content", "summary"}
        pairs = [item.split("#") for item in row["content"].split("*")]
        assert pairs[0][0] == "类型" and all(len(p) == 2 and all(p) for p in pairs), row["content"]
        assert 30 <= len(row["summary"]) <= 90 and row["summary"].endswith("。"), row["summary"]


def test_multiturn_sample_has_prompt_response_and_history_pairs():
    data = rows("multiturn_sample.json")
    assert len(data) == 100
    assert {len(r["history"]) for r in data} == {0, 1, 2}
    for row in data:
        assert set(row) == {"prompt", "response", "history"} and row["prompt"] and row["response"]
        assert all(len(turn) == 2 and all(isinstance(t, str) and t for t in turn) for turn in row["history"])
