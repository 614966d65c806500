"""Triton quantize + bit-pack with fused error feedback (reference.quantize_pack).

One kernel does the whole op in one pass: each program owns ``ROWS`` quantization blocks
of ``BLOCK`` elements, reads ``x`` and the residual once, computes ``v``, the per-block
scale, the codes, packs them into bytes, and writes the scales, the code bytes and the new
residual. A second, one-program kernel writes the 64-byte header and the section padding.

The 1-bit scale is the sum of |v| in reference.block_abs_sum's fixed order: 32 lanes
(lane j adds elements j, j+32, ... in increasing order) folded by a shuffle-down tree, so
the kernel walks each block in steps of 32 elements before it packs the sign bits.

Outside the kernels the launcher allocates the payload (or takes the caller's ``out``
buffer) and, for a non-contiguous ``x``, makes one contiguous copy
(``reshape(-1).contiguous()``).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import format as fmt
from ._common import (
    autotune_rows,
    canonical_nan,
    dummy_like,
    fadd_rn,
    floor_f32,
    fmul_rn,
    fsub_rn,
    launch_rows,
    load_v,
    misaligned,
    round_half_even,
    rows_configs,
    seed_key,
    uniform,
    write_header,
)


@triton.jit
def _quantize_pack_kernel(
    x_ptr,  # *fp32|fp16|bf16 [n] input (flat, contiguous)
    res_ptr,  # *fp32 [n] residual, read and updated in place when HAS_RES
    out_ptr,  # *uint8 payload; scales at byte 64, codes at byte codes_off
    n,  # number of elements
    nb,  # number of blocks, ceil(n / BLOCK)
    codes_off,  # byte offset of the codes section
    k1,  # seed key for stochastic rounding (a uint32 value)
    BITS: tl.constexpr,  # 1, 2, 4 or 8
    BLOCK: tl.constexpr,  # elements per scale (power of two, 32..4096)
    ROWS: tl.constexpr,  # blocks per program
    HAS_RES: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] block ids
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [ROWS, BLOCK] element ids
    inb = offs < n
    scales_ptr = (out_ptr + 64).to(tl.pointer_type(tl.float32))
    v = load_v(x_ptr, res_ptr, offs, inb, HAS_RES)
    vbits = v.to(tl.uint32, bitcast=True)
    # NaN-propagating amax as an integer max over |v|'s bits: exact, order-free, and every
    # NaN pattern sorts above +inf.
    amax_bits = tl.max((vbits & 0x7FFFFFFF).to(tl.int32), axis=1)

    if BITS == 1:
        # Sum of |v| in the reference's order: lane j accumulates elements j, j+32, ... of
        # its block one after the other (so the block is walked again in steps of 32).
        lanes = tl.arange(0, 32)
        lane = tl.zeros([ROWS, 32], dtype=tl.float32)
        for s in range(BLOCK // 32):
            o32 = blk[:, None] * BLOCK + s * 32 + lanes[None, :]
            lane = lane + tl.abs(load_v(x_ptr, res_ptr, o32, o32 < n, HAS_RES))
        # Shuffle-down tree, lane[i] += lane[i + h] for h = 16, 8, 4, 2, 1: each step adds
        # exactly two values, so tl.sum's internal order cannot change the result.
        lane = tl.sum(tl.reshape(lane, [ROWS, 2, 16]), axis=1)
        lane = tl.sum(tl.reshape(lane, [ROWS, 2, 8]), axis=1)
        lane = tl.sum(tl.reshape(lane, [ROWS, 2, 4]), axis=1)
        lane = tl.sum(tl.reshape(lane, [ROWS, 2, 2]), axis=1)
        total = tl.reshape(tl.sum(tl.reshape(lane, [ROWS, 2, 1]), axis=1), [ROWS])
        length = tl.maximum(tl.minimum(n - blk * BLOCK, BLOCK), 1).to(tl.float32)
        scale = tl.math.div_rn(total, length)
        code = tl.where((v < 0.0) & inb, 1, 0)
        dec = tl.where(v < 0.0, -scale[:, None], scale[:, None])
    else:
        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        nonfinite = amax_bits >= 0x7F800000
        amax = amax_bits.to(tl.float32, bitcast=True)
        qmax = tl.full([ROWS], QMAX, tl.float32)
        # (a zero amax is swapped for 1 only to keep the division quiet: that block's
        # codes are all zero whatever inv is)
        inv = tl.math.div_rn(qmax, tl.where(amax == 0.0, 1.0, amax))
        scale = tl.math.div_rn(amax, qmax)
        zero = (~nonfinite) & ((amax == 0.0) | (inv.to(tl.uint32, bitcast=True) == 0x7F800000))
        coded = ~(zero | nonfinite)
        scale = tl.where(zero, 0.0, scale)
        inv = tl.where(coded, inv, 0.0)
        t = fmul_rn(v, inv[:, None])
        if STOCHASTIC:
            u = uniform((k1 + tl.zeros([], dtype=tl.int64)).to(tl.uint32), offs)
            q = floor_f32(fadd_rn(t, u))
        else:
            q = round_half_even(t)
        q = tl.where(q < -QMAX, -QMAX, q)
        q = tl.where(q > QMAX, QMAX, q)
        q = tl.where(coded[:, None], q, 0.0)
        code = tl.where(inb, (q + QMAX).to(tl.int32), 0)
        dec = fmul_rn(q, scale[:, None])

    # A NaN scale (a block holding NaN) is stored as the canonical NaN the format requires.
    tl.store(scales_ptr + blk, canonical_nan(scale), mask=blk < nb)
    if HAS_RES:
        r_new = fsub_rn(v, dec)
        finite = (r_new.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
        tl.store(res_ptr + offs, r_new, mask=inb & finite)

    # Bit packing: element i's code at bit (i * BITS) % 8 of byte (i * BITS) // 8. A tile's
    # elements are consecutive, so its bytes are too.
    PER: tl.constexpr = 8 // BITS
    NBYTES: tl.constexpr = ROWS * BLOCK // PER
    if BITS == 8:
        packed = tl.reshape(code, [NBYTES])
    else:
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(tl.reshape(code, [NBYTES, PER]) << shifts[None, :], axis=1)
    byte_idx = pid.to(tl.int64) * NBYTES + tl.arange(0, NBYTES)
    code_bytes = (n * BITS + 7) // 8
    tl.store(out_ptr + codes_off + byte_idx, packed.to(tl.uint8), mask=byte_idx < code_bytes)


#: Autotuning space on GPU (the same as the dense dequantize_accumulate kernel's).
quantize_pack_configs = rows_configs

_kernel = autotune_rows(_quantize_pack_kernel,
                        key=["nb", "BITS", "BLOCK", "HAS_RES", "STOCHASTIC"],
                        # the kernel updates the residual in place
                        restore_value=["res_ptr"])


def _quantize_pack_into(x: torch.Tensor, bits: int, block: int,
                        residual: torch.Tensor | None, stochastic: bool, seed: int,
                        payload: torch.Tensor) -> None:
    """Launch the header and quantize kernels writing x's payload into ``payload``."""
    xf = x.reshape(-1)
    if not xf.is_contiguous():
        xf = xf.contiguous()
    n = xf.numel()
    header = fmt.dense_header(n, bits, block, stochastic=stochastic)
    write_header(payload, header, wrap_triton)
    nb = header.nblocks
    if nb == 0:
        return
    res = residual if residual is not None else dummy_like(x)
    codes_off = header.sections()["codes"][0]
    args = (xf, res, payload, n, nb, codes_off, seed_key(seed))
    launch_rows(_kernel, nb, block, *args, BITS=bits, HAS_RES=residual is not None,
                STOCHASTIC=bool(stochastic))


