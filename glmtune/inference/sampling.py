"""Sampling defaults, written once for every command and the server (no imports: `glmtune --help` reads them).

* `glmtune chat` and the Python `chat` / `stream_chat`: the official `chat()` of THUDM/chatglm2-6b samples
  with top_p 0.8, temperature 0.8, and top_k 50 (transformers 4.30's default, which it inherited;
  transformers 5 has none, so it is passed explicitly), in a window of 8192 tokens.
* `glmtune eval --do-sample` and `glmtune serve` when a request leaves them out: top_p 0.7, temperature
  0.95, as the official `ptuning/evaluate.sh` and `openai_api.py`.
"""

CHAT_TOP_P = 0.8
CHAT_TEMPERATURE = 0.8
TOP_K = 50
DEFAULT_MAX_LENGTH = 8192

OFFICIAL_TOP_P = 0.7
OFFICIAL_TEMPERATURE = 0.95
