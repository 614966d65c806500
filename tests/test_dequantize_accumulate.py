"""dequantize_accumulate and dequantize: every backend against the reference (bit-exact),
against a float64 sum of independently decoded payloads (with a derived tolerance),
determinism of the sparse path, input forms, and bad input."""

from __future__ import annotations

import math

import backends
import expect
import gradzip
import inputs
import numpy as np
import pytest
import torch
from gradzip import format as fmt
from gradzip import reference
from gradzip.testing import assert_bits_equal

OP = "dequantize_accumulate"
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# codec: ("dense", bits, block, rounding) or ("topk", k fraction, values, exact)
CODECS = (
    ("dense", 8, 128, "nearest"), ("dense", 4, 32, "stochastic"), ("dense", 2, 4096, "nearest"),
    ("dense", 1, 256, "nearest"),
    ("topk", 0.1, "fp32", True), ("topk", 0.3, "bf16", False), ("topk", 0.05, "int8", True),
)
ALPHAS = (1.0, 0.125, -0.7, 3.0)
SIZES = (1, 129, 4097, 20011)


def codec_id(c) -> str:
    return "-".join(str(p) for p in c)


def make_payloads(codec, n: int, W: int, seed: int = 0, overlap: bool = True) -> list:
    """W reference payloads of one codec over n elements. Top-k payloads share part of
    their index sets (the same base gradient plus per-worker noise), as real ones do."""
    base = inputs.grad_like(n, seed=seed)
    out = []
    for w in range(W):
        x = base + 0.5 * inputs.grad_like(n, seed=seed + 1000 + w) if overlap else \
            inputs.grad_like(n, seed=seed + 1000 + w)
        if codec[0] == "dense":
            _, bits, block, rounding = codec
            out.append(reference.quantize_pack(x, bits, block, None, rounding, seed + w))
        else:
            _, frac, values, exact = codec
            k = max(1, int(n * frac))
            out.append(reference.topk_select(x, k, None, exact, values, seed + w))
    return out


def synth_payloads(codec, n: int, W: int, seed: int = 0) -> list:
    """W payloads of one codec built directly from the format (random scales and code
    bytes; random sorted indices and values): cheap at 2**20 elements, and independent
    of quantize_pack/topk_select. Unused code bits past numel are left zero."""
    g = inputs.generator(seed)
    out = []
    for _ in range(W):
        if codec[0] == "dense":
            _, bits, block, rounding = codec
            h = fmt.dense_header(n, bits, block, stochastic=rounding == "stochastic")
            nb = h.nblocks
            scales = (torch.rand(nb, generator=g) * 10.0 ** torch.randint(-4, 3, (nb,), generator=g))
            scales[torch.rand(nb, generator=g) < 0.05] = 0.0
            codes = torch.randint(0, 256, (h.code_bytes,), generator=g, dtype=torch.uint8)
            if n * bits % 8:
                codes[-1] &= (1 << (n * bits % 8)) - 1
            parts = {"scales": scales, "codes": codes}
        else:
            _, frac, values, exact = codec
            k = max(1, int(n * frac))
            h = fmt.topk_header(n, k, fmt.VALUE_FORMATS[values], approximate=not exact)
            idx = torch.sort(torch.randperm(n, generator=g)[:k]).values.to(torch.int32)
            vals = inputs.grad_like(k, seed=int(torch.randint(0, 2**30, (1,), generator=g)))
            parts = {"indices": idx}
            if values == "fp32":
                parts["values"] = vals
            elif values == "bf16":
                parts["values"] = vals.to(torch.bfloat16)
            else:
                parts["values"] = torch.randint(-127, 128, (k,), generator=g, dtype=torch.int8)
                parts["value_scale"] = torch.rand(1, generator=g)
        buf = bytearray(h.total_bytes)
        buf[:64] = h.pack()
        for name, (off, length) in h.sections().items():
            buf[off:off + length] = parts[name].contiguous().view(torch.uint8).numpy().tobytes()
        out.append(torch.frombuffer(buf, dtype=torch.uint8))
    return out


def initial_out(n: int, dtype: torch.dtype, seed: int = 3) -> torch.Tensor:
    return inputs.grad_like(n, seed=seed).to(dtype)


