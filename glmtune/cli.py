"""The `glmtune` command line: a thin Typer layer over the library functions.

Every command imports its module lazily, so `glmtune --help` starts without importing torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from glmtune.errors import GlmtuneError

app = typer.Typer(
    help="Fine-tune ChatGLM2-6B with P-tuning v2: preprocess, train, eval, chat, merge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# --- init-model (tiny) ---


# --- preprocess / train (data, train) ---


# --- eval / score (evaluate, metrics) ---


# --- chat / merge (chat, merge) ---


# --- quantize (quantization) ---


def main() -> None:
    try:
        app()
    except GlmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
