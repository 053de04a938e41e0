"""Chat with a ChatGLM2 or ChatGLM3 model (optionally with a P-tuning v2 prefix): Python API and terminal REPL.

Reproduces `ChatGLMForConditionalGeneration.chat` / `stream_chat` of THUDM/chatglm2-6b
(modeling_chatglm.py) on transformers' `generate`:

* the prompt is the official `[Round N]\\n\\n问：...\\n\\n答：` template (`tokenizer.build_prompt`), encoded
  with `[gMASK] sop` in front;
* sampling defaults top_p 0.8, temperature 0.8 and top_k 50 (transformers 4.30's default, which the
  official chat inherited; transformers 5 has none, so it is passed explicitly);
* `InvalidScoreLogitsProcessor`: NaN/inf scores are replaced by a one-hot on token 5;
* `process_response` (ChatGLM2's rule, `glmtune.families.chatglm2.chat`): strip, and the `[[训练时间]]`
  placeholder becomes `2023年` (ChatGLM2 does no punctuation swapping, unlike ChatGLM-6B);
* `chat` returns `(response, history + [(query, response)])`; `stream_chat` yields that pair after
  every generated token.

What differs between families is asked of the tokenizer's family (`glmtune.families.registry.family_of`): how the
history is checked, the prompt, the post-processing and which partial answers are streamed. ChatGLM3
(`glmtune.families.chatglm3.chat.RolesChat`) follows `chat` / `stream_chat` of THUDM/chatglm3-6b instead: the prompt is
`build_chat_input(query, history, role)` over message dicts (system prompt and tools, observations),
generation stops on `</s>`, `<|user|>` or `<|observation|>`, and the reply goes through
`glmtune.families.chatglm3.chat.process_response` (a tool call comes back as a dict, parsed without `eval`). Two
official quirks are not copied: the official `chat` decodes `generated[:-1]`, dropping the last token
even when generation stopped at the length limit (glmtune drops only a stop token), and when the first
token is a stop token the official `chat` returns "" while `stream_chat` yields nothing (glmtune's
stream yields `("", history)` once).

Additions: when the prompt would not fit the window (`seq_length` of the model, or `max_length` if
smaller, minus room for the answer) the oldest rounds are dropped and a `HistoryTruncatedWarning`
says so; the returned history is then the kept rounds plus the new one. The REPL follows the official
`cli_demo.py` (`clear`, `stop`), plus Ctrl-D to exit and Ctrl-C to stop one answer.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from glmtune.errors import GlmtuneError
from glmtune.families.registry import DEFAULT_FAMILY, family_of, read_history
from glmtune.fsutil import read_json_file
from glmtune.inference.sampling import CHAT_TEMPERATURE, CHAT_TOP_P, DEFAULT_MAX_LENGTH, TOP_K
from glmtune.model.loading import find_tokenizer  # noqa: F401 (lives in loading, below merge; still importable here)

# Room kept for the answer when fitting the history, unless max_new_tokens says otherwise.
DEFAULT_ANSWER_ROOM = 1024
INVALID_SCORE_TOKEN = 5  # the official guard's token id

class HistoryTruncatedWarning(UserWarning):
    """The oldest rounds of a chat history were dropped so that the prompt fits the window."""


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """The official guard: if any score is NaN or inf, all scores become 0 except token 5 (5e4).

    Sampling from NaN probabilities would raise inside `torch.multinomial`; this turns a numerically
    broken step (typically fp16 overflow) into one harmless token instead of a crash.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not torch.isfinite(scores).all():
            scores = torch.zeros_like(scores)
            scores[..., INVALID_SCORE_TOKEN] = 5e4
        return scores


def read_history_file(path: str | Path) -> list:
    """A JSON file holding a list of [query, answer] pairs, or (ChatGLM3) of messages {role, content}
    (what `--json` prints as "history"). Which of the two it is, is the file's format: the model's family
    checks it fits when chatting."""
    data = read_json_file(path, "history file")
    if isinstance(data, dict) and "history" in data:  # accept `--json` output as is
        data = data["history"]
    return read_history(data, str(path))


def process_response(response: str) -> str:
    """The official post-processing of a plain decoded answer of the default family (ChatGLM2: strip, and the
    `[[训练时间]]` placeholder becomes `2023年`). A model's own rule is `family_of(tokenizer).process_text`."""
    return DEFAULT_FAMILY.process_text(response)


def read_tools_file(path: str | Path) -> list:
    """A JSON file holding a list of tool descriptions (ChatGLM3 `tools`)."""
    tools = read_json_file(path, "tools file")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise GlmtuneError(f"{path}: expected a JSON list of tool objects, found {type(tools).__name__}")
    return tools


