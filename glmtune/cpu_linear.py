"""`nn.Linear` for a few fp32 rows on CPU (decoding steps): a large weight as the tall factor, 4 rows at a time.

Decoding feeds every linear layer 1 to 8 rows. torch 2.13's CPU fp32 `F.linear` computes that as
x @ W.T, and for so few rows the BLAS call neither streams a large weight at memory speed nor uses the
second core: on this 2-core machine the 65024 x 1024 output layer of the mid config (bench/serve.py)
takes 13 ms for one row and 35 ms for 4 or 8 rows, while the same product written as W @ x.T with x.T
4 columns wide takes 7 ms (1 to 4 rows) and 14 ms (8 rows, two calls): the weight is read at ~40 GB/s
on both cores. 16 rows are even and 32 are slower, hence `MAX_ROWS`. Weights that fit in the caches
gain nothing or lose (the mid config's 11 MB down projection: 0.7 vs 1.8 ms for 8 rows when it has to
come from memory), hence `MIN_WEIGHT_BYTES`; its 22 MB gate/up projection gains (1.5 vs 2.4 ms). There
is no torch switch for this, so the layer does it itself.

Rows go in fixed blocks of `BLOCK` (the last one padded with zero rows), so each row's result comes from
the same call shape whatever the other rows are: for these layers a row's output is bitwise the same
alone or anywhere in a batch (tests/test_cpu_linear.py). Only inference takes this path (no autograd
through it); training, prompts (more rows), other dtypes and devices use `F.linear` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 4
MAX_ROWS = 8
MIN_WEIGHT_BYTES = 16 * 2**20


def _takes_blocks(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return x.numel() <= MAX_ROWS * x.shape[-1] and weight.numel() * weight.element_size() >= MIN_WEIGHT_BYTES


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed as weight @ rows.T, `BLOCK` rows per call (see the docstring)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    padded = -(-rows // BLOCK) * BLOCK
    blocks = flat.new_zeros(padded, flat.shape[1])
    blocks[:rows] = flat
    out_t = flat.new_empty(weight.shape[0], padded)  # [out, rows]: each call writes its own columns
    for start in range(0, padded, BLOCK):
        torch.mm(weight, blocks[start:start + BLOCK].t(), out=out_t[:, start:start + BLOCK])
    out = out_t[:, :rows].t().contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class RowBlockLinear(nn.Linear):
    """An `nn.Linear` (same parameters and state dict) that takes `blocked_linear` for a few fp32 CPU rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _takes_blocks(x, self.weight):
            return blocked_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_row_blocks(model: nn.Module) -> nn.Module:
    """Make every plain `nn.Linear` of `model` a `RowBlockLinear` (in place; parameters untouched)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = RowBlockLinear
    return model
