"""The private transformers names the tokenizer relies on (glmtune.compat, tokenizer section) still exist."""

from __future__ import annotations

import inspect

from transformers import PreTrainedTokenizer

from glmtune import compat
from glmtune.model.tiny import bundled_texts, train_tokenizer
from glmtune.families.chatglm2.tokenizer import ChatGLM2Tokenizer
from glmtune.families.tokenizer import load_tokenizer


def test_overridden_tokenizer_hooks_exist_in_transformers_with_the_arguments_glmtune_passes():
    for name in compat.TOKENIZER_HOOKS:
        assert callable(getattr(PreTrainedTokenizer, name, None)), name
        assert name in compat.TokenizerHooks.__dict__, name  # overridden there, and only there
        assert name not in ChatGLM2Tokenizer.__dict__, name
    assert ChatGLM2Tokenizer.__mro__.index(compat.TokenizerHooks) < ChatGLM2Tokenizer.__mro__.index(PreTrainedTokenizer)
    for ours, theirs in (("encode_single", "_encode_plus"), ("pad_single", "_pad")):
        mine = set(inspect.signature(getattr(ChatGLM2Tokenizer, ours)).parameters) - {"kwargs"}
        base = set(inspect.signature(getattr(PreTrainedTokenizer, theirs)).parameters) - {"kwargs"}
        assert mine == base, (ours, mine ^ base)


def test_the_backend_reaches_the_tokenizer_through_the_renamed_hooks(tmp_path, monkeypatch):
    tok = load_tokenizer(train_tokenizer(bundled_texts(), tmp_path, vocab_size=800))
    calls = []
    for name in ("text_pieces", "piece_id", "id_piece", "decode_ids", "encode_single", "pad_single"):
        real = getattr(tok, name)
        monkeypatch.setattr(tok, name, lambda *a, _n=name, _real=real, **k: calls.append(_n) or _real(*a, **k))
    tok.use_fast_encode = False  # the generic route: tokenize, then one id per piece
    ids = tok("你好", padding="max_length", max_length=12)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[-1]) and tok.decode(ids) == "你好"
    assert set(calls) == {"text_pieces", "piece_id", "id_piece", "decode_ids", "encode_single", "pad_single"}


def test_split_around_cuts_text_at_each_token_longest_first():
    assert compat.split_around("a<x>b<xy>c", ["<x>", "<xy>"]) == ["a", "<x>", "b", "<xy>", "c"]
    assert compat.split_around("plain", ["<x>"]) == ["plain"]


def test_private_tokenizer_state_reads_through_compat(tmp_path):
    tok = load_tokenizer(train_tokenizer(bundled_texts(), tmp_path, vocab_size=800))
    assert compat.added_tokens_encoder(tok) == {"<unk>": 0, "</s>": 2}
    assert compat.added_tokens_decoder(tok)[2].special
    special_map, extra = compat.special_tokens_state(tok)
    assert special_map["eos_token"] == "</s>" and isinstance(extra, list)
    assert compat.stored_pad_token(tok) == "<unk>"
    tok.add_tokens(["<extra_0>"])
    assert "<extra_0>" in compat.added_tokens_encoder(tok)