def run_both(target, payloads, out0, alpha, as_list=False):
    want = out0.clone()
    reference.dequantize_accumulate(torch.stack(payloads), want, alpha)
    dev = target.device
    rows = [p.to(dev) for p in payloads] if as_list else torch.stack(payloads).to(dev)
    got = out0.clone().to(dev)
    ret = gradzip.dequantize_accumulate(rows, got, alpha, backend=target.backend)
    assert ret is got, "dequantize_accumulate must return out"
    return got, want


def _light(codec, W, out_dtype, alpha, n):
    return W in (1, 3, 8) and alpha == ALPHAS[CODECS.index(codec) % len(ALPHAS)] \
        and out_dtype == OUT_DTYPES[CODECS.index(codec) % 3]


@pytest.mark.parametrize("target,codec,W,out_dtype,alpha,n", backends.product(
    OP, [CODECS, range(1, 9), OUT_DTYPES, ALPHAS, SIZES],
    # every W at one size; W 1, 2, 3, 8 at every size; the other alphas at one W and size
    keep=lambda codec, W, od, alpha, n: (W in (1, 2, 3, 8) or n == 4097)
    and (alpha == 1.0 or (W == 3 and n == 129)),
    keep_light=_light, numel=lambda *c: c[-1]))
def test_matches_reference(target, codec, W, out_dtype, alpha, n):
    make = make_payloads if W <= 3 else synth_payloads
    payloads = make(codec, n, W, seed=n + W)
    got, want = run_both(target, payloads, initial_out(n, out_dtype), alpha)
    assert_bits_equal(got, want, f"{target} {codec_id(codec)} W={W} {out_dtype} "
                      f"alpha={alpha} n={n}", nan_equal=True)


@pytest.mark.parametrize("target,codec,out_dtype", backends.product(
    OP, [CODECS, OUT_DTYPES], keep_light=lambda c, od: od == OUT_DTYPES[CODECS.index(c) % 3]))
def test_dequantize_into_equals_zero_then_accumulate(target, codec, out_dtype):
    """The collectives' decode into their own buffers (gradzip.ops._dequantize_into; on CPU
    one pass that never reads out): the reference's zeroed out plus dequantize_accumulate,
    bit for bit, whatever out held before (NaN here); a negative alpha gives -0.0 where
    the sum is +0.0 and the reference's +0.0 + -0.0 must come out +0.0."""
    n = 4097 if target.fits(4097) else 1001
    payloads = make_payloads(codec, n, 3, seed=7)
    for alpha in (0.25, -0.5):
        want = torch.zeros(n, dtype=out_dtype)
        reference.dequantize_accumulate(torch.stack(payloads), want, alpha)
        got = torch.full((n,), float("nan"), dtype=out_dtype, device=target.device)
        ret = gradzip.ops._dequantize_into(torch.stack(payloads).to(target.device), got, alpha,
                                           backend=target.backend)
        assert ret is got
        assert_bits_equal(got, want, f"{target} {codec_id(codec)} {out_dtype} alpha={alpha}")
    # bad input is refused before out is written
    before = got.clone()
    with pytest.raises(ValueError, match="elements but the payloads hold"):
        gradzip.ops._dequantize_into(torch.stack(payloads).to(target.device), got[:-1],
                                     backend=target.backend)
    assert_bits_equal(got, before, f"{target}: out modified by a refused call")


@pytest.mark.parametrize("target,codec", backends.product(
    OP, [CODECS], light=False))
def test_large_matches_reference(target, codec):
    n = 2**20 + 3
    payloads = synth_payloads(codec, n, 4, seed=1)
    got, want = run_both(target, payloads, initial_out(n, torch.float32), 0.25)
    assert_bits_equal(got, want, f"{target} {codec_id(codec)} n={n}")


@pytest.mark.slow
@pytest.mark.parametrize("target,codec,out_dtype", backends.product(
    OP, [CODECS, OUT_DTYPES], light=False))
def test_large_matches_reference_w8(target, codec, out_dtype):
    n = 2**20 + 3
    payloads = synth_payloads(codec, n, 8, seed=2)
    got, want = run_both(target, payloads, initial_out(n, out_dtype), -1.5)
    assert_bits_equal(got, want, f"{target} {codec_id(codec)} n={n} W=8 {out_dtype}")


@pytest.mark.parametrize("target,codec,out_dtype,W", backends.product(
    OP, [CODECS, OUT_DTYPES, (1, 2, 5, 8)], reference=True,
    keep_light=lambda c, od, W: W == 5 and od == OUT_DTYPES[CODECS.index(c) % 3]))
