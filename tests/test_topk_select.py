"""topk_select: every backend against the reference (bytes and residual bits), selection
properties against independent expectations (numpy sorts, hand-made ties), approximate
mode's recall and fill rule, non-finite input, and bad input."""

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

OP = "topk_select"
VALUES = ("fp32", "bf16", "int8")
VF = {"fp32": 1, "bf16": 2, "int8": 3}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (numel, k): single element, k = 1 and k = n, a tail, a prime at half, beyond the 16384
# sample (approximate mode samples), k so close to n that selection reaches the zeros.
SIZES = ((1, 1), (33, 1), (33, 33), (1000, 10), (1009, 504), (4999, 50), (20011, 200),
         (20011, 19974), (100003, 1000))
LARGE = 2**20 + 3


def seed_for(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def run_both(target, x, k, residual, exact, values, seed):
    want_r = None if residual is None else residual.clone()
    want = reference.topk_select(x.cpu(), k, want_r, exact, values, seed)
    xd = x.to(target.device)  # a no-op for tensors made on the device (keeps their strides)
    x_before = xd.clone()
    got_r = None if residual is None else residual.clone().to(target.device)
    got = gradzip.topk_select(xd, k, got_r, exact, values, seed, backend=target.backend)
    assert got.device == xd.device
    assert_bits_equal(xd, x_before, "x was modified by topk_select")
    return got, got_r, want, want_r


def check_case(target, x, k, with_residual, exact, values, seed, ctx):
    r = inputs.residual_like(x.numel(), seed=seed % 1000) if with_residual else None
    got, got_r, want, want_r = run_both(target, x, k, r, exact, values, seed)
    assert_payload_equal(got, want, ctx)
    if r is not None:
        assert_bits_equal(got_r, want_r, ctx + " residual")


def _light(values, exact, dtype, with_residual, nk):
    return with_residual and dtype == DTYPES[VALUES.index(values)]


def _keep(values, exact, dtype, with_residual, nk):
    # The big sizes once per value format x mode x dtype (with a residual), the biggest
    # in float32 only: they cost a second of reference time each.
    return nk[0] < 20000 or (with_residual and (nk[0] < 100000 or dtype == torch.float32))


@pytest.mark.parametrize("target,values,exact,dtype,with_residual,nk", backends.product(
    OP, [VALUES, (True, False), DTYPES, (True, False), SIZES], keep=_keep, keep_light=_light,
    numel=lambda *c: c[-1][0]))
def test_matches_reference(target, values, exact, dtype, with_residual, nk):
    n, k = nk
    seed = seed_for(n, k, values, exact)
    x = inputs.grad_like(n, dtype, seed=n + k)
    ctx = f"{target} n={n} k={k} exact={exact} values={values} {dtype} res={with_residual}"
    check_case(target, x, k, with_residual, exact, values, seed, ctx)


@pytest.mark.parametrize("target,values,exact", backends.product(
    OP, [VALUES, (True, False)], light=False))
def test_large_matches_reference(target, values, exact):
    x = inputs.grad_like(LARGE, torch.float32, seed=4)
    check_case(target, x, LARGE // 100, True, exact, values, 77,
               f"{target} n={LARGE} k=1% exact={exact} values={values}")


@pytest.mark.parametrize("target,kind,exact", backends.product(
    OP, [inputs.NONCONTIGUOUS, (True, False)], keep_light=lambda kind, exact: exact))
def test_noncontiguous_matches_reference(target, kind, exact):
    x = inputs.noncontiguous(kind, torch.bfloat16 if kind == "sliced" else torch.float32, seed=2,
                             device=target.device)
    k = max(1, x.numel() // 20)
    ctx = f"{target} {kind} {tuple(x.shape)} stride={x.stride()} exact={exact}"
    check_case(target, x, k, True, exact, "fp32", 3, ctx)
    a = gradzip.topk_select(x, k, exact=exact, seed=3, backend=target.backend)
    b = gradzip.topk_select(x.contiguous(), k, exact=exact, seed=3, backend=target.backend)
    assert_payload_equal(a, b, ctx + " vs contiguous copy")


# ---------------------------------------------------------------------------------------
# selection properties against independent expectations
# ---------------------------------------------------------------------------------------


def distinct_magnitudes(n: int, seed: int) -> torch.Tensor:
    """n values whose magnitudes are all different (so the top-k set is unique)."""
    g = inputs.generator(seed)
    mags = (torch.arange(1, n + 1, dtype=torch.float64) / n * 8).to(torch.float32)
    assert torch.unique(mags).numel() == n
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mags[torch.randperm(n, generator=g)] * signs


def np_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest |x|, ties to the lower index (stable sort)."""
    order = np.argsort(-np.abs(x.astype(np.float64)), kind="stable")
    return np.sort(order[:k])


def check_well_formed(p, n: int, k: int, values: str = "fp32", approximate: bool = False):
    f, idx, vals = expect.topk_parts(p)
    assert (f.magic, f.version, f.codec, f.numel, f.k) == (b"GZPK", 1, 2, n, k)
    assert (f.bits, f.block, f.value_format) == (0, 0, VF[values])
    assert f.index_format == 1, "int32 indices below 2**31 elements"
    assert f.flags == (2 if approximate else 0)
    assert f.reserved == bytes(24)
    assert idx.size == k, "exactly k entries"
    assert (np.diff(idx) > 0).all(), "indices strictly ascending"
    assert idx.min() >= 0 and idx.max() < n
    return idx, vals


@pytest.mark.parametrize("target,n,kfrac,exact", backends.product(
    OP, [(1000, 4999, 100003), (0.0, 0.01, 0.5, 1.0), (True, False)], reference=True,
    numel=lambda n, kf, e: n))
def test_picks_the_largest_magnitudes(target, n, kfrac, exact):
    k = max(1, int(n * kfrac))
    x = distinct_magnitudes(n, seed=n)
    p = gradzip.topk_select(x.to(target.device), k, exact=exact, seed=1, backend=target.backend)
    idx, vals = check_well_formed(p, n, k, approximate=not exact)
    want = np_topk(x.numpy(), k)
    if exact:
        np.testing.assert_array_equal(idx, want, err_msg=f"{target}: not the top-k")
    else:
        # With distinct magnitudes the approximate result is the exact one whenever enough
        # candidates pass the sampled threshold; demand at least 0.95 recall here.
        assert np.intersect1d(idx, want).size >= 0.95 * k, target
    assert_bits_equal(torch.from_numpy(vals), x[torch.from_numpy(idx)], f"{target} values")


@pytest.mark.parametrize("target,exact", backends.product(OP, [(True, False)], reference=True))
def test_ties_go_to_the_lower_index(target, exact):
    """Magnitude 1 everywhere (both signs), magnitude 2 at a few places: the 2s, then the
    lowest-index 1s. Approximate mode: every element passes the threshold, so exact rule."""
    n = 3001
    g = inputs.generator(5)
    x = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    twos = torch.randperm(n, generator=g)[:40]
    x[twos] *= 2
    for m in (1, 17, 500):
        k = 40 + m
        p = gradzip.topk_select(x.to(target.device), k, exact=exact, backend=target.backend)
        idx, _ = check_well_formed(p, n, k, approximate=not exact)
        ones = np.setdiff1d(np.arange(n), twos.numpy())
        want = np.sort(np.concatenate([twos.numpy(), ones[:m]]))
        np.testing.assert_array_equal(idx, want, err_msg=f"{target} k={k}")
    # Equal magnitudes of opposite sign: the lower index wins whatever the sign.
    y = torch.tensor([0.5, -3.0, 3.0, 1.0, -3.0], dtype=torch.float32)
    p = gradzip.topk_select(y.to(target.device), 2, exact=exact, backend=target.backend)
    assert check_well_formed(p, 5, 2, approximate=not exact)[0].tolist() == [1, 2]


@pytest.mark.parametrize("target,values", backends.product(OP, [VALUES], reference=True))
def test_nonfinite_selected_first_and_carried(target, values):
    """NaN orders above inf, inf above everything finite (by magnitude: -inf == inf)."""
    n = 2000
    x = distinct_magnitudes(n, seed=9)
    nans, infs = [17, 1500], [3, 999, 1998]
    x[nans] = math.nan
    x[infs] = torch.tensor([math.inf, -math.inf, math.inf])
    r0 = inputs.residual_like(n, seed=3)
    r = r0.clone().to(target.device)
    p = gradzip.topk_select(x.to(target.device), 3, r, values=values, backend=target.backend)
    idx, _vals = check_well_formed(p, n, 3, values)
    assert idx.tolist() == [3, 17, 1500], f"{target}: {idx.tolist()}"
    d = expect.decode(p)
    # GradScaler must see the overflow after the all-reduce.
    assert not np.isfinite(d).all()
    if values != "int8":  # int8 has one scale: a non-finite scale makes every entry NaN
        assert np.isnan(d[17]) and np.isnan(d[1500]) and d[3] == math.inf
    assert torch.isfinite(r.cpu()).all(), f"{target}: residual poisoned"
    # Next step, finite input: a finite payload, and a finite residual.
    p2 = gradzip.topk_select(inputs.grad_like(n, seed=1).to(target.device), 10, r,
                             values=values, backend=target.backend)
    assert np.isfinite(expect.decode(p2)).all()
    assert torch.isfinite(r.cpu()).all()


@pytest.mark.parametrize("target,values", backends.product(OP, [("fp32", "bf16")],
                                                     reference=True))
def test_nan_values_are_canonical_and_tie(target, values):
    """NaNs of any bit pattern order above inf and tie with each other (lower index
    first); the payload carries them as the canonical quiet NaN (0x7FC00000 / 0x7FC0)."""
    n = 100
    x = torch.linspace(1, 2, n)
    xi = x.view(torch.int32)
    for i, nb in zip((40, 10, 70, 90), (0xFFFFFFFF, 0x7F800001, 0xFFC00000, 0x7FC00000),
                     strict=True):
        xi[i] = nb - 2**32 if nb >= 2**31 else nb
    x[5] = -math.inf
    p = gradzip.topk_select(x.to(target.device), 3, values=values, backend=target.backend)
    idx, _ = check_well_formed(p, n, 3, values)
    assert idx.tolist() == [10, 40, 70], f"{target}: {idx.tolist()}"
    vo = expect.topk_layout(n, 3, VF[values])[1]
    b = expect.raw(p)
    if values == "fp32":
        assert list(np.frombuffer(b[vo:vo + 12], "<u4")) == [0x7FC00000] * 3
    else:
        assert list(np.frombuffer(b[vo:vo + 6], "<u2")) == [0x7FC0] * 3


@pytest.mark.parametrize("target,dist,kfrac", backends.product(
    OP, [("gaussian", "heavy_tailed"), (0.01, 0.001)], reference=True, light=False))
def test_approximate_recall(target, dist, kfrac):
    n = 200003
    g = inputs.generator(12)
    x = torch.randn(n, generator=g)
    if dist == "heavy_tailed":  # Cauchy: ratio of two gaussians
        x = x / torch.randn(n, generator=g)
    k = int(n * kfrac)
    for seed in (0, 1, 2**31 + 5):
        p = gradzip.topk_select(x.to(target.device), k, exact=False, seed=seed,
                                backend=target.backend)
        idx, _vals = check_well_formed(p, n, k, approximate=True)
        recall = np.intersect1d(idx, np_topk(x.numpy(), k)).size / k
        assert recall >= 0.95, f"{target} {dist} k={k} seed={seed}: recall {recall:.3f}"


@pytest.mark.parametrize("target", backends.targets(OP, reference=True, light=False))
def test_approximate_fill_when_too_few_candidates(target):
    """Put the 100 smallest magnitudes where the sampler never looks (positions from the
    specification's reference.sample_positions) and ask for all but 50: the threshold is
    the smallest sampled key, so only n-100 candidates pass; the rule then fills with the
    lowest-index non-candidates."""
    n, seed = 20011, 3
    sampled = set(reference.sample_positions(n, seed).tolist())
    unsampled = np.array(sorted(set(range(n)) - sampled))
    g = np.random.default_rng(0)
    small_pos = np.sort(g.choice(unsampled, 100, replace=False))
    others = np.setdiff1d(np.arange(n), small_pos)
    mags = np.arange(1, n + 1, dtype=np.float32)
    x = np.empty(n, dtype=np.float32)
    x[small_pos] = mags[:100]
    x[others] = g.permutation(mags[100:])
    x *= np.where(g.random(n) < 0.5, -1, 1).astype(np.float32)
    k = n - 50
    p = gradzip.topk_select(torch.from_numpy(x).to(target.device), k, exact=False, seed=seed,
                            backend=target.backend)
    idx, _ = check_well_formed(p, n, k, approximate=True)
    want = np.sort(np.concatenate([others, small_pos[:50]]))
    np.testing.assert_array_equal(idx, want, err_msg=str(target))


@pytest.mark.parametrize("target,values", backends.product(OP, [VALUES], reference=True))
def test_values_and_residual(target, values):
    """Residual = v - decode: +0.0 at selected fp32 entries, v's rounding error for bf16
    and int8, v itself elsewhere. int8 codes are within half a step of v."""
    n, k = 4099, 400
    x = inputs.grad_like(n, seed=21)
    r0 = inputs.residual_like(n, seed=22)
    r = r0.clone().to(target.device)
    p = gradzip.topk_select(x.to(target.device), k, r, values=values, backend=target.backend)
    v = x + r0
    idx, vals = check_well_formed(p, n, k, values)
    np.testing.assert_array_equal(idx, np_topk(v.numpy(), k))
    sel = torch.from_numpy(idx)
    d = torch.zeros(n)
    d[sel] = torch.from_numpy(vals)
    if values == "fp32":
        assert_bits_equal(d[sel], v[sel], f"{target} fp32 values")
    elif values == "bf16":
        # bf16 values are v rounded to nearest even (torch's conversion does exactly that)
        assert_bits_equal(d[sel], v[sel].to(torch.bfloat16).float(), f"{target} bf16")
    else:
        so = expect.topk_layout(n, k, 3)[2]
        scale = float(np.frombuffer(expect.raw(p)[so:so + 4], "<f4")[0])
        amax = float(v[sel].abs().max())
        assert abs(scale - amax / 127) <= expect.U32 * amax / 127
        err = (d[sel].double() - v[sel].double()).abs()
        assert float(err.max()) <= scale / 2 + 5 * expect.U32 * amax
        # Codes and scale exactly as the documented arithmetic (inv = 127/amax, one division).
        vo = expect.topk_layout(n, k, 3)[1]
        codes = np.frombuffer(expect.raw(p)[vo:vo + k], np.int8)
        s_want, q_want = expect.np_absmax_nearest(v[sel].numpy(), 127)
        assert scale == s_want
        np.testing.assert_array_equal(codes, q_want, err_msg=f"{target} int8 codes")
    rc = r.cpu()
    assert_bits_equal(rc, v - d, f"{target} residual != v - decode")
    if values == "fp32":
        assert (rc[sel].view(torch.int32) == 0).all(), "selected residual not +0.0"
    unsel = torch.ones(n, dtype=torch.bool)
    unsel[sel] = False
    assert_bits_equal(rc[unsel], v[unsel], f"{target} unselected residual != v")


@pytest.mark.parametrize("target,values", backends.product(
    OP, [VALUES], reference=True, keep_light=lambda values: values == "int8"))
def test_payload_size_depends_only_on_codec_numel_k(target, values):
    n, k = 3001, 77
    contents = [torch.zeros(n), inputs.grad_like(n, seed=1), torch.full((n,), math.nan),
                torch.full((n,), -math.inf), inputs.grad_like(n, seed=2) * 1e-40]
    got = {gradzip.topk_select(c.to(target.device), k, exact=e, values=values,
                               backend=target.backend).numel()
           for c in contents for e in (True, False)}
    _io, _vo, _so, total = expect.topk_layout(n, k, VF[values])
    assert got == {total}
    assert gradzip.compressed_size(n, k=k, values=values) == total


@pytest.mark.parametrize("target", backends.targets(OP, reference=True))
def test_seed_only_matters_in_approximate_mode(target):
    n, k = 30011, 300  # beyond the sample size, so different seeds sample differently
    x = inputs.grad_like(n, seed=31).to(target.device)

    def run(exact, seed):
        return expect.raw(gradzip.topk_select(x, k, exact=exact, seed=seed,
                                              backend=target.backend))
    assert run(True, 0) == run(True, 12345)
    assert run(False, 7) == run(False, 7)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------

X = inputs.grad_like(300, seed=9)


def _bad_cases():
    return [
        ("k 0", {"k": 0}, ValueError, "k must be at least 1"),
        ("k -1", {"k": -1}, ValueError, "k must be at least 1"),
        ("k > numel", {"k": 301}, ValueError, "k=301 is larger than the tensor's 300"),
        ("k float", {"k": 3.0}, TypeError, "k must be an int"),
        ("k bool", {"k": True}, TypeError, "k must be an int"),
        ("k on empty", {"x": torch.zeros(0), "k": 1, "residual": None}, ValueError, "larger than"),
        ("x int64", {"x": X.long()}, TypeError, "x must be float32"),
        ("x float64", {"x": X.double()}, TypeError, "x must be float32"),
        ("exact str", {"exact": "yes"}, TypeError, "exact must be a bool"),
        ("values fp16", {"values": "fp16"}, ValueError, "values must be one of"),
        ("values int", {"values": 1}, ValueError, "values must be one of"),
        ("seed", {"seed": -3}, ValueError, "seed must be an int"),
        ("residual fp16", {"residual": torch.zeros(300, dtype=torch.float16)}, TypeError,
         "residual must be float32"),
        ("residual size", {"residual": torch.zeros(30)}, ValueError,
         "residual has 30 elements but x has 300"),
        ("residual strided", {"residual": torch.zeros(900)[::3]}, ValueError,
         "residual must be contiguous"),
        ("residual device", {"residual": torch.empty(300, device="meta")}, ValueError,
         "residual is on meta"),
        ("residual aliases x", {"residual": "alias"}, ValueError, "must not share memory"),
        ("backend", {"backend": "numpy"}, ValueError, "backend must be one of"),
        ("backend cuda on cpu", {"backend": "cuda"}, ValueError, "needs CUDA tensors"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_arguments_raise_and_touch_nothing(case):
    name, over, exc, match = case
    kw = {"x": X.clone(), "k": 10, "residual": inputs.residual_like(300), "exact": True, "values": "fp32",
              "seed": 0, "backend": "auto"}
    kw.update(over)
    if isinstance(kw["residual"], str):
        kw["residual"] = kw["x"]
    x_before = kw["x"].clone()
    r = kw["residual"]
    r_before = r.clone() if isinstance(r, torch.Tensor) and r.device.type != "meta" else None
    with pytest.raises(exc, match=match):
        gradzip.topk_select(**kw)
    assert_bits_equal(kw["x"], x_before, f"{name}: x modified")
    if r_before is not None:
        assert_bits_equal(r, r_before, f"{name}: residual modified by a failed call")


@pytest.mark.parametrize("target", [t for t in backends.targets(OP)
                                    if t.values[0].backend in ("cpu", "cuda")])
def test_direct_op_checks_arguments(target):
    """torch.ops.gradzip.topk_select without the Python wrapper: ValueError/TypeError."""
    dev = target.device
    x = X.to(dev)
    r = inputs.residual_like(300).to(dev)
    r_before = r.clone()
    op = torch.ops.gradzip.topk_select
    cases = [
        ((x, 0, r, True, 1, 0), ValueError, "k must be at least 1"),
        ((x, 301, r, True, 1, 0), ValueError, "larger than"),
        ((x, 5, r, True, 0, 0), ValueError, "value_format"),
        ((x, 5, r, True, 4, 0), ValueError, "value_format"),
        ((x, 5, r, True, 1, -1), ValueError, "seed"),
        ((x.to(torch.int32), 5, None, True, 1, 0), TypeError, "float32"),
        ((x, 5, r.double(), True, 1, 0), TypeError, "residual"),
        ((x, 5, r[:10], True, 1, 0), ValueError, "residual"),
        ((x, 5, torch.zeros(600, device=dev)[::2], False, 1, 0), ValueError, "contiguous"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            op(*args)
    assert_bits_equal(r, r_before, f"{target}: residual modified by a failed call")
