"""ChatGLM3 tokenizer: every row of the official golden file, the official method names, and family detection."""

from __future__ import annotations

import json

import pytest

from glmtune.families.registry import detect_family
from glmtune.families.chatglm2.tokenizer import ChatGLM2Tokenizer
from glmtune.families.tokenizer import load_tokenizer
from glmtune.families.chatglm3.tokenizer import ChatGLM3Tokenizer

ROLE_IDS = {"<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796, "<|observation|>": 64797}


@pytest.fixture(scope="module")
def glm3(reference):
    return load_tokenizer(reference / "chatglm3-6b")


@pytest.fixture(scope="module")
def rows(reference):
    lines = (reference / "chatglm3-tokenizer-golden.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines][1:]


def test_a_chatglm3_folder_gives_the_chatglm3_tokenizer_with_role_tokens(reference, glm3):
    assert detect_family(reference / "chatglm3-6b").name == "chatglm3"
    assert detect_family(reference / "chatglm2-6b").name == "chatglm2"
    assert isinstance(glm3, ChatGLM3Tokenizer)
    assert type(load_tokenizer(reference / "chatglm2-6b")) is ChatGLM2Tokenizer
    assert len(glm3) == glm3.vocab_size == 64798
    assert {t: glm3.get_command(t) for t in ROLE_IDS} == ROLE_IDS
    assert (glm3.eos_token_id, glm3.pad_token_id, glm3.padding_side) == (2, 0, "left")
    # --family overrides detection: the same file read as ChatGLM2 has no role tokens.
    assert len(load_tokenizer(reference / "chatglm3-6b", family="chatglm2")) == 64794


def test_text_rows_match_official_ids_tokens_and_decoding(reference, glm3, rows):
    texts = [r for r in rows if "text" in r]
    assert len(texts) == 62
    with_roles = ChatGLM3Tokenizer(reference / "chatglm3-6b" / "tokenizer.model", encode_special_tokens=True)
    for row in texts:
        text = row["text"]
        assert glm3.encode(text, add_special_tokens=False) == row["ids"], text
        assert glm3.encode(text) == row["ids_special"], text
        assert glm3(text)["input_ids"] == row["ids_special"], text
        assert glm3.tokenize(text) == row["tokens"], text
        assert with_roles.encode(text, add_special_tokens=False) == row["ids_encode_special_tokens"], text
        assert glm3.decode(row["ids_special"]) == row["decoded"], text
        assert glm3.decode(row["ids_special"], skip_special_tokens=True) == row["decoded_skip"], text
        assert glm3.decode(row["ids"]) == row["decoded_ids"], text


def test_literal_role_and_special_strings_in_text_never_become_special_ids(glm3, rows):
    special = set(range(64789, 64798)) | {0, 1, 2}
    literal = [r for r in rows if "text" in r and any(s in r["text"] for s in ("<|", "</s>", "<unk>", "[gMASK]"))]
    assert len(literal) >= 5
    for row in literal:
        assert not set(glm3.encode(row["text"], add_special_tokens=False)) & special, row["text"]


def test_build_chat_input_matches_official_with_system_tools_observations_and_history(glm3, rows):
    cases = [r for r in rows if r.get("method") == "build_chat_input"]
    assert len(cases) == 16
    assert any(h.get("tools") for r in cases for h in r["history"])
    assert any(r["role"] == "observation" or any(h["role"] == "observation" for h in r["history"]) for r in cases)
    for row in cases:
        batch = glm3.build_chat_input(row["query"], history=row["history"], role=row["role"])
        assert batch["input_ids"].tolist() == [row["input_ids"]], row["query"]
        assert batch["attention_mask"].tolist() == [row["attention_mask"]]
        assert batch["position_ids"].tolist() == [row["position_ids"]]
        assert glm3.decode(row["input_ids"]) == row["decoded"]


def test_build_single_message_matches_official(glm3, rows):
    cases = [r for r in rows if r.get("method") == "build_single_message"]
    assert len(cases) == 10
    for row in cases:
        single = row["single"]
        assert glm3.build_single_message(single["role"], single["metadata"], single["message"]) == row["ids"], single
    with pytest.raises(ValueError, match="role must be one of"):
        glm3.build_single_message("tool", "", "x")


def test_batches_are_left_padded_with_position_ids_as_official(glm3, rows):
    calls = [r for r in rows if r.get("method") == "__call__"]
    assert len(calls) == 3
    for row in calls:
        enc = glm3(row["batch"], **row["kwargs"])
        assert [enc["input_ids"], enc["attention_mask"], enc["position_ids"]] == [
            row["input_ids"], row["attention_mask"], row["position_ids"]]
    row = next(r for r in rows if "batch_convs" in r)
    prompts = [glm3.chat_input_ids(c["query"], c["history"], c["role"]) for c in row["batch_convs"]]
    enc = glm3.pad({"input_ids": prompts})
    assert [enc["input_ids"], enc["attention_mask"], enc["position_ids"]] == [
        row["input_ids"], row["attention_mask"], row["position_ids"]]


def test_decoding_ids_and_byte_fallback_prefixes_match_official(glm3, rows):
    for row in (r for r in rows if "decode_ids" in r):
        assert glm3.decode(row["decode_ids"]) == row["decoded"]
        assert glm3.decode(row["decode_ids"], skip_special_tokens=True) == row["decoded_skip"]
    row = next(r for r in rows if "prefixes" in r)
    assert [glm3.decode(row["ids"][: k + 1]) for k in range(len(row["ids"]))] == row["prefixes"]


def test_saved_chatglm3_tokenizer_is_detected_as_chatglm3_again(glm3, tmp_path):
    glm3.save_pretrained(tmp_path)
    assert detect_family(tmp_path).name == "chatglm3"
    again = load_tokenizer(tmp_path)
    assert isinstance(again, ChatGLM3Tokenizer)
    assert again.build_single_message("user", "", "你好") == glm3.build_single_message("user", "", "你好")
