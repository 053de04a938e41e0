"""Reading and tokenizing P-tuning data the way the official ChatGLM2-6B scripts do.

Reproduces `preprocess_function_train` / `preprocess_function_eval` in THUDM/ChatGLM2-6B `ptuning/main.py`:

* rows whose prompt or response is empty (falsy) are dropped;
* the prompt is `source_prefix + build_prompt(query, history)` encoded with `[gMASK] sop` and cut on the
  right to `max_source_length` tokens (so a long prompt loses its `答：` tail, as officially);
* training: `input_ids = prompt_ids + answer_ids[:max_target_length] + [eos]`, `labels` = -100 on the prompt,
  then the answer ids and eos; every label equal to the pad id (0, which is also `<unk>`) becomes -100,
  because the official `ignore_pad_token_for_loss` replaces by value;
* eval: `input_ids` = prompt ids; `labels` = the target encoded like the official `text_target` call
  (`[gMASK] sop` + ids, cut to `max_target_length`, pad id -> -100); `reference` keeps the full target text,
  which glmtune scores by default (the official labels are a truncated re-decoding of it).

`max_samples` follows the official `max_train_samples` / `max_eval_samples`: the first N rows *read* (empty ones
included) are kept, then empty rows are dropped, so fewer than N may remain. A preprocessed folder records which
rows it dropped, so the same N on it selects the same rows as on the raw file.

Unlike the official code nothing is padded here: `collate_train` pads right and `collate_eval` pads left per
batch, so the unpadded ids and labels are identical and batches are shorter.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the stored columns or their meaning change: it invalidates caches
META_FILE = "glmtune_data.json"
REPORT_FILE = "preprocess_report.json"
MODES = ("train", "eval")
IGNORE_INDEX = -100
MIN_ROWS_PER_WORKER = 4096


@dataclass
class DataConfig:
    """Column names and lengths; the defaults are the official ADGEN ones (`content` -> `summary`)."""

    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: str | None = None
    source_prefix: str = ""
    max_source_length: int = 64
    max_target_length: int = 128
    max_samples: int | None = None  # first N rows read, before empty ones are dropped (see the module docstring)

    def validate(self) -> None:
        # The prompt always starts with the two tokens `[gMASK] sop`; fewer than 3 leaves no text at all.
        if self.max_source_length < 3:
            raise GlmtuneError(f"max_source_length must be at least 3 ([gMASK] sop + text), got {self.max_source_length}")
        if self.max_target_length < 1:
            raise GlmtuneError(f"max_target_length must be at least 1, got {self.max_target_length}")
        if self.max_samples is not None and self.max_samples < 1:
            raise GlmtuneError(f"max_samples must be at least 1, got {self.max_samples}")


# --- reading -------------------------------------------------------------------------------------


def _text_lines(path: Path):
    """The file's lines as text, line endings kept; a UTF-8 BOM is dropped (as `utf-8-sig`).

    Decoding line by line (a UTF-8 character never contains the byte \\n) lets a non-UTF-8 file be reported
    with its line and byte offset instead of a bare UnicodeDecodeError.
    """
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise GlmtuneError(
                    f"{path}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x} at byte offset {offset + exc.start}); "
                    "save the file as UTF-8"
                ) from None
            offset += len(raw)


def _iter_records(path: Path):
    """Yield (where, record) from JSON Lines, a JSON array, or CSV; `where` is 'file:line' (or ':item N')."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        raise GlmtuneError(f"{path}: unsupported file type {suffix!r} (expected .json, .jsonl or .csv)")
    with contextlib.closing(_text_lines(path)) as lines:
        if suffix == ".csv":
            reader = csv.DictReader(lines)
            for record in reader:
                yield f"{path}:{reader.line_num}", record
            return
        head: list[str] = []  # lines up to the first non-blank one, which tells an array from JSON Lines
        for line in lines:
            head.append(line)
            if line.strip():
                break
        if "".join(head).lstrip().startswith("["):  # one JSON array of objects
            try:
                items = json.loads("".join(head) + "".join(lines))
            except json.JSONDecodeError as exc:
                raise GlmtuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            for index, record in enumerate(items):
                yield f"{path}: item {index}", record
            return
        for number, line in enumerate(itertools.chain(head, lines), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GlmtuneError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield f"{path}:{number}", record


def _text_field(where: str, record: dict, column: str) -> str | None:
    if column not in record:
        raise GlmtuneError(
            f"{where}: no column {column!r} (columns present: {sorted(record)}; choose with --prompt-column/--response-column)"
        )
    value = record[column]
    if value is not None and not isinstance(value, str):
        raise GlmtuneError(f"{where}: column {column!r} should be a string, found {type(value).__name__}")
    return value


def _history_field(where: str, record: dict, column: str) -> list[list[str]]:
    value = record.get(column)
    if isinstance(value, str) and value.strip():  # CSV cells hold the history as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise GlmtuneError(f"{where}: column {column!r} should hold a JSON list of [query, answer] pairs") from None
    if value in (None, ""):
        return []
    if not isinstance(value, list) or not all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair) for pair in value
    ):
        raise GlmtuneError(f"{where}: column {column!r} should be a list of [query, answer] string pairs, found {value!r:.80}")
    return [list(pair) for pair in value]


