"""glmtune: P-tuning v2 for the ChatGLM family (ChatGLM2, ChatGLM3, 32k) on transformers' native GLM model.

The public API is imported lazily so that `glmtune --help` and `import glmtune` stay light
(no torch import until a model is actually needed).

`chat` names both a public function and the submodule `glmtune.chat` that defines it. Importing a
submodule normally sets the package attribute to the module, so `from glmtune import chat` would give
the module (and `chat(...)` a TypeError). The package's module class below keeps public function names
from being overwritten by their submodules: `glmtune.chat` is always the function; the module stays
reachable as `from glmtune.chat import ...` or `importlib.import_module("glmtune.chat")`.
"""

from __future__ import annotations

import sys
import types

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


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the import system binding a submodule over a public function of the same name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
