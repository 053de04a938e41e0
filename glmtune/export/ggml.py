"""GGML tensor encodings (f32, f16, q8_0, q4_0) and the tensor records of a chatglm.cpp model file.

Written here rather than taken from a library: the `gguf` package writes GGUF, a different container,
and chatglm.cpp 0.4 reads only its own older GGML layout; its converter needs transformers 4.30 and the
model's remote code. So glmtune encodes the blocks itself, as ggml defines them (`ggml-quants.c`,
`quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`):

* q8_0: blocks of 32 values; d = max|x| / 127 (fp16); q = round-half-away(x / d) as int8. 34 bytes a block.
* q4_0: blocks of 32 values; m = the value of largest magnitude (the first one on ties), d = m / -8 (fp16);
  q = min(15, trunc(x / d + 8.5)) as 4 bits, value j of the block in the low nibble of byte j and value
  16 + j in the high nibble. 18 bytes a block. Dequantized: (q - 8) * d.

The arithmetic follows ggml's C code step by step in float32 (x * (1 / d); for q4_0 also the + 8.5, whose
float32 rounding can move a value just below a half up; q8_0's roundf is exact, done here in float64), so the
blocks are bit for bit what ggml's own quantizer writes.

A tensor record is: name length (int32), name (UTF-8), ndim (int32), the dimensions outermost first
(int32 each), the ggml type id (int32), zero padding to a 16-byte file offset, then the data. Everything is
little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from glmtune.errors import GlmtuneError

F32, F16, Q4_0, Q8_0 = 0, 1, 2, 8  # ggml_type ids
TYPE_IDS = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
TYPE_NAMES = {v: k for k, v in TYPE_IDS.items()}
QUANTIZED = (Q8_0, Q4_0)
BLOCK = 32  # values per q8_0 / q4_0 block
BLOCK_BYTES = {Q8_0: 2 + BLOCK, Q4_0: 2 + BLOCK // 2}
ALIGN = 16  # chatglm.cpp places every tensor's data at a 16-byte file offset
# Rows encoded at a time: bounds the float32 temporaries of a 65024 x 4096 matrix to ~100 MB.
CHUNK_VALUES = 1 << 23


def type_id(name: str) -> int:
    if name not in TYPE_IDS:
        raise GlmtuneError(f"--type: expected one of {', '.join(TYPE_IDS)}, found {name!r}")
    return TYPE_IDS[name]


def _blocks(values: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if flat.size % BLOCK:
        raise GlmtuneError(f"q8_0/q4_0 need a multiple of {BLOCK} values per row, found {flat.size}")
    return flat.reshape(-1, BLOCK)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)


def quantize_q8_0(values: np.ndarray) -> np.ndarray:
    """[n_blocks, 34] uint8: each block's fp16 scale, then 32 int8 values."""
    x = _blocks(values)
    d = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)
    scaled = (x * _inverse(d)[:, None]).astype(np.float64)
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int8)
    out = np.empty((x.shape[0], BLOCK_BYTES[Q8_0]), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out


def quantize_q4_0(values: np.ndarray) -> np.ndarray:
    """[n_blocks, 18] uint8: each block's fp16 scale, then 16 bytes of two 4-bit values."""
    x = _blocks(values)
    rows = np.arange(x.shape[0])
    signed_max = x[rows, np.abs(x).argmax(axis=1)]  # argmax: the first of equal magnitudes, as ggml's loop
    d = (signed_max / np.float32(-8.0)).astype(np.float32)
    shifted = x * _inverse(d)[:, None] + np.float32(8.5)  # float32 throughout, as the C code
    q = np.minimum(15, np.trunc(shifted)).astype(np.uint8)
    out = np.empty((x.shape[0], BLOCK_BYTES[Q4_0]), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, : BLOCK // 2] | (q[:, BLOCK // 2:] << 4)
    return out


def dequantize(raw: np.ndarray, ggml_type: int, count: int) -> np.ndarray:
    """float32 values of `count` elements stored as `ggml_type` in the bytes `raw`."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if ggml_type == F32:
        return raw.view("<f4")[:count].astype(np.float32)
    if ggml_type == F16:
        return raw.view("<f2")[:count].astype(np.float32)
    blocks = raw[: count // BLOCK * BLOCK_BYTES[ggml_type]].reshape(-1, BLOCK_BYTES[ggml_type])
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n, 1]
    if ggml_type == Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
    elif ggml_type == Q4_0:
        packed = blocks[:, 2:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32) - 8.0
    else:
        raise GlmtuneError(f"unknown ggml type {ggml_type}")
    return (q * d).reshape(-1)


def encode(values: np.ndarray, ggml_type: int) -> np.ndarray:
    """The bytes of `values` (float32, any shape) stored as `ggml_type`, as a flat uint8 array."""
    if ggml_type == F32:
        return np.ascontiguousarray(values, dtype="<f4").reshape(-1).view(np.uint8)
    if ggml_type == F16:
        return np.ascontiguousarray(values, dtype=np.float32).astype("<f2").reshape(-1).view(np.uint8)
    quantize = {Q8_0: quantize_q8_0, Q4_0: quantize_q4_0}.get(ggml_type)
    if quantize is None:
        raise GlmtuneError(f"unknown ggml type {ggml_type}")
    return quantize(values).reshape(-1)


def nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    count = int(np.prod(shape, dtype=np.int64))
    if ggml_type in QUANTIZED:
        return count // BLOCK * BLOCK_BYTES[ggml_type]
    return count * (4 if ggml_type == F32 else 2)


def write_tensor(handle: BinaryIO, name: str, values, ggml_type: int) -> int:
    """Append one tensor record to `handle` (positioned at the end of the file); returns the data bytes.

    `values`: a float numpy array or torch tensor. Quantized types need its last dimension to be a
    multiple of 32 (blocks never straddle rows). Large tensors are encoded in row chunks.
    """
    shape = tuple(int(s) for s in values.shape)
    if not 1 <= len(shape) <= 4:
        raise GlmtuneError(f"{name}: ggml tensors have 1 to 4 dimensions, found shape {shape}")
    if ggml_type in QUANTIZED and shape[-1] % BLOCK:
        raise GlmtuneError(f"{name}: {TYPE_NAMES[ggml_type]} needs rows of a multiple of {BLOCK} values, "
                           f"found rows of {shape[-1]} (use --type f16 or f32)")
    encoded_name = name.encode("utf-8")
    handle.write(struct.pack(f"<i{len(encoded_name)}si", len(encoded_name), encoded_name, len(shape)))
    handle.write(struct.pack(f"<{len(shape)}ii", *shape, ggml_type))
    handle.write(b"\0" * (-handle.tell() % ALIGN))
    rows = values.reshape(-1, shape[-1]) if len(shape) > 1 else values.reshape(1, -1)
    step = max(1, CHUNK_VALUES // max(1, rows.shape[1]))
    written = 0
    for start in range(0, rows.shape[0], step):
        chunk = rows[start: start + step]
        if hasattr(chunk, "detach"):  # a torch tensor: float32 on the CPU, then numpy (shares memory when it can)
            chunk = chunk.detach().to("cpu").float().numpy()
        data = encode(chunk, ggml_type)
        handle.write(data.tobytes())
        written += data.size
    return written


@dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # of the data, from the start of the file
    nbytes: int


def read_tensor_records(data: bytes | memoryview | np.ndarray, offset: int) -> list[TensorRecord]:
    """The tensor records from `offset` to the end of a model file's bytes (as chatglm.cpp walks them)."""
    buf = memoryview(np.frombuffer(data, dtype=np.uint8)) if not isinstance(data, memoryview) else data
    records = []
    while offset < len(buf):
        (name_len,) = struct.unpack_from("<i", buf, offset)
        name = bytes(buf[offset + 4: offset + 4 + name_len]).decode("utf-8")
        offset += 4 + name_len
        (ndim,) = struct.unpack_from("<i", buf, offset)
        shape = struct.unpack_from(f"<{ndim}i", buf, offset + 4)
        (ggml_type,) = struct.unpack_from("<i", buf, offset + 4 + 4 * ndim)
        offset += 8 + 4 * ndim
        offset += -offset % ALIGN
        size = nbytes(shape, ggml_type)
        if offset + size > len(buf):
            raise GlmtuneError(f"tensor {name}: data runs past the end of the file (truncated file?)")
        records.append(TensorRecord(name, tuple(shape), ggml_type, offset, size))
        offset += size
    return records
