"""Triton top-k selection with fused error feedback (reference.topk_select).

Selection works on the order key of |v| (the float bits with the sign cleared, so NaN
sorts above inf) and never sorts. The pieces, all Triton kernels:

* **Radix select** (``_radix_hist_kernel`` + ``_radix_select_kernel``, 4 rounds of 8 bits):
  each round builds a 256-bin histogram of the next key digit among the elements whose
  higher digits match the prefix found so far (integer counts, one row per program, no
  atomics), and a one-program kernel sums the rows and picks the digit holding the k-th
  largest key. After 4 rounds the threshold key ``T`` is exact, together with how many of
  the elements equal to ``T`` are still needed.
* **Compaction by prefix sums** (``_topk_count_kernel``, ``_topk_scan_kernel``,
  ``_topk_emit_kernel``): a selection is "every element of class A, plus the first
  ``need`` elements of class B in index order". Tiles count both classes, a one-program
  scan turns the counts into each tile's output offset, and each tile writes its indices
  (ascending, as the payload requires), values and residuals at those offsets. Exact
  top-k is A = key > T, B = key == T (ties go to the lower index).
* **Approximate mode**: a sampling kernel gathers the reference's stratified sample, the
  radix select finds the threshold ``t`` in it, one pass counts the candidates
  (key >= t) per tile and a second compacts them (index order kept) while it writes the
  residual of every non-candidate. The exact top-k among the candidates then runs on that
  short list. When the candidates are fewer than k (the result is candidates plus the
  lowest-index non-candidates: A = key >= t, B = the rest) or too many for the list
  buffer, the selection runs over all elements instead.

Every decision that depends on the data (the digits, how many candidates, which path) is
made by a kernel and kept in a small int64 state tensor on the device, so the op never
synchronises with the host and torch.compile can trace it. Kernels of the path not taken
see a zero "on" flag and return without touching memory.

int8 values: the emit pass keeps the selected fp32 values in a scratch list; a reduction
gives the one scale, and a last kernel writes the codes and the selected residuals.

Besides the kernels, the launcher only allocates the payload (unless the caller gives an
``out`` buffer) and scratch tensors (``torch.empty``) and, for a non-contiguous ``x``, makes
one contiguous copy (``reshape(-1).contiguous()``).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import format as fmt
from .. import spec
from ._common import (
    INTERPRET,
    LAUNCH_OPTIONS,
    QNAN_BITS,
    canonical_nan,
    dummy_like,
    f32_to_bf16_bits,
    fmul_rn,
    fsub_rn,
    hash32,
    load_v,
    misaligned,
    round_half_even,
    seed_key,
    write_header,
)

# ---- device state: one block of 8 int64 slots per selection ---------------------------
SAMP = tl.constexpr(0)  # the sample (approximate mode's threshold)
CAND = tl.constexpr(8)  # the candidate list (approximate mode)
FULL = tl.constexpr(16)  # all elements (exact mode; approximate mode's fallback)
EMIT_ON = tl.constexpr(0)  # count / scan / emit run for this selection
LEN = tl.constexpr(1)  # elements in the list
REM = tl.constexpr(2)  # radix select: how many still to pick below the prefix
PREFIX = tl.constexpr(3)  # radix select: key bits decided so far (the result: T)
HI = tl.constexpr(4)  # class A = key > HI
LO = tl.constexpr(5)  # class B = LO <= key <= HI
NEED = tl.constexpr(6)  # take the first NEED elements of class B
RADIX_ON = tl.constexpr(7)  # the radix select runs for this selection
NCAND = tl.constexpr(24)  # approximate mode: number of candidates
SELECTED = tl.constexpr(25)  # total written by the last emit scan (kept for debugging)
STATE_SLOTS = 32

# Elements per tile in the coupled count/scan/emit kernels (their tiles must agree).
# (The interpreter pays per program and per operation, hardly per element: big tiles.)
TILE = 16384 if INTERPRET else 2048
SCAN_CHUNK = 1024
HIST_PROGRAMS = 2 if INTERPRET else 512
SAMPLE_TILE = 16384 if INTERPRET else 1024


@triton.jit
def _key(v):
    """reference.magnitude_key: float bits with the sign cleared (int32, >= 0); every NaN
    gets the canonical NaN's key, so NaNs tie (lower index first) whatever their bits."""
    key = (v.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int32)
    return tl.where(key > 0x7F800000, QNAN_BITS, key)