def test_close_to_float64_sum(target, codec, out_dtype, W):
    # Payloads from the real compressors here (synth_payloads elsewhere).
    """out0 + alpha * sum_w decode_w, against float64 from the independent decoder.

    Error budget (u = 2**-24, first order): each float32 decode q*scale rounds once (u per
    term); the float32 sum of W terms (the first addition 0 + d_0 is exact) adds at most
    (W - 1) u sum|d_w|; alpha * acc one more u; out0 + that one more u of the magnitudes;
    the final cast to out's dtype half an ulp of the result (u_out). Hence
    |out - exact| <= (W + 3) u (|out0| + |alpha| sum|d_w|) + u_out |exact| + the smallest
    subnormal of out's dtype, times 1.01 for second-order terms.
    """
    n = 4097
    alpha = -0.7
    payloads = make_payloads(codec, n, W, seed=40 + W)
    out0 = initial_out(n, out_dtype)
    got = out0.clone().to(target.device)
    gradzip.dequantize_accumulate(torch.stack(payloads).to(target.device), got, alpha,
                                  backend=target.backend)
    d = np.stack([expect.decode64(p) for p in payloads])
    a32 = float(np.float32(alpha))  # the specification scales by float32(alpha)
    o64 = out0.double().numpy()
    exact = o64 + a32 * d.sum(axis=0)
    mag = np.abs(o64) + abs(a32) * np.abs(d).sum(axis=0)
    fi = torch.finfo(out_dtype)
    u_out = fi.eps / 2
    bound = 1.01 * ((W + 3) * expect.U32 * mag + u_out * np.abs(exact)) + fi.smallest_normal * fi.eps
    err = np.abs(got.cpu().double().numpy() - exact)
    worst = int(np.argmax(err - bound))
    assert (err <= bound).all(), (f"{target}: error {err[worst]:.3g} > bound {bound[worst]:.3g} "
                                  f"at {worst}")


@pytest.mark.parametrize("target,codec", backends.product(
    OP, [[c for c in CODECS if c[0] == "topk"]], keep_light=lambda c: c[2] == "fp32"))
def test_sparse_accumulate_is_deterministic(target, codec):
    """Same payloads, same bits on every run, whatever the thread count (no atomics)."""
    n, W = 4099, 8
    payloads = make_payloads(codec, n, W, seed=8)
    rows = torch.stack(payloads).to(target.device)
    out0 = initial_out(n, torch.float32).to(target.device)
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, threads, 1):
            torch.set_num_threads(nt)
            o = out0.clone()
            gradzip.dequantize_accumulate(rows, o, 0.3, backend=target.backend)
            results.append(o.cpu())
    finally:
        torch.set_num_threads(threads)
    for i, r in enumerate(results[1:], 1):
        assert_bits_equal(r, results[0], f"{target} run {i} differs from run 0")


@pytest.mark.parametrize("target", backends.targets(OP, reference=True))
def test_input_forms_agree(target):
    """A [W, P] tensor, a list of 1-D payloads, a 1-D payload, and rows sliced out of a
    larger buffer (a row stride bigger than P) give the same result."""
    n = 3001
    codec = ("dense", 4, 64, "nearest")
    payloads = make_payloads(codec, n, 3, seed=5)
    dev = target.device
    out0 = initial_out(n, torch.float32).to(dev)
    P = payloads[0].numel()

    def run(rows):
        o = out0.clone()
        gradzip.dequantize_accumulate(rows, o, 0.5, backend=target.backend)
        return o.cpu()

    ref = run(torch.stack(payloads).to(dev))
    assert_bits_equal(run([p.to(dev) for p in payloads]), ref, f"{target} list")
    big = torch.zeros(3, P + 48, dtype=torch.uint8, device=dev)
    big[:, 16:16 + P] = torch.stack(payloads).to(dev)
    rows = big[:, 16:16 + P]
    assert not rows.is_contiguous()
    assert_bits_equal(run(rows), ref, f"{target} strided rows")
    one = run(payloads[0].to(dev))
    assert_bits_equal(one, run(torch.stack(payloads[:1]).to(dev)), f"{target} 1-D")
    # An out of any shape with the right numel.
    o2 = out0.clone().view(1, n)
    gradzip.dequantize_accumulate(torch.stack(payloads).to(dev), o2, 0.5, backend=target.backend)
    assert_bits_equal(o2.reshape(-1).cpu(), ref, f"{target} 2-D out")


