"""ChatGLM3 conversations: messages to prompt ids, the official `chat` rules, its reply parsing without `eval`, and
how an OpenAI chat request (tools, tool calls, tool results) becomes a conversation.

Reproduces `build_chat_input` and `process_response` of THUDM/chatglm3-6b (modeling_chatglm.py, HF revision
456aa875) for chat, stream_chat and serving:

* a conversation is a list of messages `{"role": system|user|assistant|observation, "content": str}`; an
  assistant message may carry `"metadata"` (a tool name), a system message may carry `"tools"` (a list of
  tool descriptions, appended to its content as indented JSON by the tokenizer);
* a reply is split at `<|assistant|>`; each part's first line is its metadata. A part without metadata is
  text (stripped, `[[训练时间]]` -> `2023年`); with metadata, and tools in the system message, it is a tool
  call `{"name": metadata, "parameters": {...}}`; with metadata and no tools, `{"name", "content"}`;
* `RolesChat`: ChatGLM3's chat rules (history fitting, the answer without its stop token, which partial answers
  `stream_chat` yields, the `--system` / `--tools` opening);
* `read_request` / `reply_tool_call`: what `glmtune serve` does with OpenAI messages, as the official
  openai_api_demo: `tools` go on the system message (`{name, description, parameters}`, under the official default
  system text when the request has none), an assistant's tool call becomes the assistant metadata (the tool name) +
  ` ```python\ntool_call(...)\n```` text, a `tool` message an observation; a reply the official parsing reads
  as a call of an offered tool comes back as a call, parsed, never executed.

Deliberate difference: the official code runs the tool-call text through Python's `eval` (model output
executed as code: a reply can run anything). glmtune parses it with `ast` and accepts only
`tool_call(name=<literal>, ...)` with keyword arguments that are Python literals (strings, numbers,
lists, dicts, True/False/None); anything else comes back as plain text, with a `ToolCallWarning`.
Nothing the model writes is ever executed.
"""

from __future__ import annotations

import ast
import copy
import json
import keyword
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from glmtune.errors import GlmtuneError
from glmtune.families.family import RequestError, checked_messages

ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)  # after the five GLM command tokens in the vocabulary
DEFAULT_TOOLS_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
MAX_TOOL_CALL_CHARS = 100_000  # longer "calls" are text: ast.parse on megabytes of model output is not worth it


class ToolCallWarning(UserWarning):
    """A reply looked like a tool call (metadata with tools) but was not a literal `tool_call(...)`."""


def normalize_messages(messages: Any, source: str = "history") -> list[dict]:
    """Check a ChatGLM3 history (a list of message dicts); return copies. Errors name the item and field."""
    return checked_messages(messages, source, ROLES, lambda m: m["role"] == "system" and isinstance(m["tools"], list),
                            "expected a list, on a system message only")


def parse_tool_call(code: str) -> dict | None:
    """The keyword arguments of `tool_call(a=..., b=...)` when every value is a literal, else None.

    Never executes anything: the text is parsed (`ast.parse`), the call's shape is checked, and each
    argument goes through `ast.literal_eval`, which only builds constants and containers.
    """
    code = code.strip()
    if not code or len(code) > MAX_TOOL_CALL_CHARS:
        return None
    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        return None
    if call.args:
        return None
    parameters: dict[str, Any] = {}
    for argument in call.keywords:
        if argument.arg is None:  # **mapping
            return None
        try:
            parameters[argument.arg] = ast.literal_eval(argument.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    return parameters


def parse_response(output: str, history: list[dict]) -> tuple[Any, list[dict], str | None]:
    """(response, history + the assistant messages, problem): `process_response` plus what went wrong, if anything."""
    content: Any = ""
    history = copy.deepcopy(history)
    problem = None
    tools = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
    for part in output.split("<|assistant|>"):
        metadata, content = part.split("\n", maxsplit=1) if "\n" in part else ("", part)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        if not tools:
            content = {"name": metadata.strip(), "content": content}
            continue
        # The official code drops the first and last lines (the ``` fences) and evals the rest.
        code = "\n".join(content.split("\n")[1:-1])
        parameters = parse_tool_call(code)
        if parameters is None:
            problem = (
                f"the reply names tool {metadata.strip()!r} but is not a literal tool_call(...): "
                f"returned as text, nothing executed ({code[:80]!r})"
            )
        else:
            content = {"name": metadata.strip(), "parameters": parameters}
    return content, history, problem


def process_text(text: str) -> str:
    """A plain answer as the official parsing returns it: stripped, `[[训练时间]]` -> `2023年`."""
    return text.strip().replace("[[训练时间]]", "2023年")


def process_response(output: str, history: list[dict], warn: bool = True) -> tuple[Any, list[dict]]:
    """The official ChatGLM3 reply parsing (see the module docstring); warns when a tool call is refused."""
    content, history, problem = parse_response(output, history)
    if problem and warn:
        warnings.warn(problem, ToolCallWarning, stacklevel=2)
    return content, history


def system_message(system: str | None = None, tools: list | None = None) -> dict:
    """The system message that opens a conversation with `--system` / `--tools` (the official default text
    when only tools are given)."""
    message: dict = {"role": "system", "content": system if system is not None else DEFAULT_TOOLS_SYSTEM}
    if tools is not None:
        message["tools"] = tools
    return message


class RolesChat:
    """ChatGLM3's `chat` / `stream_chat` of THUDM/chatglm3-6b (`glmtune.families.family.Family` documents
    each method): history is a list of messages, the prompt `build_chat_input`, the reply parsed by
    `process_response` once the stop token is dropped (a last token cut by the length limit is kept, unlike
    the official `chat`); a partial answer is yielded only when its text is not empty and does not end in an
    incomplete character (U+FFFD), and the final answer is always yielded once."""

    format = "roles"
    unit = "message(s)"

    def split_history(self, history: Any, role: str) -> tuple[list, list]:
        if role not in ROLES:
            raise GlmtuneError(f"role: expected one of {list(ROLES)}, found {role!r}")
        messages = normalize_messages(history)
        keep = 1 if messages and messages[0]["role"] == "system" else 0  # the system prompt (and tools) stay
        return messages[:keep], messages[keep:]

    def prompt(self, tokenizer: Any, query: str, history: list, role: str) -> tuple[str, list[int]]:
        ids = tokenizer.chat_input_ids(query, history, role)
        return tokenizer.decode(ids), ids

    def answer(self, tokenizer: Any, ids: list[int], history: list, query: str, role: str, stop_ids: list[int],
               warn: bool = True) -> tuple[Any, list]:
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]  # the stop token adds no text
        return process_response(tokenizer.decode(ids), history + [{"role": role, "content": query}], warn=warn)

    def stream(self, tokenizer: Any, chunks: Iterable[list[int]], answer: Callable, stop_ids: list[int]) -> Iterator:
        ids: list[int] = []
        last_text = None
        for chunk in chunks:
            ids.extend(chunk)
            if ids[-1] in stop_ids:
                continue  # the stop token adds no text; the final answer below covers an empty reply
            text = tokenizer.decode(ids)
            if text and not text.endswith("\ufffd"):
                last_text = text
                yield answer(ids, False)
        final = answer(ids, True)  # warns once if a tool call was refused
        if tokenizer.decode(ids[:-1] if ids and ids[-1] in stop_ids else ids) != last_text:
            yield final

    def history_json(self, history: list) -> list:
        return history

    def opening(self, system: str | None, tools: list | None, history: list) -> list:
        if system is None and tools is None:
            return list(history)
        if history and isinstance(history[0], dict) and history[0].get("role") == "system":
            raise GlmtuneError("--system/--tools and a history file that starts with a system message: give one of them")
        return [system_message(system, tools), *history]


