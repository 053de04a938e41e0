"""The ChatGLM model families: what differs between ChatGLM2-6B and ChatGLM3-6B (and their 32k variants).

ChatGLM3-6B has the network and weight layout of ChatGLM2-6B; what differs is listed here, in one place, so
no command branches on a family name itself (tests/test_family_dispatch.py checks the command modules):

* tokenizer: ChatGLM3 adds four role tokens `<|system|> <|user|> <|assistant|> <|observation|>` after the five
  GLM command tokens (`glmtune.families.chatglm3.tokenizer`);
* prompt building and stop tokens: ChatGLM2 uses the `[Round N]\\n\\n问：...\\n\\n答：` template and stops on
  `</s>`; ChatGLM3 uses role messages (`build_chat_input`) and stops on `</s>`, `<|user|>` or `<|observation|>`;
* response parsing: ChatGLM3 replies may carry metadata (a tool name) and a tool call (`glmtune.families.chatglm3.chat`);
* the chat rules (`Family.chat`): how a history is held and checked ((query, answer) rounds, or role
  messages whose leading system message always stays in the prompt), which partial answers `stream_chat`
  yields, how `glmtune chat` prints a history and opens one with `--system` / `--tools`: `RoundsChat`
  below for ChatGLM2, `glmtune.families.chatglm3.chat.RolesChat` for ChatGLM3; `Family.chat_format` names which, for the
  OpenAI request reader of `glmtune serve` and the data reader of `glmtune.data.preprocess`;
* the rotary rule for `rope_ratio` (the 32k releases): THUDM/chatglm2-6b-32k divides the positions by it
  (position interpolation), THUDM/chatglm3-6b-32k multiplies the rotary base by it;
* the default P-tuning data format: ADGEN prompt/response for ChatGLM2, `conversations` for ChatGLM3.

The family of a folder is recorded in config.json (`glmtune_family`, written into every P-tuning checkpoint
and merged model glmtune saves), else detected from the tokenizer (ChatGLM3's tokenizer_config.json names
its role tokens), else from the release name the official config.json carries (`THUDM/chatglm3-6b`), else
ChatGLM2; `--family` overrides. The official releases do not record a family: a
folder with no tokenizer (e.g. a bare 32k weight folder) needs `--family chatglm3` to be read as ChatGLM3.

The registry sits below what uses it and imports nothing above it (no import cycle): ChatGLM2's prompt
building, reply post-processing and chat rules are defined here (`glmtune.inference.chat` re-exports
`process_response`), ChatGLM3's come from `glmtune.families.chatglm3.chat`, which imports only `glmtune.errors`; the
tokenizer classes and data readers pick their family's code from above (`glmtune.families.tokenizer` by the
family's role tokens, `glmtune.data.preprocess` by its chat format). A family registered in `FAMILIES` (e.g. ChatGLM2's
rules with another stop token) is used by every command without touching them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError
from glmtune.families.chatglm3.chat import RolesChat, messages_to_ids, normalize_messages, process_response

FAMILY_FIELD = "glmtune_family"  # key in config.json of checkpoints and merged folders
GLM3_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ROPE_INTERPOLATE = "interpolate-positions"  # chatglm2-6b-32k: position / rope_ratio
ROPE_SCALE_BASE = "scale-base"  # chatglm3-6b-32k: base 10000 * rope_ratio


@dataclass(frozen=True)
class Family:
    """One model family; the functions take the family's own tokenizer (see `load_tokenizer`)."""

    name: str
    title: str
    role_tokens: tuple[str, ...]
    rope_rule: str
    default_data_format: str
    stop_tokens: tuple[str, ...]
    # messages [{"role", "content", "metadata"?, "tools"?}, ...] -> prompt ids ending where the assistant answers
    _messages_to_ids: Callable[[Any, Sequence[dict]], list[int]] = field(repr=False)
    # decoded answer text + the messages so far -> (response, messages + the answer)
    _parse_response: Callable[[str, list[dict]], tuple[Any, list[dict]]] = field(repr=False)
    # How `chat` / `stream_chat` / `glmtune chat` hold a conversation: ChatGLM2's (query, answer) rounds
    # (`RoundsChat`, below) or ChatGLM3's role messages (`glmtune.families.chatglm3.chat.RolesChat`); the methods below delegate.
    chat: RoundsChat | RolesChat = field(repr=False)

    def messages_to_ids(self, tokenizer: Any, messages: Sequence[dict]) -> list[int]:
        """Prompt ids for a conversation (roles system / user / assistant / observation), ready to generate."""
        return self._messages_to_ids(tokenizer, messages)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end an answer (eos first)."""
        return [tokenizer.eos_token_id] + [tokenizer.get_command(t) for t in self.stop_tokens]

    def parse_response(self, text: str, messages: list[dict]) -> tuple[Any, list[dict]]:
        """The official post-processing of a decoded answer: (response, messages with the answer appended)."""
        return self._parse_response(text, messages)

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
        """Checked copies of `history` as (pinned, droppable): what always stays in a prompt (ChatGLM3's
        leading system message) and the rest, oldest first; an unknown or unsupported `role` is an error."""
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

    def rope_parameters(self, rope_ratio: float) -> dict:
        """transformers `rope_parameters` for ChatGLM's half-head rotary embedding under this family's rule."""
        base = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        if rope_ratio == 1.0:
            return base
        if self.rope_rule == ROPE_INTERPOLATE:
            # transformers' "linear" rope divides the positions by `factor`: the chatglm2-6b-32k code exactly.
            return {**base, "rope_type": "linear", "factor": float(rope_ratio)}
        return {**base, "rope_theta": 10000.0 * float(rope_ratio)}


# --- ChatGLM2 ------------------------------------------------------------------------------------


def _glm2_messages_to_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """ChatGLM2 knows user/assistant rounds only: a system message is put in front of the first query
    (ChatGLM2 has no system role; this is what its users do), an observation role is an error."""
    history, system = [], []
    pending: str | None = None
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content", "")
        if not isinstance(content, str):
            raise GlmtuneError(f"messages[{i}]: content must be a string for ChatGLM2, found {type(content).__name__}")
        if role == "system":
            system.append(content)
        elif role == "user":
            if pending is not None:
                history.append((pending, ""))
            pending = content
        elif role == "assistant":
            history.append((pending or "", content))
            pending = None
        else:
            raise GlmtuneError(f"messages[{i}]: role {role!r} is not supported by ChatGLM2 (system, user, assistant)")
    if pending is None:
        raise GlmtuneError("messages: the last message must come from the user")
    query = pending
    if system:
        if history:
            history[0] = ("\n".join(system) + "\n" + history[0][0], history[0][1])
        else:
            query = "\n".join(system) + "\n" + query
    return tokenizer(tokenizer.build_prompt(query, history))["input_ids"]


def glm2_process_response(response: str) -> str:
    """The official ChatGLM2 post-processing of a decoded answer (`process_response` of THUDM/chatglm2-6b);
    `glmtune.inference.chat` uses it as its `process_response`. It lives here, with ChatGLM2's prompt building, so the
    registry imports nothing above it."""
    return response.strip().replace("[[训练时间]]", "2023年")


def _glm2_parse_response(text: str, messages: list[dict]) -> tuple[str, list[dict]]:
    response = glm2_process_response(text)
    return response, [*messages, {"role": "assistant", "content": response}]


def normalize_history(history: Any, source: str = "history") -> list[tuple[str, str]]:
    """`[[q, a], ...]` or `[(q, a), ...]` as a list of string tuples (a ChatGLM2 history); anything else is an error."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise GlmtuneError(f"{source}: expected a list of [query, answer] pairs, found {type(history).__name__}")
    rounds: list[tuple[str, str]] = []
    for i, item in enumerate(history):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise GlmtuneError(f"{source}[{i}]: expected a [query, answer] pair of strings, found {item!r:.80}")
        rounds.append((item[0], item[1]))
    return rounds


