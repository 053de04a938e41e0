"""Int4 weight layouts and torch's CPU weight-only kernels, used by `glmtune.model.quantization`.

One int4 weight [N, K] can be stored two ways, both N×K/2 bytes (K padded to a multiple of 32 in the
second, see below):

* the official ChatGLM2 layout (THUDM/chatglm2-6b `quantization.py`, `compress_int4_weight`): int8
  [N, K/2], byte j of row n = q[n, 2j] << 4 | (q[n, 2j+1] & 0xF), signed nibbles in -7..7;
* torch's CPU "tinygemm" layout that `aten._weight_int4pack_mm_for_cpu` reads and
  `aten._convert_weight_to_int4pack_for_cpu` writes (aten/src/ATen/native/cpu/int4mm_kernel.cpp):
  uint8 [N, W/2] of unsigned nibbles q + 8 (W: K rounded up to 32); rows go in blocks of BLOCK_N (64 with AVX512, 32
  otherwise), each block stored k-major. Inside a full block byte j pairs row j with row j + BLOCK_N/2
  (the vectorised kernels) or row 2j with row 2j + 1 (scalar kernel and the last, partial block).

We convert between the two with tensor ops over row (or column) chunks, never through the int32 [N, K]
tensor torch's converter wants, and we do not trust our reading of the C++ source: `cpu_int4_layout()`
packs a probe with torch's own converter and keeps the first candidate layout that reproduces it byte
for byte and multiplies correctly through the kernel; if none does, int4 uses the exact path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from glmtune import compat

# torch 2.13 `_weight_int8pack_mm` crashes or returns garbage when K is not a multiple of 16 (measured:
# K=100 segfaults, K=104 and 120 give NaN); `_weight_int4pack_mm_for_cpu` needs N % 16 == 0 and a
# group size of 32, 64, 128 or 256 dividing K, so its copy of a weight is padded with zero columns to
# a multiple of 32 (2736 -> 2752 for a 2736-wide input: 0.6% more bytes) and the input with zeros.
INT8_KERNEL_K_MULTIPLE = 16
INT4_KERNEL_N_MULTIPLE = 16
INT4_GROUP_SIZES = (256, 128, 64, 32)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- the official int4 layout ------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] values in -8..7 -> official int8 [N, K/2]: even column in the high nibble."""
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)


