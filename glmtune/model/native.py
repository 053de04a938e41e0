"""glmtune's one native kernel: int4 weights x int8 activations on x86 CPUs with AVX2 (csrc/int4_avx2.cpp).

Why our own: on an AVX2-only CPU (2-core AMD EPYC, no AVX-512) torch 2.13's `_weight_int4pack_mm_for_cpu`
is compute-bound on one row (it dequantizes every nibble to float and does fp32 FMAs); it read its 6B
weights at ~6.6 GB/s against ~27 GB/s the memory gives, so decoding ran at 0.57x chatglm.cpp's q4_0.
What was measured instead (bench/README.md): inductor's fused dequantize-and-dot (`torch.compile`) read
the weight 10x slower than torch's kernel after a 167 s compile, and `aten._dyn_quant_matmul_4bit` (int8
activations x int4, built on ARM's KleidiAI) rejected every call on x86; torchao is not installed here and
was not evaluated. The integer dot product ggml uses on AVX2 (`maddubs`: 32 multiply-adds in one
instruction) is what this kernel does, on the official int4 layout as it is (no repacking, no copy).

Its arithmetic (bench/README.md and tests/test_native_kernel.py): each activation row is quantized per
block of 32 to int8 with an fp32 scale absmax/127, as ggml's q8_0; dot products are exact in int32 per
block and summed in fp32 with the block scales; the fp16 row scale is applied last in fp32. So it is
an approximation of the exact path of the same order as bf16 activations (relative error ~5e-3).

Built once, by the set-up command (`python -m glmtune.model.native build`, run by shell/setup.sh),
with torch's C++ extension builder into ~/.cache/glmtune/kernels/ (GLMTUNE_KERNEL_DIR overrides), one
folder per torch version and source hash. Nothing is compiled at run time: when the library is absent
(no compiler, another torch), the CPU is not x86 with AVX2 and FMA, it fails its probe, or
GLMTUNE_NATIVE=0, `available()` is False and int4 layers use torch's kernels as before.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "int4_avx2.cpp"
NAME = "glmtune_native"
BLOCK = 32  # activation quantization block; K must be a multiple of it
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c"]


def build_dir() -> Path:
    root = Path(os.environ.get("GLMTUNE_KERNEL_DIR") or Path.home() / ".cache" / "glmtune" / "kernels")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    return root / f"torch-{torch.__version__}-{digest}"


def library_path() -> Path:
    return build_dir() / f"{NAME}.so"


def cpu_has_avx2() -> bool:
    """x86 with AVX2 and FMA, as torch sees it (its dispatch level is AVX2 or above)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build(verbose: bool = False) -> Path:
    """Compile the kernel into `build_dir()` (needs a C++ compiler and ninja); returns the library path."""
    from torch.utils.cpp_extension import load

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    load(NAME, [str(SOURCE)], build_directory=str(out), extra_cflags=CFLAGS, is_python_module=False, verbose=verbose)
    return library_path()


def reference_int4_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in torch ops (fp64 sums): x quantized per block of 32 as the kernel does,
    times the official int4 weight [N, K/2] and fp16 row scale. For tests and the load-time probe."""
    from glmtune.model.qkernels import unpack_int4

    xf = x.float().reshape(x.shape[0], -1, BLOCK)
    d = xf.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(xf * inv)
    blocks = torch.einsum("mbi,nbi->mnb", xq.double(), unpack_int4(weight, torch.float64).reshape(weight.shape[0], -1, BLOCK))
    y = (blocks * d.double().squeeze(-1)[:, None, :]).sum(-1) * scale.double()[None, :]
    return y.to(x.dtype)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the built kernel loads here and reproduces `reference_int4_mm` on a probe."""
    if os.environ.get("GLMTUNE_NATIVE", "1") == "0" or not cpu_has_avx2() or not library_path().is_file():
        return False
    try:
        torch.ops.load_library(str(library_path()))
        gen = torch.Generator().manual_seed(0)
        weight = torch.randint(-128, 128, (6, 32), generator=gen, dtype=torch.int8)
        scale = (torch.rand(6, generator=gen) + 0.5).half()
        x = torch.randn(3, 64, generator=gen)
        got, want = int4_mm(x, weight, scale), reference_int4_mm(x, weight, scale)
        return bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()))
    except (OSError, RuntimeError, AttributeError):
        return False


def supports(n: int, k: int) -> bool:
    return k % BLOCK == 0 and n % 2 == 0 and available()


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp32/bf16/fp16) @ (official int4 weight [N, K/2] * fp16 scale [N])^T -> [M, N] in x's dtype."""
    return torch.ops.glmtune_native.int4_mm(x, weight, scale)


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m glmtune.model.native build", file=sys.stderr)
        return 2
    if not cpu_has_avx2():
        print("glmtune native kernel: this CPU has no AVX2; int4 uses torch's kernels")
        return 0
    try:
        path = build()
    except Exception as exc:  # no compiler, no ninja, headers missing: report, the fallback stays
        print(f"glmtune native kernel not built ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
              "int4 uses torch's kernels", file=sys.stderr)
        return 1
    ok = available()
    print(f"glmtune native kernel: {path} ({'passes its probe' if ok else 'FAILS its probe: not used'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
