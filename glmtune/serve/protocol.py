"""OpenAI request bodies: validation, chat messages -> the model's prompt, and sampling settings.

Follows THUDM/ChatGLM2-6B `openai_api.py` where it speaks: absent `temperature` / `top_p` default to 0.95 / 0.7.
How the messages become a conversation (the history, the query and its role) is the model family's
`Family.read_request` (ChatGLM2: the last message is the user's, a leading system message goes in front of the
query, user/assistant pairs before it are the history). The prompt itself is built by
`glmtune.inference.chat.build_chat_prompt`, the function `glmtune chat` uses, so a greedy answer equals
`glmtune chat --query` for the same history (oldest rounds dropped the same way when they do not fit).

Deliberate differences: `temperature: 0` means greedy (the official server treats 0 as unset); a
malformed conversation is a 400 instead of being silently dropped; `stop`, `seed` and `n: 1` are
supported; sampling keeps top_k 50 as `glmtune chat` does. Fields OpenAI defines but this server does
not implement are accepted only at their neutral value (`n: 1`, penalties 0, `logprobs: false`), and
`user` is ignored; any other field is a 400 naming it.

Tools: the family maps OpenAI `tools`, an assistant's `tool_calls` and `tool` messages to its own format (ChatGLM3:
system-message tools and `tool_call(...)` text; GLM-4: the chat template's tool block and observation turns); a reply
the family reads as a call of an offered tool comes back as `tool_calls` (`reply_tool_call`); it is parsed, never
executed. `tool_choice` is accepted only as "auto". ChatGLM2 has no tool format: `tools` is a 400.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from glmtune.inference import chat as chat_lib
from glmtune.errors import GlmtuneError
from glmtune.families.family import RequestError
from glmtune.families.registry import family_of
from glmtune.inference.sampling import OFFICIAL_TEMPERATURE as DEFAULT_TEMPERATURE  # official openai_api.py
from glmtune.inference.sampling import OFFICIAL_TOP_P as DEFAULT_TOP_P
from glmtune.inference.sampling import TOP_K  # what `glmtune chat` samples with
from glmtune.serve.scheduler import SamplingParams

MAX_STOP = 4  # as OpenAI


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
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
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


def answer_room(req: _Common, window: int, max_tokens_cap: int) -> int:
    """Tokens kept for the answer when fitting the prompt: `max_tokens` (capped), else what `glmtune chat` keeps."""
    room = req.max_tokens or min(chat_lib.DEFAULT_ANSWER_ROOM, max(1, window // 4))
    return min(room, max_tokens_cap, window - 1)


def plain_messages(messages: list[Message]) -> list[dict]:
    """OpenAI messages as the plain dicts a family's request reader takes: role, content text, and for an assistant's
    calls `tool_calls` [{name, arguments (JSON text)}]."""
    out = []
    for m in messages:
        message = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls]
        out.append(message)
    return out


def plain_tools(tools: list[Tool] | None) -> list[dict] | None:
    """OpenAI function specs as `{name, description?, parameters?}` (what the GLM tool formats describe)."""
    if tools is None:
        return None
    out = []
    for tool in tools:
        spec = {"name": tool.function.name}
        if tool.function.description is not None:
            spec["description"] = tool.function.description
        if tool.function.parameters is not None:
            spec["parameters"] = tool.function.parameters
        out.append(spec)
    return out


def chat_prompt_ids(tokenizer, req: ChatRequest, window: int, max_tokens_cap: int) -> list[int]:
    check_messages(req.messages)
    try:  # the model family reads the conversation (`Family.read_request`): its roles, tools and tool results
        query, history, role = family_of(tokenizer).read_request(plain_messages(req.messages), plain_tools(req.tools))
    except RequestError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    room = answer_room(req, window, max_tokens_cap)
    try:
        return chat_lib.build_chat_prompt(tokenizer, query, history, window=window, answer_room=room,
                                          role=role).input_ids
    except GlmtuneError as exc:
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


def reply_tool_call(raw: str, tool_names: list[str], tokenizer) -> dict | None:
    """`{"name", "arguments"}` (arguments as JSON text) when the decoded reply `raw` is a call of one of the request's
    tools, as the model family reads its replies (`Family.reply_tool_call`); parsed, never executed. Anything else
    (a call of a tool the request did not offer, arguments with no JSON form) is None: plain content."""
    return family_of(tokenizer).reply_tool_call(raw, tool_names)


def may_become_tool_call(shown: str, tool_names: list[str]) -> bool:
    """While streaming: whether the (stripped) reply so far can still be a call, i.e. starts like `<tool name>\\n`.

    A reply that cannot is streamed at once; one that can is held until the end, when `reply_tool_call` decides.
    """
    return any((name + "\n").startswith(shown) or shown.startswith(name + "\n") for name in tool_names)
