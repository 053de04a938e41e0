"""ChatGLM2 tokenizer: parity with the official tokenizer's outputs, and the transformers integration."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from glmtune.errors import GlmtuneError
from glmtune.model.tiny import bundled_texts, train_tokenizer
from glmtune.families.chatglm2.tokenizer import ChatGLM2Tokenizer, build_prompt
from glmtune.families.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def official(reference):
    return load_tokenizer(reference / "chatglm2-6b")


@pytest.fixture(scope="module")
def golden(reference):
    rows = [json.loads(line) for line in (reference / "tokenizer-golden.jsonl").read_text(encoding="utf-8").splitlines()]
    return {
        "texts": [r for r in rows if "text" in r],
        "prompts": [r for r in rows if "query" in r],
        "batch": next(r for r in rows if "batch" in r),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small tokenizer trained on the bundled data: tests that need no reference data use it."""
    return load_tokenizer(train_tokenizer(bundled_texts(), tmp_path_factory.mktemp("tok"), vocab_size=800))


def test_command_tokens_follow_the_sentencepiece_pieces(official):
    assert official.n_pieces == 64789
    assert len(official) == official.vocab_size == 64794
    ids = [official.get_command(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")]
    assert ids == [64789, 64790, 64791, 64792, 64793]
    assert official.convert_tokens_to_ids(["[gMASK]", "sop"]) == [64790, 64792]
    assert (official.pad_token_id, official.eos_token_id, official.padding_side) == (0, 2, "left")


def test_encoding_matches_official_ids_with_and_without_special_tokens(official, golden):
    assert len(golden["texts"]) == 308  # 300 ADGEN texts + 8 with literal special strings
    for row in golden["texts"]:
        assert official.encode(row["text"], add_special_tokens=False) == row["ids"], row["text"]
        assert official.encode(row["text"]) == row["ids_special"], row["text"]


def test_decoding_matches_official_text_and_drops_prefix_tokens(official, golden):
    for row in golden["texts"]:
        assert official.decode(row["ids"]) == row["decoded"]
        assert official.decode(row["ids_special"], skip_special_tokens=True) == row["decoded"]


def test_chat_prompt_and_its_ids_match_official(official, golden):
    assert any(r["history"] for r in golden["prompts"])
    for row in golden["prompts"]:
        prompt = build_prompt(row["query"], row["history"])
        assert prompt == row["prompt"] == official.build_prompt(row["query"], row["history"])
        assert official.encode(prompt) == row["prompt_ids"]


def test_batch_is_left_padded_with_position_ids_as_official(official, golden):
    row = golden["batch"]
    enc = official(row["batch"], padding=True)
    assert enc["input_ids"] == row["input_ids"]
    assert enc["attention_mask"] == row["attention_mask"]
    assert enc["position_ids"] == row["position_ids"]


def test_truncation_counts_the_two_prefix_tokens_and_cuts_on_the_right(official, golden):
    rows = golden["texts"][:3]
    enc = official([r["text"] for r in rows], padding=True, truncation=True, max_length=7, return_tensors="pt")
    assert enc["input_ids"].tolist() == [r["ids_special"][:7] for r in rows]
    assert enc["position_ids"].tolist() == [list(range(7))] * 3
    assert enc["input_ids"].dtype == torch.long


def test_text_target_gives_labels_encoded_like_inputs(official):
    enc = official(["类型#裤"], text_target=["宽松的阔腿裤"])
    assert enc["labels"] == [official.encode("宽松的阔腿裤")]
    assert enc["input_ids"] == [official.encode("类型#裤")]


SPECIAL_IDS = {0, 1, 2, 64789, 64790, 64791, 64792, 64793}


def test_special_strings_in_raw_text_stay_ordinary_text(official, golden):
    # The official class never splits "[gMASK]", "sop", "</s>" or "<unk>" out of user text (issue 9 item 1):
    # an eos inside an answer's labels, or a user ending the answer, must be impossible.
    literal = golden["texts"][300:]  # the 8 official rows with literal special strings (+ 1 prompt row)
    assert all(any(s in r["text"] for s in ("</s>", "<unk>", "[MASK]", "[gMASK]", "<|user|>")) for r in literal)
    for row in literal:
        ids = official.encode(row["text"], add_special_tokens=False)
        assert ids == row["ids"], row["text"]
        assert not set(ids) & SPECIAL_IDS, row["text"]
        assert official(row["text"])["input_ids"] == row["ids_special"], row["text"]
        assert official.convert_tokens_to_ids(official.tokenize(row["text"])) == row["ids"], row["text"]
    assert official.encode("好</s>", add_special_tokens=False) == [46458, 1833, 30917, 30994]
    for prompt in golden["prompts"]:
        assert not set(official.encode(prompt["prompt"])[2:]) & SPECIAL_IDS


def test_special_strings_stay_text_in_a_tiny_tokenizer_too(tiny):
    special = {tiny.pad_token_id, tiny.eos_token_id, tiny.sp_model.bos_id(), *tiny.command_ids.values()}
    for text in ("好</s>", "<unk>", " </s> ", "<s>[gMASK]sop", "a</s>b<unk>c", "</s></s>"):
        ids = tiny.encode(text, add_special_tokens=False)
        assert not set(ids) & special, text
        assert tiny.decode(ids) == text


def test_decode_skips_label_padding_pad_and_eos(tiny):
    ids = tiny.encode("宽松的阔腿裤")
    noisy = [tiny.pad_token_id] * 2 + ids + [tiny.eos_token_id] + [-100] * 3
    assert tiny.decode(noisy, skip_special_tokens=True) == "宽松的阔腿裤"
    assert tiny.decode(torch.tensor([noisy, noisy]), skip_special_tokens=True) == ["宽松的阔腿裤"] * 2


def test_save_pretrained_round_trip_keeps_model_file_and_behaviour(tiny, tmp_path):
    written = tiny.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.model", "tokenizer_config.json"}
    assert str(tmp_path / "tokenizer.model") in written
    assert (tmp_path / "tokenizer.model").read_bytes() == open(tiny.vocab_file, "rb").read()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" not in config and config["padding_side"] == "left"
    text = "[Round 1]\n\n问：类型#裙*裙长#连衣裙\n\n答：这款连衣裙</s>"
    for reloaded in (load_tokenizer(tmp_path), ChatGLM2Tokenizer.from_pretrained(tmp_path)):
        assert reloaded.encode(text) == tiny.encode(text)
        assert len(reloaded) == len(tiny)
        assert reloaded(["你", "你好呀"], padding=True) == tiny(["你", "你好呀"], padding=True)


def test_seq2seq_collator_left_pads_inputs_and_pads_labels_with_minus_100(tiny):
    prompts = [tiny.encode("类型#裤"), tiny.encode("裙")]
    features = [
        {"input_ids": prompts[0] + [5, 6], "labels": [-100] * len(prompts[0]) + [5, 6]},
        {"input_ids": prompts[1] + [7], "labels": [-100] * len(prompts[1]) + [7]},
    ]
    lengths = [len(f["input_ids"]) for f in features]
    assert lengths[0] > lengths[1]
    batch = DataCollatorForSeq2Seq(tiny, padding=True, label_pad_token_id=-100)(features)
    width = lengths[0]
    gap = width - lengths[1]
    assert batch["input_ids"][1].tolist() == [tiny.pad_token_id] * gap + features[1]["input_ids"]
    assert batch["attention_mask"][1].tolist() == [0] * gap + [1] * lengths[1]
    assert batch["position_ids"][1].tolist() == [0] * gap + list(range(lengths[1]))
    assert batch["position_ids"][0].tolist() == list(range(width))
    assert batch["labels"][1].tolist() == [-100] * gap + features[1]["labels"]
    assert batch["labels"][0].tolist() == features[0]["labels"]


def test_pad_honours_an_explicit_right_side(tiny):
    out = tiny.pad({"input_ids": [[11, 12, 13], [14]]}, padding_side="right")
    assert out["input_ids"] == [[11, 12, 13], [14, 0, 0]]
    assert out["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
    assert out["position_ids"] == [[0, 1, 2], [0, 0, 0]]


def test_load_tokenizer_without_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(GlmtuneError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(GlmtuneError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path)


# --- fast encoding: the same ids and encodings as transformers' generic route ----------------------

TRICKY_TEXTS = [
    "", " ", "   ", "\t", "\n", "\n\n", "\r\n", "line1\nline2\r\nline3\n",
    "<unk>", "</s>", "<s>", "a</s>b", " <unk> x ", "好</s>", "</s></s>", "<unk>好<unk>",
    "[gMASK]", "sop", "eop", "[MASK] [sMASK]", "[gMASK]sop 你好", "sopsop eopeop",
    "😀", "👍🏽🇨🇳", "emoji 😀 in 中文\n", "\u200b", "x\x00y", "▁", "  leading", "trailing  ",
    "类型#裤*版型#宽松*风格#性感", "ＡＢＣ，全角！", "[Round 1]\n\n问：你好\n\n答：",
]


def _generic_ids(tok, text):
    return tok.convert_tokens_to_ids(tok.tokenize(text))


def _outcome(call, *args, **kwargs):
    """What a tokenizer call gives, as plain lists (tensors converted), or the error type it raises."""
    try:
        out = call(*args, **kwargs)
    except Exception as exc:  # the generic route rejects some option mixes; the fast one must too
        return type(exc)
    if hasattr(out, "items"):
        return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in out.items()}
    return out.tolist() if hasattr(out, "tolist") else out


@pytest.fixture(scope="module")
def official_generic(reference):
    tok = load_tokenizer(reference / "chatglm2-6b")
    tok.use_fast_encode = False
    return tok


def test_fast_ids_equal_generic_tokenize_then_convert(official, golden):
    texts = [r["text"] for r in golden["texts"]] + [r["prompt"] for r in golden["prompts"]] + TRICKY_TEXTS
    for text in texts:
        generic = _generic_ids(official, text)
        assert official.encode(text, add_special_tokens=False) == generic, repr(text)
        assert official.encode(text) == [64790, 64792] + generic, repr(text)
        split = official.convert_tokens_to_ids(official.tokenize(text, split_special_tokens=True))
        assert official.encode(text, split_special_tokens=True, add_special_tokens=False) == split, repr(text)


def test_fast_ids_equal_generic_route_without_reference_data(tiny):
    texts = list(bundled_texts())[:300] + TRICKY_TEXTS
    fallbacks = 0
    for text in texts:
        assert tiny.encode(text, add_special_tokens=False) == _generic_ids(tiny, text), repr(text)
        fallbacks += tiny._fast_text_ids(text, {}) is None
    assert fallbacks == 0  # special strings are ordinary text now: nothing to split out


def test_fast_path_covers_all_text_without_unk_or_eos_strings(official, golden):
    # The fast path must really be taken (not fall back) on ordinary text, or the speed-up is lost.
    for text in [r["text"] for r in golden["texts"]] + TRICKY_TEXTS:
        fast = official._fast_text_ids(text, {})
        assert fast == _generic_ids(official, text), repr(text)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"padding": True},
        {"padding": True, "truncation": True, "max_length": 9, "return_tensors": "pt"},
        {"padding": "max_length", "max_length": 40, "pad_to_multiple_of": 8, "truncation": True},
        {"padding": True, "padding_side": "right", "return_length": True, "return_special_tokens_mask": True},
        {"max_length": 6, "truncation": True, "return_overflowing_tokens": True, "stride": 2},
        {"add_special_tokens": False, "padding": "longest", "return_attention_mask": False},
        {"split_special_tokens": True, "padding": True},
    ],
)
def test_fast_batch_call_equals_generic_route(official, official_generic, golden, options):
    texts = [r["text"] for r in golden["texts"][:5]] + ["好</s>", "", "sop [gMASK] 😀"]
    assert _outcome(official, texts, **options) == _outcome(official_generic, texts, **options)
    assert _outcome(official, texts[0], **options) == _outcome(official_generic, texts[0], **options)