class RoundsChat:
    """ChatGLM2's `chat` / `stream_chat` of THUDM/chatglm2-6b: history is [(query, answer), ...], the prompt the
    `[Round N]` template, every generated token yields the post-processed answer so far. ChatGLM3's
    counterpart is `glmtune.families.chatglm3.chat.RolesChat`; `Family` documents each method."""

    format = "rounds"
    unit = "round(s)"

    def split_history(self, history: Any, role: str) -> tuple[list, list]:
        if role != "user":
            raise GlmtuneError(f"role {role!r}: ChatGLM2 has only user/assistant rounds (use a ChatGLM3 model)")
        return [], normalize_history(history)

    def prompt(self, tokenizer: Any, query: str, history: list, role: str) -> tuple[str, list[int]]:
        prompt = tokenizer.build_prompt(query, history)
        return prompt, tokenizer(prompt)["input_ids"]

    def answer(self, tokenizer: Any, ids: list[int], history: list, query: str, role: str, stop_ids: list[int],
               warn: bool = True) -> tuple[str, list]:
        response = glm2_process_response(tokenizer.decode(ids))
        return response, history + [(query, response)]

    def stream(self, tokenizer: Any, chunks: Iterable[list[int]], answer: Callable, stop_ids: list[int]) -> Iterator:
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(chunk)
            yield answer(ids, False)

    def history_json(self, history: list) -> list:
        return [list(r) for r in history]

    def opening(self, system: str | None, tools: list | None, history: list) -> list:
        if system is not None or tools is not None:
            raise GlmtuneError("--system and --tools need a ChatGLM3 model (ChatGLM2 has no system role)")
        return list(history)


CHATGLM2 = Family(
    name="chatglm2",
    title="ChatGLM2-6B (and chatglm2-6b-32k)",
    role_tokens=(),
    rope_rule=ROPE_INTERPOLATE,
    default_data_format="prompt-response",
    stop_tokens=(),
    _messages_to_ids=_glm2_messages_to_ids,
    _parse_response=_glm2_parse_response,
    chat=RoundsChat(),
)
CHATGLM3 = Family(
    name="chatglm3",
    title="ChatGLM3-6B (and chatglm3-6b-32k)",
    role_tokens=GLM3_ROLE_TOKENS,
    rope_rule=ROPE_SCALE_BASE,
    default_data_format="conversations",
    stop_tokens=("<|user|>", "<|observation|>"),
    _messages_to_ids=messages_to_ids,
    _parse_response=process_response,
    chat=RolesChat(),
)
FAMILIES: dict[str, Family] = {f.name: f for f in (CHATGLM2, CHATGLM3)}
DEFAULT_FAMILY = CHATGLM2


