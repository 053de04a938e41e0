"""Load the tokenizer of a ChatGLM2 or ChatGLM3 folder: the family (`glmtune.families.registry`) picks the class.

The classes live below this module: `glmtune.families.chatglm2.tokenizer.ChatGLM2Tokenizer` (the official ChatGLM2-6B
tokenizer, reproduced id for id; see that module) and its subclass `glmtune.families.chatglm3.tokenizer.ChatGLM3Tokenizer`
(the four ChatGLM3 role tokens), picked by the role tokens the family adds. Neither imports this module, so
the family dispatch here has no import cycle; their public names are importable from here as before
(`ChatGLM2Tokenizer`, `build_prompt`, `TOKENIZER_FILE`, `COMMAND_TOKENS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError
from glmtune.families.registry import GLM3_ROLE_TOKENS, resolve_family
from glmtune.families.chatglm2.tokenizer import COMMAND_TOKENS, TOKENIZER_FILE, ChatGLM2Tokenizer, build_prompt  # noqa: F401
from glmtune.families.chatglm3.tokenizer import ChatGLM3Tokenizer

# The tokenizer class of a family is the one that adds the family's role tokens (`Family.role_tokens`).
TOKENIZER_CLASSES: dict[tuple[str, ...], type[ChatGLM2Tokenizer]] = {(): ChatGLM2Tokenizer, GLM3_ROLE_TOKENS: ChatGLM3Tokenizer}


def load_tokenizer(path: str | Path, family: Any = None) -> ChatGLM2Tokenizer:
    """The tokenizer of a model or checkpoint folder (or a `tokenizer.model` file given directly).

    Only `tokenizer.model` is read for the vocabulary: the official tokenizer_config.json names remote code.
    The family (`glmtune.families.registry`: ChatGLM3 adds role tokens) is `family` when given, else detected from the
    folder; a ChatGLM3 folder gives a `ChatGLM3Tokenizer`.
    """
    path = Path(path)
    model_file = path if path.is_file() else path / TOKENIZER_FILE
    if not model_file.is_file():
        raise GlmtuneError(
            f"{path}: no {TOKENIZER_FILE} found (expected a ChatGLM2/ChatGLM3 model or checkpoint folder holding "
            f"the SentencePiece file {TOKENIZER_FILE})"
        )
    model_family = resolve_family(path, family)
    cls = TOKENIZER_CLASSES.get(model_family.role_tokens)
    if cls is None:
        raise GlmtuneError(f"family {model_family.name}: no tokenizer class adds the role tokens {model_family.role_tokens}")
    try:
        tokenizer = cls(vocab_file=model_file)
    except (RuntimeError, OSError) as exc:
        raise GlmtuneError(f"{model_file}: not a readable SentencePiece model ({exc})") from exc
    tokenizer.family = model_family.name  # what `glmtune.families.registry.family_of` reads (a registered variant's own name)
    return tokenizer
