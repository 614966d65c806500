"""quantize_pack: every backend against the reference (bytes and residual bits), the
properties the reference itself must have (checked against independent expectations),
non-finite input, and bad input."""

from __future__ import annotations

import math
import zlib

import backends
import expect
import gradzip
import inputs
import numpy as np
import pytest
import torch
from gradzip import reference
from gradzip.testing import assert_bits_equal, assert_payload_equal

OP = "quantize_pack"
BITS = (8, 4, 2, 1)
BLOCKS = (32, 128, 4096, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROUNDINGS = ("nearest", "stochastic")
PRIMES = (1009, 7919)
LARGE = 2**20 + 3


def defined(bits, rounding, *_):
    return not (bits == 1 and rounding == "stochastic")


def sizes(block: int) -> tuple[int, ...]:
    return (0, 1, block - 1, block + 1) + PRIMES


def seed_for(*parts) -> int:
    """A deterministic seed per case (not Python's salted hash) using all 32 bits."""
    return zlib.crc32(repr(parts).encode())


def run_both(target, x, bits, block, residual, rounding, seed):
    """(backend payload, backend residual, reference payload, reference residual)."""
    want_r = None if residual is None else residual.clone()
    want = reference.quantize_pack(x.cpu(), bits, block, want_r, rounding, seed)
    xd = x.to(target.device)  # a no-op for tensors made on the device (keeps their strides)
    x_before = xd.clone()
    got_r = None if residual is None else residual.clone().to(target.device)
    got = gradzip.quantize_pack(xd, bits, block, got_r, rounding, seed, backend=target.backend)
    assert got.device == xd.device, f"payload on {got.device}, x on {xd.device}"
    assert_bits_equal(xd, x_before, "x was modified by quantize_pack")
    return got, got_r, want, want_r


def check_case(target, x, bits, block, with_residual, rounding, seed, ctx):
    if isinstance(with_residual, torch.Tensor):
        r = with_residual
    else:
        r = inputs.residual_like(x.numel(), seed=seed % 1000) if with_residual else None
    got, got_r, want, want_r = run_both(target, x, bits, block, r, rounding, seed)
    # NaN scales too: every NaN written into a payload is the canonical 0x7FC00000.
    assert_payload_equal(got, want, ctx)
    if r is not None:
        assert_bits_equal(got_r, want_r, ctx + " residual")


# ---------------------------------------------------------------------------------------
# byte-exact against the reference
# ---------------------------------------------------------------------------------------


def _light(bits, rounding, block, dtype, with_residual, n):
    # Interpreter: every bits x rounding x block, one dtype per block, residual on,
    # three sizes (one short block, a tail, a prime) -- test_triton.py goes further.
    return (with_residual and n in (1, block + 1, 1009)
            and dtype == DTYPES[BLOCKS.index(block) % len(DTYPES)])


MATRIX = [
    p for p in backends.product(
        OP, [BITS, ROUNDINGS, BLOCKS, DTYPES, (True, False), sorted({
            s for b in BLOCKS for s in sizes(b)})],
        keep=lambda bits, rounding, block, dtype, res, n: defined(bits, rounding)
        and n in sizes(block),
        keep_light=_light, numel=lambda *c: c[-1])
]


@pytest.mark.parametrize("target,bits,rounding,block,dtype,with_residual,n", MATRIX)
def test_matches_reference(target, bits, rounding, block, dtype, with_residual, n):
    seed = seed_for(n, bits, block, rounding)
    x = inputs.grad_like(n, dtype, seed=n + 17 * bits + block)
    ctx = f"{target} bits={bits} {rounding} block={block} {dtype} n={n} res={with_residual}"
    check_case(target, x, bits, block, with_residual, rounding, seed, ctx)


@pytest.mark.parametrize("target,bits,rounding", backends.product(
    OP, [BITS, ROUNDINGS], keep=defined, light=False))
def test_large_matches_reference(target, bits, rounding):
    x = inputs.grad_like(LARGE, torch.float32, seed=bits)
    check_case(target, x, bits, 128, True, rounding, seed_for(bits, rounding),
               f"{target} bits={bits} {rounding} n={LARGE}")


@pytest.mark.slow
@pytest.mark.parametrize("target,bits,rounding,block,dtype", backends.product(
    OP, [BITS, ROUNDINGS, BLOCKS, DTYPES], keep=lambda bits, rounding, block, dtype:
    defined(bits, rounding) and dtype == DTYPES[(BITS.index(bits) + BLOCKS.index(block)) % 3],
    light=False))
def test_large_matches_reference_all_options(target, bits, rounding, block, dtype):
    # Every bits x rounding x block at 2**20+3, input dtypes rotated over them.
    x = inputs.grad_like(LARGE, dtype, seed=bits + block)
    check_case(target, x, bits, block, True, rounding, seed_for(bits, block, rounding),
               f"{target} bits={bits} {rounding} block={block} {dtype} n={LARGE}")


@pytest.mark.parametrize("target,kind,bits,dtype", backends.product(
    OP, [inputs.NONCONTIGUOUS, BITS, DTYPES], keep_light=lambda k, b, d: d == torch.float32))
def test_noncontiguous_matches_reference(target, kind, bits, dtype):
    x = inputs.noncontiguous(kind, dtype, seed=bits, device=target.device)
    ctx = f"{target} {kind} {tuple(x.shape)} stride={x.stride()} bits={bits} {dtype}"
    rounding = "nearest" if bits == 1 else "stochastic"
    seed = seed_for(kind, bits)
    check_case(target, x, bits, 128, True, rounding, seed, ctx)
    # Independent of the reference: the layout of x must not change the payload.
    r = inputs.residual_like(x.numel(), seed=5)
    a = gradzip.quantize_pack(x, bits, 128, r.clone().to(target.device), rounding, seed,
                              backend=target.backend)
    b = gradzip.quantize_pack(x.contiguous(), bits, 128, r.clone().to(target.device),
                              rounding, seed, backend=target.backend)
    assert_payload_equal(a, b, ctx + " vs contiguous copy")


@pytest.mark.parametrize("target,shape", backends.product(
    OP, [[(0,), (0, 5), (1,), (3, 0, 2), (), (1, 1, 1)]]))
def test_odd_shapes_match_reference(target, shape):
    x = inputs.grad_like(math.prod(shape), seed=3).view(shape)
    for bits in BITS:
        check_case(target, x, bits, 32, True, "nearest", 7, f"{target} shape={shape} bits={bits}")


def special_blocks(block: int, finite_only: bool = False) -> torch.Tensor:
    """Blocks that hit every branch of the per-block rules, one block each."""
    f32 = torch.finfo(torch.float32)
    g = inputs.generator(11)
    rows = [
        torch.zeros(block),  # amax == 0
        torch.full((block,), -0.0),  # amax == 0 with negative zeros
        torch.randn(block, generator=g) * 1e-44,  # subnormal amax: qmax/amax overflows
        torch.randn(block, generator=g) * 1e-38,  # small normal amax, inv near the top
        (torch.rand(block, generator=g) * 2 - 1) * f32.max,  # amax near FLT_MAX
        torch.randn(block, generator=g).abs(),  # all positive
        -torch.randn(block, generator=g).abs(),  # all negative: amax from a negative
        torch.full((block,), 3.0),  # every element is amax
        torch.where(torch.arange(block) % 2 == 0, 1.0, -1.0),  # +-amax ties
        torch.arange(block, dtype=torch.float32) - block / 2 + 0.5,  # .5 steps
    ]
    if not finite_only:
        for bad in (math.inf, -math.inf, math.nan):
            r = torch.randn(block, generator=g)
            r[block // 3] = bad
            rows.append(r)
        r = torch.randn(block, generator=g)
        r[1], r[5] = math.inf, math.nan  # NaN wins over inf
        rows.append(r)
    return torch.cat(rows)


@pytest.mark.parametrize("target,bits,rounding,block,with_residual", backends.product(
    OP, [BITS, ROUNDINGS, (32, 128), (True, False)], keep=defined))
def test_special_values_match_reference(target, bits, rounding, block, with_residual):
    x = special_blocks(block)
    x = torch.cat([x, x[: block // 2 + 3]])  # and a short last block
    ctx = f"{target} special values bits={bits} {rounding} block={block}"
    check_case(target, x, bits, block, sparse_residual(x.numel(), block) if with_residual
               else False, rounding, 99, ctx)


def sparse_residual(n: int, block: int) -> torch.Tensor:
    """Zero except in a few blocks, so that most special blocks stay special in v."""
    r = torch.zeros(n)
    for b in (4, 5, 10):  # FLT_MAX-sized, all-positive, the +inf block
        r[b * block:(b + 1) * block] = inputs.residual_like(block, seed=b)[: n - b * block]
    return r


@pytest.mark.parametrize("target,dtype", backends.product(OP, [(torch.float16, torch.bfloat16)]))
def test_half_special_values_match_reference(target, dtype):
    # Low-precision inputs at their own extremes (fp16 max, subnormals, inf, NaN).
    fi = torch.finfo(dtype)
    vals = torch.tensor([fi.max, -fi.max, fi.tiny, fi.tiny / 4, -fi.tiny / 8, 0.0, -0.0,
                         math.inf, 1.0, -1.0, math.nan, 0.5], dtype=torch.float32)
    x = vals.repeat(40).to(dtype)
    for bits in BITS:
        for block in (32, 64):
            check_case(target, x, bits, block, sparse_residual(x.numel(), block), "nearest", 1,
                       f"{target} {dtype} extremes bits={bits} block={block}")


# ---------------------------------------------------------------------------------------
# properties, against independent expectations (run on the reference too)
# ---------------------------------------------------------------------------------------

PROP_N = 4999  # under the interpreter cap; not a multiple of any block


def _v_and_payload(target, bits, block, rounding, dtype=torch.float32, n=PROP_N, seed=3):
    x = inputs.grad_like(n, dtype, seed=seed)
    r0 = inputs.residual_like(n, seed=seed + 1)
    r = r0.clone().to(target.device)
    p = gradzip.quantize_pack(x.to(target.device), bits, block, r, rounding, seed,
                              backend=target.backend)
    v = x.to(torch.float32) + r0  # the definition of v: one float32 addition
    return v, p, r.cpu(), r0


@pytest.mark.parametrize("target,bits,rounding,dtype", backends.product(
    OP, [BITS, ROUNDINGS, (torch.float32, torch.bfloat16)], reference=True, keep=defined))
def test_error_feedback_invariant(target, bits, rounding, dtype):
    """decode(payload) + residual_new == v up to one float32 rounding.

    residual_new is defined as fl32(v - d) with d the float32 decode, so (exact arithmetic,
    float64 here) |d + residual_new - v| = |fl32(v - d) - (v - d)| <= u * |v - d| with
    u = 2**-24, plus half the smallest subnormal (2**-150) when v - d is subnormal.
    """
    v, p, r, _ = _v_and_payload(target, bits, 128, rounding, dtype)
    d = expect.decode(p)
    assert np.isfinite(d).all()
    v64, d64, r64 = v.double().numpy(), d.astype(np.float64), r.double().numpy()
    err = np.abs(d64 + r64 - v64)
    bound = expect.U32 * np.abs(v64 - d64) + 2.0**-150
    worst = int(np.argmax(err - bound))
    assert (err <= bound).all(), (
        f"{target}: |decode + residual - v| = {err[worst]:.3g} > {bound[worst]:.3g} at "
        f"{worst} (v={v64[worst]!r}, decode={d64[worst]!r}, residual={r64[worst]!r})")
    # And the residual is exactly that one rounding of v - d (the definition).
    assert_bits_equal(r, v - torch.from_numpy(d), f"{target} residual != fl32(v - d)")


@pytest.mark.parametrize("target,bits,block", backends.product(
    OP, [(8, 4, 2), (32, 4096)], reference=True))
def test_nearest_error_at_most_half_a_step(target, bits, block):
    """|decode - v| <= scale/2 (+ rounding slack).

    With inv = fl(qmax/amax), scale = fl(amax/qmax), t = fl(v*inv), q = rne(t): the step
    rounding gives scale/2, and fl() in inv, scale, t and the decode product q*scale add at
    most 4u * amax (|v|, |q*scale| <= amax(1 + 2u)); 5u * amax is used.
    """
    v, p, _, _ = _v_and_payload(target, bits, block, "nearest")
    _f, scales, q = expect.dense_parts(p)
    assert (np.abs(q) <= 2 ** (bits - 1) - 1).all()
    d = expect.decode64(p)
    s = np.repeat(scales.astype(np.float64), block)[: v.numel()]
    amax = np.repeat(np.abs(np.pad(v.numpy(), (0, -v.numel() % block)).reshape(-1, block))
                     .max(axis=1).astype(np.float64), block)[: v.numel()]
    err = np.abs(d - v.double().numpy())
    bound = s / 2 + 5 * expect.U32 * amax
    assert (err <= bound).all(), f"{target}: worst excess {np.max(err - bound):.3g}"
    # The scale is amax/qmax rounded once: within half an ulp of the exact quotient.
    amax_b = amax[::block]
    nz = amax_b > 0
    rel = np.abs(scales[nz] - amax_b[nz] / (2 ** (bits - 1) - 1)) / (amax_b[nz] / (2 ** (bits - 1) - 1))
    assert (rel <= expect.U32).all()


@pytest.mark.parametrize("target,block", backends.product(OP, [(32, 128, 4096)], reference=True))
def test_one_bit_sign_and_mean_scale(target, block):
    """1 bit: bit set exactly where v < 0, scale = mean |v| of the (possibly short) block.

    The float32 sum is 32 lanes of m = ceil(len/32) terms (each lane: m-1 roundings) folded
    by a 5-level tree (5 more) and one division: relative error <= (m + 5) * u to first
    order; 1.01 * (m + 6) * u is used.
    """
    v, p, _, _ = _v_and_payload(target, 1, block, "nearest")
    _f, scales, q = expect.dense_parts(p)
    vn = v.numpy()
    np.testing.assert_array_equal(q == -1, vn < 0, err_msg=f"{target}: sign bits")
    for b in range(len(scales)):
        seg = vn[b * block:(b + 1) * block].astype(np.float64)
        mean = np.abs(seg).mean()
        m = -(-len(seg) // 32)
        assert abs(scales[b] - mean) <= 1.01 * (m + 6) * expect.U32 * mean, (target, b)


@pytest.mark.parametrize("target,bits", backends.product(OP, [(8, 4, 2)], reference=True))
def test_rounding_half_to_even(target, bits):
    """Hand-made block with amax = qmax, so scale = inv = 1 and t = v exactly: every .5
    tie must go to the even integer (Python's round() is half-to-even)."""
    qmax = 2 ** (bits - 1) - 1
    ties = [k + 0.5 for k in range(-qmax, qmax)] + [-0.5, 0.5, 0.0, -0.0]
    vals = []
    for s in range(0, len(ties), 31):  # every block of 32 starts with amax = qmax
        vals += [float(qmax)] + ties[s:s + 31]
    x = torch.tensor(vals, dtype=torch.float32)
    p = gradzip.quantize_pack(x.to(target.device), bits, 32, backend=target.backend)
    _f, scales, q = expect.dense_parts(p)
    assert (scales == 1.0).all(), scales
    assert q.tolist() == [round(v) for v in vals], target


@pytest.mark.parametrize("target,bits,dtype", backends.product(
    OP, [(8, 4, 2), (torch.float32, torch.bfloat16)], reference=True))
def test_nearest_codes_follow_the_documented_arithmetic(target, bits, dtype):
    """Scales and codes equal a numpy float32 restatement of the rules (expect.
    np_absmax_nearest): in particular inv = qmax / amax is ONE correctly rounded division,
    not reciprocal(amax) * qmax. bf16 inputs make v = amax/2 and other exact halves
    common, where the two differ (t lands on either side of .5)."""
    n, block = 4999, 32
    x = inputs.grad_like(n, dtype, seed=bits)
    # amax/2 in every block: with qmax odd, t = qmax/2 * (amax * inv) sits on a tie
    xf = x.float().view(-1)
    for s in range(0, n - 1, block):
        blk = xf[s:s + block]
        j = int(blk.abs().argmax())
        xf[s + (j + 1) % blk.numel()] = blk[j] / 2
    x = xf.to(dtype)
    p = gradzip.quantize_pack(x.to(target.device), bits, block, backend=target.backend)
    _, scales, q = expect.dense_parts(p)
    v = x.float().numpy()
    qmax = 2 ** (bits - 1) - 1
    for b in range(len(scales)):
        seg = slice(b * block, (b + 1) * block)
        s_want, q_want = expect.np_absmax_nearest(v[seg], qmax)
        assert scales[b] == s_want, f"{target} block {b}: scale {scales[b]!r} != {s_want!r}"
        bad = np.nonzero(q[seg] != q_want)[0]
        assert bad.size == 0, (
            f"{target} block {b}: codes differ at {bad[:4].tolist()}: v={v[seg][bad[:2]]}, "
            f"got q={q[seg][bad[:2]]}, documented arithmetic q={q_want[bad[:2]]}")


@pytest.mark.parametrize("target,bits,n", backends.product(
    OP, [BITS, (1, 7, 77, 130)], reference=True))
def test_bit_packing_order(target, bits, n):
    """Element i's code at bit (i*bits) % 8 of byte (i*bits) // 8, LSB first, offset
    binary; expected bytes built bit by bit here. Unused bits and padding are zero."""
    qmax = 2 ** (bits - 1) - 1
    if bits == 1:
        q = [(-1 if (i * 7) % 3 == 0 else 1) for i in range(n)]
        vals = [float(s) * (1 + i % 5) for i, s in enumerate(q)]
        codes = [1 if v < 0 else 0 for v in vals]
    else:
        q = [((i * 5) % (2 * qmax + 1)) - qmax for i in range(n)]
        for s in range(0, n, 32):
            q[s] = qmax  # amax = qmax in every block: scale 1, t = v
        vals = [float(c) for c in q]
        codes = [c + qmax for c in q]
    expected = bytearray((n * bits + 7) // 8)
    for i, c in enumerate(codes):
        expected[(i * bits) // 8] |= c << ((i * bits) % 8)
    x = torch.tensor(vals, dtype=torch.float32)
    p = expect.raw(gradzip.quantize_pack(x.to(target.device), bits, 32, backend=target.backend))
    _, co, total = expect.dense_layout(n, bits, 32)
    assert p[co:co + len(expected)] == bytes(expected), (target, p[co:co + len(expected)].hex(),
                                                         bytes(expected).hex())
    assert p[co + len(expected):] == bytes(total - co - len(expected)), "code padding not zero"


@pytest.mark.parametrize("target,bits,rounding,block", backends.product(
    OP, [BITS, ROUNDINGS, (32, 4096)], reference=True, keep=defined))
def test_header_fields_and_padding(target, bits, rounding, block):
    n = 4097
    x = inputs.grad_like(n, seed=4)
    p = gradzip.quantize_pack(x.to(target.device), bits, block, rounding=rounding,
                              backend=target.backend)
    b = expect.raw(p)
    f = expect.fields(b)
    so, co, total = expect.dense_layout(n, bits, block)
    assert (f.magic, f.version, f.codec, f.bits, f.block) == (b"GZPK", 1, 1, bits, block)
    assert (f.value_format, f.index_format, f.k) == (0, 0, 0)
    assert f.flags == (1 if rounding == "stochastic" else 0)
    assert f.numel == n and f.total_bytes == total == len(b)
    assert f.reserved == bytes(24)
    assert so % 16 == 0 and co % 16 == 0 and total % 16 == 0
    nb = -(-n // block)
    assert b[so + 4 * nb:co] == bytes(co - so - 4 * nb), "scale padding not zero"


@pytest.mark.parametrize("target,bits,block", backends.product(
    OP, [BITS, (32, 128, 4096)], reference=True, keep_light=lambda bits, block: block == 128))
def test_payload_size_depends_only_on_codec_and_numel(target, bits, block):
    n = 3001
    contents = [torch.zeros(n), inputs.grad_like(n, seed=1), torch.full((n,), math.nan),
                torch.full((n,), -math.inf), torch.full((n,), 3e38),
                inputs.grad_like(n, seed=2) * 1e-40]
    roundings = ("nearest",) if bits == 1 else ROUNDINGS
    sizes_seen = {
        gradzip.quantize_pack(c.to(target.device), bits, block, rounding=r,
                              backend=target.backend).numel()
        for c in contents for r in roundings
    }
    expected = 64 + expect.a16(4 * -(-n // block)) + expect.a16((n * bits + 7) // 8)
    assert sizes_seen == {expected}
    assert gradzip.compressed_size(n, bits=bits, block=block) == expected


# ---------------------------------------------------------------------------------------
# stochastic rounding
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,bits", backends.product(
    OP, [(8, 4, 2)], reference=True, light=False))
def test_stochastic_rounding_is_unbiased(target, bits):
    """E[decode] == v. One block pattern repeated R times: each copy's elements have
    different indices, hence independent uniforms, so the per-position mean over copies
    estimates E[decode]. Each draw is floor(t) or floor(t)+1 steps: variance <= scale^2/4,
    standard error <= scale / (2 sqrt(R)); the bound is 6 standard errors per position
    (with 128 positions, P(false alarm) < 1e-6) and 6 / sqrt(128) of that for the mean
    over positions. Nearest rounding on the same data must fail the check (power)."""
    block, reps = 128, 4096
    g = inputs.generator(bits)
    qmax = 2 ** (bits - 1) - 1
    pat = (torch.rand(block, generator=g) * 2 - 1) * qmax * 0.999
    pat[0] = qmax  # amax = qmax: scale 1, t = v
    x = pat.repeat(reps)

    def bias(rounding):
        p = gradzip.quantize_pack(x.to(target.device), bits, block, rounding=rounding, seed=2024,
                                  backend=target.backend)
        d = expect.decode64(p).reshape(reps, block)
        return d.mean(axis=0) - pat.double().numpy()

    se = 1.0 / (2 * math.sqrt(reps))
    b = bias("stochastic")
    assert np.abs(b).max() <= 6 * se, f"{target}: worst bias {np.abs(b).max():.4f} steps"
    assert abs(b.mean()) <= 6 * se / math.sqrt(block)
    assert np.abs(bias("nearest")).max() > 6 * se  # the check can fail


@pytest.mark.parametrize("target,bits", backends.product(OP, [(8, 4, 2)], reference=True))
def test_stochastic_rounds_to_a_neighbour(target, bits):
    """Every stochastic code is floor(t) or floor(t)+1 (clamped): |decode - v| < scale
    (plus the 5u * amax float slack of the nearest-rounding bound)."""
    v, p, _, _ = _v_and_payload(target, bits, 128, "stochastic")
    _f, scales, _q = expect.dense_parts(p)
    d = expect.decode64(p)
    s = np.repeat(scales.astype(np.float64), 128)[: v.numel()]
    amax = s * (2 ** (bits - 1) - 1)
    assert (np.abs(d - v.double().numpy()) < s + 5 * expect.U32 * amax).all()


@pytest.mark.parametrize("target", backends.targets(OP, reference=True))
def test_stochastic_seed_determines_codes(target):
    x = inputs.grad_like(3001, seed=8).to(target.device)

    def run(seed):
        return expect.raw(gradzip.quantize_pack(x, 4, 64, rounding="stochastic", seed=seed,
                                                backend=target.backend))
    a, b, c, hi = run(1), run(1), run(2), run(2**32 - 1)
    assert a == b, "same seed, different payload"
    assert a != c and a != hi and c != hi, "seed ignored"


# ---------------------------------------------------------------------------------------
# non-finite input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,bits,rounding", backends.product(
    OP, [BITS, ROUNDINGS], reference=True, keep=defined))
def test_nonfinite_reaches_payload_and_spares_residual(target, bits, rounding):
    block, n = 64, 64 * 6 + 10
    x = inputs.grad_like(n, seed=6)
    x[64 + 3], x[3 * 64 + 60], x[5 * 64 + 1] = math.inf, math.nan, -math.inf
    bad_blocks = [1, 3, 5]
    r0 = inputs.residual_like(n, seed=7)
    r = r0.clone().to(target.device)
    p = gradzip.quantize_pack(x.to(target.device), bits, block, r, rounding, 5,
                              backend=target.backend)
    d = expect.decode(p).reshape(-1)
    for b in range(-(-n // block)):
        seg = d[b * block:(b + 1) * block]
        if b in bad_blocks:
            # GradScaler must see the overflow after the all-reduce.
            assert not np.isfinite(seg).all(), f"{target}: block {b} lost its inf/NaN"
        else:
            assert np.isfinite(seg).all(), f"{target}: block {b} poisoned by a neighbour"
    rc = r.cpu()
    assert torch.isfinite(rc).all(), f"{target}: residual poisoned"
    # Where v - decode is not finite the old residual is kept (the specification).
    for b in bad_blocks:
        sl = slice(b * block, (b + 1) * block)
        bad = ~torch.isfinite(x[sl] + r0[sl] - torch.from_numpy(d[sl]))
        assert_bits_equal(rc[sl][bad], r0[sl][bad], f"{target} block {b} residual")
    # The next, finite step is clean.
    p2 = gradzip.quantize_pack(inputs.grad_like(n, seed=8).to(target.device), bits, block, r,
                               rounding, 6, backend=target.backend)
    assert np.isfinite(expect.decode(p2)).all()
    assert torch.isfinite(r.cpu()).all()


NAN_BITS = (0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFF0000, 0xFFFF0000)


@pytest.mark.parametrize("target,bits,dtype", backends.product(
    OP, [BITS, (torch.float32, torch.bfloat16)], reference=True))
def test_nan_scales_are_canonical(target, bits, dtype):
    """Whatever the NaN's bits in x (signalling, negative, other payloads), a NaN block's
    scale is written as the canonical quiet NaN 0x7FC00000 (docs/format.md)."""
    block = 32
    x = torch.ones(block * len(NAN_BITS))
    xi = x.view(torch.int32)
    for b, nb in enumerate(NAN_BITS):
        xi[b * block + 3] = nb - 2**32 if nb >= 2**31 else nb
    x = x.to(dtype)  # bf16 NaNs keep (a truncation of) their bits
    p = expect.raw(gradzip.quantize_pack(x.to(target.device), bits, block,
                                         backend=target.backend))
    scales = np.frombuffer(p[64:64 + 4 * len(NAN_BITS)], "<u4")
    assert [hex(s) for s in scales] == [hex(0x7FC00000)] * len(NAN_BITS), target


# ---------------------------------------------------------------------------------------
# bad input: clear exceptions, nothing modified
# ---------------------------------------------------------------------------------------

X = inputs.grad_like(300, seed=9)


def _bad_cases():
    x = X
    meta_r = torch.empty(300, device="meta")
    return [
        ("x int32", {"x": x.to(torch.int32)}, TypeError, "x must be float32"),
        ("x float64", {"x": x.double()}, TypeError, "x must be float32"),
        ("x list", {"x": x.tolist()}, TypeError, "x must be a torch.Tensor"),
        ("bits 3", {"bits": 3}, ValueError, "bits must be one of"),
        ("bits 16", {"bits": 16}, ValueError, "bits must be one of"),
        ("bits 0", {"bits": 0}, ValueError, "bits must be one of"),
        ("bits True", {"bits": True}, ValueError, "bits must be one of"),
        ("bits 8.0", {"bits": 8.0}, ValueError, "bits must be one of"),
        ("block 16", {"block": 16}, ValueError, "block must be a power of two"),
        ("block 8192", {"block": 8192}, ValueError, "block must be a power of two"),
        ("block 100", {"block": 100}, ValueError, "block must be a power of two"),
        ("block 0", {"block": 0}, ValueError, "block must be a power of two"),
        ("block 128.0", {"block": 128.0}, ValueError, "block must be a power of two"),
        ("rounding", {"rounding": "up"}, ValueError, "rounding must be one of"),
        ("1-bit stochastic", {"bits": 1, "rounding": "stochastic"}, ValueError,
         "stochastic rounding is not defined for bits=1"),
        ("seed -1", {"seed": -1}, ValueError, "seed must be an int"),
        ("seed 2**32", {"seed": 2**32}, ValueError, "seed must be an int"),
        ("seed float", {"seed": 1.5}, ValueError, "seed must be an int"),
        ("residual fp16", {"residual": torch.zeros(300, dtype=torch.float16)}, TypeError,
         "residual must be float32"),
        ("residual fp64", {"residual": torch.zeros(300, dtype=torch.float64)}, TypeError,
         "residual must be float32"),
        ("residual size", {"residual": torch.zeros(299)}, ValueError,
         "residual has 299 elements but x has 300"),
        ("residual size+", {"residual": torch.zeros(301)}, ValueError,
         "residual has 301 elements"),
        ("residual strided", {"residual": torch.zeros(600)[::2]}, ValueError,
         "residual must be contiguous"),
        ("residual device", {"residual": meta_r}, ValueError, "residual is on meta"),
        ("residual list", {"residual": [0.0] * 300}, TypeError, "residual must be a torch"),
        ("residual aliases x", {"x": x.clone(), "residual": "alias"}, ValueError,
         "must not share memory with x"),
        ("backend", {"backend": "tpu"}, ValueError, "backend must be one of"),
        ("backend cuda on cpu", {"backend": "cuda"}, ValueError, "needs CUDA tensors"),
        ("x on meta", {"x": torch.empty(300, device="meta"), "residual": None}, ValueError,
         "device type"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_arguments_raise_and_touch_nothing(case):
    name, over, exc, match = case
    kw = {"x": X.clone(), "bits": 8, "block": 128, "residual": inputs.residual_like(300), "rounding": "nearest",
              "seed": 0, "backend": "auto"}
    kw.update(over)
    if isinstance(kw["residual"], str):
        kw["residual"] = kw["x"]
    x_before = kw["x"].clone() if isinstance(kw["x"], torch.Tensor) and kw["x"].device.type \
        != "meta" else None
    r = kw["residual"]
    r_before = r.clone() if isinstance(r, torch.Tensor) and r.device.type != "meta" else None
    with pytest.raises(exc, match=match):
        gradzip.quantize_pack(**kw)
    if x_before is not None:
        assert_bits_equal(kw["x"], x_before, f"{name}: x modified")
    if r_before is not None:
        assert_bits_equal(r, r_before, f"{name}: residual modified by a failed call")


@pytest.mark.parametrize("target", backends.targets(OP))
def test_bad_arguments_on_each_backend(target):
    """The shared checks guard every backend, not only "auto"."""
    x = X.to(target.device)
    r = inputs.residual_like(300).to(target.device)
    r_before = r.clone()
    be = target.backend
    for kw, exc, match in [
        ({"bits": 3}, ValueError, "bits"),
        ({"block": 48}, ValueError, "block"),
        ({"bits": 1, "rounding": "stochastic"}, ValueError, "stochastic"),
        ({"residual": torch.zeros(299, device=target.device)}, ValueError, "residual has"),
        ({"residual": torch.zeros(300, dtype=torch.float16, device=target.device)},
         TypeError, "float32"),
    ]:
        args = {"bits": 8, "block": 128, "residual": r, "rounding": "nearest", "seed": 0, "backend": be}
        args.update(kw)
        with pytest.raises(exc, match=match):
            gradzip.quantize_pack(x, **args)
    assert_bits_equal(r, r_before, f"{target}: residual modified by a failed call")


@pytest.mark.parametrize("target", [t for t in backends.targets(OP)
                                    if t.values[0].backend in ("cpu", "cuda")])
def test_direct_op_checks_arguments(target):
    """torch.ops.gradzip.quantize_pack, reached without the Python wrapper, still refuses
    bad arguments with ValueError/TypeError (csrc/core/checks.h), never crashes."""
    dev = target.device
    x = X.to(dev)
    r = inputs.residual_like(300).to(dev)
    r_before = r.clone()
    op = torch.ops.gradzip.quantize_pack
    cases = [
        ((x.to(torch.int32), 8, 128, None, False, 0), TypeError, "float32"),
        ((x, 3, 128, r, False, 0), ValueError, "bits"),
        ((x, 8, 100, r, False, 0), ValueError, "block"),
        ((x, 8, 8192, r, False, 0), ValueError, "block"),
        ((x, 1, 128, r, True, 0), ValueError, "stochastic"),
        ((x, 8, 128, r, False, -1), ValueError, "seed"),
        ((x, 8, 128, r, False, 2**32), ValueError, "seed"),
        ((x, 8, 128, r.half(), False, 0), TypeError, "residual"),
        ((x, 8, 128, r[:299], False, 0), ValueError, "residual"),
        ((x, 8, 128, torch.zeros(600, device=dev)[::2], False, 0), ValueError, "contiguous"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            op(*args)
    assert_bits_equal(r, r_before, f"{target}: residual modified by a failed call")
