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
included) are kept, then empty rows are dropped, so fewer than N may remain.

Unlike the official code nothing is padded here: `collate_train` pads right and `collate_eval` pads left per
batch, so the unpadded ids and labels are identical and batches are shorter.

Saving tokenized rows to disk (`glmtune preprocess` folders, the raw-file cache) is `glmtune.data.store`;
alpaca / sharegpt records and `--train-on all-turns` rows are `glmtune.data.formats`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from glmtune.data import formats as data_formats
from glmtune.data.formats import IGNORE_INDEX, answers_cut, length_percentiles  # defined once, in the module below this one
from glmtune.errors import GlmtuneError
from glmtune.families.registry import get_family
from glmtune.fsutil import iter_records

TOKENIZE_MODES = ("train", "eval")  # what `tokenize` builds: training rows or eval prompts + references
MIN_ROWS_PER_WORKER = 4096
FORMAT_VERSION = 2  # of tokenized data (glmtune.data.store); bump when the stored columns or their meaning change


def digest(parts: Any) -> str:
    """sha256 of JSON-encodable `parts` (keys sorted), for cache keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the SentencePiece model the tokenizer runs (what decides the ids), and of its family:
    ChatGLM3 ships the same tokenizer.model as ChatGLM2 but other prompt ids."""
    sp_model = getattr(tokenizer, "sp_model", None)
    hasher = hashlib.sha256(sp_model.serialized_model_proto() if sp_model is not None
                            else Path(tokenizer.vocab_file).read_bytes())
    family = getattr(tokenizer, "family", "chatglm2")
    if family != "chatglm2":  # ChatGLM2 fingerprints stay what they were
        hasher.update(family.encode())
    return hasher.hexdigest()


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
    # The model family (set from the tokenizer by `with_family`); ChatGLM3 data is `glmtune.families.chatglm3.data`, with
    # the 2023 or 2024 ("finetune-hf") rules of the official demo and its conversation length limit.
    family: str = "chatglm2"
    glm3_rules: str = "2023"
    combine: bool = True  # GLM-4 data: the demo's `combine` (glmtune.families.glm4.data)
    max_seq_length: int | None = None
    data_format: str = "auto"  # columns, alpaca, sharegpt, or auto from the first row (glmtune.data.formats)
    train_on: str = "each-turn"  # or all-turns: every answer of a row's history labelled too (glmtune.data.formats)

    def validate(self) -> None:
        # The prompt always starts with the two tokens `[gMASK] sop`; fewer than 3 leaves no text at all.
        if self.max_source_length < 3:
            raise GlmtuneError(f"max_source_length must be at least 3 ([gMASK] sop + text), got {self.max_source_length}")
        if self.max_target_length < 1:
            raise GlmtuneError(f"max_target_length must be at least 1, got {self.max_target_length}")
        if self.max_samples is not None and self.max_samples < 1:
            raise GlmtuneError(f"max_samples must be at least 1, got {self.max_samples}")
        if self.max_seq_length is not None and self.max_seq_length < 3:
            raise GlmtuneError(f"max_seq_length must be at least 3 ([gMASK] sop + text), got {self.max_seq_length}")
        data_formats.resolve(self.data_format, self.train_on)


def family_rules(config: DataConfig):
    """The data rules of the config's family (`Family.data`, e.g. ChatGLM3 conversations), or None: the
    prompt/response rules of this module."""
    return get_family(config.family).data


