"""GLM-4 P-tuning data: the official fine-tune demo's `{"messages": [...]}` rows and its `process_batch` rules.

Reproduces `process_message` / `process_batch` / `process_batch_eval` of THUDM/GLM-4 `finetune_demo/finetune.py`
(the generation with `configs/ptuning_v2.yaml`), checked against ../shared/reference/glm4-preprocess-golden.jsonl.
`max_source_length` / `max_target_length` are the demo's `max_input_length` / `max_output_length`; `combine`
(`--combine/--no-combine`, default on as in ptuning_v2.yaml) picks its two rules:

* combine (default): the conversation through the chat template; only what follows the last `<|assistant|>`
  trains, never the first token after it (token i is a label when the loss mask of token i-1 is set);
* no combine: message by message (`process_message`: `None` parameter properties dropped, `tools` kept on system
  messages only); every assistant message trains from the token after its role token, plus the role token after it;
* `<|user|>` (151336) ends every training sequence, which is cut to max_source + max_target + 1 tokens.

Eval rows: one per assistant message (no combine) as `process_batch_eval`: the conversation so far cut to
max_source_length + `<|assistant|>`; labels the message's ids + 151336, cut to max_target_length; `reference` its
content. Input rows may also be alpaca, sharegpt or prompt/response records: each becomes user/assistant messages.

Deliberate differences (docs/glm4.md): content is text (the official tokenizer makes `<|assistant|>` in content a
control id, which moves where the official training starts); `process_batch_eval(combine=True)` puts the whole
conversation, reply included, into the prompt and appends `[gMASK]`, so the model is asked to continue after its
own answer: here the prompt is the conversation up to the last `<|assistant|>` (oldest tokens after `[gMASK]<sop>`
dropped when longer than max_source_length) and the labels the reply; a row without an assistant message (the
official code raises ValueError or UnboundLocalError) is skipped and counted; `process_message`'s KeyError on a
non-function tool or a function without `properties` is not copied (those tools are left as they are).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Sequence

from glmtune.data import formats as data_formats
from glmtune.data.formats import IGNORE_INDEX, length_percentiles
from glmtune.data.conversations import skip_reasons, tokenize_usable_rows
from glmtune.errors import GlmtuneError
from glmtune.fsutil import iter_records

ROLES = ("system", "user", "assistant", "observation")


def _ids(tokenizer: Any) -> tuple[int, int, int, int]:
    # The demo hard-codes the real ids (151331, 151333, 151336, 151337); the tokenizer's own ids are the same
    # there, and right for a tiny GLM-4 tokenizer, which numbers its specials after its smaller vocabulary.
    return tuple(tokenizer.get_command(t) for t in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>"))


# --- reading -------------------------------------------------------------------------------------------------------


def check_messages(where: str, messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise GlmtuneError(f"{where}: field messages: expected a list of messages, found {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GlmtuneError(f"{where}: messages[{i}]: expected an object {{role, content}}, found {m!r:.60}")
        if m.get("role") not in ROLES:
            raise GlmtuneError(f"{where}: messages[{i}]: field role: expected one of {list(ROLES)}, found {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise GlmtuneError(f"{where}: messages[{i}]: field content: expected a string, found "
                               f"{type(m.get('content')).__name__}")
        if not isinstance(m.get("metadata", ""), str):
            raise GlmtuneError(f"{where}: messages[{i}]: field metadata: expected a string (a tool name)")
        if "tools" in m and not (isinstance(m["tools"], list) and all(isinstance(t, dict) for t in m["tools"])):
            raise GlmtuneError(f"{where}: messages[{i}]: field tools: expected a list of tool objects")
    return messages


def rows_to_messages(rows: list[dict]) -> list[dict]:
    """prompt/response rows (with history) as user/assistant messages."""
    out = []
    for row in rows:
        messages = []
        for query, answer in row.get("history") or []:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        messages += [{"role": "user", "content": row["prompt"] or ""}, {"role": "assistant", "content": row["response"] or ""}]
        out.append({"messages": messages, "where": row.get("where", "")})
    return out


def load_rows(path: str | os.PathLike, config: Any) -> list[dict[str, Any]]:
    """Rows `{"messages", "where"}`; alpaca / sharegpt / prompt-response records are converted. Errors name file,
    line and field."""
    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"{path}: no such file")
    rows: list[dict[str, Any]] = []
    layout = None
    for where, record in iter_records(path):
        if config.max_samples is not None and len(rows) >= config.max_samples:
            break
        if not isinstance(record, dict):
            raise GlmtuneError(f"{where}: expected a JSON object, found {type(record).__name__}")
        if "messages" in record:
            rows.append({"messages": check_messages(where, record["messages"]), "where": where})
            continue
        layout = layout or data_formats.detect(record, config.prompt_column, config.response_column)
        if layout == "columns":
            texts = []
            for column in (config.prompt_column, config.response_column):
                if column not in record:
                    raise GlmtuneError(f"{where}: expected a 'messages' list (GLM-4 data) or the columns "
                                       f"{config.prompt_column!r}/{config.response_column!r}; columns present: {sorted(record)}")
                if record[column] is not None and not isinstance(record[column], str):
                    raise GlmtuneError(f"{where}: column {column!r} should be a string, found {type(record[column]).__name__}")
                texts.append(record[column])
            converted = [{"prompt": texts[0], "response": texts[1], "history": []}]
        else:
            converted = data_formats.convert(layout, where, record, config.train_on)
        rows.extend({**r, "where": where} for r in rows_to_messages(converted))
    if config.max_samples is not None:
        rows = rows[: config.max_samples]
    if not rows:
        raise GlmtuneError(f"{path}: no data rows")
    return rows


def skip_reason(row: dict, config: Any) -> str | None:
    """Why a row gives no example (None: it is used)."""
    if not row["messages"]:
        return "no messages"
    if not any(m["role"] == "assistant" and (m["content"] or m.get("metadata")) for m in row["messages"]):
        return "no assistant message"
    return None


# --- encoding --------------------------------------------------------------------------------------------------


def process_message(message: dict) -> dict:
    """The demo's `process_message` (None-valued parameter properties dropped; tools only on a system message),
    without its KeyError on a non-function tool or a function without `properties`."""
    message = copy.deepcopy(message)
    if "tools" in message and message["role"] == "system":
        for tool in message["tools"]:
            properties = ((tool.get("function") or {}).get("parameters") or {}).get("properties")
            if isinstance(properties, dict):
                tool["function"]["parameters"]["properties"] = {k: v for k, v in properties.items() if v is not None}
    elif "tools" in message:
        del message["tools"]
    return message


def _message_ids(tokenizer: Any, message: dict) -> list[int]:
    return tokenizer.apply_chat_template([message])[2:]  # without [gMASK]<sop>


def encode_train(row: dict, tokenizer: Any, config: Any) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, length before the cut) of `process_batch`."""
    gmask, sop, user, assistant = _ids(tokenizer)
    if config.combine:
        input_ids = tokenizer.apply_chat_template(row["messages"])
        last = len(input_ids) - input_ids[::-1].index(assistant) - 1
        masks = [j > last for j in range(len(input_ids))]
    else:
        input_ids, masks = [gmask, sop], [False, False]
        for message in row["messages"]:
            message = process_message(message)
            new = _message_ids(tokenizer, message)
            input_ids += new
            masks += [message["role"] not in ("system", "user", "observation")] * len(new)
    input_ids = input_ids + [user]
    masks = [False, *masks]
    labels = [t if m else IGNORE_INDEX for t, m in zip(input_ids, masks)]
    limit = config.max_source_length + config.max_target_length + 1
    return input_ids[:limit], labels[:limit], len(input_ids)


