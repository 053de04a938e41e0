"""ChatGLM2-6B (and chatglm2-6b-32k): SentencePiece tokenizer, round-numbered prompts, prompt/response data.

Builds and registers the `Family` record; the tokenizer module (transformers, SentencePiece) is imported only when
a tokenizer is loaded, so listing the families stays light (`glmtune --help` imports the registry).
"""

from pathlib import Path
from typing import Any

from glmtune.families.chatglm2.chat import RoundsChat, process_response, read_request
from glmtune.families.family import ROPE_INTERPOLATE, Family, register


def load_tokenizer(path: Path, family: str) -> Any:
    from glmtune.families.chatglm2.tokenizer import ChatGLM2Tokenizer, load_sentencepiece

    return load_sentencepiece(ChatGLM2Tokenizer, path, family)


# No detector: ChatGLM2 is what a folder is when nothing marks it as another family.
CHATGLM2 = register(Family(
    name="chatglm2",
    title="ChatGLM2-6B (and chatglm2-6b-32k)",
    rope_rule=ROPE_INTERPOLATE,
    default_data_format="prompt-response",
    stop_tokens=(),
    tokenizer_loader=load_tokenizer,
    chat=RoundsChat(),
    request_reader=read_request,
    process_text=process_response,
))
