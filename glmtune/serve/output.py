"""From generated ids to the text a client sees: incremental detokenization, post-processing, stop strings,
finish reasons and usage. No tensors, no threads, no HTTP.

Each step costs text work proportional to the new token, not to the answer so far:

* `IncrementalDetokenizer` decodes a short window of recent ids twice (with and without the new ones) and
  sends the difference, as vLLM's detokenizer does: decoding the window from a token boundary is what
  keeps SentencePiece's leading-space rule and byte-fallback pieces right. A window whose text ends in
  U+FFFD (a character whose other bytes are in the next token) is held until the character completes.
* `TextStream` applies the chat post-processing (`TextRules`: strip, fixed replacements) and the stop strings
  to the not-yet-sent tail only, holding back what may still change: trailing whitespace, a partial
  replacement pattern, the start of a stop string.

The concatenated deltas equal `rules(tokenizer.decode(ids))` cut at the first stop string (tested against the
whole-text functions on many answers).
"""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.serve.request import Event, Request

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas of a growing id list; the tokenizer's `decode` is only ever called on a few ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window starts here (context for the next delta)
        self.read_offset = 0  # ids up to here have been turned into text

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is held (an incomplete character at the very end comes out as the decoder writes it)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) and not final:
            return ""
        if after.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # the last character's other bytes come with the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before):]


@dataclass(frozen=True)
class TextRules:
    """A whole-text post-processing that can be applied to a stream: `strip()` then fixed replacements."""

    strip: bool = False
    replacements: tuple[tuple[str, str], ...] = ()

    def __call__(self, text: str) -> str:
        """The rules on a whole text (what the stream must equal)."""
        if self.strip:
            text = text.strip()
        for old, new in self.replacements:
            text = text.replace(old, new)
        return text


# `glmtune.inference.chat.process_response` (ChatGLM2's official post-processing) as stream rules; a test checks
# the two agree on the whole text.
CHAT_RULES = TextRules(strip=True, replacements=(("[[训练时间]]", "2023年"),))
RAW = TextRules()


def _partial_suffix(text: str, patterns, start: int = 0) -> int:
    """Length of the longest tail of text[start:] that is a proper prefix of one of `patterns` (0 if none)."""
    best = 0
    for p in patterns:
        for k in range(min(len(p) - 1, len(text) - start), best, -1):
            if text.endswith(p[:k]):
                best = k
                break
    return best


class TextStream:
    """The rules and the stop strings applied to text that arrives in pieces."""

    def __init__(self, rules: TextRules | None, stop: tuple[str, ...] = ()):
        self.rules = rules or RAW
        self.stop = tuple(s for s in stop if s)
        self.raw = ""  # received, rules not applied yet
        self.out = ""  # rules applied, not sent yet (may hold the start of a stop string)
        self.begun = False  # some non-blank text passed (the leading strip is done)

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the answer)."""
        self.raw += text
        raw = self.raw
        if final:
            safe, self.raw = (raw.rstrip() if self.rules.strip else raw), ""
        else:
            # Hold a partial replacement pattern (only after the last complete one) and trailing whitespace.
            last = 0
            for old, _ in self.rules.replacements:
                at = raw.rfind(old)
                last = max(last, at + len(old) if at >= 0 else 0)
            cut = len(raw) - _partial_suffix(raw, [old for old, _ in self.rules.replacements], last)
            if self.rules.strip:
                cut = len(raw[:cut].rstrip())
            safe, self.raw = raw[:cut], raw[cut:]
        if self.rules.strip and not self.begun:
            safe = safe.lstrip()
            self.begun = bool(safe)
        for old, new in self.rules.replacements:
            safe = safe.replace(old, new)
        self.out += safe
        hits = [i for i in (self.out.find(s) for s in self.stop) if i >= 0]
        if hits:
            send, self.out = self.out[:min(hits)], ""
            return send, True
        keep = 0 if final else _partial_suffix(self.out, self.stop)
        send, self.out = self.out[:len(self.out) - keep], self.out[len(self.out) - keep:]
        return send, False


class RequestOutput:
    """One request's answer so far; `add` turns its next token into the events to send."""

    def __init__(self, request: Request, tokenizer, stop_ids: frozenset[int]):
        self.request = request
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.text = TextStream(request.postprocess, request.params.stop)
        self.finish_reason: str | None = None

    def add(self, token: int) -> list[Event]:
        """Events for a new token: a text delta (or an empty first event), and the final event if it ended."""
        request, p = self.request, self.request.params
        self.ids.append(token)
        ended = token in self.stop_ids
        raw = "" if ended else self.detokenizer.add(token)
        length = len(self.ids) >= p.max_tokens or (
            request.window and len(request.prompt_ids) + len(self.ids) >= request.window)
        final = ended or bool(length)
        if final:
            raw += self.detokenizer.flush()
        send, hit_stop = self.text.feed(raw, final=final)
        reason = "stop" if (ended or hit_stop) else ("length" if length else None)
        events = []
        if send:
            events.append(Event(text=send))
        elif len(self.ids) == 1 and reason is None:
            events.append(Event())  # the first token exists even if it shows no text yet
        if reason is not None:
            self.finish_reason = reason
            events.append(self.final(reason))
        return events

    def final(self, reason: str, error: str | None = None, kind: str | None = None) -> Event:
        return Event(finish_reason=reason, prompt_tokens=len(self.request.prompt_ids),
                     completion_tokens=len(self.ids), token_ids=list(self.ids), error=error, error_kind=kind)
