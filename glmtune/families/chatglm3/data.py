"""ChatGLM3 P-tuning data: the official ChatGLM3 fine-tuning formats, under the 2023 or the 2024 demo's rules.

Two input formats, one per row (JSON Lines, a JSON array or CSV cells holding JSON):

* `{"conversations": [{"role", "content", "loss"?}, ...], "tools"?: [...]}` with roles system / user /
  assistant / observation, and `tool` messages `{"role": "tool", "name", "parameters", "observation"}`;
* `{"prompt": ..., "response": ...}` (or the columns named by --prompt-column / --response-column).

`rules="2023"` (default) reproduces THUDM/ChatGLM3@40dbd5b `finetune_chatmodel_demo/preprocess_utils.py`:
`MultiTurnDataset` (a system message with the tools JSON is put first; `loss` flags honoured, system/user never
trained, a tool call trained as an assistant message with the tool name as metadata and the code in
```python fences, its observation never trained; cut to `max_seq_length`) and `InputOutputDataset` (the raw
prompt with `[gMASK] sop` cut to max_source_length, the response to max_target_length, then eos).
`rules="finetune-hf"` reproduces the 2024 `finetune_demo/finetune_hf.py` `process_batch` (loss flags
ignored, every non system/user message trained, observations included; tools and tool messages rejected;
cut to max_source_length + max_target_length + 1) and `process_batch_eval`; that demo reads conversations
only, so prompt/response rows are skipped (and counted in the report).

In both, token i is a label when the loss mask of token i-1 is set (see ../shared/reference/README.md), so an
assistant message trains its text and the role token that follows (or the final `</s>`).

Eval rows (both rules, one per assistant message, as `process_batch_eval`): the conversation so far (cut to
max_source_length) + `<|assistant|>`; `labels` the message's ids (metadata line, content, eos) cut to
max_target_length; `reference` its content text, which the predictions are scored against.

Deliberate differences: rows are not padded here (batches are padded by `glmtune.data.preprocess.collate_*`); the
2024 demo's NotImplementedError on tools is one clear error naming the row and the option to use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from glmtune.data.formats import IGNORE_INDEX, answers_cut, length_percentiles  # one definition each, below glmtune.data.preprocess
from glmtune.data.conversations import skip_reasons, tokenize_usable_rows
from glmtune.errors import GlmtuneError
from glmtune.fsutil import iter_records

RULES = ("2023", "finetune-hf")
MESSAGE_ROLES = ("system", "user", "assistant", "observation", "tool")
TOOL_DEFINITION_PREFIX = "Answer the following questions as best as you can. You have access to the following tools:\n"
_INF = "1e" + repr(__import__("sys").float_info.max_10_exp + 1)


# --- reading -------------------------------------------------------------------------------------


def _check_message(where: str, i: int, message: Any) -> dict:
    if not isinstance(message, dict):
        raise GlmtuneError(f"{where}: conversations[{i}]: expected an object {{role, content}}, found {message!r:.60}")
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise GlmtuneError(f"{where}: conversations[{i}]: field role: expected one of {list(MESSAGE_ROLES)}, found {role!r}")
    if role == "tool":
        if not isinstance(message.get("name"), str) or not isinstance(message.get("parameters"), dict):
            raise GlmtuneError(f"{where}: conversations[{i}]: a tool message needs a string 'name' and an object 'parameters'")
    elif not isinstance(message.get("content"), str):
        raise GlmtuneError(
            f"{where}: conversations[{i}]: field content: expected a string, found {type(message.get('content')).__name__}"
        )
    if "loss" in message and not isinstance(message["loss"], (bool, int)):
        raise GlmtuneError(f"{where}: conversations[{i}]: field loss: expected true or false, found {message['loss']!r:.40}")
    return message


def _json_cell(where: str, record: dict, column: str) -> Any:
    value = record.get(column)
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            return json.loads(value) if value.strip() else None
        except json.JSONDecodeError:
            raise GlmtuneError(f"{where}: column {column!r} should hold JSON") from None
    return value


def load_rows(path: str | os.PathLike, config: Any) -> list[dict[str, Any]]:
    """Rows `{"conversations", "tools"?, "where"}` or `{"prompt", "response", "where"}`; errors name file, line, field."""
    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"{path}: no such file")
    rows: list[dict[str, Any]] = []
    for where, record in iter_records(path):
        if config.max_samples is not None and len(rows) >= config.max_samples:
            break
        if not isinstance(record, dict):
            raise GlmtuneError(f"{where}: expected a JSON object, found {type(record).__name__}")
        if "conversations" in record:
            conversations = _json_cell(where, record, "conversations")
            if not isinstance(conversations, list):
                raise GlmtuneError(f"{where}: field conversations: expected a list of messages")
            row: dict[str, Any] = {"conversations": [_check_message(where, i, m) for i, m in enumerate(conversations)]}
            if "tools" in record:
                tools = _json_cell(where, record, "tools")
                if not isinstance(tools, list):
                    raise GlmtuneError(f"{where}: field tools: expected a list of tool descriptions")
                row["tools"] = tools
        else:
            columns = (config.prompt_column, config.response_column)
            if not all(c in record for c in columns):
                columns = ("prompt", "response")
            if not all(c in record for c in columns):
                raise GlmtuneError(
                    f"{where}: expected a 'conversations' list or {config.prompt_column!r}/{config.response_column!r} "
                    f"columns (ChatGLM3 data; columns present: {sorted(record)})"
                )
            texts = [record[c] for c in columns]
            for column, value in zip(columns, texts):
                if value is not None and not isinstance(value, str):
                    raise GlmtuneError(f"{where}: column {column!r} should be a string, found {type(value).__name__}")
            row = {"prompt": texts[0], "response": texts[1]}
        rows.append({**row, "where": where})
    if not rows:
        raise GlmtuneError(f"{path}: no data rows")
    return rows


def skip_reason(row: dict, config: Any) -> str | None:
    """Why a row gives no example under the config's rules (None: it is used)."""
    if "conversations" not in row:
        if config.glm3_rules == "finetune-hf":
            return "prompt/response row (the 2024 demo reads conversations only)"
        return None if row["prompt"] and row["response"] else "empty prompt or response"
    # A row that trains no token adds nothing but a NaN loss in a batch of its own: left out, and counted.
    if config.glm3_rules == "finetune-hf":
        trained = any(m["role"] not in ("system", "user") for m in row["conversations"])
    else:
        trained = any(m["role"] not in ("system", "user") and bool(m.get("loss", True)) for m in row["conversations"])
    return None if trained else "no trained message"


