"""bf16 products on CPUs without bf16 instructions are formed in fp32 from the bf16 values
(glmtune.model.cpu_linear): the same result as torch's bf16 product up to the order of the sum, forward and
input gradient, for plain frozen linears and for the int4/int8 layers' exact path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmtune.model import cpu_linear
from glmtune.model.cpu_linear import OneDNNLinear
from glmtune.model.quantization import QuantizedLinear


def ulp(v: torch.Tensor) -> torch.Tensor:
    """bf16's spacing at each value (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(v.float().abs().clamp_min(2.0**-100))) - 7)


def assert_within_a_bf16_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    assert bool((diff <= ulp(want)).all()), f"max diff {diff.max().item()}"


def widening(monkeypatch, on: bool) -> list:
    """Pretend the CPU has (on=False) or lacks (on=True) bf16 instructions; count the widened products."""
    monkeypatch.setattr(cpu_linear, "bf16_products_native", lambda: not on)
    calls = []
    real = cpu_linear._fp32_linear
    monkeypatch.setattr(cpu_linear, "_fp32_linear", lambda *a: calls.append(a[1].shape) or real(*a))
    return calls


def run(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("rows", [16, 40])
def test_frozen_bf16_linear_widened_equals_torchs_bf16_product_and_input_gradient(monkeypatch, rows):
    torch.manual_seed(rows)
    layer = OneDNNLinear(96, 5000, bias=True).to(torch.bfloat16).requires_grad_(False)
    monkeypatch.setattr(cpu_linear, "WIDEN_CHUNK_ELEMENTS", 96 * 1024)  # several row blocks, one partial
    x = torch.randn(2, rows // 2, 96, dtype=torch.bfloat16)
    calls = widening(monkeypatch, on=True)
    got, got_grad = run(layer, x)
    assert calls and all(shape[0] <= 1024 for shape in calls)  # widened, one block of the weight at a time
    want = F.linear(x, layer.weight, layer.bias)
    x2 = x.clone().requires_grad_(True)
    (F.linear(x2, layer.weight, layer.bias).float() * torch.linspace(-1, 1, 5000)).sum().backward()
    assert_within_a_bf16_rounding(got, want)
    assert_within_a_bf16_rounding(got_grad, x2.grad)


def test_few_rows_and_cpus_with_bf16_instructions_keep_torchs_bf16_product(monkeypatch):
    layer = OneDNNLinear(64, 128, bias=False).to(torch.bfloat16).requires_grad_(False)
    calls = widening(monkeypatch, on=True)
    with torch.no_grad():
        assert torch.equal(layer(torch.ones(3, 64, dtype=torch.bfloat16)), F.linear(torch.ones(3, 64, dtype=torch.bfloat16), layer.weight))
    assert calls == []  # decoding rows: bf16's own GEMV reads the weight once
    calls = widening(monkeypatch, on=False)
    with torch.no_grad():
        layer(torch.ones(64, 64, dtype=torch.bfloat16))
    assert calls == []


def test_a_bf16_weight_that_trains_is_never_widened(monkeypatch):
    layer = OneDNNLinear(64, 32, bias=False).to(torch.bfloat16)
    calls = widening(monkeypatch, on=True)
    run(layer, torch.randn(32, 64, dtype=torch.bfloat16))
    assert calls == [] and layer.weight.grad is not None


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_exact_path_widened_equals_its_bf16_product_and_input_gradient(monkeypatch, bits):
    torch.manual_seed(bits)
    q = QuantizedLinear.from_float(nn.Linear(256, 384, bias=False), bits)
    q.mode = "exact"
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    decisions = []
    real = cpu_linear.widen_bf16_products
    monkeypatch.setattr(cpu_linear, "widen_bf16_products", lambda t: decisions.append(real(t)) or decisions[-1])
    monkeypatch.setattr(cpu_linear, "bf16_products_native", lambda: False)
    got, got_grad = run(q, x)
    assert decisions == [True, True]  # the product and the input gradient
    monkeypatch.setattr(cpu_linear, "bf16_products_native", lambda: True)
    want, want_grad = run(q, x)
    assert decisions[2:] == [False, False]
    assert_within_a_bf16_rounding(got, want)
    assert_within_a_bf16_rounding(got_grad, want_grad)
    assert not torch.equal(got, torch.zeros_like(got))