@pytest.mark.parametrize("target,codec,dtype", backends.product(
    OP, [CODECS, OUT_DTYPES], reference=True, keep_light=lambda c, d: d == torch.float32))
def test_dequantize_decodes_one_payload(target, codec, dtype):
    n = 1001
    (p,) = make_payloads(codec, n, 1, seed=6)
    got = gradzip.dequantize(p.to(target.device), dtype, backend=target.backend)
    assert got.dtype == dtype and got.shape == (n,) and got.device.type == target.device
    want = torch.from_numpy(expect.decode(p)).to(dtype)  # one rounding: fp32 -> dtype
    assert_bits_equal(got.cpu(), want, f"{target} dequantize")


@pytest.mark.parametrize("target", backends.targets(OP, reference=True))
def test_nonfinite_payload_reaches_out(target):
    """A payload carrying inf/NaN (GradScaler's overflow signal) makes out non-finite
    exactly where that payload's non-finite blocks or entries are."""
    n, block = 512, 64
    x = inputs.grad_like(n, seed=2)
    x[70] = math.inf
    dense = [reference.quantize_pack(x, 8, block), reference.quantize_pack(x * 0.5, 8, block)]
    out = torch.zeros(n).to(target.device)
    gradzip.dequantize_accumulate(torch.stack(dense).to(target.device), out,
                                  backend=target.backend)
    bad = ~torch.isfinite(out.cpu())
    assert bad[64:128].all() and not bad[:64].any() and not bad[128:].any()
    y = inputs.grad_like(n, seed=3)
    y[5] = math.nan
    sparse = [reference.topk_select(y, 10), reference.topk_select(y * 2, 10)]
    out = torch.zeros(n).to(target.device)
    gradzip.dequantize_accumulate(torch.stack(sparse).to(target.device), out,
                                  backend=target.backend)
    assert torch.isnan(out.cpu()[5]) and torch.isfinite(out.cpu()[torch.arange(n) != 5]).all()


# ---------------------------------------------------------------------------------------
# bad input: clear exceptions, out untouched
# ---------------------------------------------------------------------------------------

N = 300


def _payloads():
    a = reference.quantize_pack(inputs.grad_like(N, seed=1), 8, 128)
    b = reference.quantize_pack(inputs.grad_like(N, seed=2), 8, 128)
    return a, b


def _mutate(p: torch.Tensor, offset: int, value: bytes) -> torch.Tensor:
    q = p.clone()
    q[offset:offset + len(value)] = torch.frombuffer(bytearray(value), dtype=torch.uint8)
    return q


