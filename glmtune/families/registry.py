"""The model families glmtune knows, and which one a folder or a tokenizer belongs to.

Every difference between ChatGLM2-6B, ChatGLM3-6B and GLM-4 (and their variants) is a field or method of the
family's `Family` record (`glmtune.families.family`), built by the family's package:

* `glmtune.families.chatglm2`: SentencePiece tokenizer, the `[Round N]\\n\\n问：...\\n\\n答：` prompt, stops on `</s>`,
  (query, answer) rounds, prompt/response data, no tools; `rope_ratio` divides the positions (chatglm2-6b-32k);
* `glmtune.families.chatglm3`: the same tokenizer plus four role tokens, role messages with tools, stops on `</s>`,
  `<|user|>`, `<|observation|>`, its own conversation data rules; `rope_ratio` multiplies the rotary base;
* `glmtune.families.glm4`: the tiktoken tokenizer of GLM-4-9B-chat, its jinja chat template, JSON tool calls and the
  official demo's `{"messages": [...]}` data.

The family is resolved once, when the tokenizer is loaded (`glmtune.families.tokenizer.load_tokenizer` records its
name on the tokenizer), and every command asks `family_of(tokenizer)`; no command branches on a family's name
(tests/test_family_dispatch.py checks). A family of your own is a package that builds a `Family` and calls
`glmtune.families.family.register` when imported; import it before the commands run.

A folder's family: the one recorded in config.json (`glmtune_family`, written into every P-tuning checkpoint and
merged model glmtune saves) or in a glmtune tokenizer_config.json; else the first family whose detector recognises
the official files (families registered beyond the built-ins first, then GLM-4, whose tokenizer_config.json also names
role tokens, then ChatGLM3); else ChatGLM2. `--family` overrides. The official releases do not record a family: a
folder with no tokenizer (e.g. a bare 32k weight folder) needs `--family chatglm3` to be read as ChatGLM3.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError
from glmtune.families import chatglm2, chatglm3, glm4  # each registers its Family when imported
from glmtune.families.family import FAMILIES, FAMILY_FIELD, Family

CHATGLM2, CHATGLM3, GLM4 = chatglm2.CHATGLM2, chatglm3.CHATGLM3, glm4.GLM4
DEFAULT_FAMILY = CHATGLM2
# Asked in this order after any family registered beyond these (newest first): GLM-4's files also name role tokens.
BUILTIN_DETECTION = (GLM4, CHATGLM3)


def get_family(name: str | Family | None) -> Family:
    """The registered family called `name` (None: the default, ChatGLM2)."""
    if isinstance(name, Family):
        return name
    if name is None:
        return DEFAULT_FAMILY
    if name not in FAMILIES:
        raise GlmtuneError(f"--family: expected one of {sorted(FAMILIES)}, found {name!r}")
    return FAMILIES[name]


def recorded_family(folder: str | Path) -> str | None:
    """The family a glmtune-written folder records in its config.json, if any."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # reported properly by whoever reads the config
    value = cfg.get(FAMILY_FIELD) if isinstance(cfg, dict) else None
    if value is not None and value not in FAMILIES:
        raise GlmtuneError(f"{cfg_file}: field {FAMILY_FIELD}: expected one of {sorted(FAMILIES)}, found {value!r}")
    return value


def _saved_tokenizer_family(folder: Path) -> str | None:
    """The family a tokenizer saved by glmtune records in its tokenizer_config.json."""
    try:
        saved = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get(FAMILY_FIELD)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return saved if saved in FAMILIES else None


def detect_family(folder: str | Path) -> Family:
    """The family of a model, checkpoint or tokenizer folder (see the module docstring for the rule)."""
    folder = Path(folder)
    if folder.is_file():  # a tokenizer.model given directly: its folder's files decide
        folder = folder.parent
    recorded = recorded_family(folder) or _saved_tokenizer_family(folder)
    if recorded:
        return FAMILIES[recorded]
    others = [f for f in reversed(FAMILIES.values()) if f not in (*BUILTIN_DETECTION, DEFAULT_FAMILY)]
    for family in (*others, *BUILTIN_DETECTION):
        if family.detects(folder):
            return family
    return DEFAULT_FAMILY


def resolve_family(folder: str | Path | None, override: str | Family | None = None) -> Family:
    """`--family` when given, else what the folder says. `--family` is meant for folders that say nothing (a bare
    download); overriding a folder that names a family with other role tokens is allowed, but said loudly: the
    tokenizer then gains or loses role tokens the model was not trained with."""
    if override is None:
        return detect_family(folder) if folder is not None else DEFAULT_FAMILY
    family = get_family(override)
    stated = _stated_family(Path(folder)) if folder is not None else None
    if stated is not None and FAMILIES[stated[0]].tokenizer_loader is not family.tokenizer_loader:
        logging.getLogger(__name__).warning(
            "--family %s overrides %s, which is a %s model (%s): its tokenizer and prompts become %s's, which that "
            "model was not trained with; drop --family unless the folder is mislabelled", family.name, folder,
            stated[0], stated[1], family.name)
    return family


def _stated_family(folder: Path) -> tuple[str, str] | None:
    """(family, where the folder says so) when it names its family outright: a glmtune-written config.json or
    tokenizer_config.json, or the official release name; None when only the default fallback would apply."""
    folder = folder.parent if folder.is_file() else folder
    recorded = recorded_family(folder)
    if recorded:
        return recorded, f"config.json {FAMILY_FIELD} {recorded!r}"
    for name, keys in (("tokenizer_config.json", (FAMILY_FIELD, "name_or_path")), ("config.json", ("_name_or_path",))):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        for key in keys:
            value = data.get(key) if isinstance(data, dict) else None
            found = value if value in FAMILIES else next((f for f in FAMILIES if isinstance(value, str)
                                                          and f in value.lower()), None)
            if found:
                return found, f"{name} {key} {value!r}"
    return None


def family_of(tokenizer: Any) -> Family:
    """The family a glmtune tokenizer belongs to (what `load_tokenizer` detected or was told)."""
    return get_family(getattr(tokenizer, "family", None))


def stop_ids_for(tokenizer: Any) -> list[int]:
    """Stop ids of the tokenizer's family (a ChatGLM2 tokenizer: [eos])."""
    return family_of(tokenizer).stop_token_ids(tokenizer)


def read_history(data: Any, source: str) -> list:
    """A chat history read from JSON (`glmtune chat --history-file`): [query, answer] rounds, or messages
    {role, content, ...}. Which of the two it is, is the data's shape; here each entry's shape is checked, naming
    `source` and the entry, and the model's family checks that the history fits it when chatting."""
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        for i, message in enumerate(data):
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise GlmtuneError(f"{source}[{i}]: field {key}: expected a string, found "
                                       f"{type(message.get(key)).__name__}")
        return [dict(message) for message in data]
    return chatglm2.chat.normalize_history(data, source)


def check_same_family(base: Family, checkpoint: str | Path) -> None:
    """Refuse a P-tuning checkpoint trained on another family (the prefix shapes may match, so it would load)."""
    recorded = recorded_family(checkpoint)
    if recorded is not None and recorded != base.name:
        raise GlmtuneError(
            f"{checkpoint}: P-tuning checkpoint of a {recorded} model, but the base model is {base.name} "
            f"(pass the {recorded} base model, or --family if the base folder was detected wrongly)"
        )
