"""`GET /metrics` in the Prometheus text format (prometheus_client), and the one-line access log.

Each app has its own registry (several servers can live in one test process). The engine reports
tokens and finished requests through `EngineObserver`; the HTTP status of every request is counted by
`AccessLog`, which also writes one log line per request: method, path, model, status, tokens, seconds.
No prompt text unless the server was started with `--log-prompts`.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ACCESS_LOG = logging.getLogger("glmtune.serve.access")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("glmtune_requests", "HTTP requests by model and status code", ["model", "status"],
                                registry=r)
        self.prompt_tokens = Counter("glmtune_prompt_tokens", "Prompt tokens of finished requests", ["model"], registry=r)
        self.generated_tokens = Counter("glmtune_generation_tokens", "Generated tokens of finished requests", ["model"],
                                        registry=r)
        self.errors = Counter("glmtune_errors", "Requests ended by an error, by where it happened", ["kind"], registry=r)
        self.queue_depth = Gauge("glmtune_queue_depth", "Requests waiting for a batch row", registry=r)
        self.running_rows = Gauge("glmtune_running_rows", "Requests decoding in the batch", registry=r)
        self.ttft = Histogram("glmtune_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("glmtune_inter_token_latency_seconds", "Between two tokens of one request",
                                     buckets=LATENCY_BUCKETS, registry=r)

    def watch(self, engine) -> None:
        """Queue depth and running rows are read from the engine when scraped."""
        self.queue_depth.set_function(lambda: engine.waiting)
        self.running_rows.set_function(lambda: engine.active_rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineObserver:
    """What the engine tells the metrics (called on the engine thread; it never raises into the engine)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def first_token(self, request, seconds: float) -> None:
        self.metrics.ttft.observe(seconds)

    def token_gap(self, request, seconds: float) -> None:
        self.metrics.inter_token.observe(seconds)

    def finished(self, request, event) -> None:
        self.metrics.prompt_tokens.labels(request.adapter).inc(event.prompt_tokens)
        self.metrics.generated_tokens.labels(request.adapter).inc(event.completion_tokens)
        if event.finish_reason == "error":
            self.metrics.errors.labels(event.error_kind or "unknown").inc()


class AccessLog:
    """ASGI middleware: counts every HTTP request by model and status and logs one line when its body ends.

    A route fills `request.state.access` (a dict: model, prompt_tokens, completion_tokens, prompt) when it
    knows them; a streamed answer is logged when its last chunk has gone, not when its headers did."""

    def __init__(self, app, metrics: Metrics, log_prompts: bool = False):
        self.app, self.metrics, self.log_prompts = app, metrics, log_prompts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        info: dict = {}
        scope.setdefault("state", {})["access"] = info
        status = [500]

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._log(scope, info, status[0], time.perf_counter() - started)

        try:
            await self.app(scope, receive, logged_send)
        except BaseException:
            if not info.get("logged"):
                self._log(scope, info, status[0], time.perf_counter() - started)
            raise

    def _log(self, scope, info: dict, status: int, seconds: float) -> None:
        if info.get("logged"):
            return
        info["logged"] = True
        path = scope.get("path", "")
        if path in ("/health", "/metrics"):  # probes and scrapes: counted, not logged
            self.metrics.requests.labels(info.get("model", ""), str(status)).inc()
            return
        self.metrics.requests.labels(info.get("model", ""), str(status)).inc()
        line = (f'{scope.get("method", "")} {path} model={info.get("model", "-")} status={status} '
                f'prompt_tokens={info.get("prompt_tokens", 0)} completion_tokens={info.get("completion_tokens", 0)} '
                f'finish={info.get("finish", "-")} seconds={seconds:.3f}')
        if self.log_prompts and "prompt" in info:
            line += f" prompt={info['prompt']!r}"
        ACCESS_LOG.info(line)
