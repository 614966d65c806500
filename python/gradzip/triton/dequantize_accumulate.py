"""Triton decode + accumulate of W payloads into ``out`` (reference.dequantize_accumulate).

``out = round(float32(out) + float32(alpha) * acc)`` with ``acc = ((0 + d_0) + d_1) + ...``
in payload order, float32 throughout, every product and sum rounded on its own.

* Dense payloads: each program owns ``ROWS`` blocks of ``out``; for each payload it loads
  the blocks' scales and code bytes, unpacks and decodes them, and adds them to a register
  accumulator; ``out`` is read and written once.
* Top-k payloads: the indices are sorted, so no atomics are needed. A first kernel finds,
  for every tile of ``out`` and every payload, where the tile's entries start in the
  payload (a vectorised binary search). The accumulate kernel then gives each element of
  its tile the entry of each payload holding its index, by a binary search inside the
  tile's short range, and adds the decoded values in payload order: the result does not
  depend on scheduling. Positions a payload does not list add nothing, which is exactly
  adding the reference's 0.0 (``acc`` starts at +0.0 and so is never -0.0).

Top-k index lists are validated first (in range, strictly ascending) by a small kernel,
with the reference's error messages; that check reads a few flags back to the host.
"""

import numpy as np
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import format as fmt
from ._common import (
    INTERPRET,
    LAUNCH_OPTIONS,
    autotune_rows,
    f32_to_bf16_bits,
    fadd_rn,
    fmul_rn,
    launch_rows,
    load_f32,
    rows_configs,
)

SPARSE_TILE = 16384 if INTERPRET else 1024
BOUNDS_TILE = 1024


