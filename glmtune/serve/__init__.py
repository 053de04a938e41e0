"""`glmtune serve`: an OpenAI-compatible HTTP server and a web chat page for ChatGLM + P-tuning v2.

Modules, top-down (docs/serving.md has the whole picture):

* `models`    — load one frozen base and any number of P-tuning checkpoints onto it (served model ids);
* `request`   — a request, its sampling settings and the events it receives;
* `scheduler` — decides each step's plan (who leaves, who is prefilled, whether rows decode);
* `runner`    — the batch's KV cache, one prefix per row, chunked prefill, the prompt-prefix cache;
* `sampler`   — greedy / temperature / top-k / top-p per row, on transformers' warpers;
* `output`    — incremental detokenization, post-processing, stop strings, finish reasons;
* `engine`    — the loop tying them on the model's thread; every request gets one final event;
* `protocol`  — OpenAI request validation, chat messages -> the prompt (via `glmtune.inference.chat`);
* `metrics`   — Prometheus metrics and the access log;
* `api`       — the FastAPI app (routes, errors in OpenAI's JSON shape, SSE streaming, the page);
* `server`    — the process: HTTP first, model loading, graceful drain on signals;
* `page.html` — the chat page served at `/` (no external files).

Reproduces the endpoints of THUDM/ChatGLM2-6B `openai_api.py` (which serves only the base model, one
request at a time); differs in serving P-tuning adapters, batching concurrent requests, and `stop`/`seed`.
"""
