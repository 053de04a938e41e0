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


def _frozen(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return not (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)))


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return _frozen(weight, bias) and onednn_linear_ok()


# --- bf16 products on CPUs without bf16 instructions ------------------------------------------------
#
# Without AVX512_BF16 / AMX, torch 2.13's bf16 matrix products on CPU ran at 3.4-3.7 GFLOP/s on the 2-core
# AVX2 EPYC against 16-36 for fp32 at the same shapes (a 9B P-tuning step of 1,024 tokens would take hours).
# A bf16 product accumulates in fp32 and rounds its result to bf16 once; forming it from the same bf16
# values widened to fp32 (exactly) gives that result up to the order of the sum, at fp32 speed. The weight
# is widened in row blocks, so at most one block of fp32 weight exists at a time.

BF16_VIA_FP32_MIN_ROWS = 16  # one to a few rows (decoding) read the weight once: bf16's own GEMV is as fast
WIDEN_CHUNK_ELEMENTS = 1 << 22  # 16 MB of fp32 weight per block


@functools.lru_cache(maxsize=None)
def bf16_products_native() -> bool:
    """Whether this CPU has bf16 instructions (else torch's bf16 products are emulated: slow)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def widen_bf16_products(x: torch.Tensor) -> bool:
    """Whether a product with `x` ([rows, in]) should be formed in fp32 from its bf16 values (see above)."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[0] >= BF16_VIA_FP32_MIN_ROWS
            and not bf16_products_native())


def _fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return compat.onednn_linear(x, weight, bias) if onednn_linear_ok() else F.linear(x, weight, bias)


def _widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 x [rows, in] times bf16 weight [out, in]^T (+ bias), in fp32, rounded to bf16 once."""
    step = max(1, WIDEN_CHUNK_ELEMENTS // weight.shape[1])
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    for r0 in range(0, weight.shape[0], step):
        r1 = min(weight.shape[0], r0 + step)
        b = None if bias is None else bias[r0:r1].float()
        out[:, r0:r1] = _fp32_linear(x32, weight[r0:r1].float(), b)
    return out


def _widened_grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad [rows, out] @ weight [out, in] in fp32 over row blocks of the weight, rounded to bf16 once."""
    step = max(1, WIDEN_CHUNK_ELEMENTS // weight.shape[1])
    acc = torch.zeros(grad.shape[0], weight.shape[1], dtype=torch.float32)
    for r0 in range(0, weight.shape[0], step):
        r1 = min(weight.shape[0], r0 + step)
        acc.addmm_(grad[:, r0:r1].float(), weight[r0:r1].float())
    return acc.to(grad.dtype)


class _FrozenWidenedLinear(torch.autograd.Function):
    """`_widened_linear` with the gradient of x only (the weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _widened_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return _widened_grad_input(grad.contiguous(), weight), None, None


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` (same parameters and state dict) computed by oneDNN in fp32 on CPU when its weight is
    frozen (inference, or P-tuning's base layers in training); frozen bf16 products of many rows on a CPU
    without bf16 instructions are formed in fp32 from the bf16 values (`_widened_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if (self.weight.dtype == torch.bfloat16 and widen_bf16_products(x2)
                and _frozen(self.weight, self.bias)):
            if torch.is_grad_enabled() and x.requires_grad:
                y = _FrozenWidenedLinear.apply(x2.contiguous(), self.weight, self.bias)
            else:
                y = _widened_linear(x2.contiguous(), self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
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
    instructions (AVX512_BF16 or AMX); elsewhere torch's own bf16 products are emulated (the 6B int4 P-tuning
    step did not finish in 20 minutes on a 2-core AVX2 EPYC that does the same step's ~6e12 fp32 FLOPs at ~190
    GFLOP/s peak), and glmtune's widened products (above) still pay a conversion per product. So: bf16 with
    bf16 instructions, fp32 without; a bf16 run asked for with `--dtype` takes the widened products."""
    flags = cpu_flags() if flags is None else flags
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return torch.bfloat16, f"bfloat16: the CPU has bf16 instructions ({', '.join(native)})"
    return torch.float32, "float32: the CPU has no bf16 instructions (avx512_bf16 / amx_bf16), bf16 products would need fp32 conversions"

