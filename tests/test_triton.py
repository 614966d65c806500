"""gradzip's Triton backend against gradzip.reference: byte-exact payloads, bit-exact residuals.

Where these tests run
---------------------
* No CUDA device (CI, this project's build machines): on CPU tensors under the Triton
  interpreter. ``TRITON_INTERPRET=1`` is set below before triton is imported (the suite's
  conftest does the same), so this file also runs on its own.
* A CUDA device and real Triton: the very same tests run on CUDA tensors (payloads and
  residuals are copied back and compared with the CPU reference), plus the GPU-only tests
  at the end (opcheck, torch.compile).

What the interpreter cannot run, and how it is covered instead
--------------------------------------------------------------
* The GPU code generation itself: inline PTX (``mul.rn.f32``, ``add.rn.f32``,
  ``sub.rn.f32``, ``cvt.rmi.f32.f32``), ``enable_fp_fusion=False``, ``tl.math.div_rn``.
  The interpreter runs the same kernels on numpy's float32 operations, which are the
  IEEE operations the reference uses. ``test_kernels_compile_for_sm90_without_fma_or_ftz``
  compiles every kernel for sm_90 (no GPU needed) and checks the PTX: no fused
  multiply-add, no flush-to-zero, no approximate division or reciprocal.
* NaN bit patterns: the format writes every NaN in a payload as the canonical quiet NaN
  (and orders every NaN by its key in top-k), so the kernels set those bits explicitly and
  the payloads compare byte for byte whatever NaN bits the hardware's arithmetic produces;
  ``test_nan_bit_patterns_are_canonical`` feeds NaNs of many bit patterns.
* Autotuning: bypassed under the interpreter (fixed tile sizes); the configuration
  functions and their pruning are checked by ``test_autotune_configs``.
* torch.compile / opcheck: torch does not trace interpreted kernels (``wrap_triton``
  hands an ``InterpretedFunction`` back unwrapped). ``test_ops_trace_into_triton_kernels``
  traces each op with fake CUDA tensors in a subprocess without the interpreter and checks
  that the graph holds the Triton kernels and nothing that syncs with the host; real
  torch.compile and opcheck run on a GPU.
* Tensors of 2**31 elements or more (int64 top-k indices): too big for the interpreter;
  the int64 index path runs at small sizes with ``format.index_format_for`` patched to
  choose int64 indices (reference and kernels alike), and compiles in the sm_90 test.
* Sizes around 2**20 and beyond: tens of seconds per call in the interpreter; one such
  case per op is marked ``slow``.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import gradzip
from gradzip import format as fmt
from gradzip import reference
from gradzip import triton as gz_triton
from gradzip.testing import assert_bits_equal, assert_payload_equal

INTERPRET = gz_triton.INTERPRET
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (set it before triton is "
                "imported to run the Triton kernels on CPU)", allow_module_level=True)


# The interpreter runs the kernels on numpy, which warns when IEEE arithmetic produces inf
# or NaN; those are the results the reference produces too (non-finite input, a tiny amax).
pytestmark = pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VALUES = ["fp32", "bf16", "int8"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(n: int, dtype=torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Gradient-like data with a wide dynamic range (so block scales differ) and exact
    repeats (so top-k ties occur)."""
    g = _gen(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g)) * scale
    if n > 20:
        x[::13] = x[5]
    return x.to(dtype)


def _residual(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=_gen(seed)) * 0.05


def check_quantize(x, bits, block, with_residual=True, rounding="nearest", seed=7):
    n = x.numel()
    r_ref = _residual(n) if with_residual else None
    r_dev = r_ref.clone().to(DEVICE) if with_residual else None
    want = reference.quantize_pack(x, bits, block, r_ref, rounding, seed)
    got = gradzip.quantize_pack(x.to(DEVICE), bits, block, r_dev, rounding, seed,
                                backend="triton")
    assert got.device.type == DEVICE
    assert_payload_equal(got, want, "payload")
    if with_residual:
        assert_bits_equal(r_dev, r_ref, "residual")


def check_topk(x, k, exact, values, with_residual=True, seed=11):
    n = x.numel()
    r_ref = _residual(n) if with_residual else None
    r_dev = r_ref.clone().to(DEVICE) if with_residual else None
    want = reference.topk_select(x, k, r_ref, exact, values, seed)
    got = gradzip.topk_select(x.to(DEVICE), k, r_dev, exact, values, seed, backend="triton")
    assert_payload_equal(got, want, "payload")
    if with_residual:
        assert_bits_equal(r_dev, r_ref, "residual")


def check_accumulate(rows: torch.Tensor, n: int, out_dtype, alpha, seed=3):
    out0 = (torch.randn(n, generator=_gen(seed)) * 4).to(out_dtype)
    want = out0.clone()
    reference.dequantize_accumulate(rows, want, alpha)
    got = out0.clone().to(DEVICE)
    res = gradzip.dequantize_accumulate(rows.to(DEVICE), got, alpha, backend="triton")
    assert res is got
    assert_bits_equal(got, want, "out", nan_equal=True)