@triton.jit
def _topk_init_kernel(st_ptr, n, k, s, rank, APPROX: tl.constexpr):
    i = tl.arange(0, 32)
    val = tl.zeros([32], dtype=tl.int64)
    if APPROX:
        val = tl.where(i == SAMP + LEN, s, val)
        val = tl.where(i == SAMP + REM, rank, val)
        val = tl.where(i == SAMP + RADIX_ON, 1, val)
    else:
        val = tl.where(i == FULL + EMIT_ON, 1, val)
        val = tl.where(i == FULL + LEN, n, val)
        val = tl.where(i == FULL + REM, k, val)
        val = tl.where(i == FULL + RADIX_ON, 1, val)
    tl.store(st_ptr + i, val)


@triton.jit
def _topk_sample_kernel(x_ptr, res_ptr, sv_ptr, n, s, k1,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """v at reference.sample_positions: one position per stratum [j*n/s, (j+1)*n/s)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < s
    start = j * n // s
    size = (j + 1) * n // s - start
    h = hash32((k1 + tl.zeros([], dtype=tl.int64)).to(tl.uint32), j).to(tl.int64)
    pos = start + h % tl.maximum(size, 1)
    v = load_v(x_ptr, res_ptr, pos, m, HAS_RES)
    tl.store(sv_ptr + j, v, mask=m)


@triton.jit
def _topk_prepare_kernel(x_ptr, res_ptr, v_ptr, n, st_ptr, cnt_ptr,
                         HAS_RES: tl.constexpr, COUNT: tl.constexpr, TILE: tl.constexpr):
    """v = x + residual into a scratch list; approximate mode also counts each tile's
    candidates (key >= the sample threshold)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    m = offs < n
    v = load_v(x_ptr, res_ptr, offs, m, HAS_RES)
    tl.store(v_ptr + offs, v, mask=m)
    if COUNT:
        t = tl.load(st_ptr + SAMP + PREFIX).to(tl.int32)
        c = tl.sum(tl.where(m & (_key(v) >= t), 1, 0).to(tl.int64))
        tl.store(cnt_ptr + pid, c)


@triton.jit
def _radix_hist_kernel(v_ptr, st_ptr, hist_ptr, chunk,
                       B: tl.constexpr, SHIFT: tl.constexpr, HIMASK: tl.constexpr,
                       TILE: tl.constexpr):
    """Histogram of digit (key >> SHIFT) & 255 over this program's chunk of the list,
    among elements whose bits above the digit equal the prefix. One row per program."""
    pid = tl.program_id(0)
    on = tl.load(st_ptr + B + RADIX_ON) != 0
    length = tl.load(st_ptr + B + LEN)
    prefix = tl.load(st_ptr + B + PREFIX).to(tl.int32)
    start = pid.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, length)
    end = tl.where(on, end, start)
    hist = tl.zeros([256], dtype=tl.int32)
    for off in tl.range(start, end, TILE):
        o = off + tl.arange(0, TILE)
        m = o < end
        key = _key(tl.load(v_ptr + o, mask=m, other=0.0))
        m = m & ((key & HIMASK) == (prefix & HIMASK))
        hist += tl.histogram((key >> SHIFT) & 0xFF, 256, mask=m)
    tl.store(hist_ptr + pid * 256 + tl.arange(0, 256), hist)


