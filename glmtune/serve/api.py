"""The HTTP layer: FastAPI routes in OpenAI's shapes over the scheduler, SSE streaming, the chat page.

Endpoints: `GET /` (the page), `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions`. Errors use OpenAI's JSON shape `{"error": {"message", "type", "param",
"code"}}`: malformed JSON or a bad field 400, wrong/missing bearer token 401, unknown model or route
404, body over the limit 413. A client that disconnects (mid-stream or while waiting for a
non-streamed answer) cancels its request, which frees its batch row at the next step.

The request body is read here rather than by FastAPI's parameter binding so that the size limit is
enforced while reading, and so that every validation error comes out in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmtune.inference import chat as chat_lib
from glmtune.errors import GlmtuneError
from glmtune.serve import protocol
from glmtune.serve.protocol import ApiError
from glmtune.serve.scheduler import Event, Request as GenRequest, Scheduler

DEFAULT_MAX_BODY_BYTES = 1_000_000
# The page loads nothing from elsewhere; the policy makes the browser enforce it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
}


def create_app(
    served,
    scheduler: Scheduler,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_new_tokens: int = 1024,
    max_length: int = chat_lib.DEFAULT_MAX_LENGTH,
) -> FastAPI:
    """The app for `served` (`glmtune.serve.models.ServedModels`) decoded by a started `scheduler`."""
    app = FastAPI(title="glmtune serve", docs_url=None, redoc_url=None, openapi_url=None)
    window = chat_lib.context_window(served.model, max_length)
    created = int(time.time())
    page = resources.files("glmtune.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind=kind).body(), status_code=exc.status_code)

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
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON body: {exc}") from None

    def adapter_for(name: str) -> str:
        if name not in served.adapters:
            raise ApiError(404, f"model {name!r} does not exist; available: {', '.join(served.adapters)}",
                           param="model", code="model_not_found")
        return name

    # --- plain routes ---

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(served.adapters), "active_rows": scheduler.active_rows,
                "stats": dict(scheduler.stats)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        data = []
        for name, adapter in served.adapters.items():
            card = {"id": name, "object": "model", "created": created, "owned_by": "glmtune",
                    "pre_seq_len": adapter.pre_seq_len}
            if name != served.base_name:
                card["parent"] = served.base_name
            data.append(card)
        return {"object": "list", "data": data}

    # --- generation ---

    async def generate(request: Request, req, prompt_ids: list[int], postprocess, shape) -> object:
        params = protocol.sampling(req, len(prompt_ids), window, max_new_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def notify(event: Event) -> None:  # called on the scheduler thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        handle = scheduler.submit(GenRequest(prompt_ids=prompt_ids, adapter=req.model, params=params,
                                             notify=notify, postprocess=postprocess, window=window))
        if req.stream:
            return StreamingResponse(stream(events, handle, req, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, events, handle, req, shape)

    async def complete(request, events, handle, req, shape):
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
        if event.finish_reason in ("error", "cancelled"):
            raise ApiError(500, f"generation failed: {event.error or 'server shutting down'}", kind="server_error")
        return shape.full("".join(parts), event, tool_call(req, event))

    def tool_call(req, event: Event) -> dict | None:
        """The reply as a call of one of the request's tools (ChatGLM3 with `tools` only), else None."""
        names = getattr(req, "tool_names", list)()
        if not names or event.finish_reason not in ("stop", "length"):
            return None
        ids = event.token_ids[:-1] if event.token_ids and event.token_ids[-1] in scheduler.stop_ids else event.token_ids
        return protocol.reply_tool_call(served.tokenizer.decode(ids), names, served.tokenizer)

    async def stream(events, handle, req, shape):
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
                if event.finish_reason in ("error", "cancelled"):
                    err = ApiError(500, f"generation failed: {event.error or 'server shutting down'}", kind="server_error")
                    yield sse(err.body())
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
        req = protocol.parse(protocol.ChatRequest, await read_json(request))
        adapter_for(req.model)
        ids = protocol.chat_prompt_ids(served.tokenizer, req, window, max_new_tokens)
        return await generate(request, req, ids, chat_lib.process_response, _ChatShape(req.model))

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = protocol.parse(protocol.CompletionRequest, await read_json(request))
        adapter_for(req.model)
        ids = protocol.completion_prompt_ids(served.tokenizer, req, window)
        return await generate(request, req, ids, lambda text: text, _CompletionShape(req.model))

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


def run_server(
    model_path,
    *,
    adapters=None,
    ptuning_checkpoint=None,
    served_name: str | None = None,
    quantization_bit: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_length: int = chat_lib.DEFAULT_MAX_LENGTH,
    max_new_tokens: int = 1024,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
) -> None:
    """Load the models and serve until interrupted: the model on this (main) thread, HTTP on another.

    See `Scheduler.run` for why the model stays on the thread that loaded it. uvicorn installs no signal
    handlers off the main thread, so SIGINT and SIGTERM are handled here: both stop the decode loop and
    then the HTTP server (which gets `timeout_graceful_shutdown` seconds for open streams).
    """
    import signal

    import uvicorn

    from glmtune.serve.models import load_served_models

    served = load_served_models(model_path, adapters=adapters, ptuning_checkpoint=ptuning_checkpoint,
                                served_name=served_name, quantization_bit=quantization_bit, dtype=dtype, device=device)
    scheduler = Scheduler(served.model, served.tokenizer, served.adapters, served.stop_ids, max_batch_size)
    app = create_app(served, scheduler, api_key=api_key, max_body_bytes=max_body_bytes,
                     max_new_tokens=max_new_tokens, max_length=max_length)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="glmtune-http", daemon=True)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    http.start()
    try:
        while not server.started and http.is_alive():
            time.sleep(0.05)
        if not server.started:  # uvicorn has logged why (e.g. the port is in use)
            raise GlmtuneError(f"the HTTP server did not start on {host}:{port}; see the message above")
        names = ", ".join(f"{n} (prefix {a.pre_seq_len})" if a.pre_seq_len else n for n, a in served.adapters.items())
        print(f"glmtune serve: models {names}; http://{host}:{port}/ (page), http://{host}:{port}/v1 (API)", flush=True)
        scheduler.run(keep_running=http.is_alive)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        scheduler.close()
        server.should_exit = True
        http.join(timeout=15)
