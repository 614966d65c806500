"""Independent expectations for the op tests.

The decoder here is written from the payload rules in DESIGN.md / docs/format.md (struct
layout, 16-byte aligned sections, element i's code at bit ``(i*bits) % 8`` of byte
``(i*bits) // 8`` LSB first, offset binary), in numpy, without using
``gradzip.reference`` or ``gradzip.format``: property tests that decode with it check the
kernels *and* the reference against the written format, not against themselves.
The exact comparisons the tests use live in :mod:`gradzip.testing`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

HEADER = struct.Struct("<4sHBBIBBHQQQ24s")
HEADER_BYTES = 64
U32 = 2.0**-24  # unit roundoff of float32 (half an ulp of 1.0)


def a16(n: int) -> int:
    return (n + 15) // 16 * 16


def raw(payload: torch.Tensor | bytes) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    assert payload.dtype == torch.uint8 and payload.dim() == 1, (payload.dtype, payload.shape)
    return payload.detach().cpu().numpy().tobytes()


@dataclass(frozen=True)
class Fields:
    magic: bytes
    version: int
    codec: int
    bits: int
    block: int
    value_format: int
    index_format: int
    flags: int
    numel: int
    k: int
    total_bytes: int
    reserved: bytes


def fields(payload) -> Fields:
    return Fields(*HEADER.unpack(raw(payload)[:HEADER_BYTES]))


def dense_layout(numel: int, bits: int, block: int) -> tuple[int, int, int]:
    """(scales offset, codes offset, total bytes) of a dense payload."""
    nblocks = -(-numel // block)
    codes_off = HEADER_BYTES + a16(4 * nblocks)
    return HEADER_BYTES, codes_off, codes_off + a16((numel * bits + 7) // 8)


VALUE_BYTES = {1: 4, 2: 2, 3: 1}


def topk_layout(numel: int, k: int, value_format: int) -> tuple[int, int, int | None, int]:
    """(indices offset, values offset, int8 scale offset or None, total bytes)."""
    ib = 8 if numel >= 2**31 else 4
    val_off = HEADER_BYTES + a16(ib * k)
    end = val_off + a16(VALUE_BYTES[value_format] * k)
    if value_format == 3:
        return HEADER_BYTES, val_off, end, end + 16
    return HEADER_BYTES, val_off, None, end


def unpack_codes(data: bytes, bits: int, n: int) -> np.ndarray:
    """Codes of elements 0..n-1, one element at a time by the written bit-order rule."""
    buf = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    i = np.arange(n, dtype=np.int64)
    return (buf[(i * bits) // 8] >> ((i * bits) % 8)) & ((1 << bits) - 1)


def dense_parts(payload) -> tuple[Fields, np.ndarray, np.ndarray]:
    """(header fields, float32 scales per block, signed codes q per element)."""
    b = raw(payload)
    f = fields(b)
    assert f.codec == 1, f
    so, co, total = dense_layout(f.numel, f.bits, f.block)
    assert len(b) == total == f.total_bytes, (len(b), total, f.total_bytes)
    nblocks = -(-f.numel // f.block)
    scales = np.frombuffer(b[so:so + 4 * nblocks], dtype="<f4").copy()
    codes = unpack_codes(b[co:co + (f.numel * f.bits + 7) // 8], f.bits, f.numel)
    if f.bits == 1:
        q = np.where(codes == 1, -1, 1)
    else:
        q = codes - (2 ** (f.bits - 1) - 1)
    return f, scales, q


def topk_parts(payload) -> tuple[Fields, np.ndarray, np.ndarray]:
    """(header fields, int64 indices, decoded float32 values)."""
    b = raw(payload)
    f = fields(b)
    assert f.codec == 2, f
    io, vo, so, total = topk_layout(f.numel, f.k, f.value_format)
    assert len(b) == total == f.total_bytes, (len(b), total, f.total_bytes)
    itype = "<i8" if f.numel >= 2**31 else "<i4"
    idx = np.frombuffer(b[io:io + np.dtype(itype).itemsize * f.k], dtype=itype).astype(np.int64)
    vb = b[vo:vo + VALUE_BYTES[f.value_format] * f.k]
    if f.value_format == 1:
        vals = np.frombuffer(vb, dtype="<f4").copy()
    elif f.value_format == 2:
        # bfloat16 is the top half of a float32
        vals = (np.frombuffer(vb, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        scale = np.frombuffer(b[so:so + 4], dtype="<f4")[0]
        vals = np.frombuffer(vb, dtype=np.int8).astype(np.float32) * scale
    return f, idx, vals


def decode(payload) -> np.ndarray:
    """float32 decode as the format defines it: ``q * scale`` rounded once to float32."""
    f = fields(payload)
    if f.codec == 1:
        f, scales, q = dense_parts(payload)
        s = np.repeat(scales, f.block)[: f.numel]
        with np.errstate(invalid="ignore", over="ignore"):
            return q.astype(np.float32) * s
    f, idx, vals = topk_parts(payload)
    out = np.zeros(f.numel, dtype=np.float32)
    out[idx] = vals
    return out


def decode64(payload) -> np.ndarray:
    """Exact decode in float64 (q * scale has at most 8 + 24 significant bits)."""
    f = fields(payload)
    if f.codec == 1:
        f, scales, q = dense_parts(payload)
        s = np.repeat(scales.astype(np.float64), f.block)[: f.numel]
        with np.errstate(invalid="ignore", over="ignore"):
            return q.astype(np.float64) * s
    f, idx, vals = topk_parts(payload)
    out = np.zeros(f.numel, dtype=np.float64)
    out[idx] = vals.astype(np.float64)
    return out


# ---------------------------------------------------------------------------------------
# the documented quantizer arithmetic, restated in numpy float32
# ---------------------------------------------------------------------------------------


def np_absmax_nearest(v: np.ndarray, qmax: int) -> tuple[np.float32, np.ndarray]:
    """(scale, signed codes) of one finite block under the documented rules: amax = max|v|,
    scale = amax / qmax and inv = qmax / amax, each one correctly rounded float32 division
    (numpy's float32 division is IEEE), t = v * inv, q = round half to even, clamped."""
    v = v.astype(np.float32)
    amax = np.float32(np.abs(v).max()) if v.size else np.float32(0)
    with np.errstate(over="ignore", divide="ignore"):
        inv = np.float32(qmax) / amax
    if amax == 0 or not np.isfinite(inv):
        return np.float32(0), np.zeros(v.size, dtype=np.int64)
    scale = amax / np.float32(qmax)
    t = v * inv
    q = np.clip(np.rint(t), -qmax, qmax).astype(np.int64)
    return np.float32(scale), q
