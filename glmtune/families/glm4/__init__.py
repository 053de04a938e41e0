"""GLM-4-9B-chat: tiktoken tokenizer, the official jinja chat template, JSON tool calls, the fine-tune demo's
`{"messages": [...]}` data.

Builds and registers the `Family` record; the tokenizer module (tiktoken, transformers) is imported only when a
tokenizer is loaded.
"""

import json
import re
from pathlib import Path
from typing import Any

from glmtune.families.family import ROPE_SCALE_BASE, TOKENIZER_FILE, Family, register
from glmtune.families.glm4 import data
from glmtune.families.glm4.chat import Glm4Chat, read_request, reply_tool_call

PADDED_VOCAB_SIZE = 151552  # GLM-4-9B-chat's embedding rows (151,329 ranks + 14 specials + unused ids)
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/=]+ \d+\n")  # a tiktoken rank file; a SentencePiece model is binary protobuf


def load_tokenizer(path: Path, family: str) -> Any:
    from glmtune.families.glm4.tokenizer import load_glm4

    return load_glm4(path, family)


def _json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def detect(folder: Path) -> bool:
    """The official GLM-4-9B-chat folder: config.json `model_type: chatglm` with the 151,552-row vocabulary; or a
    tokenizer_config.json naming GLM-4's `<sop>` / image tokens or its tokenizer class; or a tiktoken rank file as
    tokenizer.model."""
    config = _json(folder / "config.json")
    if config.get("model_type") == "chatglm" and config.get("padded_vocab_size") == PADDED_VOCAB_SIZE:
        return True
    tok_config = _json(folder / "tokenizer_config.json")
    names = {str(v.get("content")) for v in (tok_config.get("added_tokens_decoder") or {}).values() if isinstance(v, dict)}
    if {"<sop>", "<|begin_of_image|>"} & names or tok_config.get("tokenizer_class") == "ChatGLM4Tokenizer":
        return True
    try:
        with open(folder / TOKENIZER_FILE, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return False
    return bool(_RANK_LINE.match(head))


GLM4 = register(Family(
    name="glm4",
    title="GLM-4-9B-chat",
    rope_rule=ROPE_SCALE_BASE,
    default_data_format="messages",
    stop_tokens=("<|user|>", "<|observation|>"),
    tokenizer_loader=load_tokenizer,
    chat=Glm4Chat(),
    request_reader=read_request,
    tool_call_reader=reply_tool_call,
    data=data,
    detector=detect,
))
