"""glmtune's AVX2 int4 kernel (glmtune.model.native): its arithmetic, its use by QuantizedLinear, its fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from glmtune.model import native
from glmtune.model import quantization as Q
from glmtune.model.quantization import QuantizedLinear


def _compiler_missing() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None


@pytest.fixture(scope="module")
def built():
    """The kernel, built once into the cache (as `python -m glmtune.model.native build` does)."""
    if not native.cpu_has_avx2():
        pytest.skip("not an x86 CPU with AVX2: the kernel is never used here")
    if not native.library_path().is_file():
        if _compiler_missing() and not os.environ.get("CI"):
            pytest.skip("no C++ compiler / ninja to build the kernel")
        native.build()
        native.available.cache_clear()
    assert native.available()


def _layer(k: int, n: int, bias: bool = True) -> QuantizedLinear:
    torch.manual_seed(0)
    return QuantizedLinear.from_float(torch.nn.Linear(k, n, bias=bias), 4)


@pytest.mark.parametrize(("rows", "k", "n"), [(1, 64, 6), (3, 96, 34), (65, 256, 112)])
def test_native_kernel_equals_its_stated_arithmetic(built, rows, k, n):
    layer = _layer(k, n)
    x = torch.randn(rows, k) * 3
    got = native.int4_mm(x, layer.weight, layer.weight_scale)
    want = native.reference_int4_mm(x, layer.weight, layer.weight_scale)
    # Same int8 activations, exact integer block sums; only fp32 accumulation of the blocks differs.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    got_bf16 = native.int4_mm(x.bfloat16(), layer.weight, layer.weight_scale)
    assert got_bf16.dtype == torch.bfloat16
    want_bf16 = native.reference_int4_mm(x.bfloat16(), layer.weight, layer.weight_scale).float()
    assert (got_bf16.float() - want_bf16).abs().max() <= 2**-8 * want_bf16.abs().max()  # one bf16 rounding


def test_native_path_is_within_the_activation_rounding_bound_of_the_exact_path(built):
    layer = _layer(256, 112)
    x = torch.randn(9, 256)
    layer.mode = "exact"
    exact = layer(x)
    layer.mode = "native"
    y = layer(x)
    # Rounding an activation to its block's int8 grid moves it by at most half a step (absmax/254), so an
    # output moves by at most sum_k |w_k| * step_k / 2 (plus fp32 rounding, far below).
    w = layer.dequantized_weight().abs()
    step = (x.reshape(9, -1, 32).abs().amax(-1) / 127).repeat_interleave(32, dim=1)
    bound = (step / 2) @ w.t()
    assert ((y - exact).abs() <= bound * 1.0001 + 1e-6).all()
    assert (y - exact).abs().max() > 0  # it is an approximation: this checks the native path really ran


def test_auto_mode_takes_the_native_kernel_for_bf16_rows_and_keeps_the_official_layout(built):
    layer = _layer(256, 112)
    official = layer.weight.clone()
    x = torch.randn(Q.NATIVE_MAX_ROWS, 256).bfloat16()
    y = layer(x)
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, official)  # never repacked
    want = native.int4_mm(x, official, layer.weight_scale).add_(layer.bias.to(torch.bfloat16))
    assert torch.equal(y, want)
    more = torch.randn(Q.NATIVE_MAX_ROWS + 1, 256).bfloat16()  # a long prompt: the exact path
    layer.mode = "exact"
    exact = layer(more)
    layer.mode = "auto"
    assert torch.equal(layer(more), exact)


def test_native_mode_after_torch_kernel_goes_back_to_the_official_layout(built):
    layer = _layer(256, 112)
    official = layer.weight.clone()
    layer.mode = "kernel"
    layer(torch.randn(2, 256).bfloat16())
    assert layer.weight.dtype == torch.uint8  # torch's layout
    layer.mode = "native"
    layer(torch.randn(2, 256).bfloat16())
    assert torch.equal(layer.weight, official)


def test_without_the_native_kernel_auto_mode_uses_torch_kernels_as_before(monkeypatch):
    monkeypatch.setattr(native, "supports", lambda n, k: False)
    layer = _layer(256, 112)
    x = torch.randn(1, 256).bfloat16()
    y = layer(x)
    layer.mode = "kernel"
    assert torch.equal(y, layer(x))
    layer.mode = "native"  # forced but unavailable: what auto would do
    assert torch.equal(y, layer(x))


def test_shapes_the_kernel_cannot_take_use_the_other_paths(built):
    layer = _layer(80, 112)  # 80 is not a multiple of the 32-column activation block
    assert not native.supports(112, 80)
    x = torch.randn(2, 80)
    layer.mode = "native"
    y = layer(x)
    layer.mode = "exact"  # what auto picks for fp32 activations
    assert torch.equal(y, layer(x))


FALLBACK = """
import torch
from glmtune.model import native
from glmtune.model.quantization import QuantizedLinear
torch.manual_seed(0)
layer = QuantizedLinear.from_float(torch.nn.Linear(256, 112), 4)
print(native.available(), layer(torch.randn(1, 256).bfloat16()).shape[-1])
"""


@pytest.mark.parametrize("env", [{"GLMTUNE_NATIVE": "0"}, {"GLMTUNE_KERNEL_DIR": "EMPTY"}])
def test_disabled_or_unbuilt_kernel_falls_back_cleanly(env, tmp_path):
    env = {k: str(tmp_path) if v == "EMPTY" else v for k, v in env.items()}
    out = subprocess.run([sys.executable, "-c", FALLBACK], env=dict(os.environ, **env),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "112"]


def test_build_without_a_compiler_says_so_and_exits_nonzero(tmp_path):
    if not native.cpu_has_avx2():
        pytest.skip("the build command does nothing on CPUs without AVX2")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), GLMTUNE_KERNEL_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "glmtune.model.native", "build"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "not built" in out.stderr and "torch's kernels" in out.stderr
    assert "Traceback" not in out.stderr
