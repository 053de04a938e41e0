"""What a model family is: the `Family` record each family package builds and registers, and the registration.

A family package (`glmtune.families.chatglm2`, `chatglm3`, `glm4`, or one of your own) builds one `Family` in its
`__init__.py` and calls `register()`; `glmtune.families.registry` imports the built-in packages and answers every
lookup (by name, from a folder, from a tokenizer). Commands never name a family: they ask the `Family` the tokenizer
carries (`registry.family_of`) for its tokenizer, chat rules, stop ids, serve request reader and data rules.

This module sits below the family packages and the registry and imports nothing above `glmtune.errors`, so a
family package can import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from glmtune.errors import GlmtuneError

FAMILY_FIELD = "glmtune_family"  # key in config.json of checkpoints and merged folders (and glmtune's tokenizer_config.json)
TOKENIZER_FILE = "tokenizer.model"  # the vocabulary file of every ChatGLM / GLM-4 folder (SentencePiece or tiktoken ranks)
ROPE_INTERPOLATE = "interpolate-positions"  # chatglm2-6b-32k: position / rope_ratio
ROPE_SCALE_BASE = "scale-base"  # chatglm3-6b-32k, GLM-4: base 10000 * rope_ratio

FAMILIES: dict[str, "Family"] = {}  # name -> family, in registration order (the registry fills it with the built-ins)


class RequestError(GlmtuneError):
    """A chat request a family cannot read (`Family.read_request`); `param` names the request field, as OpenAI does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ChatRules(Protocol):
    """How a family holds a conversation and turns generated ids into an answer; `Family` documents each method."""

    format: str  # "rounds" (history [(query, answer), ...]) or "roles" (history [{role, content, ...}, ...])
    unit: str  # what dropped history is counted in, e.g. "round(s)"

    def split_history(self, history: Any, role: str) -> tuple[list, list]: ...
    def prompt(self, tokenizer: Any, query: str, history: list, role: str) -> tuple[str, list[int]]: ...
    def answer(self, tokenizer: Any, ids: list[int], history: list, query: str, role: str, stop_ids: list[int],
               warn: bool = True) -> tuple[Any, list]: ...
    def stream(self, tokenizer: Any, chunks: Iterable[list[int]], answer: Callable, stop_ids: list[int]) -> Iterator: ...
    def history_json(self, history: list) -> list: ...
    def opening(self, system: str | None, tools: list | None, history: list) -> list: ...


class DataRules(Protocol):
    """A family's own fine-tuning data (e.g. ChatGLM3 conversations): reading, tokenizing and the length report.
    `config` is a `glmtune.data.preprocess.DataConfig`; a family without data rules uses the prompt/response
    rules of `glmtune.data.preprocess`."""

    def load_rows(self, path: Any, config: Any) -> list[dict]: ...
    def tokenize(self, rows: Any, tokenizer: Any, config: Any, mode: str) -> Any: ...
    def build_report(self, rows: Any, dataset: Any, config: Any, mode: str, source: Any) -> dict: ...


