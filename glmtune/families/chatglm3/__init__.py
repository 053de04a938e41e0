"""ChatGLM3-6B (and chatglm3-6b-32k): role tokens, tools, conversation data rules.

Builds and registers the `Family` record; the tokenizer module (transformers, SentencePiece) is imported only when
a tokenizer is loaded.
"""

import json
from pathlib import Path
from typing import Any

from glmtune.families.chatglm3 import data
from glmtune.families.chatglm3.chat import ROLE_TOKENS, RolesChat, process_text, read_request, reply_tool_call
from glmtune.families.family import ROPE_SCALE_BASE, Family, register


def load_tokenizer(path: Path, family: str) -> Any:
    from glmtune.families.chatglm2.tokenizer import load_sentencepiece
    from glmtune.families.chatglm3.tokenizer import ChatGLM3Tokenizer

    return load_sentencepiece(ChatGLM3Tokenizer, path, family)


def detect(folder: Path) -> bool:
    """The official ChatGLM3 tokenizer_config.json names its role tokens (in its chat_template); older downloads
    lack the chat_template but name their release (`THUDM/chatglm3-6b`) in config.json or tokenizer_config.json."""
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file() and any(t in tok_cfg.read_text(encoding="utf-8", errors="replace") for t in ROLE_TOKENS):
        return True
    for name, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        try:
            origin = json.loads((folder / name).read_text(encoding="utf-8")).get(key)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(origin, str) and "chatglm3" in origin.lower():
            return True
    return False


CHATGLM3 = register(Family(
    name="chatglm3",
    title="ChatGLM3-6B (and chatglm3-6b-32k)",
    rope_rule=ROPE_SCALE_BASE,
    default_data_format="conversations",
    stop_tokens=("<|user|>", "<|observation|>"),
    tokenizer_loader=load_tokenizer,
    chat=RolesChat(),
    request_reader=read_request,
    tool_call_reader=reply_tool_call,
    process_text=process_text,
    data=data,
    detector=detect,
))