def load_rows(path: str | os.PathLike, config: DataConfig | None = None) -> list[dict[str, Any]]:
    """Read up to `config.max_samples` rows as {"prompt", "response", "history"} (empty ones included).

    Bad input raises GlmtuneError naming the file and line: invalid JSON, a row that is not an object,
    a missing prompt/response column (with the columns present), a non-string value, a malformed history.
    """
    config = config or DataConfig()
    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"{path}: no such file")
    rows: list[dict[str, Any]] = []
    history_seen, columns = False, None
    for where, record in _iter_records(path):
        if config.max_samples is not None and len(rows) >= config.max_samples:
            break
        if not isinstance(record, dict):
            raise GlmtuneError(f"{where}: expected a JSON object, found {type(record).__name__}")
        prompt = _text_field(where, record, config.prompt_column)
        response = _text_field(where, record, config.response_column)
        if config.history_column is not None and config.history_column in record:
            history_seen = True
        columns = columns or sorted(record)
        history = _history_field(where, record, config.history_column) if config.history_column else []
        rows.append({"prompt": prompt, "response": response, "history": history})
    if not rows:
        raise GlmtuneError(f"{path}: no data rows")
    if config.history_column is not None and not history_seen:
        # Rows without history are single-turn, but a column found in no row at all is a typo.
        raise GlmtuneError(f"{path}: no column {config.history_column!r} in any row (columns present: {columns})")
    return rows


# --- tokenizing ----------------------------------------------------------------------------------


def _is_usable(row: dict) -> bool:
    # The official filter is truthiness: "" and None are dropped, whitespace-only text is kept.
    return bool(row["prompt"] and row["response"])


def _usable(rows: Sequence[dict]) -> list[dict]:
    return [row for row in rows if _is_usable(row)]