# --- reading -------------------------------------------------------------------------------------


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
    rules = family_rules(config)
    if rules is not None:
        return rules.load_rows(path, config)
    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"{path}: no such file")
    rows: list[dict[str, Any]] = []
    history_seen, columns = False, None
    layout = None if config.data_format == "auto" else config.data_format
    for where, record in iter_records(path):
        if config.max_samples is not None and len(rows) >= config.max_samples:
            break
        if not isinstance(record, dict):
            raise GlmtuneError(f"{where}: expected a JSON object, found {type(record).__name__}")
        layout = layout or data_formats.detect(record, config.prompt_column, config.response_column)
        if layout != "columns":  # alpaca / sharegpt records become the same rows (glmtune.data.formats)
            rows.extend(data_formats.convert(layout, where, record, config.train_on))
            continue
        prompt = _text_field(where, record, config.prompt_column)
        response = _text_field(where, record, config.response_column)
        if config.history_column is not None and config.history_column in record:
            history_seen = True
        columns = columns or sorted(record)
        history = _history_field(where, record, config.history_column) if config.history_column else []
        rows.append({"prompt": prompt, "response": response, "history": history})
    if config.max_samples is not None:
        rows = rows[: config.max_samples]  # a sharegpt record may have given several rows
    if not rows:
        raise GlmtuneError(f"{path}: no data rows")
    if config.history_column is not None and not history_seen and layout == "columns":
        # Rows without history are single-turn, but a column found in no row at all is a typo.
        raise GlmtuneError(f"{path}: no column {config.history_column!r} in any row (columns present: {columns})")
    return rows


# --- tokenizing ----------------------------------------------------------------------------------


def with_family(config: DataConfig, tokenizer: Any) -> DataConfig:
    """`config` for the tokenizer's model family (ChatGLM3 data has its own formats and rules)."""
    import dataclasses

    return dataclasses.replace(config, family=getattr(tokenizer, "family", "chatglm2"))


def is_usable(row: dict) -> bool:
    if "prompt" not in row:  # a family's own rows (conversations, messages): its data rules' skip reasons decide
        return True
    # The official filter is truthiness: "" and None are dropped, whitespace-only text is kept.
    return bool(row["prompt"] and row["response"])


def _usable(rows: Sequence[dict]) -> list[dict]:
    return [row for row in rows if is_usable(row)]


def _encode_batch(batch: dict, tokenizer: Any, config: DataConfig, mode: str) -> dict:
    """Tokenize a batch of prompt/response texts; lengths are counted before truncation for the report."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_tokens": [], "target_tokens": []}
    if mode == "eval":
        out["reference"] = []
    else:
        out["labels_cut"] = []  # answer tokens the length limit took from the row (the report warns about them)
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
            out["labels_cut"].append(max(0, len(full_answer) - config.max_target_length))
        else:
            labels = (prefix_ids + full_answer)[: config.max_target_length]
            out["input_ids"].append(prompt_ids)
            out["reference"].append(response)
        out["labels"].append([IGNORE_INDEX if t == pad_id else t for t in labels])
    return out


def tokenize(rows: Sequence[dict], tokenizer: Any, config: DataConfig, mode: str, num_workers: int = 1):
    """The usable `rows` tokenized for `mode` ("train" or "eval"): what `tokenize_train` / `tokenize_eval` return."""
    if mode not in TOKENIZE_MODES:
        raise GlmtuneError(f"mode must be one of {TOKENIZE_MODES}, got {mode!r}")
    config.validate()
    rules = family_rules(config)
    if rules is not None:
        return rules.tokenize(rows, tokenizer, config, mode)
    import datasets

    kept = _usable(rows)
    if not kept:
        raise GlmtuneError("every row has an empty prompt or response: nothing to tokenize")
    if config.train_on == "all-turns" and mode == "train":  # every answer labelled (glmtune.data.formats)
        encoded = [data_formats.encode_all_turns(row, tokenizer, config) for row in kept]
        return datasets.Dataset.from_dict({k: [e[k] for e in encoded] for k in encoded[0]})
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
        new_fingerprint=digest([FORMAT_VERSION, mode, asdict(config), tokenizer_fingerprint(tokenizer), len(texts)])[:32],
        desc=f"tokenizing ({mode})",
    )


def tokenize_train(rows: Sequence[dict], tokenizer: Any, config: DataConfig | None = None, num_workers: int = 1):
    """A `datasets.Dataset` with unpadded `input_ids`, `labels` (+ `prompt_tokens`, `target_tokens` lengths)."""
    return tokenize(rows, tokenizer, config or DataConfig(), "train", num_workers)


def tokenize_eval(rows: Sequence[dict], tokenizer: Any, config: DataConfig | None = None, num_workers: int = 1):
    """A `datasets.Dataset` with unpadded prompt `input_ids`, official `labels`, full `reference` text, lengths."""
    return tokenize(rows, tokenizer, config or DataConfig(), "eval", num_workers)


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


def collate_train(features: Sequence[dict], pad_token_id: int = 0) -> dict:
    """Right-pad a training batch to its longest row: `input_ids`, `attention_mask`, `labels`, `position_ids`.

    Position ids are 0..L-1 on every row, as the official model builds them for unpadded-on-the-left
    training batches; with right padding the real tokens never see the padding, so their outputs and the
    loss are the same as with the official fixed-length padding.
    """
    import torch

    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, (feature, n) in enumerate(zip(features, lengths)):
        input_ids[i, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    position_ids = torch.arange(width, dtype=torch.long).expand(len(features), width).clone()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}


def collate_eval(features: Sequence[dict], pad_token_id: int = 0) -> dict:
    """Left-pad prompts for generation, as the official tokenizer's batch call: positions 0.. on real tokens, 0 on pads."""
    import torch

    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    position_ids = torch.zeros((len(features), width), dtype=torch.long)
    for i, (feature, n) in enumerate(zip(features, lengths)):
        input_ids[i, width - n :] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[i, width - n :] = 1
        position_ids[i, width - n :] = torch.arange(n)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


