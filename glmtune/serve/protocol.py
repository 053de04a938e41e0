"""OpenAI request bodies: validation, chat messages -> the ChatGLM2 prompt, and sampling settings.

Follows THUDM/ChatGLM2-6B `openai_api.py` where it speaks: the last message must be the user's; a
leading system message is put in front of the current query; user/assistant pairs before it are the
history; absent `temperature` / `top_p` default to 0.95 / 0.7. The prompt itself is built by
`glmtune.chat.build_chat_prompt`, the function `glmtune chat` uses, so a greedy answer equals
`glmtune chat --query` for the same history (oldest rounds dropped the same way when they do not fit).

Deliberate differences: `temperature: 0` means greedy (the official server treats 0 as unset); a
malformed conversation is a 400 instead of being silently dropped; `stop`, `seed` and `n: 1` are
supported; sampling keeps top_k 50 as `glmtune chat` does. Fields OpenAI defines but this server does
not implement are accepted only at their neutral value (`n: 1`, penalties 0, `logprobs: false`), and
`user` is ignored; any other field is a 400 naming it.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from glmtune import chat as chat_lib
from glmtune.errors import GlmtuneError
from glmtune.serve.scheduler import SamplingParams

DEFAULT_TEMPERATURE = 0.95  # official openai_api.py
DEFAULT_TOP_P = 0.7  # official openai_api.py
TOP_K = 50  # what `glmtune chat` samples with (transformers 4.30's default)
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


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None  # accepted and ignored, as OpenAI's optional participant name

    def text(self) -> str:
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
        elif first["type"] == "literal_error" and param in ("n", "presence_penalty", "frequency_penalty", "logprobs"):
            message = f"{param}: only {first['ctx']['expected']} is supported, found {first['input']!r}"
        else:
            message = f"{param}: {first['msg']}"
        raise ApiError(400, message, param=param) from None


def split_messages(messages: list[Message]) -> tuple[str, list[tuple[str, str]]]:
    """(query, history) as the official openai_api.py reads them, but a malformed conversation is an error."""
    msgs = list(messages)
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


def chat_prompt_ids(tokenizer, req: ChatRequest, window: int, max_tokens_cap: int) -> list[int]:
    if chat_lib.is_glm3(tokenizer):
        # ChatGLM3 has roles: the system prompt and every message go to the model as they are.
        if req.messages[-1].role != "user":
            raise ApiError(400, f"the last message must have role 'user', found {req.messages[-1].role!r}",
                           param="messages")
        query, history = req.messages[-1].text(), [{"role": m.role, "content": m.text()} for m in req.messages[:-1]]
    else:
        query, history = split_messages(req.messages)
    room = answer_room(req, window, max_tokens_cap)
    try:
        return chat_lib.build_chat_prompt(tokenizer, query, history, window=window, answer_room=room).input_ids
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