def _encode_batch(batch: dict, tokenizer: Any, config: DataConfig, mode: str) -> dict:
    """Tokenize a batch of prompt/response texts; lengths are counted before truncation for the report."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_tokens": [], "target_tokens": []}
    if mode == "eval":
        out["reference"] = []
    prefix_ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    # Read once: attribute access on a transformers tokenizer goes through a slow __getattr__.
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    for prompt, response in zip(batch["prompt_text"], batch["response"]):
        # Encoding in full and cutting on the right equals the official `truncation=True, max_length=...`
        # (a single sequence is cut from the end; `[gMASK] sop` counts towards max_source_length).
        full_prompt = tokenizer.encode(prompt, add_special_tokens=True)
        full_answer = tokenizer.encode(response, add_special_tokens=False)
        prompt_ids = full_prompt[: config.max_source_length]
        out["prompt_tokens"].append(len(full_prompt))
        out["target_tokens"].append(len(full_answer))
        if mode == "train":
            answer_ids = full_answer[: config.max_target_length] + [eos_id]
            labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            out["input_ids"].append(prompt_ids + answer_ids)
        else:
            labels = (prefix_ids + full_answer)[: config.max_target_length]
            out["input_ids"].append(prompt_ids)
            out["reference"].append(response)
        out["labels"].append([IGNORE_INDEX if t == pad_id else t for t in labels])
    return out


def _tokenize(rows: Sequence[dict], tokenizer: Any, config: DataConfig, mode: str, num_workers: int):
    if mode not in MODES:
        raise GlmtuneError(f"mode must be one of {MODES}, got {mode!r}")
    config.validate()
    import datasets

    kept = _usable(rows)
    if not kept:
        raise GlmtuneError("every row has an empty prompt or response: nothing to tokenize")
    texts = [
        {"prompt_text": config.source_prefix + tokenizer.build_prompt(row["prompt"], row["history"]), "response": row["response"]}
        for row in kept
    ]
    dataset = datasets.Dataset.from_list(texts)
    # Each worker unpickles a copy of the tokenizer (~1 s); below a few thousand rows per worker that costs more than it saves.
    workers = max(1, min(num_workers, len(texts) // MIN_ROWS_PER_WORKER))
    return dataset.map(
        _encode_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "config": config, "mode": mode},
        remove_columns=dataset.column_names,
        num_proc=workers if workers > 1 else None,
        # Our own cache key replaces datasets' fingerprint, which would hash the whole tokenizer.
        new_fingerprint=_digest([FORMAT_VERSION, mode, asdict(config), tokenizer_fingerprint(tokenizer), len(texts)])[:32],
        desc=f"tokenizing ({mode})",
    )


def tokenize_train(rows: Sequence[dict], tokenizer: Any, config: DataConfig | None = None, num_workers: int = 1):
    """A `datasets.Dataset` with unpadded `input_ids`, `labels` (+ `prompt_tokens`, `target_tokens` lengths)."""
    return _tokenize(rows, tokenizer, config or DataConfig(), "train", num_workers)


def tokenize_eval(rows: Sequence[dict], tokenizer: Any, config: DataConfig | None = None, num_workers: int = 1):
    """A `datasets.Dataset` with unpadded prompt `input_ids`, official `labels`, full `reference` text, lengths."""
    return _tokenize(rows, tokenizer, config or DataConfig(), "eval", num_workers)


def eval_references(dataset, tokenizer: Any, official_truncation: bool = False) -> list[str]:
    """The texts predictions are scored against: the full reference, or (official) the decoded cut labels."""
    if not official_truncation:
        return list(dataset["reference"])
    # As the official compute_metrics: -100 back to pad, decode skipping special tokens.
    return [
        tokenizer.decode([t if t != IGNORE_INDEX else tokenizer.pad_token_id for t in ids], skip_special_tokens=True)
        for ids in dataset["labels"]
    ]


# --- batching ------------------------------------------------------------------------------------


def _padded_length(lengths: list[int], pad_to_multiple_of: int | None) -> int:
    longest = max(lengths)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def collate_train(
    features: Sequence[dict], pad_token_id: int = 0, label_pad_id: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None
) -> dict:
    """Right-pad a training batch to its longest row: `input_ids`, `attention_mask`, `labels`, `position_ids`.

    Position ids are 0..L-1 on every row, as the official model builds them for unpadded-on-the-left
    training batches; with right padding the real tokens never see the padding, so their outputs and the
    loss are the same as with the official fixed-length padding.
    """
    import torch

    lengths = [len(f["input_ids"]) for f in features]
    width = _padded_length(lengths, pad_to_multiple_of)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), label_pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, (feature, n) in enumerate(zip(features, lengths)):
        input_ids[i, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    position_ids = torch.arange(width, dtype=torch.long).expand(len(features), width).clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}


def collate_eval(features: Sequence[dict], pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> dict:
    """Left-pad prompts for generation, as the official tokenizer's batch call: positions 0.. on real tokens, 0 on pads."""
    import torch

    lengths = [len(f["input_ids"]) for f in features]
    width = _padded_length(lengths, pad_to_multiple_of)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    position_ids = torch.zeros((len(features), width), dtype=torch.long)
    for i, (feature, n) in enumerate(zip(features, lengths)):
        input_ids[i, width - n :] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[i, width - n :] = 1
        position_ids[i, width - n :] = torch.arange(n)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


# --- report --------------------------------------------------------------------------------------


def _percentiles(values: list[int]) -> dict[str, float]:
    import numpy as np

    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1), "max": int(max(values))}


def build_report(rows: Sequence[dict], dataset, config: DataConfig, mode: str, source: str | os.PathLike) -> dict:
    """Rows read/skipped, untruncated token lengths, and how many prompts/targets the limits cut."""
    empty_prompt = sum(1 for row in rows if not row["prompt"])
    empty_response = sum(1 for row in rows if row["prompt"] and not row["response"])
    prompt_tokens = list(dataset["prompt_tokens"])
    target_tokens = list(dataset["target_tokens"])
    # Eval labels carry `[gMASK] sop` inside max_target_length (the official text_target call); train answers don't.
    overhead = 2 if mode == "eval" else 0
    prompts_cut = sum(1 for n in prompt_tokens if n > config.max_source_length)
    targets_cut = sum(1 for n in target_tokens if n + overhead > config.max_target_length)
    kept = len(prompt_tokens)
    return {
        "source": str(source),
        "mode": mode,
        "rows_read": len(rows),
        "rows_kept": kept,
        "rows_skipped": {"empty_prompt": empty_prompt, "empty_response": empty_response, "total": len(rows) - kept},
        "max_source_length": config.max_source_length,
        "max_target_length": config.max_target_length,
        "prompt_tokens": _percentiles(prompt_tokens),
        "target_tokens": _percentiles(target_tokens),
        "prompts_truncated": prompts_cut,  # each of them lost its `答：` tail
        "prompts_truncated_pct": round(100 * prompts_cut / kept, 2),
        "targets_truncated": targets_cut,
        "targets_truncated_pct": round(100 * targets_cut / kept, 2),
        "target_rule": "answer ids cut to max_target_length" if mode == "train"
        else "official labels ([gMASK] sop + ids) cut to max_target_length; the full reference text is kept",
    }


