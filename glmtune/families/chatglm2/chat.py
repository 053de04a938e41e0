"""ChatGLM2 chat rules: (query, answer) rounds, the `[Round N]` prompt, the official reply post-processing, and
how an OpenAI chat request becomes a round.

Reproduces `chat` / `stream_chat` / `process_response` of THUDM/chatglm2-6b (modeling_chatglm.py) and the request
reading of THUDM/ChatGLM2-6B `openai_api.py` (the last message is the user's; a leading system message is put in
front of the current query; user/assistant pairs before it are the history), except that a malformed conversation
is an error instead of being silently dropped. ChatGLM2 has no system role and no tool format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from glmtune.errors import GlmtuneError
from glmtune.families.family import RequestError


def process_response(response: str) -> str:
    """The official ChatGLM2 post-processing of a decoded answer (`process_response` of THUDM/chatglm2-6b)."""
    return response.strip().replace("[[训练时间]]", "2023年")


def normalize_history(history: Any, source: str = "history") -> list[tuple[str, str]]:
    """`[[q, a], ...]` or `[(q, a), ...]` as a list of string tuples (a ChatGLM2 history); anything else is an error."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise GlmtuneError(f"{source}: expected a list of [query, answer] pairs, found {type(history).__name__}")
    rounds: list[tuple[str, str]] = []
    for i, item in enumerate(history):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise GlmtuneError(f"{source}[{i}]: expected a [query, answer] pair of strings, found {item!r:.80}")
        rounds.append((item[0], item[1]))
    return rounds


class RoundsChat:
    """ChatGLM2's `chat` / `stream_chat`: history is [(query, answer), ...], the prompt the `[Round N]` template
    (`tokenizer.build_prompt`), every generated token yields the post-processed answer so far.
    `glmtune.families.family.Family` documents each method."""

    format = "rounds"
    unit = "round(s)"

    def split_history(self, history: Any, role: str) -> tuple[list, list]:
        if role != "user":
            raise GlmtuneError(f"role {role!r}: ChatGLM2 has only user/assistant rounds (use a ChatGLM3 or GLM-4 model)")
        return [], normalize_history(history)

    def prompt(self, tokenizer: Any, query: str, history: list, role: str) -> tuple[str, list[int]]:
        prompt = tokenizer.build_prompt(query, history)
        return prompt, tokenizer(prompt)["input_ids"]

    def answer(self, tokenizer: Any, ids: list[int], history: list, query: str, role: str, stop_ids: list[int],
               warn: bool = True) -> tuple[str, list]:
        response = process_response(tokenizer.decode(ids))
        return response, history + [(query, response)]

    def stream(self, tokenizer: Any, chunks: Iterable[list[int]], answer: Callable, stop_ids: list[int]) -> Iterator:
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(chunk)
            yield answer(ids, False)

    def history_json(self, history: list) -> list:
        return [list(r) for r in history]

    def opening(self, system: str | None, tools: list | None, history: list) -> list:
        if system is not None or tools is not None:
            raise GlmtuneError("--system and --tools need a ChatGLM3 model (or GLM-4; ChatGLM2 has no system role)")
        return list(history)


def read_request(messages: list[dict], tools: list[dict] | None) -> tuple[str, list, str]:
    """(query, history, "user") of an OpenAI chat request, as the official openai_api.py reads it."""
    if tools is not None:
        raise RequestError("tools need a ChatGLM3 model (or GLM-4); this one is ChatGLM2, which has no tool format", param="tools")
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if m["role"] == "tool" or m.get("tool_calls"):
            raise RequestError(f"messages.{i}: tool calls and tool results need a ChatGLM3 model (or GLM-4); this "
                               "one is ChatGLM2, which has no tool format", param=f"messages.{i}")
    if msgs[-1]["role"] != "user":
        raise RequestError(f"the last message must have role 'user', found {msgs[-1]['role']!r}", param="messages")
    query = msgs.pop()["content"]
    if msgs and msgs[0]["role"] == "system":
        query = msgs.pop(0)["content"] + query
    if len(msgs) % 2:
        raise RequestError("before the last message, expected user/assistant pairs (after an optional leading "
                           f"system message); found {len(msgs)} messages", param="messages")
    history = []
    for i in range(0, len(msgs), 2):
        roles = (msgs[i]["role"], msgs[i + 1]["role"])
        if roles != ("user", "assistant"):
            raise RequestError(f"messages {i}, {i + 1}: expected roles ('user', 'assistant'), found {roles}",
                               param="messages")
        history.append((msgs[i]["content"], msgs[i + 1]["content"]))
    return query, history, "user"
