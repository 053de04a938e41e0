"""The ChatGLM2 tokenizer as a transformers (5.x) Python-backend tokenizer, without remote code.

Reproduces `ChatGLMTokenizer` from the official `THUDM/chatglm2-6b` release (tokenization_chatglm.py,
run under transformers 4.30), checked id for id against ../shared/reference/tokenizer-golden.jsonl:

* a SentencePiece model (`tokenizer.model`, 64,789 pieces in the real one) followed by five command
  tokens `[MASK] [gMASK] [sMASK] sop eop` at ids n_pieces .. n_pieces+4 (64789..64793);
* `<unk>` (id 0) doubles as the pad token, `</s>` (id 2) is eos; there is no bos in the inputs;
* with special tokens a sequence is `[gMASK] sop tokens...` (a pair adds `b... </s>`), so truncation to
  `max_length` counts those two tokens, and cuts on the right;
* padding is on the left and batches carry `position_ids` (0.. on the real tokens, 0 on the padding);
* the command tokens are not split out of raw text (the text "sop" stays ordinary SentencePiece text), but
  the literal strings `<unk>` and `</s>` are, as transformers did for the official class;
* decoding drops the command tokens, bos/eos, pad/unk and negative ids (label padding -100): the official
  class maps all of them to empty pieces.

The chat prompt (`build_prompt`) is the official `[Round N]\\n\\n问：...\\n\\n答：` template.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from sentencepiece import SentencePieceProcessor
from transformers import AddedToken, PreTrainedTokenizer
from transformers.utils import PaddingStrategy

from glmtune.errors import GlmtuneError

TOKENIZER_FILE = "tokenizer.model"
# Order matters: it fixes their ids right after the SentencePiece pieces, as in the official model.
COMMAND_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


def build_prompt(query: str, history: list[tuple[str, str]] | list[list[str]] | None = None) -> str:
    """The official ChatGLM2 chat prompt: earlier rounds with their answers, then the open round."""
    prompt = ""
    for i, (old_query, response) in enumerate(history or []):
        prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
    prompt += f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："
    return prompt


class ChatGLM2Tokenizer(PreTrainedTokenizer):
    """SentencePiece + ChatGLM2 command tokens, left padding with position ids."""

    vocab_files_names = {"vocab_file": TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file: str | os.PathLike, padding_side: str = "left", **kwargs: Any) -> None:
        self.vocab_file = str(vocab_file)
        # Keep the serialized model in memory: save_vocabulary must work even if the source file is gone
        # (the tiny-model writer trains into a temporary folder).
        self._model_proto = Path(vocab_file).read_bytes()
        self.sp_model = SentencePieceProcessor(model_proto=self._model_proto)
        self.n_pieces = self.sp_model.get_piece_size()
        self.command_ids = {name: self.n_pieces + i for i, name in enumerate(COMMAND_TOKENS)}
        self._command_names = {i: name for name, i in self.command_ids.items()}
        # Ids the official class turns into empty pieces when decoding (bos/eos/unk=pad, commands).
        self._silent_ids = {self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id()}
        self._silent_ids.update(self.command_ids.values())
        self._silent_ids.discard(-1)
        self._vocab: dict[str, int] | None = None
        # The official special tokens; bos stays unset because ChatGLM2 inputs never carry one.
        # transformers 4.30 split `<unk>` and `</s>` out of raw text and stripped the whitespace around
        # them; registering them as added tokens with lstrip/rstrip reproduces that.
        self._added_tokens_decoder = {
            i: AddedToken(self.sp_model.id_to_piece(i), lstrip=True, rstrip=True, normalized=False, special=True)
            for i in (self.sp_model.unk_id(), self.sp_model.eos_id())
        }
        kwargs.setdefault("unk_token", self.sp_model.id_to_piece(self.sp_model.unk_id()))
        kwargs.setdefault("eos_token", self.sp_model.id_to_piece(self.sp_model.eos_id()))
        kwargs.setdefault("pad_token", self.sp_model.id_to_piece(self.sp_model.unk_id()))
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.pop("auto_map", None)  # never write or honour remote-code hooks
        super().__init__(padding_side=padding_side, **kwargs)

    # --- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.n_pieces + len(COMMAND_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            vocab = {self.sp_model.id_to_piece(i): i for i in range(self.n_pieces)}
            vocab.update(self.command_ids)
            self._vocab = vocab
        return {**self._vocab, **self._added_tokens_encoder}

    def get_command(self, token: str) -> int:
        """Id of a command token (`[gMASK]`, `sop`, ...) or of `<bos>`, `<eos>`, `<pad>`, as the official API."""
        named = {"<bos>": self.sp_model.bos_id(), "<eos>": self.sp_model.eos_id(), "<pad>": self.sp_model.unk_id()}
        if token in named:
            return named[token]
        if token not in self.command_ids:
            raise KeyError(f"{token!r} is not a ChatGLM2 command token (expected one of {list(COMMAND_TOKENS)})")
        return self.command_ids[token]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.command_ids:
            return self.command_ids[token]
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._command_names:
            return self._command_names[index]
        if 0 <= index < self.n_pieces:
            return self.sp_model.id_to_piece(index)
        return ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces([t for t in tokens if t and t not in self.command_ids])

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        # The official class decodes every special id to an empty piece whatever `skip_special_tokens`
        # says, and -100 (label padding) as well; decoding ids directly keeps byte-fallback pieces exact.
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        kept = [int(i) for i in ids if 0 <= int(i) < self.n_pieces and int(i) not in self._silent_ids]
        return self.sp_model.decode(kept)

    # --- special tokens ---------------------------------------------------------------------------

    def get_prefix_tokens(self) -> list[int]:
        return [self.command_ids["[gMASK]"], self.command_ids["sop"]]

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special = self._silent_ids
            return [1 if t in special else 0 for t in token_ids_0 + (token_ids_1 or [])]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def build_prompt(self, query: str, history: list | None = None) -> str:
        return build_prompt(query, history)

    # --- padding ----------------------------------------------------------------------------------

    def _pad(
        self,
        encoded_inputs: dict,
        max_length: int | None = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
    ) -> dict:
        # As the official `_pad`: every encoding gets position ids 0..n-1 on its tokens, and padding
        # positions read 0; the base class pads input_ids / attention_mask on the requested side.
        n = len(encoded_inputs[self.model_input_names[0]])
        positions = list(encoded_inputs.pop("position_ids", range(n)))
        if return_attention_mask is None or return_attention_mask:
            encoded_inputs.setdefault("attention_mask", [1] * n)
        encoded_inputs = super()._pad(
            encoded_inputs,
            max_length=max_length,
            padding_strategy=padding_strategy,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        difference = len(encoded_inputs[self.model_input_names[0]]) - n
        side = padding_side if padding_side is not None else self.padding_side
        encoded_inputs["position_ids"] = (
            [0] * difference + positions if side == "left" else positions + [0] * difference
        )
        return encoded_inputs

    # --- saving -----------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        directory = Path(save_directory)
        target = directory / ((filename_prefix + "-" if filename_prefix else "") + TOKENIZER_FILE)
        if not directory.is_dir():
            target = directory  # transformers' convention: a file path instead of a folder
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tokenizer-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._model_proto)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return (str(target),)


def load_tokenizer(path: str | Path) -> ChatGLM2Tokenizer:
    """The tokenizer of a model or checkpoint folder (or a `tokenizer.model` file given directly).

    Only `tokenizer.model` is read: the official tokenizer_config.json names remote code, and nothing else
    in it changes the behaviour.
    """
    path = Path(path)
    model_file = path if path.is_file() else path / TOKENIZER_FILE
    if not model_file.is_file():
        raise GlmtuneError(
            f"{path}: no {TOKENIZER_FILE} found (expected a ChatGLM2 model or checkpoint folder holding "
            f"the SentencePiece file {TOKENIZER_FILE})"
        )
    try:
        return ChatGLM2Tokenizer(vocab_file=model_file)
    except (RuntimeError, OSError) as exc:
        raise GlmtuneError(f"{model_file}: not a readable SentencePiece model ({exc})") from exc
