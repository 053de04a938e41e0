"""The ChatGLM3-6B tokenizer, without remote code: the ChatGLM2 tokenizer plus four role tokens.

Reproduces `ChatGLMTokenizer` of the official `THUDM/chatglm3-6b` release (tokenization_chatglm.py of early
2024, run under transformers 4.30), checked id for id against ../shared/reference/chatglm3-tokenizer-golden.jsonl:

* the same SentencePiece model as ChatGLM2-6B; the command tokens `[MASK] [gMASK] [sMASK] sop eop` are
  followed by `<|system|> <|user|> <|assistant|> <|observation|>` (64794..64797 in the real model);
* text is text: literal `<|user|>`, `</s>`, `[gMASK]`... in a text are ordinary SentencePiece text, as in the
  official class. Only a tokenizer made with `encode_special_tokens=True` (the official option, off by
  default) maps the four role strings in text to their ids;
* `build_single_message(role, metadata, message)` = `<|role|>` + encode(metadata + "\\n") + encode(message), and
  `build_chat_input(query, history, role)` = `[gMASK] sop` + one message per history item (a system message
  with `tools` gets `"\\n" + json.dumps(tools, indent=4, ensure_ascii=False)`) + the query + `<|assistant|>`,
  returned as a left-padded batch of one with `input_ids`, `attention_mask`, `position_ids` tensors;
* decoding differs from ChatGLM2: the command and role tokens come back as their names (`"[gMASK]sop 你好"`),
  `<unk>` / `<s>` / `</s>` and negative ids as nothing, whatever `skip_special_tokens` says (the official
  class registers no special tokens under transformers 4.30, so skipping removes nothing).
"""

from __future__ import annotations

import json
import re
from typing import Any

from transformers.tokenization_utils_base import BatchEncoding

from glmtune.families.chatglm2.tokenizer import COMMAND_TOKENS, ChatGLM2Tokenizer
from glmtune.families.chatglm3.chat import ROLE_TOKENS as GLM3_ROLE_TOKENS
from glmtune.families.chatglm3.chat import ROLES


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM2's tokenizer with the ChatGLM3 role tokens, message builders and decoding."""

    family = "chatglm3"
    command_tokens = COMMAND_TOKENS + GLM3_ROLE_TOKENS

    def __init__(self, vocab_file: Any, encode_special_tokens: bool = False, **kwargs: Any) -> None:
        self.encode_special_tokens = bool(encode_special_tokens)
        # Recorded in tokenizer_config.json by save_pretrained, so `glmtune.families.registry.detect_family` finds the family.
        kwargs.setdefault("glmtune_family", self.family)
        super().__init__(vocab_file, **kwargs)
        self._role_pattern = re.compile("|".join(re.escape(t) for t in GLM3_ROLE_TOKENS))
        self._role_ids = {self.command_ids[t] for t in GLM3_ROLE_TOKENS}

    # --- encoding -------------------------------------------------------------------------------------

    def _role_chunks(self, text: str) -> list[str]:
        """The text cut around role strings (only used with encode_special_tokens)."""
        chunks, last = [], 0
        for match in self._role_pattern.finditer(text):
            if match.start() > last:
                chunks.append(text[last:match.start()])
            chunks.append(match.group())
            last = match.end()
        if last < len(text):
            chunks.append(text[last:])
        return chunks

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if not self.encode_special_tokens:
            return super().tokenize(text, **kwargs)
        pieces: list[str] = []
        for chunk in self._role_chunks(text):
            pieces.extend([chunk] if chunk in GLM3_ROLE_TOKENS else super().tokenize(chunk, **kwargs))
        return pieces

    def _fast_text_ids(self, text: Any, kwargs: dict) -> list[int] | None:
        if not self.encode_special_tokens or not isinstance(text, str):
            return super()._fast_text_ids(text, kwargs)
        ids: list[int] = []
        for chunk in self._role_chunks(text):
            if chunk in GLM3_ROLE_TOKENS:
                ids.append(self.command_ids[chunk])
                continue
            chunk_ids = super()._fast_text_ids(chunk, kwargs)
            if chunk_ids is None:
                return None
            ids.extend(chunk_ids)
        return ids

    def _text_ids(self, text: str) -> list[int]:
        """Ids of `text` without `[gMASK] sop` (the official `self.tokenizer.encode`)."""
        return self.encode(text, add_special_tokens=False)

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """`<|role|>` + metadata + newline + message, as ids (the official method, same name and result)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}, found {role!r}")
        return [self.command_ids[f"<|{role}|>"]] + self._text_ids(f"{metadata}\n") + self._text_ids(message)

    def build_chat_input(self, query: str, history: list[dict] | None = None, role: str = "user") -> BatchEncoding:
        """The official prompt for `query` after `history` (message dicts), ready for `generate`."""
        ids = self.chat_input_ids(query, history, role)
        return self.pad({"input_ids": [ids]}, return_tensors="pt")

    def chat_input_ids(self, query: str, history: list[dict] | None = None, role: str = "user") -> list[int]:
        """`build_chat_input` as a plain list of ids (with `[gMASK] sop`)."""
        ids: list[int] = []
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids.extend(self.build_single_message(item["role"], item.get("metadata", ""), content))
        ids.extend(self.build_single_message(role, "", query))
        ids.append(self.command_ids["<|assistant|>"])
        return self.get_prefix_tokens() + ids

    # --- decoding -------------------------------------------------------------------------------------

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        # As the official class: ids -> pieces (commands by name; bos/eos/unk and negatives as ""), then
        # SentencePiece joins the pieces, so "▁你" after "sop" keeps its space ("[gMASK]sop 你好").
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        silent = {self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id()}
        pieces = []
        for i in map(int, ids):
            if i in self._command_names:
                pieces.append(self._command_names[i])
            elif i in silent or not 0 <= i < self.n_pieces:
                pieces.append("")
            else:
                pieces.append(self.sp_model.id_to_piece(i))
        return self.sp_model.decode_pieces(pieces)