def test_fast_pairs_targets_and_encode_options_equal_generic_route(official, official_generic, golden):
    a, b, c = (r["text"] for r in golden["texts"][:3])
    for tok_kwargs in (
        {"text": [a, b], "text_target": [c, "宽松"]},
        {"text": [a, b], "text_target": [c, "宽松"], "max_length": 12, "truncation": True, "max_target_length": 5},
        {"text": a, "text_pair": b, "truncation": "only_second", "max_length": 20, "return_special_tokens_mask": True},
        {"text": [(a, b), (c, "裙")], "padding": True, "truncation": "longest_first", "max_length": 16},
        {"text": [[64790, 5, 6], [7]], "padding": True},
    ):
        assert _outcome(official, **tok_kwargs) == _outcome(official_generic, **tok_kwargs), tok_kwargs
    encode_options = ({}, {"max_length": 8}, {"truncation": True, "max_length": 8}, {"return_tensors": "pt"})
    for kwargs in (*encode_options, {"text_pair": b}):
        assert _outcome(official.encode, a, **kwargs) == _outcome(official_generic.encode, a, **kwargs), kwargs


def test_fast_encoding_follows_added_tokens(tiny):
    text = "宽松<extra_0>的阔腿裤"
    before = tiny.encode(text, add_special_tokens=False)
    assert before == _generic_ids(tiny, text)
    tiny_copy = load_tokenizer(tiny.vocab_file)
    tiny_copy.add_tokens(["<extra_0>"])
    added = tiny_copy.convert_tokens_to_ids("<extra_0>")
    ids = tiny_copy.encode(text, add_special_tokens=False)
    assert added in ids and added not in before
    assert ids == _generic_ids(tiny_copy, text)


