"""`nn.Linear` whose frozen-weight fp32 CPU work goes to oneDNN instead of MKL's sgemm.

torch 2.13's CPU `F.linear` in fp32 calls MKL's sgemm. On this project's machine (AMD EPYC, 2 cores,
AVX-512) that is 2-3x slower than oneDNN's inner product for every shape a ChatGLM model has
(measured with `torch.ops.mkldnn._linear_pointwise`, median of 11-21 calls, mid config of
bench/serve.py, weights [out, in]):

    65024 x 1024 output layer    1 row 13 ms -> 9 ms    8 rows 34 -> 10 ms    312 rows 261 -> 139 ms
    5472 x 1024 gate/up          1 row 0.74 -> 0.27     8 rows 1.6 -> 0.62    312 rows 21.7 -> 9.3
    1024 x 2736 down             1 row 0.17 -> 0.09     8 rows 0.46 -> 0.22   312 rows 10.3 -> 4.3

For one to a few rows (decoding steps) MKL neither streams a large weight at memory speed nor uses
the second core; for many rows (prompts) it is simply slower here. Both accumulate in fp32 (results
differ by rounding, ~2e-6 relative). The op has no autograd formula; P-tuning's base weights are
frozen, so training needs only the gradient of the layer's input, grad @ W, which is the same op with
the weight seen transposed (`_FrozenWeightLinear`; 1536 rows of the mid config: 2736 -> 1024 down
projection forward 43 -> 22 ms, backward 49 -> 21 ms). A layer whose weight trains (the prefix
encoder's MLP with `--prefix-projection`), other dtypes and other devices use `F.linear` unchanged. If
the operator is missing or fails its probe (another torch build), everything uses `F.linear`. The
operator is private: see `glmtune.compat.onednn_linear`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from glmtune import compat


@functools.lru_cache(maxsize=None)
def onednn_linear_ok() -> bool:
    """Whether oneDNN's fp32 linear exists in this torch build and computes F.linear on a probe, also with
    the weight seen transposed (what `_FrozenWeightLinear.backward` passes)."""
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(3, 2, 40, generator=gen), torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
        g = torch.randn(5, 24, generator=gen)
        with torch.inference_mode():
            got, got_t = compat.onednn_linear(x, w, b), compat.onednn_linear(g, w.t(), None)
        return bool(got.shape == (3, 2, 24) and torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
                    and torch.allclose(got_t, g @ w, rtol=1e-5, atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class _FrozenWeightLinear(torch.autograd.Function):
    """y = x W^T + b by oneDNN, with the gradient of x only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return compat.onednn_linear(x.contiguous(), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return compat.onednn_linear(grad.contiguous(), weight.t(), None), None, None


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return onednn_linear_ok()


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` (same parameters and state dict) computed by oneDNN in fp32 on CPU when its weight is
    frozen (inference, or P-tuning's base layers in training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _takes_onednn(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenWeightLinear.apply(x, self.weight, self.bias)
        return compat.onednn_linear(x.contiguous(), self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Make every plain `nn.Linear` of `model` a `OneDNNLinear` (in place; parameters untouched)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is not there)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return set(next((line for line in f if line.startswith("flags")), ":").split(":", 1)[1].split())
    except OSError:
        return set()


def cpu_compute_dtype(flags: set[str] | None = None) -> tuple[torch.dtype, str]:
    """The compute dtype a CPU run should use when none is given, and why.

    bf16 halves the bytes of every activation, but its products are fast only where the CPU has bf16
    instructions (AVX512_BF16 or AMX); elsewhere oneDNN emulates them through fp32 conversions, and the
    6B int4 P-tuning step did not finish in 20 minutes on a 2-core AVX2 EPYC that does the same step's
    ~6e12 fp32 FLOPs at ~190 GFLOP/s peak. So: bf16 with bf16 instructions, fp32 without."""
    flags = cpu_flags() if flags is None else flags
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return torch.bfloat16, f"bfloat16: the CPU has bf16 instructions ({', '.join(native)})"
    return torch.float32, "float32: the CPU has no bf16 instructions (avx512_bf16 / amx_bf16), bf16 products would be emulated"