# --- detection -----------------------------------------------------------------------------------


def get_family(name: str | Family | None) -> Family:
    """The registered family called `name` (None: the default, ChatGLM2)."""
    if isinstance(name, Family):
        return name
    if name is None:
        return DEFAULT_FAMILY
    if name not in FAMILIES:
        raise GlmtuneError(f"--family: expected one of {sorted(FAMILIES)}, found {name!r}")
    return FAMILIES[name]


def recorded_family(folder: str | Path) -> str | None:
    """The family a glmtune-written folder records in its config.json, if any."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # reported properly by whoever reads the config
    value = cfg.get(FAMILY_FIELD) if isinstance(cfg, dict) else None
    if value is not None and value not in FAMILIES:
        raise GlmtuneError(f"{cfg_file}: field {FAMILY_FIELD}: expected one of {sorted(FAMILIES)}, found {value!r}")
    return value


def detect_family(folder: str | Path) -> Family:
    """The family of a model, checkpoint or tokenizer folder (see the module docstring for the rule)."""
    folder = Path(folder)
    if folder.is_file():  # a tokenizer.model given directly: nothing says ChatGLM3
        folder = folder.parent
    recorded = recorded_family(folder)
    if recorded:
        return FAMILIES[recorded]
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        text = tok_cfg.read_text(encoding="utf-8", errors="replace")
        try:
            saved = json.loads(text).get(FAMILY_FIELD)  # written by glmtune's own tokenizers
        except (json.JSONDecodeError, AttributeError):
            saved = None
        if saved in FAMILIES:
            return FAMILIES[saved]
        # The official ChatGLM3 tokenizer_config.json names its role tokens (in its chat_template).
        if any(token in text for token in GLM3_ROLE_TOKENS):
            return CHATGLM3
    # Older downloads of the official ChatGLM3 folders lack the chat_template, but name their release.
    for name, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        try:
            origin = json.loads((folder / name).read_text(encoding="utf-8")).get(key)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(origin, str) and "chatglm3" in origin.lower():
            return CHATGLM3
    return DEFAULT_FAMILY


def resolve_family(folder: str | Path | None, override: str | Family | None = None) -> Family:
    """`--family` when given, else what the folder says. `--family` is meant for folders that say nothing (a bare
    download); overriding a folder that names a family with other role tokens is allowed, but said loudly: the
    tokenizer then gains or loses role tokens the model was not trained with."""
    if override is None:
        return detect_family(folder) if folder is not None else DEFAULT_FAMILY
    family = get_family(override)
    stated = _stated_family(Path(folder)) if folder is not None else None
    if stated is not None and FAMILIES[stated[0]].role_tokens != family.role_tokens:
        logging.getLogger(__name__).warning(
            "--family %s overrides %s, which is a %s model (%s): its tokenizer and prompts become %s's, which that "
            "model was not trained with; drop --family unless the folder is mislabelled", family.name, folder,
            stated[0], stated[1], family.name)
    return family


def _stated_family(folder: Path) -> tuple[str, str] | None:
    """(family, where the folder says so) when it names its family outright: a glmtune-written config.json or
    tokenizer_config.json, or the official release name; None when only the default fallback would apply."""
    folder = folder.parent if folder.is_file() else folder
    recorded = recorded_family(folder)
    if recorded:
        return recorded, f"config.json {FAMILY_FIELD} {recorded!r}"
    for name, keys in (("tokenizer_config.json", (FAMILY_FIELD, "name_or_path")), ("config.json", ("_name_or_path",))):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        for key in keys:
            value = data.get(key) if isinstance(data, dict) else None
            found = value if value in FAMILIES else next((f for f in FAMILIES if isinstance(value, str)
                                                          and f in value.lower()), None)
            if found:
                return found, f"{name} {key} {value!r}"
    return None


def family_of(tokenizer: Any) -> Family:
    """The family a glmtune tokenizer belongs to (what `load_tokenizer` detected or was told)."""
    return get_family(getattr(tokenizer, "family", None))


def stop_ids_for(tokenizer: Any) -> list[int]:
    """Stop ids of the tokenizer's family (a ChatGLM2 tokenizer: [eos])."""
    return family_of(tokenizer).stop_token_ids(tokenizer)


def check_same_family(base: Family, checkpoint: str | Path) -> None:
    """Refuse a P-tuning checkpoint trained on another family (the prefix shapes match, so it would load)."""
    recorded = recorded_family(checkpoint)
    if recorded is not None and recorded != base.name:
        raise GlmtuneError(
            f"{checkpoint}: P-tuning checkpoint of a {recorded} model, but the base model is {base.name} "
            f"(pass the {recorded} base model, or --family if the base folder was detected wrongly)"
        )
