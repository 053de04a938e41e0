"""The ChatGLM2 tokenizer as a transformers (5.x) Python-backend tokenizer, without remote code.

Reproduces `ChatGLMTokenizer` from the official `THUDM/chatglm2-6b` release (tokenization_chatglm.py,
run under transformers 4.30), checked id for id against ../shared/reference/tokenizer-golden.jsonl:

* a SentencePiece model (`tokenizer.model`, 64,789 pieces in the real one) followed by five command
  tokens `[MASK] [gMASK] [sMASK] sop eop` at ids n_pieces .. n_pieces+4 (64789..64793);
* `<unk>` (id 0) doubles as the pad token, `</s>` (id 2) is eos; there is no bos in the inputs;
* with special tokens a sequence is `[gMASK] sop tokens...` (a pair adds `b... </s>`), so truncation to
  `max_length` counts those two tokens, and cuts on the right;
* padding is on the left and batches carry `position_ids` (0.. on the real tokens, 0 on the padding);
* text is text: no string in the input becomes a special id. The official class encodes `"好</s>"` as
  SentencePiece text (`[46458, 1833, 30917, 30994]`), and so does this one: special tokens (`<unk>`, `</s>`,
  the command tokens, any token added as special) are never split out of raw text, and a SentencePiece
  piece spelled like a command name keeps its own id. Tokens added as *non*-special (`add_tokens`) are
  vocabulary the user asked for and are split out, as transformers does;
* decoding drops the command tokens, bos/eos, pad/unk and negative ids (label padding -100): the official
  class maps all of them to empty pieces.

Encoding asks SentencePiece for ids directly instead of transformers' generic `tokenize` ->
`convert_tokens_to_ids` (about 6x faster, see bench/tokenizer.py), falling back to the generic route for
any text where the two could differ; special tokens, truncation and padding stay with transformers.

The chat prompt (`build_prompt`) is the official `[Round N]\\n\\n问：...\\n\\n答：` template.

Load a folder's tokenizer with `glmtune.families.tokenizer.load_tokenizer`: the folder's family (`glmtune.families.registry`)
builds this class or its ChatGLM3 subclass (`glmtune.families.chatglm3.tokenizer`) through `load_sentencepiece`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sentencepiece import SentencePieceProcessor
from transformers import AddedToken, PreTrainedTokenizer
from transformers.tokenization_python import Trie
from transformers.tokenization_utils_base import BatchEncoding, TruncationStrategy
from transformers.utils import PaddingStrategy

from glmtune import compat
from glmtune.errors import GlmtuneError
from glmtune.families.family import TOKENIZER_FILE
from glmtune.fsutil import atomic_file

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
    #: The family name (glmtune.families.registry) and the command tokens that follow the SentencePiece pieces.
    family = "chatglm2"
    command_tokens: tuple[str, ...] = COMMAND_TOKENS
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file: str | os.PathLike, padding_side: str = "left", **kwargs: Any) -> None:
        self.vocab_file = str(vocab_file)
        # Keep the serialized model in memory: save_vocabulary must work even if the source file is gone
        # (the tiny-model writer trains into a temporary folder).
        self._model_proto = Path(vocab_file).read_bytes()
        self.sp_model = SentencePieceProcessor(model_proto=self._model_proto)
        self.n_pieces = self.sp_model.get_piece_size()
        self.command_ids = {name: self.n_pieces + i for i, name in enumerate(self.command_tokens)}
        self._command_names = {i: name for name, i in self.command_ids.items()}
        # Ids the official class turns into empty pieces when decoding (bos/eos/unk=pad, commands).
        self._silent_ids = {self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id()}
        self._silent_ids.update(self.command_ids.values())
        self._silent_ids.discard(-1)
        self._vocab: dict[str, int] | None = None
        # The official special tokens; bos stays unset because ChatGLM2 inputs never carry one. They are
        # registered as special added tokens (their ids are the SentencePiece control ids), but `tokenize`
        # below never splits a special token out of text: the official class encodes "</s>" in text as
        # ordinary pieces.
        compat.seed_added_tokens(self, {
            i: AddedToken(self.sp_model.id_to_piece(i), lstrip=False, rstrip=False, normalized=False, special=True)
            for i in (self.sp_model.unk_id(), self.sp_model.eos_id())
        })
        kwargs.setdefault("unk_token", self.sp_model.id_to_piece(self.sp_model.unk_id()))
        kwargs.setdefault("eos_token", self.sp_model.id_to_piece(self.sp_model.eos_id()))
        kwargs.setdefault("pad_token", self.sp_model.id_to_piece(self.sp_model.unk_id()))
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.pop("auto_map", None)  # never write or honour remote-code hooks
        self._fast_state: tuple | None = None  # see _fast_tables
        self._sp_unk_id = self.sp_model.unk_id()  # SentencePiece's accessors are slow Python wrappers
        super().__init__(padding_side=padding_side, **kwargs)

    # --- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.n_pieces + len(self.command_tokens)

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            vocab = {self.sp_model.id_to_piece(i): i for i in range(self.n_pieces)}
            vocab.update(self.command_ids)
            self._vocab = vocab
        return {**self._vocab, **compat.added_tokens_encoder(self)}

    @property
    def pad_token_id(self) -> int | None:
        # transformers' `_pad` reads this once per padded row. Without a class attribute every read first
        # fails normal lookup and lands in `PreTrainedTokenizerBase.__getattr__` (several µs each); this
        # gives the same answer from the same map. Setting it still goes through the base `__setattr__`.
        token = compat.stored_pad_token(self)
        if token is None:
            return super().__getattr__("pad_token_id")  # unset: the base class's answer and log line
        return self.convert_tokens_to_ids(str(token))

    def get_command(self, token: str) -> int:
        """Id of a command token (`[gMASK]`, `sop`, ...) or of `<bos>`, `<eos>`, `<pad>`, as the official API."""
        named = {"<bos>": self.sp_model.bos_id(), "<eos>": self.sp_model.eos_id(), "<pad>": self.sp_model.unk_id()}
        if token in named:
            return named[token]
        if token not in self.command_ids:
            raise KeyError(f"{token!r} is not a {self.family} command token (expected one of {list(self.command_tokens)})")
        return self.command_ids[token]

    def _splitting_tokens(self) -> set[str]:
        """Added tokens that are split out of raw text: the non-special ones only (text is text)."""
        special = set(self.all_special_tokens)
        decoder = compat.added_tokens_decoder(self)
        return {t for t, i in compat.added_tokens_encoder(self).items() if not decoder[i].special and t not in special}

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # transformers' `tokenize` splits every added token out of the text, special ones included, and keeps
        # a chunk equal to a special token whole: "好</s>" would end with eos. The official ChatGLM tokenizers
        # never do that, so only non-special added tokens split here (with their lstrip/rstrip options).
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        splitting = set() if split_special_tokens else self._splitting_tokens()
        if not any(t in text for t in splitting):
            return self._tokenize(text)
        trie = Trie()
        for token in splitting:
            trie.add(token)
        chunks = trie.split(text)
        for i, chunk in enumerate(chunks):
            if chunk in splitting:
                added = compat.added_tokens_decoder(self)[compat.added_tokens_encoder(self)[chunk]]
                if added.rstrip and i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
                if added.lstrip and i > 0:
                    chunks[i - 1] = chunks[i - 1].rstrip()
        pieces: list[str] = []
        for chunk in chunks:
            if chunk in splitting:
                pieces.append(chunk)
            elif chunk:
                pieces.extend(self._tokenize(chunk))
        return pieces

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        # A SentencePiece piece keeps its own id even when it is spelled like a command token (only possible
        # in a vocabulary trained with such a piece; not in the official one), so text never becomes a command.
        piece_id = self.sp_model.piece_to_id(token)
        if token in self.command_ids and self.sp_model.id_to_piece(piece_id) != token:
            return self.command_ids[token]
        return piece_id

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

    # --- fast encoding ----------------------------------------------------------------------------
    #
    # transformers' generic route turns text into ids as `convert_tokens_to_ids(tokenize(text))`: a
    # Python trie pass over every character, SentencePiece pieces as strings, then one Python lookup per
    # piece. Asking SentencePiece for ids directly gives the same ids whenever that route would have
    # done nothing more than `piece_to_id` on each piece, which `_fast_text_ids` checks; everything
    # after the ids (special tokens, truncation, padding, tensors) still runs through transformers.

    # Why not a `tokenizers` (Rust) fast tokenizer built from tokenizer.model (issue 9 item 19b)? Built as
    # transformers' converters do (BPE from SentencePieceExtractor, byte fallback, "▁" prepend/replace
    # normalizer) it gives the same ids on all 370 golden texts (ChatGLM2 and ChatGLM3 files), but measured
    # 1.6-2.2x slower than this path on the 308 ChatGLM2 golden texts x 20 (3 runs, loaded 2-core machine:
    # 0.56/0.51/0.51 s here vs 1.02/0.93/0.83 s `encode_batch`, 1.23/1.09/0.91 s one by one), and it needs
    # `SentencePieceExtractor`, whose signature already changed within transformers 5. SentencePiece itself
    # (what the official tokenizer runs) stays the engine; only the per-piece Python lookups are skipped.

    #: Set False (on the class or an instance) to encode through the generic route, e.g. to compare.
    use_fast_encode = True

    def _fast_tables(self) -> tuple[tuple[str, ...], dict[int, int]]:
        """Strings that make the generic route split the text, and piece ids it maps elsewhere.

        Rebuilt whenever added or special tokens change (a dict/list comparison, cheap per call)."""
        encoder = compat.added_tokens_encoder(self)
        special_map, extra = compat.special_tokens_state(self)
        key = (encoder, special_map, extra)
        state = self._fast_state
        if state is not None and state[0] == key:
            return state[1], state[2]
        # `tokenize` splits the non-special added tokens out of the text (special ones never).
        needles = tuple(self._splitting_tokens())
        # `_convert_token_to_id_with_added_voc` looks a piece up among added tokens before SentencePiece: a
        # piece spelled like one of those gets that id instead of its own (never a command token: see
        # `_convert_token_to_id`).
        remap = {}
        for name, token_id in encoder.items():
            piece_id = self.sp_model.piece_to_id(name)
            if self.sp_model.id_to_piece(piece_id) == name and piece_id != token_id:
                remap[piece_id] = token_id
        copied = (dict(encoder), dict(special_map), list(extra))
        self._fast_state = (copied, needles, remap)
        return needles, remap

    def _fast_text_ids(self, text: Any, kwargs: dict) -> list[int] | None:
        """Ids of `text` exactly as the generic route gives them, or None where only that route knows."""
        if not isinstance(text, str) or not self.use_fast_encode or kwargs.get("sanitize_control_tokens"):
            return None
        needles, remap = self._fast_tables()
        # With split_special_tokens the generic route skips the trie and sends the whole text to SentencePiece.
        if not kwargs.get("split_special_tokens", self.split_special_tokens) and any(n in text for n in needles):
            return None  # a user-added token in the text: `tokenize` splits it out
        ids = self.sp_model.encode(text)
        if remap:
            ids = [remap.get(i, i) for i in ids]
        # An unknown span comes back as its surface text from `tokenize`, and is looked up again as a
        # piece; leave that rare case (never with byte fallback, as in ChatGLM2) to the generic route.
        if self._sp_unk_id in ids:
            return None
        return ids

    def encode(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding: Any = False,
        truncation: Any = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: Any = None,
        **kwargs: Any,
    ) -> list[int]:
        # The plain call (what preprocessing makes 2x per row) needs none of the BatchEncoding / pad work
        # `prepare_for_model` does for it; its result there is just the ids with the prefix, and the
        # over-long warning, both kept here. Any option at all takes the full route.
        plain = text_pair is None and padding is False and (truncation is None or truncation is False)
        if plain and max_length is None and return_tensors is None and kwargs.keys() <= {"split_special_tokens"}:
            ids = self._fast_text_ids(text, kwargs)
            if ids is not None:
                if add_special_tokens:
                    ids = self.build_inputs_with_special_tokens(ids)
                compat.warn_if_too_long(self, ids)
                return ids
        return super().encode(
            text,
            text_pair=text_pair,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            stride=stride,
            padding_side=padding_side,
            return_tensors=return_tensors,
            **kwargs,
        )

    def _encode_plus(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: Any = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        **kwargs: Any,
    ) -> BatchEncoding:
        # Single texts (a batch comes back here one text at a time from the base class) take the fast ids
        # and the same `prepare_for_model` call as `PythonBackend._encode_plus`; anything else goes there.
        ids = self._fast_text_ids(text, kwargs)
        pair_ids = self._fast_text_ids(text_pair, kwargs) if text_pair is not None else None
        if ids is not None and (text_pair is None or pair_ids is not None):
            return self.prepare_for_model(
                ids,
                pair_ids=pair_ids,
                add_special_tokens=add_special_tokens,
                padding=padding_strategy.value,
                truncation=truncation_strategy.value,
                max_length=max_length,
                stride=stride,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_tensors=return_tensors,
                prepend_batch_axis=True,
                return_attention_mask=return_attention_mask,
                return_token_type_ids=return_token_type_ids,
                return_overflowing_tokens=return_overflowing_tokens,
                return_special_tokens_mask=return_special_tokens_mask,
                return_length=return_length,
                verbose=verbose,
            )
        return super()._encode_plus(
            text,
            text_pair=text_pair,
            add_special_tokens=add_special_tokens,
            padding_strategy=padding_strategy,
            truncation_strategy=truncation_strategy,
            max_length=max_length,
            stride=stride,
            is_split_into_words=is_split_into_words,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_tensors=return_tensors,
            return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask,
            return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask,
            return_length=return_length,
            verbose=verbose,
            **kwargs,
        )

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
        with atomic_file(target, "wb") as handle:
            handle.write(self._model_proto)
        return (str(target),)


def load_sentencepiece(cls: type[ChatGLM2Tokenizer], path: Path, family: str) -> ChatGLM2Tokenizer:
    """`cls` built from the SentencePiece `tokenizer.model` of a folder (or the file given directly).

    Only `tokenizer.model` is read for the vocabulary: the official tokenizer_config.json names remote code.
    """
    model_file = path if path.is_file() else path / TOKENIZER_FILE
    if not model_file.is_file():
        raise GlmtuneError(
            f"{path}: no {TOKENIZER_FILE} found (expected a ChatGLM2/ChatGLM3 model or checkpoint folder holding "
            f"the SentencePiece file {TOKENIZER_FILE})"
        )
    try:
        tokenizer = cls(vocab_file=model_file)
    except (RuntimeError, OSError) as exc:
        raise GlmtuneError(f"{model_file}: not a readable SentencePiece model ({exc})") from exc
    tokenizer.family = family  # what `glmtune.families.registry.family_of` reads (a registered variant's own name)
    return tokenizer