# --- report --------------------------------------------------------------------------------------


def build_report(rows: Sequence[dict], dataset, config: DataConfig, mode: str, source: str | os.PathLike) -> dict:
    """Rows read/skipped, untruncated token lengths, and how many prompts/targets the limits cut."""
    rules = family_rules(config)
    if rules is not None:
        return rules.build_report(rows, dataset, config, mode, source)
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
        "prompt_tokens": length_percentiles(prompt_tokens),
        "target_tokens": length_percentiles(target_tokens),
        "prompts_truncated": prompts_cut,  # each of them lost its `答：` tail
        "prompts_truncated_pct": round(100 * prompts_cut / kept, 2),
        "targets_truncated": targets_cut,
        "targets_truncated_pct": round(100 * targets_cut / kept, 2),
        "target_rule": "answer ids cut to max_target_length" if mode == "train"
        else "official labels ([gMASK] sop + ids) cut to max_target_length; the full reference text is kept",
        **answers_cut(dataset, "--max-source-length + --max-target-length" if config.train_on == "all-turns"
                      else "--max-target-length"),
    }


def answers_cut_warning(report: dict) -> str | None:
    """The warning for a report whose training rows lost answer tokens to the length limit (None: none did)."""
    rows = report.get("answers_cut", 0)
    if not rows:
        return None
    examples = report.get("examples", report["rows_kept"])
    return (f"WARNING: {rows} of {examples} training rows ({100 * rows / max(1, examples):.1f}%) lost answer tokens to "
            f"the length limit: {report['answer_tokens_cut']:,} trained tokens in all, up to "
            f"{report['answer_tokens_cut_max']:,} in one row; the model never learns those parts of the answers "
            f"(raise {report['answer_limit_option']} to keep them)")


def format_report(report: dict) -> str:
    p, t = report["prompt_tokens"], report["target_tokens"]
    header = ["tokens", "p50", "p90", "p99", "max", "limit", "cut", "cut %"]
    rows = [
        ["prompt", p["p50"], p["p90"], p["p99"], p["max"], report["max_source_length"], report["prompts_truncated"],
         report["prompts_truncated_pct"]],
        ["target", t["p50"], t["p90"], t["p99"], t["max"], report["max_target_length"], report["targets_truncated"],
         report["targets_truncated_pct"]],
    ]
    # Each column as wide as its widest cell plus two spaces, so 6+ digit lengths never run together.
    widths = [max(len(str(row[i])) for row in (header, *rows)) + 2 for i in range(len(header))]
    table = ["".join(f"{cell!s:<{widths[0]}}" if i == 0 else f"{cell!s:>{widths[i]}}" for i, cell in enumerate(row))
             for row in (header, *rows)]
    summary = (f"{report['source']} ({report['mode']}): {report['rows_read']} rows read, {report['rows_kept']} kept, "
               f"{report['rows_skipped']['total']} skipped (empty prompt {report['rows_skipped']['empty_prompt']}, "
               f"empty response {report['rows_skipped']['empty_response']})")
    warning = answers_cut_warning(report)
    return "\n".join([summary, *table, *([warning] if warning else [])])