# --- encoding ------------------------------------------------------------------------------------


def format_function_call(name: str, parameters: dict) -> str:
    """`tool_call(a='x', b=1)` as the official demo writes it (astunparse of a call with constant keywords)."""

    def literal(value: Any) -> str:
        text = repr(value)
        return text.replace("inf", _INF) if isinstance(value, (float, complex)) else text

    return f"{name}(" + ", ".join(f"{key}={literal(value)}" for key, value in parameters.items()) + ")"


def _messages_2023(row: dict, tokenizer: Any) -> list[tuple[list[int], bool, dict | None]]:
    """(ids, loss, message) per encoded message of the 2023 `format_conversation`."""
    conversations = list(row["conversations"])
    if "tools" in row:
        conversations.insert(0, {"role": "system",
                                 "content": TOOL_DEFINITION_PREFIX + json.dumps(row["tools"], indent=4, ensure_ascii=False)})
    out = []
    for message in conversations:
        loss = bool(message.get("loss", True)) and message["role"] not in ("system", "user")
        if message["role"] == "tool":
            code = "```python\n" + format_function_call("tool_call", message["parameters"]) + "\n```"
            out.append((tokenizer.build_single_message("assistant", message["name"], code), loss, None))
            observation = message.get("observation")
            if not isinstance(observation, str):
                observation = json.dumps(observation, ensure_ascii=False)
            out.append((tokenizer.build_single_message("observation", "", observation), False, None))
        else:
            ids = tokenizer.build_single_message(message["role"], "", message["content"])
            out.append((ids, loss, message if message["role"] == "assistant" else None))
    return out


def _messages_hf(row: dict, tokenizer: Any) -> list[tuple[list[int], bool, dict | None]]:
    """The same for the 2024 `process_batch`: loss flags ignored, tools rejected."""
    where = row.get("where", "row")
    if "tools" in row:
        raise GlmtuneError(
            f"{where}: field tools: the 2024 finetune_hf rules do not support tools (the official demo raises "
            "NotImplementedError); use the default 2023 rules (--chatglm3-rules 2023)"
        )
    out = []
    for message in row["conversations"]:
        if message["role"] == "tool":
            raise GlmtuneError(f"{where}: a 'tool' message: not supported by the 2024 finetune_hf rules; use the 2023 rules")
        ids = tokenizer.build_single_message(message["role"], "", message["content"])
        out.append((ids, message["role"] not in ("system", "user"), message if message["role"] == "assistant" else None))
    return out


def encode_train(row: dict, tokenizer: Any, config: Any) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, untruncated length) of one usable row."""
    return encode_train_counted(row, tokenizer, config)[:3]


def encode_train_counted(row: dict, tokenizer: Any, config: Any) -> tuple[list[int], list[int], int, int]:
    """`encode_train`'s result and the number of trained (label) tokens the length limit cut off."""
    eos = tokenizer.eos_token_id
    if "conversations" not in row:  # InputOutputDataset (2023 only)
        a_ids = tokenizer.encode(row["prompt"], add_special_tokens=True)[: config.max_source_length]
        full_b = tokenizer.encode(row["response"], add_special_tokens=False)
        b_ids = full_b[: config.max_target_length]
        labels = [IGNORE_INDEX] * len(a_ids) + b_ids + [eos]
        labels = [IGNORE_INDEX if t == tokenizer.pad_token_id else t for t in labels]
        return a_ids + b_ids + [eos], labels, len(a_ids) + len(b_ids) + 1, len(full_b) - len(b_ids)
    messages = _messages_hf(row, tokenizer) if config.glm3_rules == "finetune-hf" else _messages_2023(row, tokenizer)
    tokens, masks = list(tokenizer.get_prefix_tokens()), [False, False]
    for ids, loss, _ in messages:
        tokens += ids
        masks += [loss] * len(ids)
    tokens.append(eos)
    masks.append(False)
    labels = [t if m else IGNORE_INDEX for t, m in zip(tokens, [False] + masks[:-1])]
    limit = max_seq_length(config)
    return tokens[:limit], labels[:limit], len(tokens), sum(1 for t in labels[limit:] if t != IGNORE_INDEX)


