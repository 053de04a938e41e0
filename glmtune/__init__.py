"""glmtune: P-tuning v2 for ChatGLM2-6B on transformers' native GLM model.

The public API is imported lazily so that `glmtune --help` and `import glmtune` stay light
(no torch import until a model is actually needed).
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "glmtune.loading",
    "save_model": "glmtune.loading",
    "load_tokenizer": "glmtune.tokenizer",
    "chat": "glmtune.chat",
    "stream_chat": "glmtune.chat",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glmtune' has no attribute {name!r}")
