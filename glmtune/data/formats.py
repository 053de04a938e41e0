"""The two data layouts most instruction data ships in (alpaca, sharegpt), read as glmtune's column rows.

`glmtune.data.preprocess.load_rows` reads `--prompt-column/--response-column/--history-column` rows; this module turns
a record of another layout into the same `{"prompt", "response", "history"}` rows, so tokenizing,
truncation and caching stay the official ones and an alpaca or sharegpt row gives exactly the ids of the
equivalent column row.

* alpaca: `instruction`, `input`, `output`, optional `system` and `history` ([query, answer] pairs). The
  prompt is `instruction + "\\n" + input` when input is non-empty (as the alpaca template joins them);
  ChatGLM2 has no system role, so `system + "\\n"` is prepended to the first query of the conversation.
* sharegpt: `conversations` (or `messages`): a list of `{from|role, value|content}` with roles
  human/user, gpt/assistant, system. Every assistant turn becomes one row whose history is the turns
  before it: the official multi-turn semantics (THUDM/ChatGLM2-6B `ptuning/train_chat.sh`).

`--train-on all-turns` (not in the official scripts; ChatGLM3's finetuning does the same): one row per
conversation in which every answer is labelled, not only the last. The row is encoded segment by segment,
`[gMASK] sop` + round header, answer, next round header, answer, ..., eos: the headers are what the
tokenizer's own `build_prompt` adds between answers (so another model family's prompt format carries
over), each answer is encoded on its own as the official code encodes a response, and the whole row is
cut on the right to max_source_length + max_target_length + 1 tokens. It applies to any row with history
(columns with --history-column, alpaca `history`, sharegpt).

This module also holds what the two families' data modules share (`IGNORE_INDEX`, `length_percentiles`,
`answers_cut`),
below both `glmtune.data.preprocess` and `glmtune.families.chatglm3.data`, so that neither imports the other for them.
"""

from __future__ import annotations

from typing import Any

from glmtune.errors import GlmtuneError

IGNORE_INDEX = -100  # the one definition (glmtune.data.preprocess, which imports this module, re-exports it): a label that is not trained
FORMATS = ("auto", "columns", "alpaca", "sharegpt")
TRAIN_ON = ("each-turn", "all-turns")
_USER, _ASSISTANT, _SYSTEM = ("human", "user"), ("gpt", "assistant", "chatgpt", "bot"), ("system",)


def detect(record: Any, prompt_column: str, response_column: str) -> str:
    """The layout of a data file, from its first record: columns when the configured columns are there."""
    if not isinstance(record, dict) or (prompt_column in record and response_column in record):
        return "columns"
    if isinstance(record.get("conversations", record.get("messages")), list):
        return "sharegpt"
    if "instruction" in record:  # alpaca (a row without `output` is then named as such, not as a missing column)
        return "alpaca"
    return "columns"  # the column reader then names the missing column


def resolve(data_format: str, train_on: str) -> None:
    if data_format not in FORMATS:
        raise GlmtuneError(f"data format must be one of {list(FORMATS)}, found {data_format!r}")
    if train_on not in TRAIN_ON:
        raise GlmtuneError(f"--train-on must be one of {list(TRAIN_ON)}, found {train_on!r}")


def _string(where: str, record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        found = "missing" if key not in record else f"{type(value).__name__} {value!r:.40}"
        raise GlmtuneError(f"{where}: field {key!r}: expected a string, found {found}")
    return value


def _with_system(system: str, history: list[list[str]], prompt: str) -> tuple[list[list[str]], str]:
    """`system` prepended to the first query (ChatGLM2's prompt has no system slot)."""
    if not system:
        return history, prompt
    if history:
        return [[system + "\n" + history[0][0], history[0][1]], *history[1:]], prompt
    return history, system + "\n" + prompt


def alpaca_rows(where: str, record: dict) -> list[dict]:
    if "output" not in record:
        raise GlmtuneError(f"{where}: an alpaca row (it has 'instruction') without the answer field 'output' "
                           f"(fields present: {sorted(record)})")
    instruction = _string(where, record, "instruction")
    extra = _string(where, record, "input", required=False)
    output = _string(where, record, "output")
    system = _string(where, record, "system", required=False)
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history
    ):
        raise GlmtuneError(f"{where}: field 'history': expected a list of [query, answer] string pairs, found {history!r:.80}")
    prompt = instruction + "\n" + extra if extra else instruction
    history, prompt = _with_system(system, [list(p) for p in history], prompt)
    return [{"prompt": prompt, "response": output, "history": history}]


def _role(where: str, index: int, turn: Any) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise GlmtuneError(f"{where}: conversations[{index}]: expected an object, found {type(turn).__name__}")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if not isinstance(text, str):
        raise GlmtuneError(f"{where}: conversations[{index}]: field 'value'/'content': expected a string, found {text!r:.40}")
    role = str(role).lower()
    for name, spellings in (("user", _USER), ("assistant", _ASSISTANT), ("system", _SYSTEM)):
        if role in spellings:
            return name, text
    raise GlmtuneError(f"{where}: conversations[{index}]: field 'from'/'role': expected one of "
                       f"{list(_USER + _ASSISTANT + _SYSTEM)}, found {role!r}")


def glm3_sign(record: dict) -> str | None:
    """What marks a conversation record as ChatGLM3 fine-tuning data rather than sharegpt, if anything: a
    `tools` list, a `tool` or `observation` message, or `loss` flags (glmtune.families.chatglm3.data)."""
    if "tools" in record:
        return "a 'tools' list"
    turns = record.get("conversations", record.get("messages"))
    for index, turn in enumerate(turns if isinstance(turns, list) else []):
        if isinstance(turn, dict) and turn.get("role") in ("tool", "observation"):
            return f"a {turn['role']!r} message (conversations[{index}])"
        if isinstance(turn, dict) and "loss" in turn:
            return f"'loss' flags (conversations[{index}])"
    return None


