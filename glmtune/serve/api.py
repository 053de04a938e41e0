"""The HTTP layer: FastAPI routes in OpenAI's shapes over the engine, SSE streaming, the chat page.

Endpoints: `GET /` (the page), `GET /health`, `GET /metrics`, `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions`. Errors use OpenAI's JSON shape `{"error": {"message", "type", "param",
"code"}}`: malformed JSON or a bad field 400, wrong/missing bearer token 401, unknown model or route
404, body over the limit 413, queue full 429 (with `Retry-After`), draining 503. A request the engine
could not finish is a 500 (a 504 past the request timeout, a 503 when the server stopped first); when
streaming, the error comes as one SSE event, then `[DONE]`. A client that disconnects (mid-stream or
while waiting for a non-streamed answer) cancels its request, which frees its batch row at the next step.

The request body is read here rather than by FastAPI's parameter binding so that the size limit is
enforced while reading, and so that every validation error comes out in OpenAI's shape.

Threads: the routes run on the HTTP thread, which alone uses `served.tokenizer` (prompts in, tool calls
out); the engine decodes text with its own copy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmtune.inference import chat as chat_lib
from glmtune.serve import protocol
from glmtune.serve.metrics import CONTENT_TYPE, AccessLog, Metrics
from glmtune.serve.output import CHAT_RULES, RAW
from glmtune.serve.protocol import ApiError
from glmtune.serve.request import Event, Request as GenRequest
from glmtune.serve.scheduler import QueueFull

DEFAULT_MAX_BODY_BYTES = 1_000_000
RETRY_AFTER_SECONDS = 1
# The page loads nothing from elsewhere; the policy makes the browser enforce it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
}
# A final error event -> (HTTP status, OpenAI error type) for a non-streamed answer.
ERROR_STATUS = {"timeout": (504, "timeout"), "shutdown": (503, "server_error")}


def final_error(event: Event) -> ApiError:
    status, kind = ERROR_STATUS.get(event.error_kind or "", (500, "server_error"))
    if event.finish_reason == "cancelled":
        return ApiError(500, "generation cancelled", kind="server_error", code="cancelled")
    return ApiError(status, f"generation failed: {event.error}", kind=kind, code=event.error_kind)


def create_app(
    served,
    engine,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_new_tokens: int = 1024,
    max_length: int = chat_lib.DEFAULT_MAX_LENGTH,
    request_timeout: float | None = None,
    metrics: Metrics | None = None,
    log_prompts: bool = False,
) -> FastAPI:
    """The app for `served` (`glmtune.serve.models.ServedModels`) decoded by a running `engine`.

    `app.state.draining = True` makes it refuse new generations (503) and answer 503 on /health."""
    app = FastAPI(title="glmtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    metrics = metrics or Metrics()
    app.state.metrics = metrics
    if hasattr(engine, "stats"):
        metrics.watch(engine)
    app.add_middleware(AccessLog, metrics=metrics, log_prompts=log_prompts)
    window = chat_lib.context_window(served.model, max_length)
    created = int(time.time())
    page = resources.files("glmtune.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status in (429, 503):
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind=kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):  # a bug must still answer in OpenAI's shape
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", kind="authentication_error")

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"request body is {declared} bytes, the limit is {max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise ApiError(413, f"request body over the {max_body_bytes}-byte limit")
        return protocol.decode_json(bytes(body))

    def adapter_for(name: str) -> str:
        if name not in served.adapters:
            raise ApiError(404, f"model {name!r} does not exist; available: {', '.join(served.adapters)}",
                           param="model", code="model_not_found")
        return name

    def accepting() -> None:
        if app.state.draining:
            raise ApiError(503, "the server is shutting down; retry on another replica", kind="server_error",
                           code="draining")

    # --- plain routes ---

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        body = {"status": "draining" if app.state.draining else "ok", "models": list(served.adapters),
                "active_rows": engine.active_rows, "waiting": getattr(engine, "waiting", 0),
                "stats": dict(engine.stats)}
        return JSONResponse(body, status_code=503 if app.state.draining else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        data = []
        for name, adapter in served.adapters.items():
            card = {"id": name, "object": "model", "created": created, "owned_by": "glmtune",
                    "pre_seq_len": adapter.pre_seq_len if adapter is not None else 0}
            if name != served.base_name:
                card["parent"] = served.base_name
            data.append(card)
        return {"object": "list", "data": data}

    # --- generation ---

    async def generate(request: Request, req, prompt_ids: list[int], rules, shape) -> object:
        params = protocol.sampling(req, len(prompt_ids), window, max_new_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        access = request.scope["state"].get("access", {})
        access.update(model=req.model, prompt_tokens=len(prompt_ids))
        if log_prompts:
            access["prompt"] = served.tokenizer.decode(prompt_ids)

        def notify(event: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        deadline = time.monotonic() + request_timeout if request_timeout else None
        try:
            handle = engine.submit(GenRequest(prompt_ids=prompt_ids, adapter=req.model, params=params, notify=notify,
                                              postprocess=rules, window=window, deadline=deadline))
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry in a moment", kind="rate_limit_error",
                           code="rate_limit_exceeded") from None
        if req.stream:
            return StreamingResponse(stream(events, handle, req, shape, access), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, events, handle, req, shape, access)

    def record(access: dict, event: Event) -> None:
        access.update(completion_tokens=event.completion_tokens, finish=event.finish_reason)

    async def complete(request, events, handle, req, shape, access):
        parts: list[str] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return JSONResponse({}, status_code=499)
                    continue
                parts.append(event.text)
                if event.finish_reason is not None:
                    break
        except asyncio.CancelledError:
            handle.cancel()
            raise
        record(access, event)
        if event.finish_reason in ("error", "cancelled"):
            raise final_error(event)
        return shape.full("".join(parts), event, tool_call(req, event))

    def tool_call(req, event: Event) -> dict | None:
        """The reply as a call of one of the request's tools (ChatGLM3 with `tools` only), else None."""
        names = getattr(req, "tool_names", list)()
        if not names or event.finish_reason not in ("stop", "length"):
            return None
        ids = event.token_ids[:-1] if event.token_ids and event.token_ids[-1] in engine.stop_ids else event.token_ids
        return protocol.reply_tool_call(served.tokenizer.decode(ids), names, served.tokenizer)

    async def stream(events, handle, req, shape, access):
        names = getattr(req, "tool_names", list)()
        held: list[str] | None = [] if names else None  # text held back while the reply may become a tool call
        try:
            first = True
            while True:
                event = await events.get()
                if first:  # sent once the first token exists, so clients can time to first token by it
                    yield sse(shape.chunk(role=True))
                    first = False
                if held is not None and event.text:
                    held.append(event.text)
                    if not protocol.may_become_tool_call("".join(held), names):
                        event.text, held = "".join(held), None  # a plain reply: send what was held, then stream
                if event.text and held is None:
                    yield sse(shape.chunk(text=event.text))
                if event.finish_reason is None:
                    continue
                record(access, event)
                if event.finish_reason in ("error", "cancelled"):
                    yield sse(final_error(event).body())
                else:
                    call = tool_call(req, event)
                    if call is not None:
                        yield sse(shape.chunk(call=call))
                    elif held:
                        yield sse(shape.chunk(text="".join(held)))
                    yield sse(shape.chunk(finish="tool_calls" if call else event.finish_reason))
                    if req.include_usage():
                        yield sse(shape.usage_chunk(event))
                yield "data: [DONE]\n\n"
                return
        finally:  # normal end, or the client went away (the task is cancelled / the generator closed)
            handle.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        accepting()
        req = protocol.parse(protocol.ChatRequest, await read_json(request))
        adapter_for(req.model)
        ids = protocol.chat_prompt_ids(served.tokenizer, req, window, max_new_tokens)
        return await generate(request, req, ids, CHAT_RULES, _ChatShape(req.model))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        accepting()
        req = protocol.parse(protocol.CompletionRequest, await read_json(request))
        adapter_for(req.model)
        ids = protocol.completion_prompt_ids(served.tokenizer, req, window)
        return await generate(request, req, ids, RAW, _CompletionShape(req.model))

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