# ---------------------------------------------------------------------------------------
# quantize_pack
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [32, 256, 4096])
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_pack_sizes(bits, block):
    """Sizes 1, block-1, block+1, a prime and a multi-block tail, with error feedback."""
    for n in sorted({1, block - 1, block + 1, 1009, 2 * block + 37}):
        check_quantize(_data(n, seed=n), bits, block)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_pack_empty(bits):
    """numel 0: the payload is the header alone (the reference's own 1-bit path cannot take
    an empty tensor, so the expectation is the header from gradzip.format)."""
    x = torch.empty(0, device=DEVICE)
    r = torch.empty(0, device=DEVICE)
    got = gradzip.quantize_pack(x, bits, 64, r, backend="triton")
    want = torch.frombuffer(bytearray(fmt.dense_header(0, bits, 64).pack()), dtype=torch.uint8)
    assert_payload_equal(got, want, "empty payload vs the header")
    if bits > 1:
        assert_payload_equal(got, reference.quantize_pack(x.cpu(), bits, 64), "empty payload")


# (stochastic rounding is not defined for 1 bit: the API rejects it, see the bad-input tests)
BITS_ROUNDING = [(8, "nearest"), (8, "stochastic"), (4, "nearest"), (4, "stochastic"),
                 (2, "nearest"), (2, "stochastic"), (1, "nearest")]


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "rounding"), BITS_ROUNDING)
def test_quantize_pack_dtypes_rounding(bits, rounding, dtype, with_residual):
    check_quantize(_data(997, dtype, seed=bits), bits, 64, with_residual, rounding, seed=12345)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_pack_non_contiguous(bits):
    base = _data(64 * 50, seed=3).view(64, 50)
    x = base.t()[:, 1:]  # 49 x 64, strided
    assert not x.is_contiguous()
    check_quantize(x, bits, 128)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_pack_round_half_even_and_signed_zero(bits):
    """amax = qmax makes inv = 1, so the halves below are exact ties; -0.0 checks the
    residual's zero sign (v - q*scale with q = -0.0)."""
    qmax = 2 ** (bits - 1) - 1
    ties = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, -0.0, 0.0, 0.25, -0.75, 0.49999997]
    ties = [t for t in ties if abs(t) <= qmax]
    block = ([float(qmax)] + ties * 32)[:32]
    x = torch.tensor(block * 4, dtype=torch.float32)
    x[32] = -float(qmax)  # amax from a negative value
    for rounding in ("nearest", "stochastic"):
        check_quantize(x, bits, 32, True, rounding)
        check_quantize(x, bits, 32, False, rounding)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_pack_zero_and_tiny_blocks(bits):
    """An all-zero block (scale 0), a block whose amax is so small that qmax / amax
    overflows (codes 0, scale 0), subnormal values, and -0.0."""
    x = torch.zeros(32 * 5)
    x[32:64] = 1e-45 * torch.arange(32)  # subnormals: qmax / amax overflows
    x[64:96] = torch.randn(32, generator=_gen(2)) * 1e-38
    x[96:128] = -0.0
    x[128:] = _data(32, seed=9)
    check_quantize(x, bits, 32)
    check_quantize(x, bits, 32, with_residual=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_pack_non_finite(bits, dtype):
    """NaN / inf blocks keep a non-finite scale (the overflow reaches every rank) and leave
    the residual of their elements untouched."""
    x = _data(32 * 6, seed=4)
    x[3] = float("nan")
    x[40] = float("inf")
    x[70] = -float("inf")
    x[100] = float("nan")
    x[101] = float("inf")
    check_quantize(x.to(dtype), bits, 32)


def test_quantize_pack_non_finite_float16():
    """float16 NaN / inf: ATen widens a float16 NaN to float32 with different bits in its
    vectorised body and its scalar tail; the canonical NaN makes the scales equal anyway."""
    x = _data(32 * 4, seed=5)
    x[70] = -float("inf")
    x[3] = float("nan")
    x[100] = float("nan")
    for bits in (8, 4, 2, 1):
        check_quantize(x.half(), bits, 32)


def _nan_patterns(x: torch.Tensor, where: list[int]) -> torch.Tensor:
    """x with NaNs of different bit patterns (sign set, quiet and signalling payloads) at
    ``where``: the payload must hold the canonical NaN whatever the input bits."""
    pats = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FA5A5A5, 0xFF812345]
    b = x.clone().view(torch.int32)
    for j, i in enumerate(where):
        b[i] = torch.tensor(pats[j % len(pats)], dtype=torch.int64).to(torch.int32)
    return b.view(torch.float32)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_pack_nan_bit_patterns(bits):
    """NaN scales are the canonical NaN, whatever NaN bits the block holds (and in the
    residual as well as in x)."""
    x = _nan_patterns(_data(32 * 6, seed=12), [1, 5, 33, 64, 90, 130])
    check_quantize(x, bits, 32)
    r = _nan_patterns(_residual(32 * 6, seed=13), [7, 160])
    want_r, got_r = r.clone(), r.clone().to(DEVICE)
    want = reference.quantize_pack(x, bits, 32, want_r)
    got = gradzip.quantize_pack(x.to(DEVICE), bits, 32, got_r, backend="triton")
    assert_payload_equal(got, want, "payload")
    assert_bits_equal(got_r, want_r, "residual")


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("exact", [True, False])
def test_topk_nan_bit_patterns(exact, values):
    """Every NaN has the canonical NaN's key: NaNs of different bits tie, the lower index
    wins, and fp32/bf16 values and the int8 scale are written as the canonical NaN."""
    x = _nan_patterns(_data(3000, seed=14), [2999, 17, 1500, 3, 2000, 41])
    for k in (1, 2, 4, 6, 30):
        check_topk(x, k, exact, values)
    check_topk(x.bfloat16(), 3, exact, values)


