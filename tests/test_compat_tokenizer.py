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
        assert name in ChatGLM2Tokenizer.__dict__, name
    for name in ("_encode_plus", "_pad"):
        ours = set(inspect.signature(getattr(ChatGLM2Tokenizer, name)).parameters) - {"kwargs"}
        theirs = set(inspect.signature(getattr(PreTrainedTokenizer, name)).parameters) - {"kwargs"}
        assert ours == theirs, (name, ours ^ theirs)


def test_private_tokenizer_state_reads_through_compat(tmp_path):
    tok = load_tokenizer(train_tokenizer(bundled_texts(), tmp_path, vocab_size=800))
    assert compat.added_tokens_encoder(tok) == {"<unk>": 0, "</s>": 2}
    assert compat.added_tokens_decoder(tok)[2].special
    special_map, extra = compat.special_tokens_state(tok)
    assert special_map["eos_token"] == "</s>" and isinstance(extra, list)
    assert compat.stored_pad_token(tok) == "<unk>"
    tok.add_tokens(["<extra_0>"])
    assert "<extra_0>" in compat.added_tokens_encoder(tok)