def format_report(report: dict) -> str:
    p, t = report["prompt_tokens"], report["target_tokens"]
    lines = [
        f"{report['source']} ({report['mode']}): {report['rows_read']} rows read, {report['rows_kept']} kept, "
        f"{report['rows_skipped']['total']} skipped (empty prompt {report['rows_skipped']['empty_prompt']}, "
        f"empty response {report['rows_skipped']['empty_response']})",
        f"{'tokens':<8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'limit':>8}{'cut':>8}{'cut %':>8}",
        f"{'prompt':<8}{p['p50']:>8}{p['p90']:>8}{p['p99']:>8}{p['max']:>8}{report['max_source_length']:>8}"
        f"{report['prompts_truncated']:>8}{report['prompts_truncated_pct']:>8}",
        f"{'target':<8}{t['p50']:>8}{t['p90']:>8}{t['p99']:>8}{t['max']:>8}{report['max_target_length']:>8}"
        f"{report['targets_truncated']:>8}{report['targets_truncated_pct']:>8}",
    ]
    return "\n".join(lines)


# --- saving, loading, caching --------------------------------------------------------------------


def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the SentencePiece model the tokenizer runs (what decides the ids)."""
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is not None:
        return hashlib.sha256(sp_model.serialized_model_proto()).hexdigest()
    return hashlib.sha256(Path(tokenizer.vocab_file).read_bytes()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
}


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
    if meta.get("mode") not in MODES:
        raise bad("mode", f"one of {MODES}", meta.get("mode"))
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
    unknown, missing = sorted(set(stored) - set(_CONFIG_TYPES)), sorted(set(_CONFIG_TYPES) - set(stored))
    if unknown or missing:
        problem = f"has unknown setting(s) {unknown}" if unknown else f"lacks setting(s) {missing}"
        raise GlmtuneError(f"{file}: field 'config' {problem} (expected {sorted(_CONFIG_TYPES)}); preprocess again")
    for name, types in _CONFIG_TYPES.items():
        if not isinstance(stored[name], types) or isinstance(stored[name], bool):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise GlmtuneError(f"{file}: field 'config.{name}' should be {expected}, "
                               f"found {type(stored[name]).__name__} ({stored[name]!r:.40})")
    config = DataConfig(**stored)
    try:
        config.validate()
    except GlmtuneError as exc:
        raise GlmtuneError(f"{file}: field 'config': {exc}") from None
    return {**meta, "config": config}


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
    config = config or DataConfig()
    source, output_dir = Path(source), Path(output_dir)
    _check_output_dir(output_dir)
    rows = load_rows(source, config)
    dataset = _tokenize(rows, tokenizer, config, mode, num_workers)
    report = build_report(rows, dataset, config, mode, source)
    meta = {
        "format": FORMAT_VERSION, "mode": mode, "config": asdict(config), "source": str(source),
        "source_sha256": _file_sha256(source), "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        # Which rows read were dropped as empty: lets a later max_samples pick rows as on the raw file.
        "skipped_rows": [i for i, row in enumerate(rows) if not _is_usable(row)],
    }
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        dataset.save_to_disk(str(tmp))
        (tmp / REPORT_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if output_dir.exists():  # a directory cannot be replaced in one step: move the old one aside first
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
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
    config = config or DataConfig()
    source = Path(source)
    if source.is_dir():
        dataset, report, meta = load_preprocessed(source, tokenizer, mode, config.max_samples)
        differing = {
            k: (v, getattr(config, k)) for k, v in asdict(meta["config"]).items()
            if k != "max_samples" and getattr(config, k) != v  # max_samples is applied, not a stored setting
        }
        if differing:
            logger.warning("%s was preprocessed with other settings; using the stored ones: %s", source, differing)
        return dataset, report
    if not source.is_file():
        raise GlmtuneError(f"{source}: no such file or dataset folder")
    config.validate()
    key = _digest([FORMAT_VERSION, mode, asdict(config), tokenizer_fingerprint(tokenizer), _file_sha256(source)])
    entry = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = entry / f"{source.stem}-{mode}-{key[:16]}"
    if not is_preprocessed(entry):
        preprocess(source, tokenizer, entry, config, mode, num_workers)
    else:
        logger.info("using cached tokenized data %s", entry)
    dataset, report, _ = load_preprocessed(entry, tokenizer, mode)
    return dataset, report