def test_quantize_pack_error_feedback_invariant():
    """decode(payload) + residual_new == v up to one float32 rounding (and exactly where
    the decoded value is exact), checked on the Triton output alone."""
    x = _data(3000, seed=21)
    r = _residual(3000, seed=22)
    v = x + r
    r_dev = r.clone().to(DEVICE)
    p = gradzip.quantize_pack(x.to(DEVICE), 4, 128, r_dev, backend="triton")
    dec = reference.dequantize(p.cpu())
    # r_new = fl(v - dec), so v - (dec + r_new) is that one subtraction's rounding error:
    # at most 2**-24 relative to v - dec (plus 2**-149 absolute for subnormal results).
    exact = v.double() - dec.double()
    err = (exact - r_dev.cpu().double()).abs()
    assert bool((err <= exact.abs() * 2.0**-24 + 2.0**-149).all())


@pytest.mark.slow
def test_quantize_pack_large():
    n = 2**20 + 3
    check_quantize(_data(n, seed=1), 4, 128, True, "stochastic")


# ---------------------------------------------------------------------------------------
# topk_select
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES)
def test_topk_exact_sizes(values):
    for n in (1, 2, 37, 1009):
        for k in sorted({1, max(1, n // 10), n}):
            check_topk(_data(n, seed=n + k), k, True, values)


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exact", [True, False])
def test_topk_dtypes(exact, dtype, with_residual):
    check_topk(_data(3001, dtype, seed=7), 300, exact, "fp32", with_residual)


@pytest.mark.parametrize("values", VALUES)
def test_topk_approximate_small(values):
    """n below the sample size: the sample is every element."""
    for n, k in ((5, 2), (1000, 1), (4099, 400)):
        check_topk(_data(n, seed=n), k, False, values)


@pytest.mark.parametrize("exact", [True, False])
def test_topk_ties_go_to_lower_index(exact):
    """Equal magnitudes of both signs: the k lowest indices among the ties win."""
    x = torch.ones(2000)
    x[1::2] = -1.0
    x[1500] = 3.0
    for k in (1, 2, 700, 2000):
        check_topk(x, k, exact, "fp32")


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("exact", [True, False])
def test_topk_non_finite(exact, values):
    """NaN orders above inf: both are picked first, their values reach the payload, and
    their residual entries keep the old residual."""
    x = _data(3000, seed=8)
    x[17] = float("nan")
    x[400] = float("inf")
    x[401] = -float("inf")
    x[2999] = float("nan")
    check_topk(x, 30, exact, values)
    check_topk(x.bfloat16(), 3, exact, values)


@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_topk_zeros_and_int8_overflow(values):
    """All-zero input (int8 scale 0); values so small that 127 / amax overflows."""
    check_topk(torch.zeros(500), 20, True, values)
    x = torch.zeros(500)
    x[::50] = 1e-44
    check_topk(x, 5, False, values)


@pytest.mark.parametrize("values", VALUES)
def test_topk_approximate_sampled(values):
    """n above the sample size (stratified sample, candidate list)."""
    check_topk(_data(40000, seed=3), 400, False, values)


def test_topk_approximate_fewer_candidates_than_k():
    """Large values exactly at the sampled positions make the threshold select fewer than
    k candidates: the result is every candidate plus the lowest-index others."""
    n, k, seed = 40000, 20000, 5
    pos = reference.sample_positions(n, seed)
    x = torch.rand(n, generator=_gen(1)) * 0.01
    x[pos] = 1.0 + torch.rand(pos.numel(), generator=_gen(2))
    t = torch.sort(reference.magnitude_key(x[pos]), descending=True).values[
        reference.approximate_rank(n, k) - 1]
    assert int((reference.magnitude_key(x) >= t).sum()) < k  # the case under test
    for values in ("fp32", "bf16"):
        check_topk(x, k, False, values, seed=seed)


def test_topk_approximate_too_many_candidates():
    """Mostly zeros: every element ties with the threshold, far more candidates than the
    candidate list holds, so the selection runs over all elements."""
    x = torch.zeros(40000)
    x[::1000] = 1.0
    check_topk(x, 5, False, "fp32")
    check_topk(x, 100, False, "int8")


@pytest.mark.parametrize("exact", [True, False])
def test_topk_int64_indices(exact, monkeypatch):
    """The int64 index layout (numel >= 2**31 in real use) at a small size: the reference,
    the kernels and the header checks all take the index format from this function."""
    monkeypatch.setattr(fmt, "index_format_for", lambda numel: fmt.INDEX_INT64)
    x = _data(1500, seed=2)
    for values in VALUES:
        check_topk(x, 150, exact, values)
        rows = torch.stack([reference.topk_select(x, 150, None, exact, values, s)
                            for s in (1, 2)])
        check_accumulate(rows, 1500, torch.float32, 0.5)


@pytest.mark.slow
def test_topk_large():
    x = _data(2**20 + 3, seed=5)
    check_topk(x, 10000, True, "bf16")
    check_topk(x, 10000, False, "int8")


# ---------------------------------------------------------------------------------------
# dequantize_accumulate
# ---------------------------------------------------------------------------------------


def _dense_rows(n, bits, block, w, seed=0):
    return torch.stack([reference.quantize_pack(_data(n, seed=seed + i), bits, block)
                        for i in range(w)])


def _topk_rows(n, k, values, w, exact=True, seed=0):
    return torch.stack([reference.topk_select(_data(n, seed=seed + i), k, None, exact, values,
                                              seed + i) for i in range(w)])


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_accumulate_dense(bits, out_dtype):
    for n, block, w in ((1, 32, 1), (1000, 64, 3), (4097, 4096, 2)):
        check_accumulate(_dense_rows(n, bits, block, w, seed=n), n, out_dtype, 0.3)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("values", VALUES)
def test_accumulate_sparse(values, out_dtype):
    for n, k, w in ((1, 1, 2), (1000, 100, 3), (3000, 3000, 2)):
        check_accumulate(_topk_rows(n, k, values, w, seed=n), n, out_dtype, 0.25)


def test_accumulate_sparse_overlapping_and_disjoint():
    """Payloads that pick the same indices, and ones that pick none in common."""
    x = _data(2000, seed=1)
    same = torch.stack([reference.topk_select(x * s, 50, None, True, "fp32") for s in (1, -2, 3)])
    check_accumulate(same, 2000, torch.float32, 1.0)
    y = torch.zeros(2000)
    y[:100] = 1.0
    z = torch.zeros(2000)
    z[1900:] = -1.0
    disjoint = torch.stack([reference.topk_select(t, 100, None, True, "bf16") for t in (y, z)])
    check_accumulate(disjoint, 2000, torch.bfloat16, 1.0)


def test_accumulate_alpha_and_input_forms():
    rows = _dense_rows(777, 4, 128, 3)
    for alpha in (1.0, 1 / 3, -2.5, 0.0, 3e38, 1e-45, 5):
        check_accumulate(rows, 777, torch.float32, alpha)
    # a list of payloads, and a single 1-D payload
    out_ref = torch.ones(777)
    reference.dequantize_accumulate(rows, out_ref, 0.5)
    out = torch.ones(777, device=DEVICE)
    gradzip.dequantize_accumulate([r.to(DEVICE) for r in rows], out, 0.5, backend="triton")
    assert_bits_equal(out, out_ref, "out", nan_equal=True)
    one = gradzip.dequantize(rows[0].to(DEVICE), torch.float32, backend="triton")
    assert_bits_equal(one, reference.dequantize(rows[0]), "dequantize", nan_equal=True)


def test_accumulate_non_finite():
    x = _data(300, seed=3)
    x[5] = float("nan")
    x[200] = float("inf")
    for bits in (8, 1):
        rows = torch.stack([reference.quantize_pack(x, bits, 32),
                            reference.quantize_pack(-2 * x, bits, 32)])
        check_accumulate(rows, 300, torch.float32, 1.0)
    rows = torch.stack([reference.topk_select(x, 10, None, True, v) for v in ("fp32",)] * 2)
    check_accumulate(rows, 300, torch.bfloat16, 1.0)


def test_accumulate_strided_rows():
    """Rows taken from a wider buffer (row stride larger than the payload)."""
    rows = _dense_rows(500, 2, 32, 3)
    wide = torch.zeros(3, rows.shape[1] + 16, dtype=torch.uint8)
    wide[:, 8:8 + rows.shape[1]] = rows
    view = wide.to(DEVICE)[:, 8:8 + rows.shape[1]]
    out_ref = torch.zeros(500)
    reference.dequantize_accumulate(rows, out_ref, 1.0)
    out = torch.zeros(500, device=DEVICE)
    gradzip.dequantize_accumulate(view, out, 1.0, backend="triton")
    assert_bits_equal(out, out_ref, "out", nan_equal=True)


@pytest.mark.slow
def test_accumulate_large():
    n = 2**20 + 3
    check_accumulate(_dense_rows(n, 8, 256, 2), n, torch.bfloat16, 0.5)
    check_accumulate(_topk_rows(n, 5000, "int8", 3), n, torch.float32, 0.5)


# ---------------------------------------------------------------------------------------
# bad input: the same exceptions as the reference backend (shared validation)
# ---------------------------------------------------------------------------------------


def _same_error(fn):
    """fn(backend) must raise, with the same type and message for triton and torch."""
    errors = []
    for backend in ("triton", "torch"):
        with pytest.raises((ValueError, TypeError)) as info:
            fn(backend)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    return errors[0]


def test_bad_input_quantize_and_topk():
    x = torch.randn(100, device=DEVICE)
    r = torch.zeros(100, device=DEVICE)
    cases = [
        lambda b: gradzip.quantize_pack(x.int(), 8, backend=b),
        lambda b: gradzip.quantize_pack(x, 3, backend=b),
        lambda b: gradzip.quantize_pack(x, 8, 48, backend=b),
        lambda b: gradzip.quantize_pack(x, 8, 8192, backend=b),
        lambda b: gradzip.quantize_pack(x, 1, rounding="stochastic", backend=b),
        lambda b: gradzip.quantize_pack(x, 8, rounding="up", backend=b),
        lambda b: gradzip.quantize_pack(x, 8, residual=torch.zeros(99, device=DEVICE),
                                        backend=b),
        lambda b: gradzip.quantize_pack(x, 8, residual=r.double(), backend=b),
        lambda b: gradzip.quantize_pack(x, 8, seed=-1, backend=b),
        lambda b: gradzip.topk_select(x, 0, backend=b),
        lambda b: gradzip.topk_select(x, 101, backend=b),
        lambda b: gradzip.topk_select(x, 5, values="fp16", backend=b),
        lambda b: gradzip.topk_select(x, 5, residual=r[:50], backend=b),
        lambda b: gradzip.topk_select(x, 5, seed=2**32, backend=b),
    ]
    for case in cases:
        _same_error(case)
    assert torch.equal(r, torch.zeros(100, device=DEVICE))  # never touched


def test_bad_input_accumulate():
    p = reference.quantize_pack(torch.randn(100), 8, 32)
    q = reference.topk_select(torch.randn(100), 5)
    dev = DEVICE

    def corrupt(payload, offset, value):
        payload = payload.clone()
        payload[offset] = value
        return payload

    cases = [
        lambda b: gradzip.dequantize_accumulate(p.to(dev), torch.zeros(99, device=dev),
                                                backend=b),
        lambda b: gradzip.dequantize_accumulate(corrupt(p, 0, 0).to(dev),
                                                torch.zeros(100, device=dev), backend=b),
        lambda b: gradzip.dequantize_accumulate(corrupt(p, 4, 9).to(dev),
                                                torch.zeros(100, device=dev), backend=b),
        lambda b: gradzip.dequantize_accumulate(p[:-16].to(dev), torch.zeros(100, device=dev),
                                                backend=b),
        lambda b: gradzip.dequantize_accumulate(  # same size, different block
            torch.stack([p, reference.quantize_pack(torch.randn(100), 8, 64)]).to(dev),
            torch.zeros(100, device=dev), backend=b),
        lambda b: gradzip.dequantize_accumulate([p.to(dev), q.to(dev)],
                                                torch.zeros(100, device=dev), backend=b),
        lambda b: gradzip.dequantize_accumulate(p.to(dev), torch.zeros(100, device=dev,
                                                                       dtype=torch.int32),
                                                backend=b),
    ]
    for case in cases:
        _same_error(case)


def test_bad_topk_indices_raise():
    """Corrupt index sections (outside [0, numel), or not ascending) raise ValueError like
    the reference's decode, and leave out untouched."""
    n, k = 1000, 20
    p = reference.topk_select(_data(n, seed=1), k)
    idx_off = fmt.topk_header(n, k, fmt.VALUE_FP32).sections()["indices"][0]
    bad_range = p.clone()
    bad_range[idx_off + 4 * 7: idx_off + 4 * 8] = torch.tensor([n + 5], dtype=torch.int32
                                                               ).view(torch.uint8)
    bad_order = p.clone()
    swapped = bad_order[idx_off: idx_off + 4 * k].view(torch.int32).clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    bad_order[idx_off: idx_off + 4 * k] = swapped.view(torch.uint8)
    for payload, msg in ((bad_range, "out of range"), (bad_order, "ascending")):
        with pytest.raises(ValueError, match=msg):
            reference.dequantize_accumulate(payload[None], torch.zeros(n))
        out = torch.full((n,), 2.0, device=DEVICE)
        with pytest.raises(ValueError, match=msg):
            gradzip.dequantize_accumulate(torch.stack([p, payload]).to(DEVICE), out,
                                          backend="triton")
        assert bool((out == 2.0).all())


# ---------------------------------------------------------------------------------------
# the Triton hash on indices >= 2**32 (unreachable through the ops at test sizes)
# ---------------------------------------------------------------------------------------


_common_mod = importlib.import_module("gradzip.triton._common")
tl = triton.language


@triton.jit
def _hash_kernel(idx_ptr, h_ptr, u_ptr, n, k1, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < n
    i = tl.load(idx_ptr + o, mask=m, other=0)
    k = (k1 + tl.zeros([], dtype=tl.int64)).to(tl.uint32)
    tl.store(h_ptr + o, _common_mod.hash32(k, i).to(tl.int64), mask=m)
    tl.store(u_ptr + o, _common_mod.uniform(k, i), mask=m)


def test_hash_and_uniform_match_reference_for_large_indices():
    idx = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3,
                        2**62 + 12345], dtype=torch.int64)
    for seed in (0, 1, 2**31, 2**32 - 1):
        h = torch.zeros(idx.numel(), dtype=torch.int64, device=DEVICE)
        u = torch.zeros(idx.numel(), dtype=torch.float32, device=DEVICE)
        _hash_kernel[(1,)](idx.to(DEVICE), h, u, idx.numel(), _common_mod.seed_key(seed),
                           BLOCK=16)
        assert torch.equal(h.cpu(), reference.hash32(seed, idx))
        assert_bits_equal(u, reference.uniform(seed, idx), "uniform")


# ---------------------------------------------------------------------------------------
# GPU code generation, autotuning and torch.compile, checked without a GPU
# ---------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
QP, TK, DA, C = [importlib.import_module("gradzip.triton." + m) for m in
                 ("quantize_pack", "topk_select", "dequantize_accumulate", "_common")]
P, F, I64, I32 = "*u8", "*fp32", "*i64", "*i32"
cases = []
def add(name, kernel, sig, cx):
    sig = {a: ("constexpr" if a in cx else t) for a, t in sig.items()}
    cases.append((name, kernel, sig, cx))
qp_sig = {"x_ptr": F, "res_ptr": F, "out_ptr": P, "n": "i32", "nb": "i32", "codes_off": "i32",
          "k1": "i64", "BITS": 0, "BLOCK": 0, "ROWS": 0, "HAS_RES": 0, "STOCHASTIC": 0}
for bits, x, stochastic in ((8, "*fp32", True), (4, "*bf16", False), (2, "*fp16", True),
                            (1, "*bf16", False)):
    add(f"quantize{bits}{x}", QP._quantize_pack_kernel, {**qp_sig, "x_ptr": x},
        {"BITS": bits, "BLOCK": 128, "ROWS": 8, "HAS_RES": True, "STOCHASTIC": stochastic})
# Triton passes an int argument equal to 1 as a compile-time constant.
add("quantize-n1", QP._quantize_pack_kernel, qp_sig,
    {"n": 1, "nb": 1, "k1": 1, "BITS": 4, "BLOCK": 32, "ROWS": 1, "HAS_RES": True,
     "STOCHASTIC": True})
add("header", C._header_kernel, {"out_ptr": P, **{f"w{i}": "i64" for i in range(8)},
    "p0": "i32", "l0": "i32", "p1": "i32", "l1": "i32", "p2": "i32", "l2": "i32"},
    {"w2": 1, "l1": 1})
add("init", TK._topk_init_kernel, {"st_ptr": I64, "n": "i32", "k": "i32", "s": "i32",
    "rank": "i32", "APPROX": 0}, {"k": 1, "APPROX": True})
add("sample", TK._topk_sample_kernel, {"x_ptr": "*bf16", "res_ptr": F, "sv_ptr": F, "n": "i64",
    "s": "i32", "k1": "i64", "HAS_RES": 0, "BLOCK": 0}, {"HAS_RES": True, "BLOCK": 1024})
add("prepare", TK._topk_prepare_kernel, {"x_ptr": "*fp16", "res_ptr": F, "v_ptr": F, "n": "i32",
    "st_ptr": I64, "cnt_ptr": I64, "HAS_RES": 0, "COUNT": 0, "TILE": 0},
    {"HAS_RES": True, "COUNT": True, "TILE": 2048})
add("hist", TK._radix_hist_kernel, {"v_ptr": F, "st_ptr": I64, "hist_ptr": I32, "chunk": "i32",
    "B": 0, "SHIFT": 0, "HIMASK": 0, "TILE": 0},
    {"B": 16, "SHIFT": 16, "HIMASK": 0x7F000000, "TILE": 2048})
add("select", TK._radix_select_kernel, {"st_ptr": I64, "hist_ptr": I32, "nrows": "i32", "B": 0,
    "SHIFT": 0, "LAST": 0, "RB": 0}, {"nrows": 1, "B": 16, "SHIFT": 0, "LAST": True, "RB": 16})
add("count", TK._topk_count_kernel, {"v_ptr": F, "st_ptr": I64, "cnt_a_ptr": I64,
    "cnt_b_ptr": I64, "B": 0, "TILE": 0}, {"B": 8, "TILE": 2048})
add("scan", TK._topk_scan_kernel, {"st_ptr": I64, "cnt_a_ptr": I64, "cnt_b_ptr": I64,
    "sel_off_ptr": I64, "b_off_ptr": I64, "ntiles": "i32", "B": 0, "TOTAL": 0, "HAS_B": 0,
    "ALWAYS": 0, "CH": 0}, {"ntiles": 1, "B": 8, "TOTAL": 25, "HAS_B": True, "ALWAYS": False,
    "CH": 1024})
add("decide", TK._topk_decide_kernel, {"st_ptr": I64, "n": "i32", "k": "i32", "cap": "i32"},
    {"k": 1})
add("compact", TK._topk_compact_kernel, {"v_ptr": F, "res_ptr": F, "st_ptr": I64,
    "off_ptr": I64, "cv_ptr": F, "ci_ptr": I64, "n": "i32", "HAS_RES": 0, "TILE": 0},
    {"HAS_RES": True, "TILE": 2048})
for vf, idx64 in ((1, False), (2, True), (3, False)):
    add(f"emit{vf}{idx64}", TK._topk_emit_kernel, {"v_ptr": F, "idx_ptr": I64, "res_ptr": F,
        "st_ptr": I64, "sel_off_ptr": I64, "b_off_ptr": I64, "out_ptr": P, "selv_ptr": F,
        "idx_off": "i32", "val_off": "i32", "B": 0, "HAS_IDX": 0, "HAS_RES": 0, "VF": 0,
        "IDX64": 0, "TILE": 0},
        {"B": 8, "HAS_IDX": True, "HAS_RES": True, "VF": vf, "IDX64": idx64, "TILE": 2048})
add("int8amax", TK._int8_amax_kernel, {"selv_ptr": F, "part_ptr": I32, "k": "i32", "TILE": 0},
    {"TILE": 1024})
add("int8scale", TK._int8_scale_kernel, {"part_ptr": I32, "nparts": "i32", "out_ptr": P,
    "vs_off": "i32", "fs_ptr": F, "CH": 0}, {"CH": 1024})
add("int8quant", TK._int8_quant_kernel, {"selv_ptr": F, "out_ptr": P, "idx_off": "i32",
    "val_off": "i32", "res_ptr": F, "fs_ptr": F, "k": "i32", "IDX64": 0, "HAS_RES": 0,
    "TILE": 0}, {"IDX64": False, "HAS_RES": True, "TILE": 1024})
acc_sig = {"rows_ptr": P, "row_stride": "i32", "W": "i32", "out_ptr": F, "n": "i32",
           "alpha": "fp32", "codes_off": "i32", "BITS": 0, "BLOCK": 0, "ROWS": 0}
for bits, out in ((8, "*fp32"), (4, "*bf16"), (2, "*fp16"), (1, "*bf16")):
    add(f"accumulate{bits}{out}", DA._accumulate_dense_kernel, {**acc_sig, "out_ptr": out},
        {"BITS": bits, "BLOCK": 64, "ROWS": 16})
add("bounds", DA._sparse_bounds_kernel, {"rows_ptr": P, "row_stride": "i64", "idx_off": "i32",
    "k": "i32", "starts_ptr": I64, "nbounds": "i32", "steps": "i32", "TILE": 0, "BT": 0,
    "IDX64": 0}, {"TILE": 1024, "BT": 1024, "IDX64": False})
for vf in (1, 2, 3):
    add(f"sparse{vf}", DA._accumulate_sparse_kernel, {"rows_ptr": P, "row_stride": "i32",
        "W": "i32", "starts_ptr": I64, "nbounds": "i32", "out_ptr": "*bf16", "n": "i32",
        "alpha": "fp32", "idx_off": "i32", "val_off": "i32", "vs_off": "i32", "VF": 0,
        "IDX64": 0, "TILE": 0}, {"W": 1, "VF": vf, "IDX64": vf == 3, "TILE": 1024})
add("check", DA._check_indices_kernel, {"rows_ptr": P, "row_stride": "i32", "idx_off": "i32",
    "k": "i32", "n": "i64", "flags_ptr": I32, "nprog": "i32", "BT": 0, "IDX64": 0},
    {"BT": 4096, "IDX64": False})
failures = []
for name, kernel, sig, cx in cases:
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=cx)
        # No enable_fp_fusion option here: inline PTX must keep mul and add apart even
        # when a caller (or torch.compile) launches with Triton's default.
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    except Exception as e:  # a kernel that does not compile for the GPU
        failures.append(f"{name}: {type(e).__name__}: {str(e)[:400]}")
        continue
    code = "\n".join(l for l in ptx.splitlines() if not l.strip().startswith("//"))
    for bad in ("fma.rn.f32", "fma.rn.ftz", ".ftz", "div.full", "div.approx", "rcp.approx"):
        if bad in code and not (bad == "fma.rn.f32" and name.startswith("header")):
            failures.append(f"{name}: PTX contains {bad}")
print("COMPILED", len(cases))
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # The child imports the same gradzip as this process: the installed package in CI, the
    # source tree (with an in-place build) in development.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gradzip.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _has_cuda_compiler() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_cuda_compiler(), reason="Triton's NVIDIA backend is not installed")
def test_kernels_compile_for_sm90_without_fma_or_ftz():
    """Every kernel (each value format, index width, input and output dtype) compiles for
    sm_90 with Triton's default options, and its PTX has no fused multiply-add, no
    flush-to-zero and no approximate division: the arithmetic the interpreter checked is
    the arithmetic a GPU will run."""
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=_subprocess_env(),
                          check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "COMPILED" in proc.stdout


_TRACE_SCRIPT = r"""
import logging, sys
import torch
import gradzip, gradzip.triton
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
logging.disable(logging.WARNING)  # mutation analysis warns that no GPU driver is loaded
with FakeTensorMode():
    x = torch.empty(5000, device="cuda", dtype=torch.bfloat16)
    r = torch.empty(5000, device="cuda")
    rows = torch.empty(3, 1040, dtype=torch.uint8, device="cuda")
    out = torch.empty(5000, device="cuda", dtype=torch.float16)
    qbuf = torch.empty(gradzip.format.dense_payload_bytes(5000, 4, 64), dtype=torch.uint8,
                       device="cuda")
    tbuf = torch.empty(gradzip.format.topk_payload_bytes(5000, 50, "int8"),
                       dtype=torch.uint8, device="cuda")
fns = {
    "quantize": (lambda x, r: torch.ops.gradzip.triton_quantize_pack(x, 4, 64, r, True, 3),
                 (x, r)),
    "topk_exact": (lambda x, r: torch.ops.gradzip.triton_topk_select(x, 50, r, True, 3, 3),
                   (x, r)),
    "topk_approx": (lambda x, r: torch.ops.gradzip.triton_topk_select(x, 50, r, False, 2, 3),
                    (x, r)),
    "quantize_out": (lambda x, r, p: torch.ops.gradzip.triton_quantize_pack_out(
        x, 4, 64, r, True, 3, p), (x, r, qbuf)),
    "topk_out": (lambda x, r, p: torch.ops.gradzip.triton_topk_select_out(
        x, 50, r, False, 3, 3, p), (x, r, tbuf)),
    "accumulate_dense": (lambda rows, out: torch.ops.gradzip.triton_dequantize_accumulate(
        rows, out, 0.5, 1, 8, 32, 0, 0), (rows, out)),
    "accumulate_sparse": (lambda rows, out: torch.ops.gradzip.triton_dequantize_accumulate(
        rows, out, 0.5, 2, 0, 0, 50, 3), (rows, out)),
}
for name, (fn, args) in fns.items():
    gm = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    kernels = [t for t in targets if "triton_kernel_wrapper" in t]
    opaque = [t for t in targets
              if "gradzip" in t or t.endswith(".item") or "_local_scalar_dense" in t]
    print(name, len(kernels), opaque)
    if not kernels or opaque:
        sys.exit(1)
"""


def test_ops_trace_into_triton_kernels():
    """What torch.compile does to a triton_op (functionalise, trace with fake tensors),
    with fake CUDA tensors and no GPU: every op becomes a graph of Triton kernel calls, with
    no opaque custom op left and no host synchronisation (.item()) in it."""
    proc = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=_subprocess_env(),
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("quantize", "topk_exact", "topk_approx", "accumulate_dense",
                 "accumulate_sparse", "quantize_out", "topk_out"):
        assert name in proc.stdout


def test_autotune_configs():
    """Autotuning spaces live in named functions; pruning keeps at least one configuration
    for every block size and every kept configuration covers at most 8192 elements."""
    qp = gz_triton.quantize_pack_configs()
    da = gz_triton.dequantize_accumulate_configs()
    tk = gz_triton.topk_select_configs()
    assert qp and da and tk
    assert all(isinstance(c, triton.Config) for c in qp + da + tk)
    for configs in (qp, da):
        for block in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            kept = _common_mod.prune_rows_configs(configs, {}, BLOCK=block)
            assert kept
            assert all(c.kwargs["ROWS"] * block <= 8192 for c in kept)


# ---------------------------------------------------------------------------------------
# GPU only: opcheck and torch.compile on real CUDA tensors
# ---------------------------------------------------------------------------------------

def gpu(fn):
    return pytest.mark.gpu(
        pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (real Triton)")(fn))


@gpu
def test_opcheck_gpu():
    x = torch.randn(3000, device="cuda")
    r = torch.zeros(3000, device="cuda")
    torch.library.opcheck(torch.ops.gradzip.triton_quantize_pack, (x, 4, 64, r, True, 3))
    torch.library.opcheck(torch.ops.gradzip.triton_topk_select, (x, 30, r, False, 3, 3))
    qbuf = torch.empty(gradzip.format.dense_payload_bytes(3000, 4, 64), dtype=torch.uint8,
                       device="cuda")
    torch.library.opcheck(torch.ops.gradzip.triton_quantize_pack_out,
                          (x, 4, 64, r, True, 3, qbuf))
    tbuf = torch.empty(gradzip.format.topk_payload_bytes(3000, 30, "int8"), dtype=torch.uint8,
                       device="cuda")
    torch.library.opcheck(torch.ops.gradzip.triton_topk_select_out,
                          (x, 30, r, False, 3, 3, tbuf))
    rows = _dense_rows(3000, 8, 64, 2).cuda()
    torch.library.opcheck(torch.ops.gradzip.triton_dequantize_accumulate,
                          (rows, torch.zeros(3000, device="cuda"), 0.5, 1, 8, 64, 0, 0))


@gpu
def test_torch_compile_gpu():
    x = _data(5000, seed=1).cuda()

    def step(x, r1, r2, out):
        p = torch.ops.gradzip.triton_quantize_pack(x * 2, 4, 64, r1, True, 9)
        q = torch.ops.gradzip.triton_topk_select(x, 50, r2, False, 1, 9)
        torch.ops.gradzip.triton_dequantize_accumulate(p[None], out, 1.0, 1, 4, 64, 0, 0)
        return p, q

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        r1, r2, out = (torch.zeros(5000, device="cuda") for _ in range(3))
        results.append((*fn(x, r1, r2, out), r1, r2, out))
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


@gpu
def test_auto_backend_uses_triton_without_cuda_kernels():
    """A build without CUDA kernels runs CUDA tensors through Triton under backend="auto"."""
    if gradzip.build_info()["cuda_kernels_registered"]:
        pytest.skip("this build has CUDA kernels: backend='auto' picks them")
    x = _data(3000, seed=4).cuda()
    assert torch.equal(gradzip.quantize_pack(x, 4), gradzip.quantize_pack(x, 4, backend="triton"))
