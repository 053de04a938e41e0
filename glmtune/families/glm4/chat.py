"""GLM-4 chat rules: role messages through the official chat template, JSON tool calls, and OpenAI requests.

Follows `chat` / `process_response` of THUDM/glm-4-9b-chat (modeling_chatglm.py) and the official inference demo:

* a conversation is a list of messages `{"role": system|user|assistant|observation, "content": str}`; an assistant
  message may carry `"metadata"` (the name of the tool it calls), any message may carry `"tools"` (the official
  `[{"type": "function", "function": {name, description, parameters}}, ...]`; the template writes the tool block
  where that message is);
* the prompt is `apply_chat_template(messages, add_generation_prompt=True)`; generation stops on `<|endoftext|>`,
  `<|user|>` or `<|observation|>` (151329, 151336, 151338);
* a reply is split at `<|assistant|>`; each part's first line is its metadata. A part without metadata is text
  (stripped); with metadata it is a tool call: the tool's name, then its arguments as JSON, read with `json.loads`
  into `{"name", "parameters"}` (the official code raises on bad JSON; here the part comes back as
  `{"name", "content"}` with a `ToolCallWarning`). Nothing the model writes is ever executed;
* `glmtune serve`: OpenAI `tools` become the template's tool block (on the system message, or a system message of
  its own in front), an assistant's `tool_calls` assistant messages with the tool name as metadata and the JSON
  arguments as content, a `tool` message an observation turn.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from glmtune.errors import GlmtuneError
from glmtune.families.family import RequestError, checked_messages

ROLES = ("system", "user", "assistant", "observation")
MAX_TOOL_CALL_CHARS = 100_000  # longer "calls" are text


class ToolCallWarning(UserWarning):
    """A reply named a tool (metadata) but its arguments were not a JSON object."""


def normalize_messages(messages: Any, source: str = "history") -> list[dict]:
    """Check a GLM-4 conversation (a list of message dicts); return copies. Errors name the item and field."""
    return checked_messages(messages, source, ROLES,
                            lambda m: isinstance(m["tools"], list) and all(isinstance(t, dict) for t in m["tools"]),
                            "expected a list of tool objects")


def as_glm4_tools(tools: list[dict]) -> list[dict]:
    """Tool descriptions in the template's form: `{name, ...}` specs are wrapped as `{"type": "function", "function": spec}`."""
    return [t if "type" in t else {"type": "function", "function": t} for t in tools]


def parse_part(part: str) -> tuple[Any, dict, str | None]:
    """(response, assistant message, problem) for one part of a decoded reply (text between `<|assistant|>`s)."""
    metadata, content = part.split("\n", maxsplit=1) if "\n" in part else ("", part)
    if not metadata.strip():
        content = content.strip()
        return content, {"role": "assistant", "metadata": metadata, "content": content}, None
    message = {"role": "assistant", "metadata": metadata, "content": content}
    name = metadata.strip()
    try:
        parameters = json.loads(content) if len(content) <= MAX_TOOL_CALL_CHARS else None
    except (json.JSONDecodeError, RecursionError):
        parameters = None
    if not isinstance(parameters, dict):
        problem = f"the reply names tool {name!r} but its arguments are not a JSON object: returned as text ({content[:80]!r})"
        return {"name": name, "content": content}, message, problem
    return {"name": name, "parameters": parameters}, message, None


def parse_response(ids: list[int], tokenizer: Any, history: list[dict]) -> tuple[Any, list[dict], str | None]:
    """(response, history + the assistant messages, problem) for generated ids (stop token removed)."""
    assistant = tokenizer.get_command("<|assistant|>")
    parts: list[list[int]] = [[]]
    for i in ids:
        if i == assistant:
            parts.append([])
        else:
            parts[-1].append(i)
    history = copy.deepcopy(history)
    response: Any = ""
    problem = None
    for part in parts:
        response, message, trouble = parse_part(tokenizer.decode(part, skip_special_tokens=True))
        history.append(message)
        problem = problem or trouble
    return response, history, problem


