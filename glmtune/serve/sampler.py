"""The next token of every row from the batch's logits: greedy, or temperature / top-k / top-p with a per-row seed.

Built on transformers' own warpers (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, applied in
that order, as `generate(do_sample=True)` does), so a sampled row sees the same filtered distribution as
`glmtune chat`. What is ours: greedy rows are picked by one batched argmax (per row, five passes over the
vocabulary each step cost a third of an 8-row step on a 2-core machine), the official guard for non-finite
logits, and one `torch.Generator` per seeded row so a row's draws do not depend on its neighbours.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from glmtune.inference.chat import INVALID_SCORE_TOKEN
from glmtune.serve.request import SamplingParams


def warpers(params: SamplingParams) -> LogitsProcessorList:
    """The warpers `generate` would apply for these settings (greedy: none)."""
    out = LogitsProcessorList()
    if params.greedy:
        return out
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        out.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(params.top_p))
    return out


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """A row's own random stream: seeded when the request gives a seed (reproducible whatever the batch)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is not None:
        # Any integer JSON allows is a valid seed: fold it into the generator's 64-bit range.
        generator.manual_seed(params.seed % (2**64))
    else:
        generator.seed()
    return generator


class RowSampler:
    """One row's sampling state (its warpers and generator), made once when the row joins."""

    def __init__(self, params: SamplingParams, device):
        self.params = params
        self.warpers = warpers(params)
        self.generator = make_generator(params, device)

    def pick(self, scores: torch.Tensor) -> int:
        """The next token from this row's finite float logits [1, vocab]."""
        if self.params.greedy:
            return int(scores.argmax(-1).item())
        scores = self.warpers(None, scores)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator).item())


def guard(scores: torch.Tensor) -> torch.Tensor:
    """The official guard (see chat.InvalidScoreLogitsProcessor): non-finite logits become a one-hot on token 5."""
    out = torch.zeros_like(scores)
    out[..., INVALID_SCORE_TOKEN] = 5e4
    return out


def sample(samplers: list[RowSampler], logits: torch.Tensor) -> list[int | Exception]:
    """Every row's next token from logits [rows, vocab]; a row whose sampling raises gets the exception instead,
    so one bad row fails alone.

    A row's sum is finite only if all its logits are (an inf or NaN makes it inf or NaN), so one reduction
    clears the usual case and only a row whose sum is not finite gets the exact per-element test.
    """
    scores = logits.float()
    sum_finite = torch.isfinite(scores.sum(-1)).tolist()
    greedy = scores.argmax(-1).tolist() if any(s.params.greedy for s in samplers) else None
    out: list[int | Exception] = []
    for i, sampler in enumerate(samplers):
        try:
            finite = sum_finite[i] or bool(torch.isfinite(scores[i]).all())
            if finite and sampler.params.greedy:
                out.append(int(greedy[i]))  # argmax of the row alone: same values, same first maximum
            else:
                row = scores[i:i + 1]
                out.append(sampler.pick(row if finite else guard(row)))
        except Exception as exc:  # noqa: BLE001 - reported on that row only
            out.append(exc)
    return out