@triton.jit
def _radix_select_kernel(st_ptr, hist_ptr, nrows,
                         B: tl.constexpr, SHIFT: tl.constexpr, LAST: tl.constexpr,
                         RB: tl.constexpr):
    """Sum the histogram rows and pick the digit of the REM-th largest key."""
    on = tl.load(st_ptr + B + RADIX_ON) != 0
    rem = tl.load(st_ptr + B + REM)
    prefix = tl.load(st_ptr + B + PREFIX)
    bins = tl.arange(0, 256)
    total = tl.zeros([256], dtype=tl.int64)
    row_end = tl.where(on, nrows, 0)
    for r0 in tl.range(0, row_end, RB):
        rows = r0 + tl.arange(0, RB)
        h = tl.load(hist_ptr + rows[:, None] * 256 + bins[None, :],
                    mask=rows[:, None] < nrows, other=0)
        total += tl.sum(h.to(tl.int64), axis=0)
    ge = tl.sum(total) - tl.cumsum(total, 0) + total  # elements with digit >= d
    d = tl.max(tl.where(ge >= rem, bins, -1))
    gt = tl.sum(tl.where(bins == d, ge - total, 0))  # elements with digit > d
    rem = rem - gt
    prefix = prefix | (d.to(tl.int64) << SHIFT)
    tl.store(st_ptr + B + REM, rem, mask=on)
    tl.store(st_ptr + B + PREFIX, prefix, mask=on)
    if LAST:
        tl.store(st_ptr + B + HI, prefix, mask=on)
        tl.store(st_ptr + B + LO, prefix, mask=on)
        tl.store(st_ptr + B + NEED, rem, mask=on)


@triton.jit
def _topk_count_kernel(v_ptr, st_ptr, cnt_a_ptr, cnt_b_ptr,
                       B: tl.constexpr, TILE: tl.constexpr):
    pid = tl.program_id(0)
    on = tl.load(st_ptr + B + EMIT_ON) != 0
    length = tl.where(on, tl.load(st_ptr + B + LEN), 0)
    hi = tl.load(st_ptr + B + HI)
    lo = tl.load(st_ptr + B + LO)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    m = offs < length
    key = _key(tl.load(v_ptr + offs, mask=m, other=0.0)).to(tl.int64)
    a = m & (key > hi)
    b = m & (key >= lo) & (key <= hi)
    tl.store(cnt_a_ptr + pid, tl.sum(a.to(tl.int64)))
    tl.store(cnt_b_ptr + pid, tl.sum(b.to(tl.int64)))


@triton.jit
def _topk_scan_kernel(st_ptr, cnt_a_ptr, cnt_b_ptr, sel_off_ptr, b_off_ptr, ntiles,
                      B: tl.constexpr, TOTAL: tl.constexpr, HAS_B: tl.constexpr,
                      ALWAYS: tl.constexpr, CH: tl.constexpr):
    """Exclusive prefix sums over tiles: where each tile's selected elements start in the
    output, and (HAS_B) how many class-B elements precede it. Writes the total to TOTAL."""
    if ALWAYS:
        on = tl.full([], 1, tl.int1)
    else:
        on = tl.load(st_ptr + B + EMIT_ON) != 0
    if HAS_B:
        need = tl.load(st_ptr + B + NEED)
    carry_s = tl.zeros([], dtype=tl.int64)
    carry_b = tl.zeros([], dtype=tl.int64)
    end = tl.where(on, ntiles, 0)
    for t0 in tl.range(0, end, CH):
        t = t0 + tl.arange(0, CH)
        m = t < ntiles
        s = tl.load(cnt_a_ptr + t, mask=m, other=0)
        if HAS_B:
            b = tl.load(cnt_b_ptr + t, mask=m, other=0)
            b_excl = carry_b + tl.cumsum(b, 0) - b
            tl.store(b_off_ptr + t, b_excl, mask=m)
            s = s + tl.minimum(tl.maximum(need - b_excl, 0), b)
            carry_b += tl.sum(b)
        tl.store(sel_off_ptr + t, carry_s + tl.cumsum(s, 0) - s, mask=m)
        carry_s += tl.sum(s)
    tl.store(st_ptr + TOTAL, carry_s, mask=on)


@triton.jit
def _topk_decide_kernel(st_ptr, n, k, cap):
    """Approximate mode: pick the path from the number of candidates."""
    ncand = tl.load(st_ptr + NCAND)
    t = tl.load(st_ptr + SAMP + PREFIX)
    listed = (ncand >= k) & (ncand <= cap)
    fill = ncand < k
    full = ~listed
    tl.store(st_ptr + CAND + EMIT_ON, listed.to(tl.int64))
    tl.store(st_ptr + CAND + LEN, tl.where(listed, ncand, 0))
    tl.store(st_ptr + CAND + REM, (k + tl.zeros([], dtype=tl.int64)))
    tl.store(st_ptr + CAND + PREFIX, tl.zeros([], dtype=tl.int64))
    tl.store(st_ptr + CAND + RADIX_ON, listed.to(tl.int64))
    tl.store(st_ptr + FULL + EMIT_ON, full.to(tl.int64))
    tl.store(st_ptr + FULL + LEN, (n + tl.zeros([], dtype=tl.int64)))
    tl.store(st_ptr + FULL + REM, (k + tl.zeros([], dtype=tl.int64)))
    tl.store(st_ptr + FULL + PREFIX, tl.zeros([], dtype=tl.int64))
    tl.store(st_ptr + FULL + RADIX_ON, (full & ~fill).to(tl.int64))
    # Fewer candidates than k: every candidate (key >= t) plus the lowest-index rest.
    tl.store(st_ptr + FULL + HI, tl.where(fill, t - 1, 0))
    tl.store(st_ptr + FULL + LO, tl.zeros([], dtype=tl.int64))
    tl.store(st_ptr + FULL + NEED, tl.where(fill, k - ncand, 0))