def _bad_cases():
    a, b = _payloads()
    stoch = reference.quantize_pack(inputs.grad_like(N, seed=3), 8, 128, rounding="stochastic")
    other_n = reference.quantize_pack(inputs.grad_like(N - 1, seed=3), 8, 128)
    assert other_n.numel() == a.numel()  # same size, different numel
    topk = reference.topk_select(inputs.grad_like(N, seed=3), 1)
    bits4 = reference.quantize_pack(inputs.grad_like(N, seed=3), 4, 128)
    out = lambda **kw: torch.zeros(N, **kw)
    return [
        ("truncated", [a[:-1], b[:-1]], out(), ValueError, "truncated"),
        ("truncated to header", [a[:40]], out(), ValueError, "truncated"),
        ("empty payload", torch.zeros(1, 0, dtype=torch.uint8), out(), ValueError, "truncated"),
        ("oversized", [torch.cat([a, torch.zeros(16, dtype=torch.uint8)])], out(), ValueError,
         "oversized"),
        ("wrong magic", [a, _mutate(b, 0, b"GZPQ")], out(), ValueError, "magic"),
        ("wrong version", [_mutate(a, 4, b"\x02\x00"), b], out(), ValueError, "version"),
        ("version 0", [_mutate(a, 4, b"\x00\x00")], out(), ValueError, "version"),
        ("mixed flags", [a, stoch], out(), ValueError, "mixed codecs or numels"),
        ("mixed numels", [a, other_n], out(), ValueError, "mixed codecs or numels"),
        ("mixed codecs", [a, topk], out(), ValueError, "mixed"),
        ("mixed bits", [a, bits4], out(), ValueError, "mixed"),
        ("out too small", [a, b], out()[:-1], ValueError, "out has 299 elements"),
        ("out too big", [a, b], torch.zeros(N + 1), ValueError, "out has 301 elements"),
        ("out int32", [a, b], out(dtype=torch.int32), TypeError, "out must be float32"),
        ("out float64", [a, b], out(dtype=torch.float64), TypeError, "out must be float32"),
        ("out strided", [a, b], torch.zeros(2 * N)[::2], ValueError, "out must be contiguous"),
        ("out on meta", [a, b], torch.empty(N, device="meta"), ValueError, "out is on meta"),
        ("payload float", torch.zeros(2, a.numel()), out(), TypeError, "uint8"),
        ("payload int8", [a.view(torch.int8)], out(), TypeError, "uint8"),
        ("payloads 3-D", torch.stack([a, b]).unsqueeze(0), out(), ValueError, "shape"),
        ("no payloads", [], out(), ValueError, "at least one payload"),
        ("no rows", torch.zeros(0, a.numel(), dtype=torch.uint8), out(), ValueError,
         "at least one payload"),
        ("alpha str", [a], out(), TypeError, "alpha"),
        ("backend", [a], out(), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("target", backends.targets(OP, reference=True))
def test_bad_input_raises_and_leaves_out_alone(target, case):
    name, payloads, out, exc, match = case
    dev = target.device
    if isinstance(payloads, list):
        payloads = [p.to(dev) for p in payloads]
    else:
        payloads = payloads.to(dev)
    if out.device.type != "meta":
        out = out.to(dev)
    out_before = out.clone() if out.device.type != "meta" else None
    kw = {"alpha": 1.0, "backend": target.backend}
    if name == "alpha str":
        kw["alpha"] = "1"
    if name == "backend":
        kw["backend"] = "fpga"
    with pytest.raises(exc, match=match):
        gradzip.dequantize_accumulate(payloads, out, **kw)
    if out_before is not None:
        assert_bits_equal(out, out_before, f"{target} {name}: out modified")


@pytest.mark.parametrize("target", backends.targets(OP, reference=True))
def test_dequantize_bad_input(target):
    a, b = _payloads()
    dev = target.device
    with pytest.raises(ValueError, match="one payload"):
        gradzip.dequantize(torch.stack([a, b]).to(dev), backend=target.backend)
    with pytest.raises(TypeError, match="dtype"):
        gradzip.dequantize(a.to(dev), torch.float64, backend=target.backend)
    with pytest.raises(ValueError, match="magic"):
        gradzip.dequantize(_mutate(a, 0, b"XXXX").to(dev), backend=target.backend)
    with pytest.raises(ValueError, match="truncated"):
        gradzip.dequantize(a[:-16].to(dev), backend=target.backend)


@pytest.mark.parametrize("target", [t for t in backends.targets(OP)
                                    if t.values[0].backend in ("cpu", "cuda")])
def test_direct_op_checks_arguments(target):
    """torch.ops.gradzip.dequantize_accumulate without the Python wrapper validates the
    arguments and every header (ValueError/TypeError) before touching out."""
    a, b = _payloads()
    dev = target.device
    rows = torch.stack([a, b]).to(dev)
    out = inputs.grad_like(N).to(dev)
    before = out.clone()
    op = torch.ops.gradzip.dequantize_accumulate
    cases = [
        ((rows.float(), out, 1.0), TypeError, "uint8"),
        ((rows[0], out, 1.0), ValueError, "\\[W, P\\]"),
        ((rows[:0], out, 1.0), ValueError, "at least one payload"),
        ((rows, out.double(), 1.0), TypeError, "out"),
        ((rows, torch.zeros(2 * N, device=dev)[::2], 1.0), ValueError, "contiguous"),
        ((rows, out[:-1], 1.0), ValueError, "out has"),
        ((rows[:, :-16], out, 1.0), ValueError, "payload 0"),
        ((rows[:, :32], out, 1.0), ValueError, "truncated"),
        ((torch.stack([a, _mutate(b, 0, b"XXXX")]).to(dev), out, 1.0), ValueError,
         "payload 1.*magic"),
        ((torch.stack([a, _mutate(b, 4, b"\x07\x00")]).to(dev), out, 1.0), ValueError,
         "payload 1.*version"),
        ((torch.stack([a, reference.quantize_pack(inputs.grad_like(N - 1), 8, 128)]).to(dev),
          out, 1.0), ValueError, "mixed"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            op(*args)
    assert_bits_equal(out, before, f"{target}: out modified by a failed call")