def sharegpt_rows(where: str, record: dict) -> list[dict]:
    """One row per assistant turn, the turns before it as [query, answer] history."""
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise GlmtuneError(f"{where}: field 'conversations': expected a list of turns, found {type(turns).__name__}")
    sign = glm3_sign(record)
    if sign:
        raise GlmtuneError(f"{where}: ChatGLM3 fine-tuning data ({sign}), but the model is not a ChatGLM3 model; "
                           "train a ChatGLM3 model on it (or pass --family chatglm3 if the model folder is a ChatGLM3 "
                           "one that says nothing about its family)")
    system = record.get("system") if isinstance(record.get("system"), str) else ""
    rows, history, query = [], [], None
    for index, turn in enumerate(turns):
        role, text = _role(where, index, turn)
        if role == "system":
            if index != 0:
                raise GlmtuneError(f"{where}: conversations[{index}]: a system turn must come first")
            system = text
        elif role == "user":
            if query is not None:
                raise GlmtuneError(f"{where}: conversations[{index}]: two user turns in a row (expected an assistant turn)")
            query = text
        else:
            if query is None:
                raise GlmtuneError(f"{where}: conversations[{index}]: an assistant turn without a user turn before it")
            row_history, prompt = _with_system(system, [list(p) for p in history], query)
            rows.append({"prompt": prompt, "response": text, "history": row_history})
            history.append([query, text])
            query = None
    return rows


def convert(data_format: str, where: str, record: dict, train_on: str = "each-turn") -> list[dict]:
    if data_format == "alpaca":
        return alpaca_rows(where, record)
    rows = sharegpt_rows(where, record)
    # all-turns: the last row already holds every earlier turn as history, and all of them are labelled.
    return rows[-1:] if train_on == "all-turns" else rows


# --- all-turns rows -------------------------------------------------------------------------------


def encode_all_turns(row: dict, tokenizer, config) -> dict:
    """input_ids / labels with every answer of the conversation labelled (see the module docstring)."""
    turns = [*row["history"], [row["prompt"], row["response"]]]
    ids, labels, seen = [], [], ""
    for index, (query, answer) in enumerate(turns):
        text = config.source_prefix + tokenizer.build_prompt(query, turns[:index])
        if not text.startswith(seen):
            raise GlmtuneError("--train-on all-turns: this tokenizer's prompt does not extend the previous round's text")
        header = tokenizer.encode(text[len(seen):], add_special_tokens=index == 0)
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        ids += header + answer_ids
        labels += [IGNORE_INDEX] * len(header) + answer_ids
        seen = text + answer
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    limit = config.max_source_length + config.max_target_length + 1
    pad_id = tokenizer.pad_token_id
    return {"input_ids": ids[:limit], "labels": [IGNORE_INDEX if t == pad_id else t for t in labels[:limit]],
            "prompt_tokens": sum(1 for t in labels if t == IGNORE_INDEX),
            "target_tokens": sum(1 for t in labels if t != IGNORE_INDEX) - 1,
            "labels_cut": sum(1 for t in labels[limit:] if t != IGNORE_INDEX)}


# --- showing what is trained on -----------------------------------------------------------------

LABEL_OPEN, LABEL_CLOSE = "⟦", "⟧"


def format_samples(dataset, tokenizer, count: int = 2) -> str:
    """The first `count` tokenized rows decoded, the labelled span (what the loss is computed on) in ⟦ ⟧.

    Training rows mark their labelled tokens; eval rows show the prompt and the reference they are scored
    against. Special tokens ([gMASK], sop, </s>) are shown, since they are part of what the model sees.
    """
    lines = [f"first {min(count, len(dataset))} rows as the model sees them ({LABEL_OPEN}...{LABEL_CLOSE} = trained on):"]
    for index in range(min(count, len(dataset))):
        row = dataset[index]
        ids, labels = row["input_ids"], row["labels"]
        if "reference" in row:  # eval rows: the prompt is generated from, the reference scored against
            text = tokenizer.decode(ids, skip_special_tokens=False) + f"  ->  reference: {row['reference']}"
        else:
            parts, start = [], 0
            for end in range(1, len(ids) + 1):
                if end == len(ids) or (labels[end] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
                    piece = tokenizer.decode(ids[start:end], skip_special_tokens=False)
                    parts.append(piece if labels[start] == IGNORE_INDEX else f"{LABEL_OPEN}{piece}{LABEL_CLOSE}")
                    start = end
            text = "".join(parts)
        lines.append(f"[{index}] {text!r}")
    return "\n".join(lines)


def length_percentiles(values: list[int]) -> dict[str, float]:
    """p50/p90/p99/max of token lengths: the preprocess report of both families (here, below glmtune.data.preprocess and
    glmtune.families.chatglm3.data, so neither imports the other for it)."""
    import numpy as np

    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1), "max": int(max(values))}


def answers_cut(dataset, limit_option: str) -> dict:
    """How many training rows lost answer (label) tokens to the length limit, and how many: the report fields
    the loud warning of `format_report` reads. Eval rows keep the full reference text, so nothing is lost there."""
    cut = [n for n in (dataset["labels_cut"] if "labels_cut" in dataset.column_names else []) if n > 0]
    return {"answers_cut": len(cut), "answer_tokens_cut": sum(cut), "answer_tokens_cut_max": max(cut, default=0),
            "answer_limit_option": limit_option}
