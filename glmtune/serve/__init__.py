"""`glmtune serve`: an OpenAI-compatible HTTP server and a web chat page for ChatGLM2 + P-tuning v2.

Modules, top-down:

* `models`    — load one frozen base and any number of P-tuning checkpoints onto it (served model ids);
* `scheduler` — continuous batching over the model's forward with a KV cache, one prefix per row;
  no HTTP in it, so it is tested without a socket;
* `protocol`  — OpenAI request validation, chat messages -> the ChatGLM2 prompt (via `glmtune.inference.chat`);
* `api`       — the FastAPI app (routes, errors in OpenAI's JSON shape, SSE streaming, the page);
* `page.html` — the chat page served at `/` (no external files).

Reproduces the endpoints of THUDM/ChatGLM2-6B `openai_api.py` (which serves only the base model, one
request at a time); differs in serving P-tuning adapters, batching concurrent requests, and `stop`/`seed`.
"""