def test_fast_encoding_keeps_command_pieces_and_unknown_text_like_generic(tmp_path):
    # A vocabulary where "sop" is itself a piece and there is no byte fallback: the generic route maps
    # that piece to the command id and looks unknown spans up again; the fast path must agree.
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the shop sells soap and tops", "stop, pop the top"] * 20), model_writer=buffer,
        model_type="bpe", vocab_size=60, hard_vocab_limit=False, byte_fallback=False, user_defined_symbols=["sop"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(buffer.getvalue())
    tok = load_tokenizer(tmp_path)
    assert tok.sp_model.id_to_piece(tok.sp_model.piece_to_id("sop")) == "sop"
    for text in ("sop", "a sopsop shop", "shop 好 soap", "好", "eop [gMASK]"):
        assert tok.encode(text, add_special_tokens=False) == _generic_ids(tok, text), text
    # Text is text: the piece "sop" keeps its own id, never the command id; the name still gives the command.
    assert tok.get_command("sop") not in tok.encode("a sop", add_special_tokens=False)
    assert tok.sp_model.piece_to_id("sop") in tok.encode("a sop", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("[gMASK]") == tok.get_command("[gMASK]")


def test_pad_token_id_follows_changes_to_the_pad_token(tiny):
    tok = load_tokenizer(tiny.vocab_file)
    assert tok.pad_token_id == 0
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert tok.pad({"input_ids": [[5, 6], [7]]})["input_ids"] == [[5, 6], [2, 7]]
    tok.pad_token = None
    assert tok.pad_token_id is None
