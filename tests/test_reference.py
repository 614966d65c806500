"""gradzip.reference, the specification, checked against independent re-statements of its
own rules: the hash in plain Python integers, block_abs_sum's order as a scalar loop,
the magnitude key's order, the sampler's strata, the rank formula, and its decode against
the numpy decoder of tests/expect.py."""

from __future__ import annotations

import itertools
import math

import expect
import inputs
import numpy as np
import pytest
import torch
from gradzip import reference
from gradzip.testing import assert_bits_equal

M32 = 0xFFFFFFFF


def lowbias32_int(x: int) -> int:
    """The documented finaliser, one Python int at a time."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def hash32_int(seed: int, index: int) -> int:
    k1 = lowbias32_int(seed ^ 0x9E3779B9)
    k2 = lowbias32_int((index >> 32) ^ k1)
    return lowbias32_int((lowbias32_int((index & M32) ^ k2) + k1) & M32)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31, 2**32 - 1])
def test_hash_matches_plain_integer_arithmetic(seed):
    idx = [0, 1, 2, 255, 2**16 + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3,
           2**62 + 11]
    got = reference.hash32(seed, torch.tensor(idx, dtype=torch.int64)).tolist()
    assert got == [hash32_int(seed, i) for i in idx]
    g = inputs.generator(seed % 1000)
    many = torch.randint(0, 2**62, (2000,), generator=g, dtype=torch.int64)
    got = reference.hash32(seed, many).tolist()
    assert got == [hash32_int(seed, i) for i in many.tolist()]


def test_uniform_range_resolution_and_determinism():
    idx = torch.arange(2**16, dtype=torch.int64)
    for seed in (0, 7, 2**32 - 1):
        u = reference.uniform(seed, idx)
        assert u.dtype == torch.float32
        assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
        assert torch.equal(u * 2**24, torch.floor(u * 2**24)), "not multiples of 2**-24"
        assert_bits_equal(reference.uniform(seed, idx), u, "uniform not deterministic")
        assert torch.equal((u * 2**24).long(), reference.hash32(seed, idx) >> 8)


@pytest.mark.parametrize("seed", [0, 3, 2**32 - 1])
@pytest.mark.parametrize("offset", [0, 2**32 - 2**15, 2**40])
def test_uniform_is_uniform(seed, offset):
    """Chi-square over 64 equal bins of 2**16 draws (63 degrees of freedom: mean 63, sd
    11.2): 63 + 6 sd = 130 is never reached by a uniform source in practice; also the
    lag-1 correlation, whose standard error is 1/sqrt(n) = 0.004, stays under 0.025."""
    idx = torch.arange(offset, offset + 2**16, dtype=torch.int64)
    u = reference.uniform(seed, idx)
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    expected = 2**16 / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 130, chi2
    c = torch.corrcoef(torch.stack([u[:-1], u[1:]]).double())[0, 1]
    assert abs(float(c)) < 0.025
    assert abs(float(u.double().mean()) - 0.5) < 6 * math.sqrt(1 / 12 / 2**16)


def test_seeds_give_unrelated_streams():
    idx = torch.arange(2**14, dtype=torch.int64)
    a, b = reference.uniform(1, idx), reference.uniform(2, idx)
    assert not torch.equal(a, b)
    c = torch.corrcoef(torch.stack([a, b]).double())[0, 1]
    assert abs(float(c)) < 6 / math.sqrt(2**14)
    # The high 32 bits of the index matter.
    hi = reference.uniform(1, idx + 2**32)
    assert (hi != a).float().mean() > 0.99


@pytest.mark.parametrize("block", [32, 64, 128, 4096])
def test_block_abs_sum_order(block):
    """The documented order, written as a float32 scalar loop: lane j accumulates elements
    j, j+32, ... in order, then lanes fold with h = 16, 8, 4, 2, 1."""
    g = inputs.generator(block)
    nb = 3
    vb = (torch.randn(nb, block, generator=g) * 10.0 ** torch.randint(-6, 6, (nb, block),
                                                                       generator=g)).float()
    vb[2, block // 2:] = 0.0  # a short last block is zero-padded
    got = reference.block_abs_sum(vb)
    for b in range(nb):
        a = np.abs(vb[b].numpy()).astype(np.float32)
        lane = [np.float32(a[j]) for j in range(32)]
        for s in range(32, block, 32):
            for j in range(32):
                lane[j] = np.float32(lane[j] + a[s + j])
        h = 16
        while h >= 1:
            for j in range(h):
                lane[j] = np.float32(lane[j] + lane[j + h])
            h //= 2
        assert got[b].item() == float(lane[0]), (b, got[b].item(), float(lane[0]))


def test_magnitude_key_orders_by_magnitude_nan_first():
    f32 = torch.finfo(torch.float32)
    ordered = [0.0, 1e-45, 1e-40, f32.tiny, 1e-20, 0.5, 1.0, 1.0000001, 3e38, f32.max,
               math.inf, math.nan]
    t = torch.tensor(ordered, dtype=torch.float32)
    for sign in (1.0, -1.0):
        keys = reference.magnitude_key(t * sign).tolist()
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert_bits_equal(reference.magnitude_key(t), reference.magnitude_key(-t),
                      "key depends on sign")
    # Every NaN has the canonical NaN's key, whatever its bits.
    nans = torch.tensor([0x7FC00000, -0x400000, 0x7F800001, -1, 0x7FFFFFFF],
                        dtype=torch.int32).view(torch.float32)
    assert torch.isnan(nans).all()
    assert reference.magnitude_key(nans).tolist() == [0x7FC00000] * 5


@pytest.mark.parametrize("n", [1, 100, 16383, 16384, 16385, 20011, 10**6 + 3])
def test_sample_positions_one_per_stratum(n):
    s = min(n, reference.SAMPLE_SIZE)
    pos = reference.sample_positions(n, 9).tolist()
    assert len(pos) == s
    for j in {0, s // 2, s - 1}:
        lo, hi = j * n // s, (j + 1) * n // s
        assert lo <= pos[j] < hi
    assert all(a < b for a, b in itertools.pairwise(pos))
    if n <= reference.SAMPLE_SIZE:
        assert pos == list(range(n))
    assert reference.sample_positions(n, 9).tolist() == pos


@pytest.mark.parametrize("n", [1, 50, 16384, 100003, 2**31 + 5])
def test_approximate_rank_formula(n):
    s = min(n, reference.SAMPLE_SIZE)
    for k in {1, 2, n // 100 or 1, n // 2 or 1, n}:
        want = min(s, math.ceil(1.25 * k * s / n - 1e-12) + 16)
        assert reference.approximate_rank(n, k) == want, (n, k)


CODECS = [("dense", b, blk, r) for b in (8, 4, 2, 1) for blk in (32, 4096)
          for r in ("nearest", "stochastic") if not (b == 1 and r == "stochastic")] + \
         [("topk", v, e) for v in ("fp32", "bf16", "int8") for e in (True, False)]


def _payload(codec, x, residual=None):
    if codec[0] == "dense":
        return reference.quantize_pack(x, codec[1], codec[2], residual, codec[3], 5)
    return reference.topk_select(x, max(1, x.numel() // 7), residual, codec[2], codec[1], 5)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: "-".join(map(str, c)))
def test_reference_decode_matches_independent_decoder(codec):
    for n in (1, 33, 4097):
        p = _payload(codec, inputs.grad_like(n, seed=n))
        assert_bits_equal(reference.dequantize(p), torch.from_numpy(expect.decode(p)),
                          f"{codec} n={n}")


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: "-".join(map(str, c)))
def test_reference_is_deterministic_and_leaves_x_alone(codec):
    x = inputs.grad_like(3001, torch.bfloat16, seed=1)
    x0 = x.clone()
    r1, r2 = inputs.residual_like(3001), inputs.residual_like(3001)
    assert torch.equal(_payload(codec, x, r1), _payload(codec, x, r2))
    assert_bits_equal(r1, r2, f"{codec} residual")
    assert_bits_equal(x, x0, f"{codec} x modified")


def test_reference_accumulate_forms():
    ps = [reference.quantize_pack(inputs.grad_like(500, seed=s), 4, 64) for s in range(3)]
    a = reference.dequantize_accumulate(torch.stack(ps), torch.zeros(500))
    b = reference.dequantize_accumulate(ps, torch.zeros(500))
    c = reference.dequantize_accumulate(ps[0], torch.zeros(500))
    assert_bits_equal(a, b, "list vs tensor")
    assert_bits_equal(c, reference.dequantize(ps[0]), "1-D payload")


def test_compressed_bytes_per_element():
    for bits in (1, 2, 4, 8):
        for block in (32, 4096):
            n = 2**20 * block
            # asymptotic: the 64-byte header is left out
            exact = (expect.a16(4 * n // block) + expect.a16(n * bits // 8)) / n
            assert reference.compressed_bytes_per_element(bits, block) == exact


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_pack_empty_input(bits):
    """An empty tensor compresses to a header-only payload (for 1 bit too: block_abs_sum
    of zero blocks)."""
    r = torch.zeros(0)
    p = reference.quantize_pack(torch.zeros(0), bits, 32, r)
    f = expect.fields(p)
    assert p.numel() == 64 and f.numel == 0 and f.total_bytes == 64
    assert reference.dequantize(p).numel() == 0
