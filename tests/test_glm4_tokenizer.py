"""The GLM-4 tokenizer: ids, decoding, batches and the chat template equal the official tokenizer on every golden row,
except that text never becomes a control id (special strings in text stay text: the official raw-BPE ids)."""

from __future__ import annotations

import json

import pytest

from glmtune.errors import GlmtuneError
from glmtune.families.registry import detect_family, family_of
from glmtune.families.tokenizer import load_tokenizer

SPECIAL_IDS = range(151329, 151343)


@pytest.fixture(scope="module")
def glm4(reference):
    rows = [json.loads(line) for line in (reference / "glm4-tokenizer-golden.jsonl").read_text(encoding="utf-8").splitlines()]
    return load_tokenizer(reference / "glm-4-9b-chat"), rows[0]["meta"], rows[1:]


def rows_with(rows, key):
    return [r for r in rows if key in r]


def test_the_official_folder_is_detected_as_glm4_and_loads_the_special_tokens_of_its_config(glm4, reference):
    tok, meta, _ = glm4
    assert detect_family(reference / "glm-4-9b-chat").name == "glm4" and family_of(tok).name == "glm4"
    assert detect_family(reference / "golden-model-glm4" / "model").name == "glm4"  # config.json alone says so
    assert {t: tok.convert_tokens_to_ids(t) for t in meta["special_ids"]} == meta["special_ids"]
    assert (tok.eos_token_id, tok.pad_token_id, tok.vocab_size, len(tok), tok.padding_side) == (
        meta["eos_token_id"], meta["pad_token_id"], meta["vocab_size"], meta["len"], meta["padding_side"])
    assert family_of(tok).stop_token_ids(tok) == [151329, 151336, 151338]


def test_ids_tokens_and_decoding_equal_the_official_on_every_text_row(glm4):
    tok, _, rows = glm4
    texts = rows_with(rows, "text")
    assert len(texts) == 65
    with_specials = 0
    for row in texts:
        text = row["text"]
        # Text is text: a special string in it keeps its BPE ids (what the official raw tiktoken path gives).
        assert tok.encode(text, add_special_tokens=False) == row["ids_raw_bpe"], text
        assert tok(text, add_special_tokens=False)["input_ids"] == row["ids_raw_bpe"], text  # the transformers route
        assert tok.encode(text) == [151331, 151333] + row["ids_raw_bpe"], text
        if row["ids"] == row["ids_raw_bpe"]:
            assert tok.encode(text) == row["ids_special"], text
            assert [list(tok.convert_tokens_to_string([t]).encode()) for t in tok.tokenize(text)] == [
                list(bytes(t).decode("utf-8", errors="replace").encode()) for t in row["tokens"]], text
        else:
            with_specials += 1
            assert not set(tok.encode(text, add_special_tokens=False)) & set(SPECIAL_IDS)
        # Decoding the official ids (specials included) equals the official decoding.
        assert tok.decode(row["ids_special"]) == row["decoded"], text
        assert tok.decode(row["ids_special"], skip_special_tokens=True) == row["decoded_skip"], text
        assert tok.decode(row["ids"]) == row["decoded_ids"], text
        assert tok.decode(row["ids"], skip_special_tokens=True) == row["decoded_ids_skip"], text
    assert with_specials >= 15  # the rows where the official tokenizer lets text become control ids


def test_decode_rows_and_incremental_prefixes_equal_the_official(glm4):
    tok, _, rows = glm4
    decode_rows = rows_with(rows, "decode_ids")
    assert len(decode_rows) == 4
    # the official repetition of the text before an unused id is not copied (the next test)
    unused = [r for r in decode_rows if any(151343 <= i <= 151551 for i in r["decode_ids"]) and r["decoded"]]
    assert len(unused) == 1
    for row in decode_rows:
        if row in unused:
            continue
        assert tok.decode(row["decode_ids"]) == row["decoded"]
        assert tok.decode(row["decode_ids"], skip_special_tokens=True) == row["decoded_skip"]
    (prefixes,) = rows_with(rows, "prefixes")
    ids = prefixes["ids"]
    assert [tok.decode(ids[: k + 1]) for k in range(len(ids))] == prefixes["prefixes"]


def test_unused_padded_ids_decode_to_nothing_instead_of_repeating_the_text(glm4):
    tok, _, _ = glm4
    # The official decoder gives "你好你好hi" here.
    assert tok.decode([109377, 151400, 6023]) == "你好hi"
    assert tok.decode([109377, 151343, 151551, 6023]) == "你好hi"