@triton.jit
def _store_out(out_ptr, offs, val, mask):
    """Round the float32 result to out's dtype, to nearest even (as torch's .to())."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptr.to(tl.pointer_type(tl.uint16)) + offs,
                 f32_to_bf16_bits(val).to(tl.uint16), mask=mask)
    else:
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_dense_kernel(
    rows_ptr,  # *uint8 [W, row_stride] payloads
    row_stride,  # bytes between payloads
    W,  # number of payloads
    out_ptr,  # *fp32|fp16|bf16 [n], updated in place
    n,  # elements
    alpha,  # float32 scale of the sum
    codes_off,  # byte offset of the codes section (scales start at byte 64)
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,  # blocks per program
):
    pid = tl.program_id(0)
    blk = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    m = offs < n
    nb = (n + BLOCK - 1) // BLOCK
    PER: tl.constexpr = 8 // BITS
    NBYTES: tl.constexpr = ROWS * BLOCK // PER
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    byte_idx = pid.to(tl.int64) * NBYTES + tl.arange(0, NBYTES)
    byte_ok = byte_idx < (n * BITS + 7) // 8
    shifts = tl.arange(0, PER) * BITS
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for w in range(W):
        base = rows_ptr + (tl.zeros([], dtype=tl.int64) + w) * row_stride
        scale = tl.load((base + 64).to(tl.pointer_type(tl.float32)) + blk, mask=blk < nb,
                        other=0.0)
        b = tl.load(base + codes_off + byte_idx, mask=byte_ok, other=0).to(tl.int32)
        if BITS == 8:
            code = tl.reshape(b, [ROWS, BLOCK])
        else:
            code = tl.reshape((b[:, None] >> shifts[None, :]) & ((1 << BITS) - 1),
                              [ROWS, BLOCK])
        if BITS == 1:
            d = tl.where(code == 1, -scale[:, None], scale[:, None])
        else:
            d = fmul_rn((code - QMAX).to(tl.float32), scale[:, None])
        acc = fadd_rn(acc, d)
    o = load_f32(out_ptr, offs, m)
    _store_out(out_ptr, offs, fadd_rn(o, fmul_rn(alpha, acc)), m)


@triton.jit
def _index_ptr(base, idx_off, IDX64: tl.constexpr):
    if IDX64:
        return (base + idx_off).to(tl.pointer_type(tl.int64))
    else:
        return (base + idx_off).to(tl.pointer_type(tl.int32))


@triton.jit
def _lower_bound(idx_ptr, lo, hi, target, steps, mask):
    """Per lane, the first entry in [lo, hi) of the ascending index list at ``idx_ptr``
    whose index is >= target; ``steps`` halvings (the bit length of the widest range)."""
    for _ in range(steps):
        act = lo < hi
        mid = (lo + hi) // 2
        right = tl.load(idx_ptr + mid, mask=act & mask, other=0).to(tl.int64) < target
        lo = tl.where(act & right, mid + 1, lo)
        hi = tl.where(act & ~right, mid, hi)
    return lo


@triton.jit
def _sparse_bounds_kernel(rows_ptr, row_stride, idx_off, k, starts_ptr, nbounds, steps,
                          TILE: tl.constexpr, BT: tl.constexpr, IDX64: tl.constexpr):
    """starts[w, t] = first entry of payload w whose index is >= t * TILE."""
    w = tl.program_id(1)
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    m = t < nbounds
    idx_ptr = _index_ptr(rows_ptr + w.to(tl.int64) * row_stride, idx_off, IDX64)
    lo = _lower_bound(idx_ptr, tl.zeros([BT], dtype=tl.int64),
                      tl.zeros([BT], dtype=tl.int64) + k, t * TILE, steps, m)
    tl.store(starts_ptr + w.to(tl.int64) * nbounds + t, lo, mask=m)


@triton.jit
def _accumulate_sparse_kernel(
    rows_ptr, row_stride, W,  # payloads as in the dense kernel
    starts_ptr,  # *int64 [W, nbounds] from _sparse_bounds_kernel
    nbounds,
    out_ptr, n, alpha,
    idx_off, val_off, vs_off,  # byte offsets: indices, values, int8 value scale
    VF: tl.constexpr,  # 1 fp32, 2 bf16, 3 int8 values
    IDX64: tl.constexpr,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    m = offs < n
    acc = tl.zeros([TILE], dtype=tl.float32)
    for w in range(W):
        w64 = tl.zeros([], dtype=tl.int64) + w
        base = rows_ptr + w64 * row_stride
        idx_ptr = _index_ptr(base, idx_off, IDX64)
        s = tl.load(starts_ptr + w64 * nbounds + pid)
        e = tl.load(starts_ptr + w64 * nbounds + pid + 1)
        steps = tl.zeros([], dtype=tl.int32)  # bit length of the range: halvings to empty it
        c = e - s
        while c > 0:
            c = c >> 1
            steps += 1
        lo = _lower_bound(idx_ptr, tl.zeros([TILE], dtype=tl.int64) + s,
                          tl.zeros([TILE], dtype=tl.int64) + e, offs, steps, m)
        inr = m & (lo < e)
        found = inr & (tl.load(idx_ptr + lo, mask=inr, other=-1).to(tl.int64) == offs)
        if VF == 1:
            val = tl.load((base + val_off).to(tl.pointer_type(tl.float32)) + lo, mask=found,
                          other=0.0)
        elif VF == 2:
            h = tl.load((base + val_off).to(tl.pointer_type(tl.uint16)) + lo, mask=found,
                        other=0)
            val = (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            q = tl.load((base + val_off).to(tl.pointer_type(tl.int8)) + lo, mask=found,
                        other=0)
            vscale = tl.load((base + vs_off).to(tl.pointer_type(tl.float32)))
            val = fmul_rn(q.to(tl.float32), vscale)
        acc = tl.where(found, fadd_rn(acc, val), acc)
    o = load_f32(out_ptr, offs, m)
    _store_out(out_ptr, offs, fadd_rn(o, fmul_rn(alpha, acc)), m)


@triton.jit
def _check_indices_kernel(rows_ptr, row_stride, idx_off, k, n, flags_ptr, nprog,
                          BT: tl.constexpr, IDX64: tl.constexpr):
    """flags[w, p] = 1 (an index outside [0, n)) | 2 (not strictly ascending)."""
    w = tl.program_id(1)
    p = tl.program_id(0)
    j = p.to(tl.int64) * BT + tl.arange(0, BT)
    m = j < k
    idx_ptr = _index_ptr(rows_ptr + w.to(tl.int64) * row_stride, idx_off, IDX64)
    a = tl.load(idx_ptr + j, mask=m, other=0).to(tl.int64)
    nxt = tl.load(idx_ptr + j + 1, mask=j + 1 < k, other=0).to(tl.int64)
    out_of_range = tl.max((m & ((a < 0) | (a >= n))).to(tl.int32))
    unordered = tl.max(((j + 1 < k) & (nxt <= a)).to(tl.int32))
    tl.store(flags_ptr + w.to(tl.int64) * nprog + p, out_of_range | (unordered * 2))


#: Autotuning space on GPU of the dense kernel (the same as quantize_pack's).
dequantize_accumulate_configs = rows_configs

_dense_kernel = autotune_rows(_accumulate_dense_kernel, key=["n", "W", "BITS", "BLOCK"],
                              restore_value=["out_ptr"])  # the kernel updates out in place


def _float32(alpha: float) -> float:
    """float32(alpha), rounded to nearest as torch.tensor(alpha, dtype=float32) does."""
    with np.errstate(over="ignore"):
        return float(np.float32(alpha))


@triton_op("gradzip::triton_dequantize_accumulate", mutates_args={"out"})
def triton_dequantize_accumulate(payloads: torch.Tensor, out: torch.Tensor, alpha: float,
                                 codec: int, bits: int, block: int, k: int,
                                 value_format: int) -> None:
    """Triton kernels behind ``gradzip.dequantize_accumulate(..., backend="triton")``.

    ``payloads``: [W, P] uint8 with unit stride along P, all of the codec the header
    fields describe (parsed and checked by the caller); ``out`` is updated in place."""
    n = out.numel()
    w = payloads.shape[0]
    if n == 0:
        return
    a32 = _float32(alpha)
    stride = payloads.stride(0)
    if codec == fmt.CODEC_DENSE:
        header = fmt.dense_header(n, bits, block)
        codes_off = header.sections()["codes"][0]
        nb = header.nblocks
        launch_rows(_dense_kernel, nb, block, payloads, stride, w, out, n, a32, codes_off,
                    BITS=bits)
        return
    header = fmt.topk_header(n, k, value_format)
    secs = header.sections()
    idx64 = header.index_format == fmt.INDEX_INT64
    vs_off = secs["value_scale"][0] if "value_scale" in secs else 0
    ntiles = triton.cdiv(n, SPARSE_TILE)
    nbounds = ntiles + 1
    starts = torch.empty(w, nbounds, dtype=torch.int64, device=out.device)
    wrap_triton(_sparse_bounds_kernel)[(triton.cdiv(nbounds, BOUNDS_TILE), w)](
        payloads, stride, secs["indices"][0], k, starts, nbounds, int(k).bit_length(),
        TILE=SPARSE_TILE, BT=BOUNDS_TILE, IDX64=idx64, **LAUNCH_OPTIONS)
    wrap_triton(_accumulate_sparse_kernel)[(ntiles,)](
        payloads, stride, w, starts, nbounds, out, n, a32, secs["indices"][0],
        secs["values"][0], vs_off, VF=value_format, IDX64=idx64, TILE=SPARSE_TILE,
        **LAUNCH_OPTIONS)


def check_topk_indices(rows: torch.Tensor, header: fmt.Header) -> None:
    """Raise ValueError (the reference's messages) if any payload's indices are outside
    [0, numel) or not strictly ascending. Reads one flag per program back to the host."""
    k = header.k
    bt = 16384 if INTERPRET else 4096
    nprog = triton.cdiv(k, bt)
    flags = torch.empty(rows.shape[0], nprog, dtype=torch.int32, device=rows.device)
    idx_off = header.sections()["indices"][0]
    wrap_triton(_check_indices_kernel)[(nprog, rows.shape[0])](
        rows, rows.stride(0), idx_off, k, header.numel, flags, nprog, BT=bt,
        IDX64=header.index_format == fmt.INDEX_INT64, **LAUNCH_OPTIONS)
    bad = flags.amax(dim=1).tolist()
    for w, f in enumerate(bad):
        if f & 1:
            raise ValueError(f"payload {w}: corrupt gradzip top-k payload: index out of range")
        if f & 2:
            raise ValueError(
                f"payload {w}: corrupt gradzip top-k payload: indices not strictly ascending")


def dequantize_accumulate(rows: torch.Tensor, out: torch.Tensor, alpha: float,
                          header: fmt.Header | None = None) -> None:
    """Entry point used by :func:`gradzip.ops.dequantize_accumulate` for
    ``backend="triton"``: ``rows`` [W, P] uint8 whose headers the caller has validated.

    ``header``: the payloads' parsed header when the caller has it (saves reading payload 0's
    header back from the device once more)."""
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    if header is None:
        header = fmt.parse_header(rows[0, : fmt.HEADER_BYTES].cpu().numpy().tobytes(),
                                  length=rows.shape[1])
    if header.codec == fmt.CODEC_TOPK:
        check_topk_indices(rows, header)
    torch.ops.gradzip.triton_dequantize_accumulate(
        rows, out, float(alpha), header.codec, header.bits, header.block, header.k,
        header.value_format)
