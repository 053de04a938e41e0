"""OpenAI request bodies: validation, chat messages -> the ChatGLM2 prompt, and sampling settings.

Follows THUDM/ChatGLM2-6B `openai_api.py` where it speaks: the last message must be the user's; a
leading system message is put in front of the current query; user/assistant pairs before it are the
history; absent `temperature` / `top_p` default to 0.95 / 0.7. The prompt itself is built by
`glmtune.inference.chat.build_chat_prompt`, the function `glmtune chat` uses, so a greedy answer equals
`glmtune chat --query` for the same history (oldest rounds dropped the same way when they do not fit).

Deliberate differences: `temperature: 0` means greedy (the official server treats 0 as unset); a
malformed conversation is a 400 instead of being silently dropped; `stop`, `seed` and `n: 1` are
supported; sampling keeps top_k 50 as `glmtune chat` does. Fields OpenAI defines but this server does
not implement are accepted only at their neutral value (`n: 1`, penalties 0, `logprobs: false`), and
`user` is ignored; any other field is a 400 naming it.

ChatGLM3 models (see `glm3_messages`): roles go to the model as they are; OpenAI `tools` become the
official system-message `tools` (`{name, description, parameters}`, under the official default system
text when the request has no system message), an assistant's `tool_calls` the official assistant
metadata + `tool_call(...)` text, a `tool` message an observation. A reply that the official parsing
reads as a call of an offered tool comes back as `tool_calls` (`reply_tool_call`); it is parsed, never
executed. `tool_choice` is accepted only as "auto". ChatGLM2 has no tool format: `tools` is a 400.
Which reading applies is the model family's chat format (`REQUEST_READERS`: "rounds" or "roles").
"""

from __future__ import annotations

import json
import keyword
import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from glmtune.inference import chat as chat_lib
from glmtune.errors import GlmtuneError
from glmtune.families.registry import family_of
from glmtune.families.chatglm3.chat import DEFAULT_TOOLS_SYSTEM, parse_response
from glmtune.serve.request import SamplingParams

DEFAULT_TEMPERATURE = 0.95  # official openai_api.py
DEFAULT_TOP_P = 0.7  # official openai_api.py
TOP_K = 50  # what `glmtune chat` samples with (transformers 4.30's default)
MAX_STOP = 4  # as OpenAI
MAX_DEPTH = 64  # JSON nesting a request may have (tool parameter schemas included)
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is a 64-bit integer


class ApiError(Exception):
    """An error returned to the client in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # accepted; the model is not constrained either way


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None  # None only on an assistant message with tool_calls
    name: str | None = None  # accepted and ignored, as OpenAI's optional participant name
    tool_calls: list[ToolCall] | None = None  # assistant only
    tool_call_id: str | None = None  # tool only; ChatGLM3 observations carry no id, so it is not used

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: StrictInt | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: StrictBool = False
    stream_options: dict | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[False, None] = None
    user: str | None = None  # ignored

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, found {len(stops)}")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", None] = None  # the model decides; forcing or forbidding a call is not implemented

    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or ()]


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    echo: Literal[False] = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(f"one prompt per request (found {len(value)}); send several requests instead")
            return value[0]
        return value


def decode_json(body: bytes):
    """The request body as JSON; anything JSON allows but a request must not carry is a 400 naming where it is."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise ApiError(400, f"request body nested too deeply (at most {MAX_DEPTH} levels)") from None
    check_values(data)
    return data


