"""The CPU compute dtype chosen when none is given: bf16 only where the CPU has bf16 instructions."""

import torch

from glmtune.model.cpu_linear import cpu_compute_dtype


def test_cpu_without_bf16_instructions_computes_in_fp32_and_says_why():
    dtype, reason = cpu_compute_dtype({"avx", "avx2", "fma", "f16c"})
    assert dtype == torch.float32 and "no bf16 instructions" in reason


def test_cpu_with_avx512_bf16_or_amx_computes_in_bf16():
    for flags in ({"avx512f", "avx512_bf16"}, {"amx_bf16", "amx_tile"}):
        dtype, reason = cpu_compute_dtype(flags)
        assert dtype == torch.bfloat16 and sorted(flags & {"avx512_bf16", "amx_bf16"})[0] in reason