class Glm4Chat:
    """GLM-4's `chat` / `stream_chat` (`glmtune.families.family.Family` documents each method): history is a list of
    messages; a leading system message (or one carrying tools) always stays in the prompt; a partial answer is
    yielded when its text is not empty and does not end in an incomplete character, the final one always once."""

    format = "roles"
    unit = "message(s)"

    def split_history(self, history: Any, role: str) -> tuple[list, list]:
        if role not in ROLES:
            raise GlmtuneError(f"role: expected one of {list(ROLES)}, found {role!r}")
        messages = normalize_messages(history)
        keep = 1 if messages and (messages[0]["role"] == "system" or "tools" in messages[0]) else 0
        return messages[:keep], messages[keep:]

    def prompt(self, tokenizer: Any, query: str, history: list, role: str) -> tuple[str, list[int]]:
        messages = [*history, {"role": role, "content": query}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), ids

    def answer(self, tokenizer: Any, ids: list[int], history: list, query: str, role: str, stop_ids: list[int],
               warn: bool = True) -> tuple[Any, list]:
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]  # the stop token adds no text
        response, new_history, problem = parse_response(list(ids), tokenizer, history + [{"role": role, "content": query}])
        if problem and warn:
            warnings.warn(problem, ToolCallWarning, stacklevel=2)
        return response, new_history

    def stream(self, tokenizer: Any, chunks: Iterable[list[int]], answer: Callable, stop_ids: list[int]) -> Iterator:
        ids: list[int] = []
        last_text = None
        for chunk in chunks:
            ids.extend(chunk)
            if ids[-1] in stop_ids:
                continue
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if text and not text.endswith("\ufffd"):
                last_text = text
                yield answer(ids, False)
        final = answer(ids, True)
        if tokenizer.decode(ids[:-1] if ids and ids[-1] in stop_ids else ids, skip_special_tokens=True) != last_text:
            yield final

    def history_json(self, history: list) -> list:
        return history

    def opening(self, system: str | None, tools: list | None, history: list) -> list:
        if system is None and tools is None:
            return list(history)
        if history and isinstance(history[0], dict) and history[0].get("role") == "system":
            raise GlmtuneError("--system/--tools and a history file that starts with a system message: give one of them")
        message: dict = {"role": "system", "content": system or ""}
        if tools is not None:
            message["tools"] = as_glm4_tools(tools)
        return [message, *history]


# --- serve: OpenAI requests ------------------------------------------------------------------------------------------


def read_request(messages: list[dict], tools: list[dict] | None) -> tuple[str, list, str]:
    """(query, history, role) of an OpenAI chat request: tools become the template's tool block, an assistant's
    calls assistant messages (metadata = tool name, content = the JSON arguments), `tool` results observations."""
    if messages[-1]["role"] not in ("user", "tool"):
        raise RequestError(f"the last message must have role 'user' or 'tool', found {messages[-1]['role']!r}",
                           param="messages")
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            out.append({"role": "observation", "content": m["content"]})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            if m["content"]:
                out.append({"role": "assistant", "content": m["content"]})
            for j, call in enumerate(m["tool_calls"]):
                where = f"messages.{i}.tool_calls.{j}"
                try:
                    arguments = json.loads(call["arguments"] or "{}")
                except json.JSONDecodeError as exc:
                    raise RequestError(f"{where}.function.arguments: invalid JSON ({exc.msg})", param=where) from None
                if not isinstance(arguments, dict):
                    raise RequestError(f"{where}.function.arguments: expected a JSON object, found "
                                       f"{type(arguments).__name__}", param=where)
                out.append({"role": "assistant", "metadata": call["name"],
                            "content": json.dumps(arguments, ensure_ascii=False)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools is not None:
        if out and out[0]["role"] == "system":
            out[0]["tools"] = as_glm4_tools(tools)
        else:
            out.insert(0, {"role": "system", "content": "", "tools": as_glm4_tools(tools)})
    return out[-1]["content"], out[:-1], out[-1]["role"]


def reply_tool_call(raw: str, tool_names: list[str]) -> dict | None:
    """`{"name", "arguments"}` (arguments as JSON text) when a decoded reply is a call of one of the request's tools:
    the tool's name on the first line, a JSON object after it. Parsed, never executed; anything else is None."""
    part = raw.split("<|assistant|>")[0]
    response, _, problem = parse_part(part)
    if problem or not isinstance(response, dict) or response["name"] not in tool_names:
        return None
    return {"name": response["name"], "arguments": json.dumps(response["parameters"], ensure_ascii=False)}
