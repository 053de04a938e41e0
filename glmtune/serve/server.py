"""`glmtune serve`'s process: HTTP up first (`/health` 503 while the model loads), the model and the engine on
the main thread, graceful drain on SIGTERM / SIGINT.

Drain: the first signal makes the server refuse new generations (503, and 503 on /health so a load
balancer stops sending), lets the running requests finish for up to `drain_timeout` seconds, ends the
rest with a final error event (streams get an SSE error, then `[DONE]`), closes HTTP and exits 0. A
second signal exits at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

from glmtune.errors import GlmtuneError
from glmtune.inference import chat as chat_lib
from glmtune.serve.api import DEFAULT_MAX_BODY_BYTES, RETRY_AFTER_SECONDS, create_app
from glmtune.serve.protocol import ApiError


class Gate:
    """ASGI app that answers 503 (OpenAI's shape) until `ready(app)` hands it the real app."""

    def __init__(self):
        self.app = None

    def ready(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "lifespan":  # nothing to start: answer the lifespan protocol
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        body = json.dumps(ApiError(503, "the model is loading", kind="server_error", code="loading").body()).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_SECONDS).encode())]})
        await send({"type": "http.response.body", "body": body})


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
    max_queue: int = 256,
    request_timeout: float = 600.0,
    drain_timeout: float = 30.0,
    prefill_chunk: int = 512,
    prefix_cache_tokens: int = 16384,
    log_prompts: bool = False,
    log_level: str = "info",
) -> None:
    """Serve until a signal: HTTP on its own thread, the model on this (main) thread (see `Engine.run`).

    uvicorn installs no signal handlers off the main thread, so SIGINT and SIGTERM are handled here."""
    import uvicorn

    from glmtune.serve.engine import Engine
    from glmtune.serve.metrics import EngineObserver, Metrics
    from glmtune.serve.models import load_served_models

    logging.getLogger("glmtune.serve.access").setLevel(getattr(logging, log_level.upper(), logging.INFO))
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    gate = Gate()
    server = uvicorn.Server(uvicorn.Config(gate, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="glmtune-http", daemon=True)
    signals = {"count": 0, "deadline": None}

    def on_signal(signum, frame):
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(128 + signum)  # a second signal: at once
        signals["deadline"] = time.monotonic() + drain_timeout
        if gate.app is not None:
            gate.app.state.draining = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    http.start()
    try:
        while not server.started and http.is_alive():
            time.sleep(0.05)
        if not server.started:  # uvicorn has logged why (e.g. the port is in use)
            raise GlmtuneError(f"the HTTP server did not start on {host}:{port}; see the message above")
        served = load_served_models(model_path, adapters=adapters, ptuning_checkpoint=ptuning_checkpoint,
                                    served_name=served_name, quantization_bit=quantization_bit, dtype=dtype,
                                    device=device)
        metrics = Metrics()
        engine = Engine(served.model, served.tokenizer, served.adapters, served.stop_ids, max_batch_size,
                        max_queue=max_queue, prefill_chunk=prefill_chunk, prefix_cache_tokens=prefix_cache_tokens,
                        observer=EngineObserver(metrics))
        app = create_app(served, engine, api_key=api_key, max_body_bytes=max_body_bytes,
                         max_new_tokens=max_new_tokens, max_length=max_length, request_timeout=request_timeout,
                         metrics=metrics, log_prompts=log_prompts)
        app.state.draining = signals["count"] > 0
        if signals["count"] == 0:
            gate.ready(app)
            names = ", ".join(f"{n} (prefix {a.pre_seq_len})" if a.pre_seq_len else n for n, a in served.adapters.items())
            print(f"glmtune serve: models {names}; http://{host}:{port}/ (page), http://{host}:{port}/v1 (API)",
                  flush=True)

            def keep_running() -> bool:
                if not http.is_alive():
                    return False
                if signals["deadline"] is None:
                    return True
                return engine.live > 0 and time.monotonic() < signals["deadline"]

            engine.run(keep_running=keep_running)  # returns after ending every live request with a final event
            deadline = time.monotonic() + 5  # let the HTTP side send those final events
            while engine.live and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        server.should_exit = True
        http.join(timeout=15)
        for s, handler in previous.items():  # only now: a second signal while HTTP closes still exits at once
            signal.signal(s, handler)