def load_chat_model(
    model_path: str | Path,
    ptuning_checkpoint: str | Path | None = None,
    *,
    quantization_bit: int | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    family: str | None = None,
):
    """(model, tokenizer) ready to chat; pre_seq_len / prefix_projection come from the checkpoint, the
    family (`glmtune.families.registry`) from `family` or the model folder."""
    from glmtune.model.loading import load_model, read_chatglm_config

    read_chatglm_config(model_path)  # "not a model folder" says more than "no tokenizer"
    tokenizer = find_tokenizer(model_path, ptuning_checkpoint, family=family)
    from glmtune.model.loading import resolve_device

    device, dtype = resolve_device(device, dtype)
    model = load_model(model_path, ptuning_checkpoint=ptuning_checkpoint, quantization_bit=quantization_bit,
                       dtype=dtype, device=device, family=tokenizer.family)
    return model, tokenizer


# --- prompt ------------------------------------------------------------------------------------


@dataclass
class ChatPrompt:
    """The prompt actually sent to the model, and which history rounds it contains."""

    prompt: str
    input_ids: list[int]
    history: list  # the rounds (ChatGLM3: messages) included in the prompt
    dropped: int  # how many of the oldest rounds were left out
    window: int  # tokens the prompt and answer may use together
    unit: str = "round(s)"  # what `dropped` counts (the family's `history_unit`)


def context_window(model, max_length: int = DEFAULT_MAX_LENGTH) -> int:
    """Prompt + answer tokens allowed: the model's `seq_length`, or `max_length` if smaller.

    The prefix does not count: its keys carry no position, as in the official model.
    """
    seq_length = (getattr(model, "chatglm_config", None) or {}).get("seq_length") or model.config.max_position_embeddings
    return min(int(max_length), int(seq_length))


def build_chat_prompt(
    tokenizer, query: str, history=None, *, window: int, answer_room: int, role: str = "user"
) -> ChatPrompt:
    """The official prompt with as many of the latest rounds as fit in `window - answer_room` tokens.

    ChatGLM2: `history` is `[(query, answer), ...]`. ChatGLM3: a list of messages `{role, content}`; the
    leading system message (with its tools) always stays, the oldest other messages are dropped first.
    """
    limit = window - answer_room
    if limit <= 0:
        raise GlmtuneError(f"no room for a prompt: window {window} tokens, {answer_room} kept for the answer")
    family = family_of(tokenizer)
    pinned, rounds = family.split_history(history, role)

    def attempt(start: int) -> ChatPrompt | None:
        kept = pinned + rounds[start:]
        prompt, ids = family.chat_prompt(tokenizer, query, kept, role)
        return ChatPrompt(prompt, ids, kept, start, window, family.history_unit) if len(ids) <= limit else None

    best = attempt(0)
    if best is not None:
        return best
    best = attempt(len(rounds))
    if best is None:
        alone = len(family.chat_prompt(tokenizer, query, [], role)[1])
        raise GlmtuneError(
            f"the query alone is {alone} tokens; at most {limit} fit (window {window} minus {answer_room} "
            "for the answer; raise --max-length or lower --max-new-tokens)"
        )
    # Fewer rounds never make a longer prompt: binary-search the first round that can stay.
    lo, hi = 0, len(rounds)  # attempt(lo) does not fit, attempt(hi) does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fitted = attempt(mid)
        if fitted is None:
            lo = mid
        else:
            hi, best = mid, fitted
    return best


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer for the tokenizer's family (ChatGLM2: eos; ChatGLM3: eos, <|user|>, <|observation|>)."""
    return family_of(tokenizer).stop_token_ids(tokenizer)


