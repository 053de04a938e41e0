"""glmtune: P-tuning v2 for the ChatGLM family (ChatGLM2, ChatGLM3, 32k) on transformers' native GLM model.

The public API is imported lazily so that `glmtune --help` and `import glmtune` stay light
(no torch import until a model is actually needed).
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "glmtune.model.loading",
    "save_model": "glmtune.model.loading",
    "load_tokenizer": "glmtune.families.tokenizer",
    "chat": "glmtune.inference.chat",
    "stream_chat": "glmtune.inference.chat",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glmtune' has no attribute {name!r}")
