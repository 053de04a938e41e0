"""The GLM-4-9B-chat tokenizer on tiktoken, without remote code, as a transformers tokenizer.

Reproduces `ChatGLM4Tokenizer` of the official `THUDM/glm-4-9b-chat` release (tokenization_chatglm.py, July and
Nov 2024), checked against ../shared/reference/glm4-tokenizer-golden.jsonl:

* `tokenizer.model` is a tiktoken rank file (`base64 rank` per line); the text is split with the cl100k pattern and
  byte-pair encoded by tiktoken (the library made for this format); the 14 special tokens `<|endoftext|>` ...
  `<|end_of_video|>` follow the ranks (151329..151342 in the real model) and are read from tokenizer_config.json;
* `encode(text)` puts `[gMASK] <sop>` in front; batches are left-padded with `<|endoftext|>` (151329) and carry
  `position_ids` (0 on pads); decoding puts a space on each side of a special token, `skip_special_tokens` drops
  all 14;
* the chat template is the jinja `chat_template` of tokenizer_config.json, rendered by transformers' own
  `apply_chat_template`.

Deliberate differences (docs/glm4.md):

* text is text: the official tokenizer turns a literal `<|user|>`, `[gMASK]` or `<|endoftext|>` in any text into the
  control id (prompt injection through user text). Here no text ever becomes a special id: `encode` gives the raw
  BPE ids the official `tokenizer.tokenizer.encode` gives, and in `apply_chat_template` only the template's own
  markers are control ids; message content, metadata and tool descriptions are encoded as text;
* the padded ids 151343..151551 (no token) decode to nothing; the official decoder repeats the pending text there.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer
from transformers.utils import PaddingStrategy

from glmtune import compat
from glmtune.errors import GlmtuneError
from glmtune.families.family import FAMILY_FIELD, TOKENIZER_FILE
from glmtune.fsutil import atomic_file

# The official split pattern (that of tiktoken's cl100k_base).
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                  "<|end_of_video|>")
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a chat template
_BYTE_BASE = 0x100  # a BPE token's string form: each byte b as chr(0x100 + b), so it never spells a special token
_SENTINEL = "\ue000{}\ue001"  # private-use marks standing for data while the template renders


def read_ranks(path: Path) -> dict[bytes, int]:
    """The tiktoken rank file: one `base64-token rank` pair per line. tiktoken's own loader caches remote files
    and names no line on bad input; this one reads a local file and says where it is wrong."""
    ranks: dict[bytes, int] = {}
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise GlmtuneError(f"{path}: not a readable tiktoken rank file ({exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise GlmtuneError(f"{path}: line {number}: expected `base64-token rank`, found {line[:60]!r}") from None
    if not ranks:
        raise GlmtuneError(f"{path}: empty tiktoken rank file")
    return ranks


def write_ranks(ranks: dict[bytes, int], path: Path) -> None:
    with atomic_file(path, "w") as handle:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            handle.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


class Glm4Tokenizer(PreTrainedTokenizer):
    """tiktoken BPE + the GLM-4 special tokens; left padding with position ids; text never becomes a special id."""

    vocab_files_names = {"vocab_file": TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"
    family = "glm4"

    def __init__(self, vocab_file: str | Path, special_tokens: dict[str, int] | None = None,
                 padding_side: str = "left", **kwargs: Any) -> None:
        self.vocab_file = str(vocab_file)
        self.ranks = read_ranks(Path(vocab_file))
        n = len(self.ranks)
        specials = dict(special_tokens or {t: n + i for i, t in enumerate(SPECIAL_TOKENS)})
        missing = [t for t in ("<|endoftext|>", "[gMASK]", "<sop>", *ROLE_MARKERS) if t not in specials]
        if missing:
            raise GlmtuneError(f"{vocab_file}: the GLM-4 special tokens {missing} are not defined")
        self.special_ids = dict(specials)
        self._special_names = {i: t for t, i in specials.items()}
        # tiktoken does the splitting and merging; special tokens are given to it but never allowed in text.
        self.encoding = tiktoken.Encoding(name=f"glm4-{n}", pat_str=PAT_STR, mergeable_ranks=self.ranks,
                                          special_tokens=specials)
        self._vocab: dict[str, int] | None = None
        compat.seed_added_tokens(self, {i: AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True)
                                        for t, i in specials.items()})
        kwargs.setdefault("eos_token", "<|endoftext|>")
        kwargs.setdefault("pad_token", "<|endoftext|>")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault(FAMILY_FIELD, self.family)  # recorded in tokenizer_config.json by save_pretrained
        for key in ("auto_map", "tokenizer_class", "added_tokens_decoder", "additional_special_tokens"):
            kwargs.pop(key, None)  # never write or honour remote-code hooks; the specials are set above
        super().__init__(padding_side=padding_side, **kwargs)

    # --- vocabulary ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.ranks)

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {self._token_string(b): i for b, i in self.ranks.items()}
        return {**self._vocab, **self.special_ids}

    @staticmethod
    def _token_string(token: bytes) -> str:
        return "".join(chr(_BYTE_BASE + b) for b in token)

    @staticmethod
    def _token_bytes(token: str) -> bytes | None:
        try:
            return bytes(ord(c) - _BYTE_BASE for c in token)
        except ValueError:
            return None

    def get_command(self, token: str) -> int:
        """Id of a special token (`[gMASK]`, `<|user|>`, ...), as ChatGLM's `get_command`."""
        if token not in self.special_ids:
            raise KeyError(f"{token!r} is not a GLM-4 special token (expected one of {list(self.special_ids)})")
        return self.special_ids[token]

    # --- encoding: text is text ------------------------------------------------------------------------------------

    def text_ids(self, text: str) -> list[int]:
        """BPE ids of `text`, special strings included as ordinary text."""
        return self.encoding.encode_ordinary(text)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # transformers' `tokenize` splits every added token (all 14 specials here) out of the text: the official
        # prompt injection. Here the whole text goes to the BPE.
        return [self._token_string(self.encoding.decode_single_token_bytes(i)) for i in self.text_ids(text)]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_ids:
            return self.special_ids[token]
        raw = self._token_bytes(token)
        if raw is None or raw not in self.ranks:
            raise KeyError(f"{token!r} is not a GLM-4 token")
        return self.ranks[raw]

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._special_names:
            return self._special_names[index]
        if 0 <= index < len(self.ranks):
            return self._token_string(self.encoding.decode_single_token_bytes(index))
        return ""  # the padded ids after the specials: no token

    def encode(self, text: Any, text_pair: Any = None, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        # The plain call (what preprocessing makes per message) takes tiktoken's ids directly; any option takes the
        # full transformers route, which reaches the same ids through `tokenize`.
        if isinstance(text, str) and text_pair is None and not kwargs:
            ids = self.text_ids(text)
            return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids
        return super().encode(text, text_pair=text_pair, add_special_tokens=add_special_tokens, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        ids = [self.special_ids["[gMASK]"], self.special_ids["<sop>"]] + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return [1 if t in self._special_names else 0 for t in token_ids_0 + (token_ids_1 or [])]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # --- decoding -----------------------------------------------------------------------------------------------

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        raw = b"".join(b for b in map(self._token_bytes, tokens) if b is not None)
        return raw.decode("utf-8", errors="replace")

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        # As the official (transformers' slow-tokenizer decoding): runs of BPE ids are decoded as UTF-8 (a split
        # character becomes U+FFFD), special tokens stand alone, all parts joined by a space; skipped specials
        # join the runs around them. Ids without a token (the padded range, -100) are nothing.
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_names:
                if skip_special_tokens:
                    continue
                if run:
                    parts.append(self.encoding.decode_bytes(run).decode("utf-8", errors="replace"))
                    run = []
                parts.append(self._special_names[i])
            elif 0 <= i < len(self.ranks):
                run.append(i)
        if run:
            parts.append(self.encoding.decode_bytes(run).decode("utf-8", errors="replace"))
        return " ".join(parts)

    # --- chat template ----------------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation: list, tools: Any = None, add_generation_prompt: bool = False,
                            tokenize: bool = True, padding: Any = False, return_dict: bool = False,
                            return_tensors: Any = None, **kwargs: Any) -> Any:
        """The official template rendered by transformers' `apply_chat_template` (`tokenize=False` gives the text,
        equal to the official), tokenized so that only the template's own markers are control ids.

        `tokenize=True` gives the ids (a list per conversation for a batch), `return_dict=True` a padded batch with
        `attention_mask` and `position_ids`, as the official tokenizer does."""
        batch = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batch else [conversation]
        rendered = [self._render(list(c), tools, add_generation_prompt, **kwargs) for c in conversations]
        if not tokenize:
            texts = [text for text, _ in rendered]
            return texts if batch else texts[0]
        ids = [chat_ids for _, chat_ids in rendered]
        if not return_dict:
            return ids if batch else ids[0]
        return self.pad({"input_ids": ids}, padding=padding or (PaddingStrategy.LONGEST if batch else False),
                        return_tensors=return_tensors)

    def _render(self, messages: list, tools: Any, add_generation_prompt: bool, **kwargs: Any) -> tuple[str, list[int]]:
        data: list[str] = []

        def mark(value: Any, keys: bool = False) -> Any:
            # Every non-empty string the template prints from the data becomes a sentinel (empty ones stay empty:
            # the template tests them); `role` and a tool's `type` are compared, not printed, and stay; keys are
            # printed (and so marked) only inside a function's `parameters` schema.
            if isinstance(value, str):
                if not value:
                    return value
                data.append(value)
                return _SENTINEL.format(len(data) - 1)
            if isinstance(value, dict):
                return {(mark(k) if keys else k): (v if k in ("role", "type") and not keys
                                                   else mark(v, keys or k == "parameters"))
                        for k, v in value.items()}
            if isinstance(value, list):
                return [mark(v, keys) for v in value]
            return copy.deepcopy(value)

        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise GlmtuneError(f"messages[{i}]: expected an object with a string role, found {message!r:.80}")
            if message["role"] not in ("system", "user", "assistant", "observation"):
                raise GlmtuneError(f"messages[{i}]: field role: expected one of system, user, assistant, observation, "
                                   f"found {message['role']!r}")
        marked = [mark(m) for m in messages]
        template_text = super().apply_chat_template(marked, tools=tools, add_generation_prompt=add_generation_prompt,
                                                    tokenize=False, **kwargs)
        return self._fill(template_text, data)

    def _fill(self, template_text: str, data: list[str]) -> tuple[str, list[int]]:
        """The rendered text with the data put back, and its ids: specials only where the template wrote them."""
        pieces: list[tuple[str, bool]] = []  # (text, is template text)
        rest = template_text
        while "\ue000" in rest:
            head, _, tail = rest.partition("\ue000")
            index, _, rest = tail.partition("\ue001")
            pieces.append((head, True))
            value = data[int(index)]
            # A sentinel inside a JSON string (the tools block's tojson) stands for the JSON-escaped value.
            in_json = head.endswith('"') and rest.startswith('"')
            pieces.append((json.dumps(value, ensure_ascii=False)[1:-1] if in_json else value, False))
        pieces.append((rest, True))
        text = "".join(p for p, _ in pieces)
        ids: list[int] = []
        pending = ""
        for piece, is_template in pieces:
            if not is_template:
                pending += piece
                continue
            position = 0
            while True:
                found = [(piece.find(t, position), t) for t in self.special_ids if piece.find(t, position) >= 0]
                if not found:
                    pending += piece[position:]
                    break
                start, token = min(found)
                pending += piece[position:start]
                ids.extend(self.text_ids(pending))
                pending = ""
                ids.append(self.special_ids[token])
                position = start + len(token)
        ids.extend(self.text_ids(pending))
        return text, ids

    # --- padding ------------------------------------------------------------------------------------------------

    def _pad(self, encoded_inputs: dict, max_length: int | None = None,
             padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD, pad_to_multiple_of: int | None = None,
             padding_side: str | None = None, return_attention_mask: bool | None = None) -> dict:
        # As the official `_pad`: position ids 0..n-1 on the tokens, 0 on the padding.
        n = len(encoded_inputs[self.model_input_names[0]])
        positions = list(encoded_inputs.pop("position_ids", range(n)))
        if return_attention_mask is None or return_attention_mask:
            encoded_inputs.setdefault("attention_mask", [1] * n)
        encoded_inputs = super()._pad(encoded_inputs, max_length=max_length, padding_strategy=padding_strategy,
                                      pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                                      return_attention_mask=return_attention_mask)
        difference = len(encoded_inputs[self.model_input_names[0]]) - n
        side = padding_side if padding_side is not None else self.padding_side
        encoded_inputs["position_ids"] = [0] * difference + positions if side == "left" else positions + [0] * difference
        return encoded_inputs

    # --- saving -------------------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        directory = Path(save_directory)
        target = directory / ((filename_prefix + "-" if filename_prefix else "") + TOKENIZER_FILE)
        if not directory.is_dir():
            target = directory
        write_ranks(self.ranks, target)
        return (str(target),)


def load_glm4(path: Path, family: str) -> Glm4Tokenizer:
    """The GLM-4 tokenizer of a folder: `tokenizer.model` (tiktoken ranks) + tokenizer_config.json (the special
    tokens' ids, the chat template, padding side). Nothing else in tokenizer_config.json is honoured (no remote code)."""
    folder = path.parent if path.is_file() else path
    model_file = path if path.is_file() else path / TOKENIZER_FILE
    if not model_file.is_file():
        raise GlmtuneError(f"{path}: no {TOKENIZER_FILE} found (expected a GLM-4 model or checkpoint folder holding the "
                           f"tiktoken rank file {TOKENIZER_FILE})")
    config_file = folder / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GlmtuneError(f"{folder}: no {CONFIG_FILE} (a GLM-4 tokenizer needs its special tokens and chat template)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GlmtuneError(f"{config_file}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise GlmtuneError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
    decoder = config.get("added_tokens_decoder") or {}
    try:
        specials = {entry["content"]: int(i) for i, entry in decoder.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise GlmtuneError(f"{config_file}: field added_tokens_decoder: expected {{id: {{content, ...}}}}") from None
    template = config.get("chat_template")
    if template is None and (folder / TEMPLATE_FILE).is_file():
        template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    if not isinstance(template, str):
        raise GlmtuneError(f"{config_file}: no chat_template (the official GLM-4 tokenizer_config.json has one)")
    tokenizer = Glm4Tokenizer(vocab_file=model_file, special_tokens=specials or None, chat_template=template,
                              padding_side=config.get("padding_side", "left"))
    tokenizer.family = family
    return tokenizer