def unpack_int4(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Official int8 [N, K/2] -> signed values [N, K] in `dtype` (arithmetic shifts keep the sign).

    Written straight into the output dtype: one pass fewer than unpacking to int8 and converting."""
    out = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=dtype, device=packed.device)
    pairs = out.view(packed.shape[0], packed.shape[1], 2)
    pairs[..., 0] = packed >> 4
    pairs[..., 1] = (packed << 4) >> 4
    return out


def _official_to_unsigned(packed: torch.Tensor) -> torch.Tensor:
    """Official int8 [R, K/2] -> uint8 [R, K] nibbles q + 8 (in 4-bit two's complement, q + 8 = q ^ 8)."""
    b = packed.view(torch.uint8)
    return torch.stack((b >> 4, b & 0x0F), dim=-1).reshape(b.shape[0], -1) ^ 8


def _unsigned_to_official(u: torch.Tensor) -> torch.Tensor:
    return (((u[:, 0::2] ^ 8) << 4) | (u[:, 1::2] ^ 8)).view(torch.int8)


# --- torch's CPU int4 layout -------------------------------------------------------------------


@dataclass(frozen=True)
class Int4Layout:
    block_n: int
    split: bool  # full blocks pair row j with row j + block_n/2 (vectorised kernels), else 2j with 2j+1


_CANDIDATES = (Int4Layout(64, True), Int4Layout(32, True), Int4Layout(32, False), Int4Layout(64, False))


def _pack_unsigned(u: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """uint8 [R, K] nibbles for rows starting on a block boundary -> the R*K/2 bytes torch stores."""
    rows, k = u.shape
    block = layout.block_n
    full = rows // block * block
    parts = []
    if full:
        ub = u[:full].view(full // block, block, k)
        if layout.split:
            byte = (ub[:, block // 2:] << 4) | ub[:, : block // 2]
        else:
            byte = (ub[:, 1::2] << 4) | ub[:, 0::2]
        parts.append(byte.transpose(1, 2).reshape(-1))  # k-major inside the block
    if rows > full:  # the last, partial block always pairs adjacent rows
        tail = u[full:]
        parts.append(((tail[1::2] << 4) | tail[0::2]).t().reshape(-1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _unpack_unsigned(flat: torch.Tensor, rows: int, k: int, k0: int, k1: int, layout: Int4Layout) -> torch.Tensor:
    """Columns k0:k1 of `rows` rows (starting on a block boundary) from their stored bytes -> uint8 [rows, k1-k0]."""
    block = layout.block_n
    full = rows // block * block
    out = torch.empty(rows, k1 - k0, dtype=torch.uint8, device=flat.device)
    if full:
        b = flat[: full * k // 2].view(full // block, k, block // 2)[:, k0:k1]
        low, high = b & 0x0F, b >> 4
        if layout.split:
            pairs = torch.cat((low, high), dim=2)
        else:
            pairs = torch.stack((low, high), dim=3).reshape(full // block, k1 - k0, block)
        out[:full].view(full // block, block, k1 - k0).copy_(pairs.transpose(1, 2))
    if rows > full:
        tail = rows - full
        b = flat[full * k // 2:].view(k, tail // 2)[k0:k1]
        out[full:] = torch.stack((b & 0x0F, b >> 4), dim=2).reshape(k1 - k0, tail).t()
    return out


def int4_kernel_width(k: int) -> int:
    """Input width of the kernel's copy: K rounded up to a multiple of the smallest group size, 32."""
    return -(-k // INT4_GROUP_SIZES[-1]) * INT4_GROUP_SIZES[-1]


def official_to_cpu_int4(packed: torch.Tensor, layout: Int4Layout, chunk_rows: int) -> torch.Tensor:
    """Official int8 [N, K/2] -> torch's CPU layout, uint8 [N, W/2] with W = `int4_kernel_width(K)`
    (zero columns appended), converted `chunk_rows` rows at a time."""
    n, half = packed.shape
    pad = int4_kernel_width(2 * half) - 2 * half
    step = max(layout.block_n, chunk_rows // layout.block_n * layout.block_n)
    out = torch.empty(n, half + pad // 2, dtype=torch.uint8, device=packed.device)
    flat = out.view(-1)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        u = _official_to_unsigned(packed[r0:r1])
        if pad:
            u = torch.cat((u, u.new_full((r1 - r0, pad), 8)), dim=1)  # nibble 8 = value 0
        flat[r0 * out.shape[1]: r1 * out.shape[1]] = _pack_unsigned(u, layout)
    return out


def cpu_int4_rows(packed: torch.Tensor, layout: Int4Layout, r0: int, r1: int) -> torch.Tensor:
    """Signed int8 values [r1-r0, W] of rows r0:r1 (r0 on a block boundary) from torch's CPU layout."""
    half = packed.shape[1]
    flat = packed.view(-1)[r0 * half: r1 * half]
    return _unpack_unsigned(flat, r1 - r0, 2 * half, 0, 2 * half, layout).view(torch.int8) - 8


def cpu_int4_cols(packed: torch.Tensor, layout: Int4Layout, k0: int, k1: int) -> torch.Tensor:
    """Signed int8 values [N, k1-k0] of columns k0:k1 from torch's CPU layout."""
    n, half = packed.shape
    return _unpack_unsigned(packed.view(-1), n, 2 * half, k0, k1, layout).view(torch.int8) - 8


def cpu_int4_to_official(packed: torch.Tensor, layout: Int4Layout, chunk_rows: int, k: int) -> torch.Tensor:
    """Torch's CPU layout -> the official int8 [N, K/2], dropping the padding columns."""
    n, half = packed.shape
    step = max(layout.block_n, chunk_rows // layout.block_n * layout.block_n)
    out = torch.empty(n, k // 2, dtype=torch.int8, device=packed.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        flat = packed.view(-1)[r0 * half: r1 * half]
        out[r0:r1] = _unsigned_to_official(_unpack_unsigned(flat, r1 - r0, 2 * half, 0, k, layout))
    return out


# --- kernels -----------------------------------------------------------------------------------


def int4_group_size(k: int) -> int | None:
    """The largest group size the CPU int4 kernel accepts that divides K (scales repeat per row)."""
    return next((g for g in INT4_GROUP_SIZES if k % g == 0), None)


def int4_scales_and_zeros(scale: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """[K/group, N, 2] in `dtype`: each row's one official scale repeated over its groups, zero 0.

    The kernel computes (nibble - 8) * scale + zero, so the official symmetric per-row scheme maps
    onto its group-wise format exactly (up to the scale's rounding to `dtype`)."""
    groups = k // int4_group_size(k)
    s = scale.to(dtype)[None, :, None].expand(groups, -1, 1)
    return torch.cat((s, torch.zeros_like(s)), dim=2).contiguous()


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return compat.int4pack_mm_cpu(x, packed, 2 * packed.shape[1] // scales_and_zeros.shape[0], scales_and_zeros)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return compat.int8pack_mm(x, q, scale)


@functools.lru_cache(maxsize=None)
def cpu_int4_layout() -> Int4Layout | None:
    """The layout this torch build's CPU int4 kernel uses, verified on a probe; None if unknown."""
    try:
        gen = torch.Generator().manual_seed(0)
        n, k = 176, 64  # full 64- and 32-row blocks plus a partial one (176 = 2*64 + 48 = 5*32 + 16)
        u = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        reference = compat.convert_weight_to_int4pack_cpu(u, 2)
        if reference.dtype != torch.uint8 or tuple(reference.shape) != (n, k // 2):
            return None
        x = torch.randn(3, k, generator=gen).to(torch.bfloat16)
        scale = torch.rand(n, generator=gen) + 0.5
        expected = x.float() @ ((u - 8).float() * scale.bfloat16().float()[:, None]).t()
        got = int4_mm(x, reference, int4_scales_and_zeros(scale, k, torch.bfloat16)).float()
        if not torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()):
            return None
        for layout in _CANDIDATES:
            mine = _pack_unsigned(u.to(torch.uint8), layout)
            back = _unpack_unsigned(reference.view(-1), n, k, 0, k, layout)
            if torch.equal(mine, reference.view(-1)) and torch.equal(back, u.to(torch.uint8)):
                return layout
    except (RuntimeError, AttributeError, NotImplementedError):
        pass
    return None


@functools.lru_cache(maxsize=None)
def cpu_int8_kernel_ok() -> bool:
    """Whether `_weight_int8pack_mm` exists here and computes x @ (q * scale)^T on a probe."""
    try:
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (48, 64), generator=gen, dtype=torch.int8)
        x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
        scale = (torch.rand(48, generator=gen) + 0.5).to(torch.bfloat16)
        expected = x.float() @ (q.float() * scale.float()[:, None]).t()
        got = int8_mm(x, q, scale).float()
        return bool(torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def kernel_supported(bits: int, n: int, k: int) -> bool:
    if bits == 8:
        return k % INT8_KERNEL_K_MULTIPLE == 0 and cpu_int8_kernel_ok()
    return n % INT4_KERNEL_N_MULTIPLE == 0 and k % 2 == 0 and cpu_int4_layout() is not None