# --- serve: OpenAI requests ------------------------------------------------------------------------------------------


def tool_call_text(call: dict, where: str) -> str:
    """The assistant text ChatGLM3 writes for a call (after its metadata line): ` ```python\ntool_call(k=v, ...)\n````.

    The leading space is in the official model's replies (and the official demos' histories); without it
    the fence tokenizes differently from what the model generated.
    The values are Python literals (`repr`) because that is what the model writes and `parse_tool_call`
    reads back; JSON `true`/`null` become `True`/`None`.
    """
    try:
        arguments = json.loads(call["arguments"] or "{}")
    except json.JSONDecodeError as exc:
        raise RequestError(f"{where}.function.arguments: invalid JSON ({exc.msg})", param=where) from None
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}.function.arguments: expected a JSON object, found {type(arguments).__name__}",
                           param=where)
    bad = [k for k in arguments if not (k.isidentifier() and not keyword.iskeyword(k))]
    if bad:
        raise RequestError(f"{where}.function.arguments: argument names must be identifiers, found {bad[0]!r}",
                           param=where)
    return " ```python\ntool_call(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")\n```"


def request_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI messages (plain dicts) as ChatGLM3 messages, what the official openai_api_demo does with them."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            out.append({"role": "observation", "content": m["content"]})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            if m["content"]:
                out.append({"role": "assistant", "content": m["content"]})
            for j, call in enumerate(m["tool_calls"]):
                out.append({"role": "assistant", "metadata": call["name"],
                            "content": tool_call_text(call, f"messages.{i}.tool_calls.{j}")})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools is not None:
        if out and out[0]["role"] == "system":
            out[0]["tools"] = tools
        else:
            out.insert(0, {"role": "system", "content": DEFAULT_TOOLS_SYSTEM, "tools": tools})
    return out


def read_request(messages: list[dict], tools: list[dict] | None) -> tuple[str, list, str]:
    """(query, history, role): the system prompt, tools and every message go to the model as they are; the query
    may be a tool result (an observation), which the model answers."""
    if messages[-1]["role"] not in ("user", "tool"):
        raise RequestError(f"the last message must have role 'user' or 'tool', found {messages[-1]['role']!r}",
                           param="messages")
    converted = request_messages(messages, tools)
    return converted[-1]["content"], converted[:-1], converted[-1]["role"]


def reply_tool_call(raw: str, tool_names: list[str]) -> dict | None:
    """`{"name", "arguments"}` (arguments as JSON text) when a reply is a call of one of the request's tools.

    `raw` is the decoded reply (stop token removed, not stripped: a plain reply starts with a blank metadata
    line). The official parsing (`parse_response`, which never executes anything) decides; a call of a tool the
    request did not offer, or one whose literal arguments have no JSON form (sets, bytes, ...), is not a call:
    the reply then comes back as plain content.
    """
    content, _, problem = parse_response(raw, [{"role": "system", "content": "", "tools": []}])
    if problem or not isinstance(content, dict) or "parameters" not in content or content["name"] not in tool_names:
        return None
    try:
        arguments = json.dumps(content["parameters"], ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return {"name": content["name"], "arguments": arguments}