def test_batches_are_left_padded_with_position_ids_as_the_official(glm4):
    tok, _, rows = glm4
    batches = rows_with(rows, "batch")
    assert len(batches) == 5
    for row in batches:
        out = tok(row["batch"], **row["kwargs"])
        assert out["input_ids"] == row["input_ids"], row["kwargs"]
        assert out["attention_mask"] == row["attention_mask"], row["kwargs"]
        assert out["position_ids"] == row["position_ids"], row["kwargs"]
    (chat_batch,) = rows_with(rows, "batch_chat")
    out = tok.apply_chat_template(chat_batch["batch_chat"], **chat_batch["kwargs"])
    assert out["input_ids"] == chat_batch["input_ids"]
    assert out["attention_mask"] == chat_batch["attention_mask"] and out["position_ids"] == chat_batch["position_ids"]


def test_chat_template_text_and_ids_equal_the_official_on_every_template_row(glm4):
    tok, _, rows = glm4
    chats = rows_with(rows, "messages")
    assert len(chats) == 20
    differing = 0
    for row in chats:
        text = tok.apply_chat_template(row["messages"], add_generation_prompt=row["add_generation_prompt"], tokenize=False)
        ids = tok.apply_chat_template(row["messages"], add_generation_prompt=row["add_generation_prompt"])
        assert text == row["text_out"], row["messages"]
        contents = "".join(m["content"] for m in row["messages"])
        if not any(s in contents for s in ("<|", "[gMASK]", "<sop>")):
            assert ids == row["input_ids"], row["messages"]
        else:  # special strings in content: the official ids hold control ids there, glmtune's the text
            differing += 1
            assert ids != row["input_ids"]
            assert [i for i in ids if i in SPECIAL_IDS] == [151331, 151333, 151336, 151337]  # the template's own
            assert tok.decode(ids[3:-1]) == text[len("[gMASK]<sop><|user|>"):-len("<|assistant|>")]
        if "dict" in row:
            out = tok.apply_chat_template(row["messages"], add_generation_prompt=True, return_dict=True,
                                          return_tensors="pt")
            assert {k: v.tolist() for k, v in out.items()} == row["dict"]
    assert differing == 1


def test_special_strings_in_tool_descriptions_and_metadata_stay_text(glm4):
    tok, _, _ = glm4
    tools = [{"type": "function", "function": {"name": "f<|user|>", "description": "d <|assistant|> [gMASK]",
                                               "parameters": {"type": "object", "properties": {"<|system|>": {}}}}}]
    messages = [{"role": "system", "content": "", "tools": tools}, {"role": "user", "content": "q"},
                {"role": "assistant", "metadata": "<|observation|>", "content": "{}"}]
    ids = tok.apply_chat_template(messages)
    # <|system|> of the tool block, then the template's role markers only.
    assert [i for i in ids if i in SPECIAL_IDS] == [151331, 151333, 151335, 151336, 151337]
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.count("f<|user|>") == 2  # the "## name" line and the JSON
    assert all(text.count(s) == 1 for s in ("d <|assistant|> [gMASK]", '"<|system|>"', "<|observation|>\n{}"))


def test_a_glm4_folder_without_its_tokenizer_config_is_a_clear_error(reference, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((reference / "glm-4-9b-chat" / "tokenizer.model").read_bytes()[:4000])
    with pytest.raises(GlmtuneError, match="no tokenizer_config.json"):
        load_tokenizer(tmp_path, family="glm4")
    (tmp_path / "tokenizer.model").write_text("not base64 at all\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}', encoding="utf-8")
    with pytest.raises(GlmtuneError, match="line 1"):
        load_tokenizer(tmp_path, family="glm4")


def test_save_pretrained_round_trips_and_records_the_family(glm4, tmp_path):
    tok, _, _ = glm4
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert family_of(again).name == "glm4"
    messages = [{"role": "user", "content": "你好 <|user|>"}]
    assert again.apply_chat_template(messages, add_generation_prompt=True) == tok.apply_chat_template(
        messages, add_generation_prompt=True)


def test_a_tiny_glm4_tokenizer_is_written_in_the_official_format_and_detected(tmp_path):
    from glmtune.families.glm4.tiny import write_tiny_tokenizer
    from glmtune.model.tiny import bundled_texts

    folder = write_tiny_tokenizer(tmp_path / "tok", bundled_texts(), vocab_size=600)
    tok = load_tokenizer(folder)
    assert family_of(tok).name == "glm4" and tok.vocab_size == 600 and len(tok) == 614
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "[gMASK]", "<|user|>")] == [600, 602, 607]
    text = "类型#裙*颜色#红色 hello <|user|> 123"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok.encode("类型#裙", add_special_tokens=False)) < len("类型#裙".encode())  # merges were learned
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert ids[:3] == [602, 604, 607] and ids[-1] == 608
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["glmtune_family"]  # the official files alone: the special tokens say GLM-4
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert detect_family(folder).name == "glm4"