def encode_eval(row: dict, tokenizer: Any, config: Any) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, label ids, reference text) per evaluated assistant message (see the module docstring)."""
    gmask, sop, user, assistant = _ids(tokenizer)
    if config.combine:
        ids = tokenizer.apply_chat_template(row["messages"])
        last = len(ids) - ids[::-1].index(assistant) - 1
        prompt = ids[: last + 1]
        if len(prompt) > config.max_source_length:
            prompt = prompt[:2] + prompt[len(prompt) - config.max_source_length + 2:]
        reply = [m for m in row["messages"] if m["role"] == "assistant" and (m["content"] or m.get("metadata"))][-1]
        return [(prompt, (ids[last + 1:] + [user])[: config.max_target_length], reply["content"])]
    examples = []
    input_ids = [gmask, sop]
    for message in row["messages"]:
        if len(input_ids) >= config.max_source_length:
            break
        message = process_message(message)
        new = _message_ids(tokenizer, message)
        if message["role"] == "assistant" and new:
            output = new[1:] + [user]
            examples.append((input_ids[: config.max_source_length] + new[:1], output[: config.max_target_length],
                             message["content"]))
        input_ids = input_ids + new
    return examples


def encode_batch(batch: dict, tokenizer: Any, config: Any, mode: str) -> dict:
    """`datasets.map` function: the columns `glmtune.data.preprocess` produces, from rows stored as JSON text."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_tokens": [], "target_tokens": []}
    if mode == "eval":
        out["reference"] = []
    for text in batch["row"]:
        row = json.loads(text)
        if mode == "train":
            input_ids, labels, full = encode_train(row, tokenizer, config)
            out["input_ids"].append(input_ids)
            out["labels"].append(labels)
            out["prompt_tokens"].append(full)
            out["target_tokens"].append(sum(1 for t in labels if t != IGNORE_INDEX))
            continue
        for prompt_ids, label_ids, reference in encode_eval(row, tokenizer, config):
            out["input_ids"].append(prompt_ids)
            out["labels"].append(label_ids)
            out["reference"].append(reference)
            out["prompt_tokens"].append(len(prompt_ids))
            out["target_tokens"].append(len(label_ids))
    return out