def max_seq_length(config: Any) -> int:
    """Conversation length limit: --max-seq-length (2023 rules; default source + target + 1), or the
    2024 demo's max_input_length + max_output_length + 1."""
    if config.glm3_rules == "finetune-hf" or not config.max_seq_length:
        return config.max_source_length + config.max_target_length + 1
    return config.max_seq_length


def encode_eval(row: dict, tokenizer: Any, config: Any) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, label ids, reference text) per assistant message, as `process_batch_eval`."""
    if "conversations" not in row:
        a_ids = tokenizer.encode(row["prompt"], add_special_tokens=True)[: config.max_source_length]
        labels = tokenizer.encode(row["response"], add_special_tokens=False)[: config.max_target_length]
        return [(a_ids, labels, row["response"])]
    messages = _messages_hf(row, tokenizer) if config.glm3_rules == "finetune-hf" else _messages_2023(row, tokenizer)
    examples = []
    prompt = list(tokenizer.get_prefix_tokens())
    for ids, _, message in messages:
        if len(prompt) >= config.max_source_length:
            break
        if message is not None:
            output = ids[1:] + [tokenizer.eos_token_id]
            examples.append((prompt[: config.max_source_length] + ids[:1], output[: config.max_target_length],
                             message["content"]))
        prompt = prompt + ids
    return examples


def encode_batch(batch: dict, tokenizer: Any, config: Any, mode: str) -> dict:
    """`datasets.map` function: the columns `glmtune.data.preprocess` produces, from rows stored as JSON text."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_tokens": [], "target_tokens": []}
    if mode == "eval":
        out["reference"] = []
    else:
        out["labels_cut"] = []  # trained tokens the length limit took (the report warns about them)
    for text in batch["row"]:
        row = json.loads(text)
        if mode == "train":
            input_ids, labels, full, cut = encode_train_counted(row, tokenizer, config)
            out["input_ids"].append(input_ids)
            out["labels"].append(labels)
            out["labels_cut"].append(cut)
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
    """The usable rows tokenized for `mode`, as a `datasets.Dataset` (see the module docstring)."""
    if config.glm3_rules not in RULES:
        raise GlmtuneError(f"--chatglm3-rules: expected one of {list(RULES)}, found {config.glm3_rules!r}")
    if not hasattr(tokenizer, "build_single_message"):
        raise GlmtuneError("ChatGLM3 data needs the ChatGLM3 tokenizer (a ChatGLM3 model folder, or --family chatglm3)")
    return tokenize_usable_rows(rows, skip_reason, encode_batch, tokenizer, config, mode, "ChatGLM3")


def build_report(rows: Sequence[dict], dataset, config: Any, mode: str, source: Any) -> dict:
    """Rows read / skipped (with reasons) and token lengths, in the shape of `glmtune.data.preprocess.build_report`."""
    reasons = skip_reasons(rows, skip_reason, config)
    lengths = list(dataset["prompt_tokens"])
    targets = list(dataset["target_tokens"])
    limit = max_seq_length(config) if mode == "train" else config.max_source_length
    cut = sum(1 for n in lengths if n > limit)
    kept = len(rows) - sum(reasons.values())
    return {
        "source": str(source),
        "mode": mode,
        "family": "chatglm3",
        "rules": config.glm3_rules,
        "rows_read": len(rows),
        "rows_kept": kept,
        "examples": len(lengths),
        "rows_skipped": {"empty_prompt": 0, "empty_response": reasons.get("empty prompt or response", 0),
                         "total": sum(reasons.values()), "reasons": reasons},
        "max_source_length": limit,
        "max_target_length": config.max_target_length,
        "prompt_tokens": length_percentiles(lengths),
        "target_tokens": length_percentiles(targets),
        "prompts_truncated": cut,
        "prompts_truncated_pct": round(100 * cut / max(1, len(lengths)), 2),
        "targets_truncated": 0,
        "targets_truncated_pct": 0.0,
        "target_rule": "whole conversations (or prompt + response) cut to the length limit" if mode == "train"
        else "one example per assistant message; its content text is the reference",
        **answers_cut(dataset, "--max-seq-length (--max-target-length for prompt/response rows)"
                      if config.glm3_rules == "2023" else "--max-source-length + --max-target-length"),
    }
