"""The terminal chat of `glmtune chat`: the read loop, history and tools files, and what is printed.

Built on the Python API (`glmtune.inference.chat`), which knows nothing of terminals. The loop follows the
official `cli_demo.py` (`clear`, `stop`), plus Ctrl-D to exit and Ctrl-C to stop one answer. ChatGLM3 tool calls
are printed as JSON and never executed: the next line typed is sent back as the tool's observation.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from glmtune.errors import GlmtuneError
from glmtune.families.registry import read_history
from glmtune.fsutil import read_json_file
from glmtune.inference import chat as chat_api
from glmtune.inference.chat import ChatPrompt, truncation_message

def read_history_file(path: str | Path) -> list:
    """A JSON file holding a list of [query, answer] pairs, or (ChatGLM3) of messages {role, content}
    (what `--json` prints as "history"). Which of the two it is, is the file's format: the model's family
    checks it fits when chatting."""
    data = read_json_file(path, "history file")
    if isinstance(data, dict) and "history" in data:  # accept `--json` output as is
        data = data["history"]
    return read_history(data, str(path))


def read_tools_file(path: str | Path) -> list:
    """A JSON file holding a list of tool descriptions (ChatGLM3 `tools`)."""
    tools = read_json_file(path, "tools file")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise GlmtuneError(f"{path}: expected a JSON list of tool objects, found {type(tools).__name__}")
    return tools


# --- the read loop ----------------------------------------------------------------------------

BANNER = "glmtune chat: type a message and press Enter. 'clear' resets the history, 'stop' or Ctrl-D exits, Ctrl-C stops an answer."


def run_repl(
    model,
    tokenizer,
    *,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    err: TextIO | None = None,
    debug_prompt: bool = False,
    start: list | None = None,
    **chat_kwargs,
) -> list:
    """The interactive loop; returns the history at exit. `chat_kwargs` go to `stream_chat`.

    ChatGLM3: `start` is the history to begin with and to return to on `clear` (the `--system` / `--tools`
    message); when a reply is a tool call, it is printed as JSON and the next line typed is sent back as
    the tool's observation (role `observation`). Nothing is ever executed."""
    out = out or sys.stdout
    err = err or sys.stderr

    def show_prompt(prepared: ChatPrompt) -> None:
        if prepared.dropped:
            err.write(f"note: {truncation_message(prepared)}\n")
        if debug_prompt:
            err.write(f"[prompt {len(prepared.input_ids)} tokens] {json.dumps(prepared.prompt, ensure_ascii=False)}\n")
        err.flush()
        # The label comes after the notes, so they never land inside the answer.
        out.write("\nChatGLM: ")
        out.flush()

    out.write(BANNER + "\n")
    start = list(start or [])
    history: list = list(start)
    role = "user"
    while True:
        try:
            query = read("\nObservation: " if role == "observation" else "\nUser: ")
        except EOFError:
            out.write("\n")
            break
        except KeyboardInterrupt:
            out.write("\n(type 'stop' or press Ctrl-D to exit)\n")
            continue
        query = query.strip()
        if not query:
            continue
        if query == "stop":
            break
        if query == "clear":
            history, role = list(start), "user"
            out.write("history cleared\n")
            continue
        printed, latest = "", None
        try:
            with contextlib.closing(
                chat_api.stream_chat(model, tokenizer, query, history, on_prompt=show_prompt, role=role, **chat_kwargs)
            ) as stream:
                role = "user"
                for response, latest in stream:
                    if not isinstance(response, str):  # a ChatGLM3 tool call or metadata reply: shown at the end
                        continue
                    # Hold back a trailing U+FFFD: the rest of that character's bytes are still coming.
                    shown = response.rstrip("\ufffd")
                    if shown.startswith(printed) and len(shown) > len(printed):
                        out.write(shown[len(printed):])
                        out.flush()
                        printed = shown
            if latest is not None and isinstance(response, dict):
                out.write(json.dumps(response, ensure_ascii=False))
                if "parameters" in response:  # a tool call: the user runs the tool and types its result
                    role = "observation"
                    out.write("\n(tool call: type the tool's result as the observation)")
            elif latest is not None and response.startswith(printed):  # the held-back tail, if any
                out.write(response[len(printed):])
            out.write("\n")
        except KeyboardInterrupt:
            out.write(" [stopped]\n")
        except GlmtuneError as exc:
            err.write(f"error: {exc}\n")
            continue
        if latest is not None:  # an interrupted answer stays in the history as far as it got
            history = latest
    out.flush()
    return history