class _ChatShape:
    """`chat.completion` and `chat.completion.chunk` objects for one request."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, event: Event, call: dict | None = None) -> dict:
        message = {"role": "assistant", "content": text}
        if call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [self._call(call)]}
        return {**self._base("chat.completion"), "usage": _usage(event), "choices": [{
            "index": 0, "message": message, "finish_reason": "tool_calls" if call else event.finish_reason,
            "logprobs": None}]}

    def _call(self, call: dict) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]}}

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None, call: dict | None = None) -> dict:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        if call is not None:  # OpenAI's streamed call: one delta with the whole call (index 0), content null
            delta = {"content": None, "tool_calls": [{"index": 0, **self._call(call)}]}
        return {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def usage_chunk(self, event: Event) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": _usage(event)}


class _CompletionShape(_ChatShape):
    """`text_completion` objects (streamed chunks have the same object name, as OpenAI's)."""

    def __init__(self, model: str):
        super().__init__(model)
        self.id = f"cmpl-{uuid.uuid4().hex}"

    def full(self, text: str, event: Event, call: dict | None = None) -> dict:
        return {**self._base("text_completion"), "usage": _usage(event), "choices": [{
            "index": 0, "text": text, "finish_reason": event.finish_reason, "logprobs": None}]}

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None, call: dict | None = None) -> dict:
        return {**self._base("text_completion"),
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    def usage_chunk(self, event: Event) -> dict:
        return {**self._base("text_completion"), "choices": [], "usage": _usage(event)}