@dataclass(frozen=True)
class Family:
    """One model family. Its functions take the family's own tokenizer (what `load_tokenizer` returns)."""

    name: str
    title: str
    rope_rule: str  # ROPE_INTERPOLATE or ROPE_SCALE_BASE: what `rope_ratio` means
    default_data_format: str  # the data layout the family's official demo reads
    stop_tokens: tuple[str, ...]  # tokens that end an answer besides eos
    # (path of a folder or tokenizer file, the family's name) -> a transformers-compatible tokenizer whose
    # `.family` is that name; its errors are GlmtuneError naming the file.
    tokenizer_loader: Callable[[Path, str], Any] = field(repr=False)
    chat: ChatRules = field(repr=False)
    # OpenAI chat messages (plain dicts: role, content text, tool_calls [{name, arguments}]) and tools
    # ([{name, description?, parameters?}] or None) -> (query, history, role) for `chat`; RequestError when unreadable.
    request_reader: Callable[[list[dict], list[dict] | None], tuple[str, list, str]] = field(repr=False)
    # (decoded reply, names of the offered tools) -> {"name", "arguments" (JSON text)} or None: never executes anything.
    tool_call_reader: Callable[[str, list[str]], dict | None] = field(repr=False, default=lambda raw, names: None)
    # plain decoded answer text -> the answer as the official chat returns it (no tool-call parsing)
    process_text: Callable[[str], str] = field(repr=False, default=str.strip)
    data: DataRules | None = field(repr=False, default=None)
    # folder -> whether the official files there mark it as this family (`glmtune.families.registry.detect_family`).
    detector: Callable[[Path], bool] | None = field(repr=False, default=None)

    # --- tokenizer, stops --------------------------------------------------------------------------------------

    def load_tokenizer(self, path: str | Path) -> Any:
        """This family's tokenizer of a model or checkpoint folder (or the vocabulary file given directly)."""
        return self.tokenizer_loader(Path(path), self.name)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end an answer (eos first)."""
        return [tokenizer.eos_token_id] + [tokenizer.get_command(t) for t in self.stop_tokens]

    def detects(self, folder: Path) -> bool:
        return self.detector is not None and self.detector(folder)

    # --- serve ---------------------------------------------------------------------------------------------------

    def read_request(self, messages: list[dict], tools: list[dict] | None) -> tuple[str, list, str]:
        """(query, history, role) of an OpenAI chat request, as `chat_prompt` takes them."""
        return self.request_reader(messages, tools)

    def reply_tool_call(self, raw: str, tool_names: list[str]) -> dict | None:
        """`{"name", "arguments"}` when the decoded reply `raw` is a call of one of `tool_names`; parsed, never run."""
        return self.tool_call_reader(raw, tool_names)

    # --- chat: what glmtune.inference.chat, glmtune chat and glmtune serve ask the family --------------------------

    @property
    def chat_format(self) -> str:
        """"rounds" (history is [(query, answer), ...]) or "roles" (history is messages {role, content})."""
        return self.chat.format

    @property
    def history_unit(self) -> str:
        """What dropped history is counted in: "round(s)" or "message(s)"."""
        return self.chat.unit

    def split_history(self, history: Any, role: str = "user") -> tuple[list, list]:
        """Checked copies of `history` as (pinned, droppable): what always stays in a prompt (a leading system
        message) and the rest, oldest first; an unknown or unsupported `role` is an error."""
        return self.chat.split_history(history, role)

    def chat_prompt(self, tokenizer: Any, query: str, history: list, role: str = "user") -> tuple[str, list[int]]:
        """(prompt text, prompt ids) of the official chat for `query` after `history` (already split/checked)."""
        return self.chat.prompt(tokenizer, query, history, role)

    def chat_answer(self, tokenizer: Any, ids: list[int], history: list, query: str, role: str = "user",
                    warn: bool = True) -> tuple[Any, list]:
        """(response, history + this round) for the generated `ids`, post-processed as the official chat does."""
        return self.chat.answer(tokenizer, ids, history, query, role, self.stop_token_ids(tokenizer), warn)

    def stream_answers(self, tokenizer: Any, chunks: Iterable[list[int]],
                       answer: Callable[[list[int], bool], tuple[Any, list]]) -> Iterator[tuple[Any, list]]:
        """The official `stream_chat` policy: which partial answers to yield while `chunks` of new ids arrive;
        `answer(ids, warn)` makes one (response, history)."""
        return self.chat.stream(tokenizer, chunks, answer, self.stop_token_ids(tokenizer))

    def history_json(self, history: list) -> list:
        """A chat history as JSON (what `glmtune chat --json` prints and `--history-file` reads back)."""
        return self.chat.history_json(history)

    def opening_history(self, system: str | None, tools: list | None, history: list) -> list:
        """`history` with the conversation's opening (`--system` / `--tools`) in front; an error for a family
        without a system role, or when `history` already opens with a system message."""
        return self.chat.opening(system, tools, history)

    # --- model ---------------------------------------------------------------------------------------------------

    def rope_parameters(self, rope_ratio: float) -> dict:
        """transformers `rope_parameters` for ChatGLM's half-head rotary embedding under this family's rule."""
        base = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        if rope_ratio == 1.0:
            return base
        if self.rope_rule == ROPE_INTERPOLATE:
            # transformers' "linear" rope divides the positions by `factor`: the chatglm2-6b-32k code exactly.
            return {**base, "rope_type": "linear", "factor": float(rope_ratio)}
        return {**base, "rope_theta": 10000.0 * float(rope_ratio)}


def register(family: Family) -> Family:
    """Make `family` known to every command (`glmtune.families.registry`); a second family of the same name is an error."""
    known = FAMILIES.get(family.name)
    if known is not None and known is not family:
        raise GlmtuneError(f"family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def checked_messages(messages: Any, source: str, roles, tools_ok: Callable[[dict], bool], tools_rule: str) -> list[dict]:
    """Copies of a role-message conversation, each message checked (role in `roles`, string content and
    metadata, `tools` where `tools_ok(message)`); errors name the item and field. What the role-message
    families share; `tools_rule` says in the error where and what `tools` may be."""
    import copy

    if messages is None:
        return []
    if not isinstance(messages, (list, tuple)):
        raise GlmtuneError(f"{source}: expected a list of messages {{role, content}}, found {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise GlmtuneError(f"{source}[{i}]: expected a message object {{role, content}}, found {message!r:.80}")
        role = message.get("role")
        if role not in roles:
            raise GlmtuneError(f"{source}[{i}]: field role: expected one of {list(roles)}, found {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise GlmtuneError(f"{source}[{i}]: field content: expected a string, found {type(content).__name__}")
        metadata = message.get("metadata", "")
        if not isinstance(metadata, str):
            raise GlmtuneError(f"{source}[{i}]: field metadata: expected a string, found {type(metadata).__name__}")
        if "tools" in message and not tools_ok(message):
            raise GlmtuneError(f"{source}[{i}]: field tools: {tools_rule}")
        out.append(copy.deepcopy(message))
    return out