@triton.jit
def _topk_compact_kernel(v_ptr, res_ptr, st_ptr, off_ptr, cv_ptr, ci_ptr, n,
                         HAS_RES: tl.constexpr, TILE: tl.constexpr):
    """Approximate mode: list the candidates (value, index) in index order; the other
    elements are never selected, so their residual (v where finite) is written here."""
    pid = tl.program_id(0)
    on = tl.load(st_ptr + CAND + EMIT_ON) != 0
    t = tl.load(st_ptr + SAMP + PREFIX).to(tl.int32)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    m = (offs < n) & on
    v = tl.load(v_ptr + offs, mask=m, other=0.0)
    c = m & (_key(v) >= t)
    ci = c.to(tl.int64)
    pos = tl.load(off_ptr + pid, mask=on, other=0) + tl.cumsum(ci, 0) - ci
    tl.store(cv_ptr + pos, v, mask=c)
    tl.store(ci_ptr + pos, offs, mask=c)
    if HAS_RES:
        finite = (v.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
        tl.store(res_ptr + offs, v, mask=m & (~c) & finite)


@triton.jit
def _topk_emit_kernel(v_ptr, idx_ptr, res_ptr, st_ptr, sel_off_ptr, b_off_ptr, out_ptr,
                      selv_ptr, idx_off, val_off,
                      B: tl.constexpr, HAS_IDX: tl.constexpr, HAS_RES: tl.constexpr,
                      VF: tl.constexpr, IDX64: tl.constexpr, TILE: tl.constexpr):
    """Write the selected indices and values at their prefix-sum offsets, and residuals."""
    pid = tl.program_id(0)
    on = tl.load(st_ptr + B + EMIT_ON) != 0
    length = tl.where(on, tl.load(st_ptr + B + LEN), 0)
    hi = tl.load(st_ptr + B + HI)
    lo = tl.load(st_ptr + B + LO)
    need = tl.load(st_ptr + B + NEED)
    offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    m = offs < length
    v = tl.load(v_ptr + offs, mask=m, other=0.0)
    key = _key(v).to(tl.int64)
    a = m & (key > hi)
    b = m & (key >= lo) & (key <= hi)
    bi = b.to(tl.int64)
    rank_b = tl.load(b_off_ptr + pid, mask=on, other=0) + tl.cumsum(bi, 0) - bi
    sel = a | (b & (rank_b < need))
    si = sel.to(tl.int64)
    pos = tl.load(sel_off_ptr + pid, mask=on, other=0) + tl.cumsum(si, 0) - si
    if HAS_IDX:
        gidx = tl.load(idx_ptr + offs, mask=m, other=0)
    else:
        gidx = offs
    if IDX64:
        tl.store((out_ptr + idx_off).to(tl.pointer_type(tl.int64)) + pos, gidx, mask=sel)
    else:
        tl.store((out_ptr + idx_off).to(tl.pointer_type(tl.int32)) + pos, gidx.to(tl.int32),
                 mask=sel)
    if VF == 1:
        tl.store((out_ptr + val_off).to(tl.pointer_type(tl.float32)) + pos, canonical_nan(v),
                 mask=sel)
        dec = v
    elif VF == 2:
        hb = f32_to_bf16_bits(v)
        tl.store((out_ptr + val_off).to(tl.pointer_type(tl.uint16)) + pos, hb.to(tl.uint16),
                 mask=sel)
        dec = (hb.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        tl.store(selv_ptr + pos, v, mask=sel)
        dec = v
    if HAS_RES:
        r_new = tl.where(sel, fsub_rn(v, dec), v)
        keep = m & ((r_new.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000)
        if VF == 3:
            keep = keep & (~sel)  # written with the int8 codes, once the scale is known
        tl.store(res_ptr + gidx, r_new, mask=keep)


@triton.jit
def _int8_amax_kernel(selv_ptr, part_ptr, k, TILE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    v = tl.load(selv_ptr + offs, mask=offs < k, other=0.0)
    abs_bits = (v.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int32)
    tl.store(part_ptr + tl.program_id(0), tl.max(abs_bits))


@triton.jit
def _int8_scale_kernel(part_ptr, nparts, out_ptr, vs_off, fs_ptr, CH: tl.constexpr):
    """The one int8 scale (reference._quantize_values_int8): amax / 127, or 0 for an
    all-zero list or when 127 / amax overflows; NaN/inf kept so the overflow travels."""
    amax_bits = tl.zeros([], dtype=tl.int32)
    for p0 in tl.range(0, nparts, CH):
        p = p0 + tl.arange(0, CH)
        amax_bits = tl.maximum(amax_bits, tl.max(tl.load(part_ptr + p, mask=p < nparts,
                                                         other=0)))
    nonfinite = amax_bits >= 0x7F800000
    amax = amax_bits.to(tl.float32, bitcast=True)
    q = tl.full([], 127.0, tl.float32)
    inv = tl.math.div_rn(q, tl.where(amax == 0.0, 1.0, amax))
    scale = tl.math.div_rn(amax, q)
    zero = (~nonfinite) & ((amax == 0.0) | (inv.to(tl.uint32, bitcast=True) == 0x7F800000))
    scale = tl.where(zero, 0.0, scale)
    scale = canonical_nan(scale)
    inv = tl.where(zero | nonfinite, 0.0, inv)
    tl.store((out_ptr + vs_off).to(tl.pointer_type(tl.float32)), scale)
    tl.store(fs_ptr, scale)
    tl.store(fs_ptr + 1, inv)


@triton.jit
def _int8_quant_kernel(selv_ptr, out_ptr, idx_off, val_off, res_ptr, fs_ptr, k,
                       IDX64: tl.constexpr, HAS_RES: tl.constexpr, TILE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    m = offs < k
    v = tl.load(selv_ptr + offs, mask=m, other=0.0)
    scale = tl.load(fs_ptr)
    inv = tl.load(fs_ptr + 1)
    q = round_half_even(fmul_rn(v, inv))
    q = tl.where(q < -127.0, -127.0, q)
    q = tl.where(q > 127.0, 127.0, q)
    q = tl.where(inv == 0.0, 0.0, q)
    tl.store((out_ptr + val_off).to(tl.pointer_type(tl.int8)) + offs, q.to(tl.int8), mask=m)
    if HAS_RES:
        if IDX64:
            idx = tl.load((out_ptr + idx_off).to(tl.pointer_type(tl.int64)) + offs, mask=m,
                          other=0)
        else:
            idx = tl.load((out_ptr + idx_off).to(tl.pointer_type(tl.int32)) + offs, mask=m,
                          other=0).to(tl.int64)
        r_new = fsub_rn(v, fmul_rn(q, scale))
        finite = (r_new.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
        tl.store(res_ptr + idx, r_new, mask=m & finite)


def topk_select_configs() -> list[triton.Config]:
    """Autotuning space on GPU for the radix histogram pass (the pass that runs four times
    over the data): inner tile and warps. The coupled count/scan/emit kernels use the fixed
    ``TILE``: their tile boundaries must agree with each other."""
    return [triton.Config({"TILE": tile}, num_warps=warps)
            for tile in (1024, 2048, 4096) for warps in (4, 8)]


if INTERPRET:
    _hist_kernel = _radix_hist_kernel
else:
    _hist_kernel = triton.autotune(configs=topk_select_configs(),
                                   key=["chunk", "B", "SHIFT"])(_radix_hist_kernel)


def _launch(kernel, grid, *args, **kwargs):
    wrap_triton(kernel)[grid](*args, **kwargs, **LAUNCH_OPTIONS)


def _radix_select(vals: torch.Tensor, st: torch.Tensor, b: int, cap: int) -> None:
    """Four 8-bit rounds over the first st[b + LEN] (<= cap) entries of ``vals``."""
    ntiles = triton.cdiv(cap, TILE)
    programs = min(ntiles, HIST_PROGRAMS)
    chunk = triton.cdiv(ntiles, programs) * TILE
    hist = torch.empty(programs * 256, dtype=torch.int32, device=vals.device)
    for shift in (24, 16, 8, 0):
        himask = (0xFFFFFFFF << (shift + 8)) & 0x7FFFFFFF
        kw = {"B": b, "SHIFT": shift, "HIMASK": himask}
        if INTERPRET:
            _launch(_hist_kernel, (programs,), vals, st, hist, chunk, **kw, TILE=TILE)
        else:
            _launch(_hist_kernel, (programs,), vals, st, hist, chunk, **kw)
        _launch(_radix_select_kernel, (1,), st, hist, programs, B=b, SHIFT=shift,
                LAST=shift == 0, RB=16)


def _select_and_emit(vals, idx, st, b, cap, res, payload, selv, idx_off, val_off,
                     has_res, value_format, idx64):
    """Count, scan and emit over the list ``vals`` (``idx``: their element indices, or
    None for the identity) for the selection kept in state block ``b``."""
    dev = vals.device
    _radix_select(vals, st, b, cap)
    ntiles = triton.cdiv(cap, TILE)
    cnt = torch.empty(2, ntiles, dtype=torch.int64, device=dev)
    off = torch.empty(2, ntiles, dtype=torch.int64, device=dev)
    _launch(_topk_count_kernel, (ntiles,), vals, st, cnt[0], cnt[1], B=b, TILE=TILE)
    _launch(_topk_scan_kernel, (1,), st, cnt[0], cnt[1], off[0], off[1], ntiles,
            B=b, TOTAL=SELECTED.value, HAS_B=True, ALWAYS=False,
            CH=SCAN_CHUNK)
    _launch(_topk_emit_kernel, (ntiles,), vals, idx if idx is not None else vals, res, st,
            off[0], off[1], payload, selv, idx_off, val_off, B=b, HAS_IDX=idx is not None,
            HAS_RES=has_res, VF=value_format, IDX64=idx64, TILE=TILE)


def _topk_select_into(x: torch.Tensor, k: int, residual: torch.Tensor | None, exact: bool,
                      value_format: int, seed: int, payload: torch.Tensor) -> None:
    """Launch the kernels writing x's payload into ``payload``."""
    xf = x.reshape(-1)
    if not xf.is_contiguous():
        xf = xf.contiguous()
    n = xf.numel()
    dev = x.device
    header = fmt.topk_header(n, k, value_format, approximate=not exact)
    write_header(payload, header, wrap_triton)
    secs = header.sections()
    idx_off, val_off = secs["indices"][0], secs["values"][0]
    idx64 = header.index_format == fmt.INDEX_INT64
    has_res = residual is not None
    res = residual if has_res else dummy_like(x)
    st = torch.empty(STATE_SLOTS, dtype=torch.int64, device=dev)
    vbuf = torch.empty(n, dtype=torch.float32, device=dev)
    selv = torch.empty(k if value_format == fmt.VALUE_INT8 else 1, dtype=torch.float32,
                       device=dev)
    ntiles = triton.cdiv(n, TILE)
    common = {"res": res, "payload": payload, "selv": selv, "idx_off": idx_off,
              "val_off": val_off, "has_res": has_res, "value_format": value_format,
              "idx64": idx64}

    if exact:
        _launch(_topk_init_kernel, (1,), st, n, k, 0, 0, APPROX=False)
        _launch(_topk_prepare_kernel, (ntiles,), xf, res, vbuf, n, st, st,
                HAS_RES=has_res, COUNT=False, TILE=TILE)
        _select_and_emit(vbuf, None, st, FULL.value, n, **common)
    else:
        s = spec.sample_count(n)
        rank = spec.approximate_rank(n, k)
        # The candidate list's capacity: about twice the expected count (rank strata of
        # n / s elements each); more candidates than this take the all-elements path.
        cap = min(n, 2 * rank * triton.cdiv(n, s) + 1024)
        sv = torch.empty(s, dtype=torch.float32, device=dev)
        cnt = torch.empty(ntiles, dtype=torch.int64, device=dev)
        cand_off = torch.empty(ntiles, dtype=torch.int64, device=dev)
        cv = torch.empty(cap, dtype=torch.float32, device=dev)
        ci = torch.empty(cap, dtype=torch.int64, device=dev)
        _launch(_topk_init_kernel, (1,), st, n, k, s, rank, APPROX=True)
        _launch(_topk_sample_kernel, (triton.cdiv(s, SAMPLE_TILE),), xf, res, sv, n, s,
                seed_key(seed), HAS_RES=has_res, BLOCK=SAMPLE_TILE)
        _radix_select(sv, st, SAMP.value, s)
        _launch(_topk_prepare_kernel, (ntiles,), xf, res, vbuf, n, st, cnt,
                HAS_RES=has_res, COUNT=True, TILE=TILE)
        _launch(_topk_scan_kernel, (1,), st, cnt, cnt, cand_off, cand_off, ntiles,
                B=SAMP.value, TOTAL=NCAND.value, HAS_B=False, ALWAYS=True, CH=SCAN_CHUNK)
        _launch(_topk_decide_kernel, (1,), st, n, k, cap)
        _launch(_topk_compact_kernel, (ntiles,), vbuf, res, st, cand_off, cv, ci, n,
                HAS_RES=has_res, TILE=TILE)
        _select_and_emit(cv, ci, st, CAND.value, cap, **common)
        _select_and_emit(vbuf, None, st, FULL.value, n, **common)

    if value_format == fmt.VALUE_INT8:
        vs_off = secs["value_scale"][0]
        tile = 16384 if INTERPRET else 1024
        parts = triton.cdiv(k, tile)
        part = torch.empty(parts, dtype=torch.int32, device=dev)
        fs = torch.empty(2, dtype=torch.float32, device=dev)
        _launch(_int8_amax_kernel, (parts,), selv, part, k, TILE=tile)
        _launch(_int8_scale_kernel, (1,), part, parts, payload, vs_off, fs, CH=1024)
        _launch(_int8_quant_kernel, (parts,), selv, payload, idx_off, val_off, res, fs, k,
                IDX64=idx64, HAS_RES=has_res, TILE=tile)


@triton_op("gradzip::triton_topk_select", mutates_args={"residual"})
def triton_topk_select(x: torch.Tensor, k: int, residual: torch.Tensor | None,
                       exact: bool, value_format: int, seed: int) -> torch.Tensor:
    """Triton kernels behind ``gradzip.topk_select(..., backend="triton")``.

    Arguments as :func:`gradzip.topk_select` (already validated; ``value_format`` 1 fp32,
    2 bf16, 3 int8); ``residual`` is updated in place. Returns the uint8 payload."""
    nbytes = fmt.topk_header(x.numel(), k, value_format).total_bytes
    payload = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    _topk_select_into(x, k, residual, exact, value_format, seed, payload)
    return payload


@triton_op("gradzip::triton_topk_select_out", mutates_args={"residual", "out"})
def triton_topk_select_out(x: torch.Tensor, k: int, residual: torch.Tensor | None,
                           exact: bool, value_format: int, seed: int,
                           out: torch.Tensor) -> None:
    """The ``out=`` form: the payload written into ``out`` (already validated: 1-D uint8,
    contiguous, the payload's size, x's device). The index, value and scale stores need
    aligned sections, so an ``out`` that is not 16-byte aligned is filled from an aligned
    temporary."""
    if misaligned(out):
        tmp = torch.empty_like(out)
        _topk_select_into(x, k, residual, exact, value_format, seed, tmp)
        out.copy_(tmp)
    else:
        _topk_select_into(x, k, residual, exact, value_format, seed, out)


def topk_select(x: torch.Tensor, k: int, residual: torch.Tensor | None, exact: bool,
                value_format: int, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Entry point used by :func:`gradzip.ops.topk_select` for ``backend="triton"``;
    returns the payload (``out`` when given)."""
    if out is not None:
        torch.ops.gradzip.triton_topk_select_out(x, int(k), residual, bool(exact),
                                                 int(value_format), int(seed), out)
        return out
    return torch.ops.gradzip.triton_topk_select(x, int(k), residual, bool(exact),
                                                int(value_format), int(seed))
