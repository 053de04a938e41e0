"""Tokenized P-tuning data on disk: `glmtune preprocess` folders and the cache of tokenized raw files.

THUDM/ChatGLM2-6B `ptuning/main.py` tokenizes inside every run: `datasets.load_dataset` reads the raw file and
`Dataset.map(..., num_proc=preprocessing_num_workers, load_from_cache_file=not overwrite_cache)` reuses an
earlier result from datasets' own cache. This module reproduces that tokenize-once-and-reuse with a cache key of
its own, and adds a separate, inspectable preprocessing step; the ids themselves come from `glmtune.data.preprocess`.

* `preprocess` writes a folder: the Arrow dataset, `glmtune_data.json` (format version, mode, settings, sha256 of
  the source and of the tokenizer model, rows dropped as empty) and `preprocess_report.json`; it is built in a
  temp folder and renamed into place, so a failed run leaves nothing half-written.
* `read_meta` / `load_preprocessed` check a folder (format, mode, tokenizer, settings) before it is used, so a
  stale or foreign folder is one clear error instead of wrong ids. The recorded dropped rows let `max_samples`
  on a folder keep the same rows as on the raw file (the official rule: first N rows read, then empty ones dropped).
* `load_or_build_dataset` takes a folder or a raw file; a raw file is tokenized once into a cache entry keyed by
  the file's content, the tokenizer model, the settings and the mode. `FORMAT_VERSION` is part of every key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

# FORMAT_VERSION, digest and tokenizer_fingerprint live in glmtune.data.preprocess (tokenize keys datasets' cache with them).
from glmtune.data.preprocess import (  # noqa: F401 (FORMAT_VERSION, digest re-exported)
    FORMAT_VERSION, TOKENIZE_MODES, DataConfig, build_report, digest, is_usable, load_rows, tokenize, tokenizer_fingerprint,
    with_family,
)
from glmtune.errors import GlmtuneError
from glmtune.fsutil import atomic_dir

logger = logging.getLogger(__name__)

META_FILE = "glmtune_data.json"
REPORT_FILE = "preprocess_report.json"


# --- fingerprints --------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


# --- reading a folder ----------------------------------------------------------------------------


def is_preprocessed(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise GlmtuneError(f"{file}: missing; preprocess again")
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise GlmtuneError(f"{file}: not UTF-8 text; preprocess again") from None
    except json.JSONDecodeError as exc:
        raise GlmtuneError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); preprocess again") from None


# What each stored DataConfig field may hold (bool is excluded from int: JSON `true` is not a length).
_CONFIG_TYPES = {
    "prompt_column": (str,), "response_column": (str,), "history_column": (str, type(None)), "source_prefix": (str,),
    "max_source_length": (int,), "max_target_length": (int,), "max_samples": (int, type(None)),
    "family": (str,), "glm3_rules": (str,), "max_seq_length": (int, type(None)),
    "data_format": (str,), "train_on": (str,),  # glmtune.data.formats
    "combine": (bool,),  # GLM-4 data (glmtune.families.glm4.data)
}
# Settings added with the ChatGLM3 family and the data formats; folders written before them are ChatGLM2
# column data trained on each turn.
_CONFIG_DEFAULTS = {"family": "chatglm2", "glm3_rules": "2023", "max_seq_length": None,
                    "data_format": "columns", "train_on": "each-turn", "combine": True}


def read_meta(path: str | os.PathLike) -> dict:
    """The checked `glmtune_data.json` of a folder written by `preprocess`; `meta["config"]` is a DataConfig.

    A missing, corrupt or foreign file raises GlmtuneError naming the file and the field (expected vs found).
    """
    path = Path(path)
    file = path / META_FILE
    if not file.is_file():
        raise GlmtuneError(f"{path}: not a glmtune dataset folder (no {META_FILE}; make one with `glmtune preprocess`)")
    meta = _read_json(file)
    if not isinstance(meta, dict):
        raise GlmtuneError(f"{file}: expected a JSON object, found {type(meta).__name__}")

    def bad(field: str, expected: str, found: Any = None) -> GlmtuneError:
        found = "nothing" if found is None and field not in meta else repr(found)
        return GlmtuneError(f"{file}: field {field!r} should be {expected}, found {found}; preprocess again")

    if meta.get("format") != FORMAT_VERSION:  # first: an older layout may fail the checks below for no real fault
        raise bad("format", str(FORMAT_VERSION), meta.get("format"))
    if meta.get("mode") not in TOKENIZE_MODES:
        raise bad("mode", f"one of {TOKENIZE_MODES}", meta.get("mode"))
    sha = meta.get("tokenizer_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise bad("tokenizer_sha256", "a sha256 hex string", sha)
    skipped = meta.get("skipped_rows")
    if not (isinstance(skipped, list) and all(type(i) is int and i >= 0 for i in skipped)
            and all(a < b for a, b in zip(skipped, skipped[1:]))):
        raise bad("skipped_rows", "increasing row numbers", skipped)
    stored = meta.get("config")
    if not isinstance(stored, dict):
        raise bad("config", "an object of settings", stored)
    if isinstance(stored, dict):
        stored = {**_CONFIG_DEFAULTS, **stored}
    unknown, missing = sorted(set(stored) - set(_CONFIG_TYPES)), sorted(set(_CONFIG_TYPES) - set(stored))
    if unknown or missing:
        problem = f"has unknown setting(s) {unknown}" if unknown else f"lacks setting(s) {missing}"
        raise GlmtuneError(f"{file}: field 'config' {problem} (expected {sorted(_CONFIG_TYPES)}); preprocess again")
    for name, types in _CONFIG_TYPES.items():
        if not isinstance(stored[name], types) or isinstance(stored[name], bool) and bool not in types:
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise GlmtuneError(f"{file}: field 'config.{name}' should be {expected}, "
                               f"found {type(stored[name]).__name__} ({stored[name]!r:.40})")
    config = DataConfig(**stored)
    try:
        config.validate()
    except GlmtuneError as exc:
        raise GlmtuneError(f"{file}: field 'config': {exc}") from None
    return {**meta, "config": config}


# --- writing, loading, caching -------------------------------------------------------------------


def _check_output_dir(output_dir: Path) -> None:
    # Checked before any tokenizing, so a wrong path fails at once rather than after minutes of work.
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise GlmtuneError(f"{folder}: exists and is not a folder")
            break
    if output_dir.is_dir() and any(output_dir.iterdir()) and not is_preprocessed(output_dir):
        raise GlmtuneError(f"{output_dir}: exists and is not a glmtune dataset folder; refusing to overwrite it")


def preprocess(
    source: str | os.PathLike, tokenizer: Any, output_dir: str | os.PathLike, config: DataConfig | None = None,
    mode: str = "train", num_workers: int = 1,
) -> dict:
    """Tokenize a raw file into `output_dir` (Arrow dataset + meta + report), atomically; returns the report.

    An existing glmtune dataset folder at `output_dir` is replaced; any other non-empty folder is refused.
    """
    config = with_family(config or DataConfig(), tokenizer)
    source, output_dir = Path(source), Path(output_dir)
    _check_output_dir(output_dir)
    rows = load_rows(source, config)
    dataset = tokenize(rows, tokenizer, config, mode, num_workers)
    report = build_report(rows, dataset, config, mode, source)
    meta = {
        "format": FORMAT_VERSION, "mode": mode, "config": asdict(config), "source": str(source),
        "source_sha256": _file_sha256(source), "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        # Which rows read were dropped as empty: lets a later max_samples pick rows as on the raw file.
        "skipped_rows": [i for i, row in enumerate(rows) if not is_usable(row)],
    }
    with atomic_dir(output_dir) as tmp:  # a failed or killed run leaves the old folder or none, never half of one
        dataset.save_to_disk(str(tmp))
        (tmp / REPORT_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report


def _first_samples(dataset, skipped_rows: list[int], max_samples: int | None):
    """The kept rows among the first `max_samples` rows read (the raw-file rule), from the stored kept rows."""
    if max_samples is None:
        return dataset
    count = max_samples - sum(1 for i in skipped_rows if i < max_samples)
    return dataset if count >= len(dataset) else dataset.select(range(max(count, 0)))


def load_preprocessed(
    path: str | os.PathLike, tokenizer: Any | None = None, mode: str | None = None, max_samples: int | None = None,
):
    """(dataset, report, meta) of a folder written by `preprocess`, checking its mode and tokenizer.

    `max_samples` keeps the rows the same number would keep on the raw file; `meta` is `read_meta`'s.
    """
    import datasets

    path = Path(path)
    meta = read_meta(path)
    if mode is not None and meta["mode"] != mode:
        raise GlmtuneError(f"{path}: tokenized for {meta['mode']!r}, but {mode!r} data is needed (preprocess with --mode {mode})")
    if tokenizer is not None and meta["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer):
        raise GlmtuneError(f"{path}: tokenized with a different tokenizer.model than the model's; preprocess again")
    report = _read_json(path / REPORT_FILE)
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise GlmtuneError(f"{path}: dataset files missing ({exc}); preprocess again") from None
    return _first_samples(dataset, meta["skipped_rows"], max_samples), report, meta


def _report_lacks_cut_answers(entry: Path, mode: str) -> bool:
    # Entries cached before the report counted the answer tokens cut are built again, so the warning is never missed.
    try:
        return mode == "train" and "answers_cut" not in _read_json(entry / REPORT_FILE)
    except GlmtuneError:
        return True


def default_cache_dir() -> Path:
    root = os.environ.get("GLMTUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glmtune"
    return Path(root) / "datasets"


def load_or_build_dataset(
    source: str | os.PathLike, tokenizer: Any, config: DataConfig | None = None, mode: str = "train",
    cache_dir: str | os.PathLike | None = None, num_workers: int = 1,
):
    """(dataset, report) for a preprocessed folder, or for a raw file tokenized once and cached.

    The cache entry is keyed by the file's content, the tokenizer model, the settings and the mode, so an
    edited file or a changed flag builds a new entry and an unchanged one is reused. A folder keeps the
    settings it was made with; only `config.max_samples` applies to it, by the raw-file rule.
    """
    config = with_family(config or DataConfig(), tokenizer)
    source = Path(source)
    if source.is_dir():
        dataset, report, meta = load_preprocessed(source, tokenizer, mode, config.max_samples)
        differing = {
            k: (v, getattr(config, k)) for k, v in asdict(meta["config"]).items()
            if k != "max_samples" and getattr(config, k) != v  # max_samples is applied, not a stored setting
            # ChatGLM3 rules / max_seq_length are `preprocess` options: left at their defaults they ask nothing
            and not (k in _CONFIG_DEFAULTS and getattr(config, k) == _CONFIG_DEFAULTS[k])
        }
        if differing:
            logger.warning("%s was preprocessed with other settings; using the stored ones: %s", source, differing)
        return dataset, report
    if not source.is_file():
        raise GlmtuneError(f"{source}: no such file or dataset folder")
    config.validate()
    key = digest([FORMAT_VERSION, mode, asdict(config), tokenizer_fingerprint(tokenizer), _file_sha256(source)])
    entry = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = entry / f"{source.stem}-{mode}-{key[:16]}"
    if not is_preprocessed(entry) or _report_lacks_cut_answers(entry, mode):
        preprocess(source, tokenizer, entry, config, mode, num_workers)
    else:
        logger.info("using cached tokenized data %s", entry)
    dataset, report, _ = load_preprocessed(entry, tokenizer, mode)
    # The entry is shared by every file with this content (other checkouts, copies): it records the path
    # of whichever was tokenized first, so report the path the caller gave.
    return dataset, {**report, "source": str(source)}