def _prepare(model, tokenizer, query, history, max_length, max_new_tokens, do_sample, top_p, temperature, top_k,
             logits_processor, on_prompt, extra, role="user") -> tuple[ChatPrompt, dict]:
    window = context_window(model, max_length)
    room = max_new_tokens if max_new_tokens else min(DEFAULT_ANSWER_ROOM, max(1, window // 4))
    try:
        prepared = build_chat_prompt(tokenizer, query, history, window=window, answer_room=room, role=role)
    except GlmtuneError:
        if max_new_tokens:
            raise
        # No answer length was asked for: as the official chat, a prompt that leaves room for one token is
        # still answered (up to max_length), rather than refused for the default answer room.
        prepared = build_chat_prompt(tokenizer, query, history, window=window, answer_room=1, role=role)
    if on_prompt is not None:
        on_prompt(prepared)
    elif prepared.dropped:
        warnings.warn(truncation_message(prepared), HistoryTruncatedWarning, stacklevel=3)
    input_ids = torch.tensor([prepared.input_ids], dtype=torch.long, device=model.device)
    processors = LogitsProcessorList(logits_processor or [])
    processors.append(InvalidScoreLogitsProcessor())
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "max_new_tokens": max_new_tokens or window - len(prepared.input_ids),
        "do_sample": do_sample,
        "logits_processor": processors,
        "eos_token_id": stop_token_ids(tokenizer),
    }
    if do_sample:  # greedy ignores them, and transformers warns when they are set without sampling
        kwargs.update(top_p=top_p, temperature=temperature, top_k=top_k)
    kwargs.update(extra)
    return prepared, kwargs


def _answer(tokenizer, prepared: ChatPrompt, query: str, role: str, ids: list[int], warn: bool = True):
    """(response, history) for the generated `ids` of one answer, in the family's format."""
    return family_of(tokenizer).chat_answer(tokenizer, ids, prepared.history, query, role, warn)


def truncation_message(prepared: ChatPrompt) -> str:
    return (
        f"chat history too long for the {prepared.window}-token window: dropped the oldest "
        f"{prepared.dropped} {prepared.unit}, kept {len(prepared.history)}"
    )


# --- chat / stream_chat ------------------------------------------------------------------------


def chat(
    model,
    tokenizer,
    query: str,
    history=None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: int | None = None,
    do_sample: bool = True,
    top_p: float = CHAT_TOP_P,
    temperature: float = CHAT_TEMPERATURE,
    top_k: int = TOP_K,
    logits_processor=None,
    on_prompt: Callable[[ChatPrompt], None] | None = None,
    role: str = "user",
    **generate_kwargs,
) -> tuple:
    """One answer to `query` after `history`: `(response, history + [(query, response)])`.

    ChatGLM3: `history` is a list of messages and `role` the query's role (user, observation, system); the
    result is `(response, history + [{role, content: query}, {role: assistant, metadata, content}])`, the
    response a string or, for a tool call, `{"name", "parameters"}` (see glmtune.families.chatglm3.chat).
    `max_new_tokens` caps the answer (default: whatever the window leaves). `on_prompt` receives the
    `ChatPrompt` before generation (then no warning is issued for dropped rounds: the callback decides).
    """
    prepared, kwargs = _prepare(model, tokenizer, query, history, max_length, max_new_tokens, do_sample, top_p,
                                temperature, top_k, logits_processor, on_prompt, generate_kwargs, role)
    output = model.generate(**kwargs)
    return _answer(tokenizer, prepared, query, role, output[0, len(prepared.input_ids):].tolist())


class _TokenQueue(BaseStreamer):
    """Hands the ids `generate` produces to the consuming thread; the first `put` is the prompt."""

    DONE = object()

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(self.DONE)


class _StopWhenSet(StoppingCriteria):
    """Ends generation after the current token once the consumer is gone (closed or interrupted)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_chat(
    model,
    tokenizer,
    query: str,
    history=None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_new_tokens: int | None = None,
    do_sample: bool = True,
    top_p: float = CHAT_TOP_P,
    temperature: float = CHAT_TEMPERATURE,
    top_k: int = TOP_K,
    logits_processor=None,
    on_prompt: Callable[[ChatPrompt], None] | None = None,
    role: str = "user",
    **generate_kwargs,
) -> Iterator[tuple]:
    """Like `chat`, yielding `(partial_response, history + [(query, partial_response)])` per token.

    `generate` runs in a worker thread feeding a queue, so the consumer can stop at any time: closing
    the generator (or an exception such as KeyboardInterrupt while it waits) stops generation after
    the token being computed and joins the thread.

    ChatGLM3 (as the official `stream_chat`): a partial answer is yielded only when its text is not empty
    and does not end in an incomplete character (U+FFFD); the final answer is always yielded once.
    """
    prepared, kwargs = _prepare(model, tokenizer, query, history, max_length, max_new_tokens, do_sample, top_p,
                                temperature, top_k, logits_processor, on_prompt, generate_kwargs, role)
    tokens = _TokenQueue()
    stop = threading.Event()
    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    criteria.append(_StopWhenSet(stop))

    def work() -> None:
        try:
            model.generate(**kwargs, streamer=tokens, stopping_criteria=criteria)
        except BaseException as exc:  # re-raised in the consumer's thread
            tokens.queue.put(exc)

    def chunks() -> Iterator[list[int]]:
        while True:
            try:
                # A timeout keeps the wait interruptible by Ctrl-C on every platform.
                item = tokens.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _TokenQueue.DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    worker = threading.Thread(target=work, name="glmtune-generate", daemon=True)
    worker.start()
    try:
        # The family decides which partial answers are shown (ChatGLM3 holds back empty and half characters).
        yield from family_of(tokenizer).stream_answers(
            tokenizer, chunks(), lambda ids, warn: _answer(tokenizer, prepared, query, role, ids, warn=warn)
        )
    finally:
        stop.set()
        worker.join()


# --- terminal REPL -----------------------------------------------------------------------------

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
                stream_chat(model, tokenizer, query, history, on_prompt=show_prompt, role=role, **chat_kwargs)
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