@triton_op("gradzip::triton_quantize_pack", mutates_args={"residual"})
def triton_quantize_pack(x: torch.Tensor, bits: int, block: int,
                         residual: torch.Tensor | None, stochastic: bool,
                         seed: int) -> torch.Tensor:
    """Triton kernel behind ``gradzip.quantize_pack(..., backend="triton")``.

    Arguments as :func:`gradzip.quantize_pack` (already validated); ``residual`` (fp32,
    ``x.numel()`` elements, contiguous) is updated in place. Returns the uint8 payload."""
    nbytes = fmt.dense_payload_bytes(x.numel(), bits, block)
    payload = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    _quantize_pack_into(x, bits, block, residual, stochastic, seed, payload)
    return payload


@triton_op("gradzip::triton_quantize_pack_out", mutates_args={"residual", "out"})
def triton_quantize_pack_out(x: torch.Tensor, bits: int, block: int,
                             residual: torch.Tensor | None, stochastic: bool, seed: int,
                             out: torch.Tensor) -> None:
    """The ``out=`` form: the payload written into ``out`` (already validated: 1-D uint8,
    contiguous, the payload's size, x's device). The scale stores need a 4-byte aligned
    section, so an ``out`` that is not 16-byte aligned is filled from an aligned temporary."""
    if misaligned(out):
        tmp = torch.empty_like(out)
        _quantize_pack_into(x, bits, block, residual, stochastic, seed, tmp)
        out.copy_(tmp)
    else:
        _quantize_pack_into(x, bits, block, residual, stochastic, seed, out)


def quantize_pack(x: torch.Tensor, bits: int, block: int, residual: torch.Tensor | None,
                  stochastic: bool, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Entry point used by :func:`gradzip.ops.quantize_pack` for ``backend="triton"``;
    returns the payload (``out`` when given)."""
    if out is not None:
        torch.ops.gradzip.triton_quantize_pack_out(x, bits, block, residual, bool(stochastic),
                                                   int(seed), out)
        return out
    return torch.ops.gradzip.triton_quantize_pack(x, bits, block, residual, bool(stochastic),
                                                  int(seed))