def tokenize(rows: Sequence[dict], tokenizer: Any, config: Any, mode: str):
    """The usable rows tokenized for `mode`, as a `datasets.Dataset`."""
    if not hasattr(tokenizer, "apply_chat_template") or getattr(tokenizer, "family", None) != config.family:
        raise GlmtuneError("GLM-4 data needs the GLM-4 tokenizer (a GLM-4 model folder, or --family glm4)")
    return tokenize_usable_rows(rows, skip_reason, encode_batch, tokenizer, config, mode, "GLM-4")


def build_report(rows: Sequence[dict], dataset, config: Any, mode: str, source: Any) -> dict:
    """Rows read / skipped (with reasons) and token lengths, in the shape of `glmtune.data.preprocess.build_report`."""
    reasons = skip_reasons(rows, skip_reason, config)
    lengths = list(dataset["prompt_tokens"])
    targets = list(dataset["target_tokens"])
    limit = config.max_source_length + config.max_target_length + 1 if mode == "train" else config.max_source_length
    cut = sum(1 for n in lengths if n > limit)
    return {
        "source": str(source),
        "mode": mode,
        "family": config.family,
        "rules": "combine" if config.combine else "per-message",
        "rows_read": len(rows),
        "rows_kept": len(rows) - sum(reasons.values()),
        "examples": len(lengths),
        "rows_skipped": {"empty_prompt": 0, "empty_response": 0, "total": sum(reasons.values()), "reasons": reasons},
        "max_source_length": limit,
        "max_target_length": config.max_target_length,
        "prompt_tokens": length_percentiles(lengths),
        "target_tokens": length_percentiles(targets),
        "prompts_truncated": cut,
        "prompts_truncated_pct": round(100 * cut / max(1, len(lengths)), 2),
        "targets_truncated": 0,
        "targets_truncated_pct": 0.0,
        "target_rule": "whole conversations cut to max_source + max_target + 1 tokens" if mode == "train"
        else "one example per evaluated assistant message; its content text is the reference",
    }
