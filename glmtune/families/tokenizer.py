"""Load the tokenizer of a model or checkpoint folder: the folder's family (`glmtune.families.registry`) builds it.

Each family package holds its own tokenizer (`glmtune.families.chatglm2.tokenizer`, `...chatglm3.tokenizer`,
`...glm4.tokenizer`); this loader resolves the family once and records its name on the tokenizer, where every
command finds it again (`glmtune.families.registry.family_of`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.families.family import TOKENIZER_FILE  # noqa: F401 (the file name model folders are searched for)
from glmtune.families.registry import resolve_family


def load_tokenizer(path: str | Path, family: Any = None) -> Any:
    """The tokenizer of a model or checkpoint folder (or its `tokenizer.model` file given directly).

    The family is `family` (a name or `Family`) when given, else detected from the folder. Only the vocabulary
    file (`tokenizer.model`) and the family's own settings are read: the official tokenizer_config.json files
    name remote code, which glmtune never runs.
    """
    path = Path(path)
    return resolve_family(path, family).load_tokenizer(path)