def check_values(data) -> None:
    """Depth at most MAX_DEPTH, strings encodable as UTF-8 (no unpaired surrogates such as "\\ud800"), numbers
    finite (Python's JSON reader accepts NaN and Infinity). Iterative: a deep body must not exhaust the stack."""
    todo = [(data, ())]
    while todo:
        value, path = todo.pop()
        where = ".".join(str(p) for p in path) or None
        if len(path) > MAX_DEPTH:
            raise ApiError(400, f"{where}: nested too deeply (at most {MAX_DEPTH} levels)", param=path[0])
        if isinstance(value, dict):
            for key, item in value.items():
                if not _utf8(key):
                    raise ApiError(400, f"{where or 'body'}: a key is not valid Unicode (unpaired surrogate)",
                                   param=where)
                todo.append((item, (*path, key)))
        elif isinstance(value, list):
            todo.extend((item, (*path, i)) for i, item in enumerate(value))
        elif isinstance(value, str) and not _utf8(value):
            raise ApiError(400, f"{where}: not valid Unicode (an unpaired surrogate such as \\ud800)", param=where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ApiError(400, f"{where}: expected a finite number, found {value}", param=where)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse(model_cls: type[BaseModel], data) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, found {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unsupported field {param!r} (this server does not implement it)"
        elif first["type"] == "missing":
            message = f"missing required field {param!r}"
        elif first["type"] == "literal_error" and param in ("n", "presence_penalty", "frequency_penalty", "logprobs",
                                                            "tool_choice"):
            message = f"{param}: only {first['ctx']['expected']} is supported, found {first['input']!r}"
        else:
            message = f"{param}: {first['msg']}"
        raise ApiError(400, message, param=param) from None


def check_messages(messages: list[Message]) -> None:
    """Field combinations pydantic cannot express: content null only with tool_calls, which only the assistant sends."""
    for i, m in enumerate(messages):
        if m.tool_calls is not None and m.role != "assistant":
            raise ApiError(400, f"messages.{i}: tool_calls only on an assistant message, found role {m.role!r}",
                           param=f"messages.{i}.tool_calls")
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"messages.{i}.content: expected a string (null only on an assistant message "
                           "with tool_calls)", param=f"messages.{i}.content")


def split_messages(messages: list[Message]) -> tuple[str, list[tuple[str, str]]]:
    """(query, history) as the official openai_api.py reads them, but a malformed conversation is an error."""
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if m.role == "tool" or m.tool_calls:
            raise ApiError(400, f"messages.{i}: tool calls and tool results need a ChatGLM3 model (this one is "
                           "ChatGLM2, which has no tool format)", param=f"messages.{i}")
    if msgs[-1].role != "user":
        raise ApiError(400, f"the last message must have role 'user', found {msgs[-1].role!r}", param="messages")
    query = msgs.pop().text()
    if msgs and msgs[0].role == "system":
        query = msgs.pop(0).text() + query
    if len(msgs) % 2:
        raise ApiError(400, "before the last message, expected user/assistant pairs (after an optional leading "
                       f"system message); found {len(msgs)} messages", param="messages")
    history = []
    for i in range(0, len(msgs), 2):
        roles = (msgs[i].role, msgs[i + 1].role)
        if roles != ("user", "assistant"):
            raise ApiError(400, f"messages {i}, {i + 1}: expected roles ('user', 'assistant'), found {roles}",
                           param="messages")
        history.append((msgs[i].text(), msgs[i + 1].text()))
    return query, history


def answer_room(req: _Common, window: int, max_tokens_cap: int) -> int:
    """Tokens kept for the answer when fitting the prompt: `max_tokens` (capped), else what `glmtune chat` keeps."""
    room = req.max_tokens or min(chat_lib.DEFAULT_ANSWER_ROOM, max(1, window // 4))
    return min(room, max_tokens_cap, window - 1)


def openai_tools_to_glm3(tools: list[Tool]) -> list[dict]:
    """OpenAI function specs -> the official ChatGLM3 tool dicts `{name, description, parameters}`."""
    out = []
    for tool in tools:
        spec = {"name": tool.function.name}
        if tool.function.description is not None:
            spec["description"] = tool.function.description
        if tool.function.parameters is not None:
            spec["parameters"] = tool.function.parameters
        out.append(spec)
    return out


def tool_call_text(call: ToolCall, where: str) -> str:
    """The assistant text ChatGLM3 writes for a call (after its metadata line): ` ```python\ntool_call(k=v, ...)\n````.

    The leading space is in the official model's replies (and the official demos' histories); without it
    the fence tokenizes differently from what the model generated.
    The values are Python literals (`repr`) because that is what the model writes and `glm3.parse_tool_call`
    reads back; JSON `true`/`null` become `True`/`None`.
    """
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"{where}.function.arguments: invalid JSON ({exc.msg})", param=where) from None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"{where}.function.arguments: expected a JSON object, found {type(arguments).__name__}",
                       param=where)
    bad = [k for k in arguments if not (k.isidentifier() and not keyword.iskeyword(k))]
    if bad:
        raise ApiError(400, f"{where}.function.arguments: argument names must be identifiers, found {bad[0]!r}",
                       param=where)
    return " ```python\ntool_call(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")\n```"


def glm3_messages(req: ChatRequest) -> list[dict]:
    """The request's OpenAI messages as ChatGLM3 messages (what the official openai_api_demo does with them):
    `tools` go on the system message (a default one is added when there is none), an assistant's
    `tool_calls` become assistant messages with the tool name as metadata, a `tool` result an observation."""
    out: list[dict] = []
    for i, m in enumerate(req.messages):
        if m.role == "tool":
            out.append({"role": "observation", "content": m.text()})
        elif m.role == "assistant" and m.tool_calls:
            if m.text():
                out.append({"role": "assistant", "content": m.text()})
            for j, call in enumerate(m.tool_calls):
                out.append({"role": "assistant", "metadata": call.function.name,
                            "content": tool_call_text(call, f"messages.{i}.tool_calls.{j}")})
        else:
            out.append({"role": m.role, "content": m.text()})
    if req.tools is not None:
        tools = openai_tools_to_glm3(req.tools)
        if out and out[0]["role"] == "system":
            out[0]["tools"] = tools
        else:
            out.insert(0, {"role": "system", "content": DEFAULT_TOOLS_SYSTEM, "tools": tools})
    return out


def rounds_request(req: ChatRequest) -> tuple[str, list, str]:
    """(query, history, role) of a request to a model that chats in rounds (ChatGLM2): no tool format."""
    if req.tools is not None:
        raise ApiError(400, "tools need a ChatGLM3 model; this one is ChatGLM2, which has no tool format",
                       param="tools")
    query, history = split_messages(req.messages)
    return query, history, "user"


def roles_request(req: ChatRequest) -> tuple[str, list, str]:
    """(query, history, role) of a request to a model with roles (ChatGLM3): the system prompt, tools and every
    message go to the model as they are; the query may be a tool result (an observation), which the model answers."""
    if req.messages[-1].role not in ("user", "tool"):
        raise ApiError(400, f"the last message must have role 'user' or 'tool', found {req.messages[-1].role!r}",
                       param="messages")
    messages = glm3_messages(req)
    return messages[-1]["content"], messages[:-1], messages[-1]["role"]


# How a request becomes a chat, per chat format of the model's family (`glmtune.families.registry.Family.chat_format`).
REQUEST_READERS = {"rounds": rounds_request, "roles": roles_request}


def chat_prompt_ids(tokenizer, req: ChatRequest, window: int, max_tokens_cap: int) -> list[int]:
    check_messages(req.messages)
    query, history, role = REQUEST_READERS[family_of(tokenizer).chat_format](req)
    room = answer_room(req, window, max_tokens_cap)
    try:
        return chat_lib.build_chat_prompt(tokenizer, query, history, window=window, answer_room=room,
                                          role=role).input_ids
    except GlmtuneError as exc:
        if req.tools:  # the system message with the tools must stay; it is what does not fit
            tools = len(tokenizer(json.dumps(openai_tools_to_glm3(req.tools), ensure_ascii=False))["input_ids"])
            raise ApiError(400, f"the tools are too long: their descriptions take about {tools} tokens of the window "
                           f"{window} ({room} kept for the answer); send fewer or shorter tools ({exc})",
                           param="tools", code="context_length_exceeded") from None
        raise ApiError(400, f"prompt too long: {exc}", param="messages", code="context_length_exceeded") from None


def completion_prompt_ids(tokenizer, req: CompletionRequest, window: int) -> list[int]:
    ids = tokenizer(req.prompt)["input_ids"]
    if len(ids) >= window:
        raise ApiError(400, f"prompt too long: the prompt is {len(ids)} tokens, the model's limit is {window} "
                       "(prompt and answer together)", param="prompt", code="context_length_exceeded")
    return ids


def sampling(req: _Common, prompt_len: int, window: int, max_tokens_cap: int) -> SamplingParams:
    """The request's settings, `max_tokens` capped by the server and by what the window leaves."""
    room = window - prompt_len
    wanted = req.max_tokens or room
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    return SamplingParams(
        max_tokens=max(1, min(wanted, room, max_tokens_cap)),
        temperature=temperature,
        top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
        top_k=TOP_K,
        seed=req.seed,
        stop=tuple(req.stop or ()),
    )


def reply_tool_call(raw: str, tool_names: list[str]) -> dict | None:
    """`{"name", "arguments"}` (arguments as JSON text) when a ChatGLM3 reply is a call of one of the request's tools.

    `raw` is the decoded reply (stop token removed, not stripped: a plain reply starts with a blank
    metadata line). The official parsing (`glm3.parse_response`, which never executes anything) decides;
    a call of a tool the request did not offer, or one whose literal arguments have no JSON form
    (sets, bytes, ...), is not a call: the reply then comes back as plain content.
    """
    content, _, problem = parse_response(raw, [{"role": "system", "content": "", "tools": []}])
    if problem or not isinstance(content, dict) or "parameters" not in content or content["name"] not in tool_names:
        return None
    try:
        arguments = json.dumps(content["parameters"], ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return {"name": content["name"], "arguments": arguments}


def may_become_tool_call(shown: str, tool_names: list[str]) -> bool:
    """While streaming: whether the (stripped) reply so far can still be a call, i.e. starts like `<tool name>\\n`.

    A reply that cannot is streamed at once; one that can is held until the end, when `reply_tool_call` decides.
    """
    return any((name + "\n").startswith(shown) or shown.startswith(name + "\n") for name in tool_names)
