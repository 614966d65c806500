"""The ``out=`` form of quantize_pack and topk_select: a caller-owned payload buffer.

On every backend the bytes written into ``out`` are the allocating form's bytes and the
residual the same bits; the buffer is returned, fully overwritten (whatever it held), may
be reused across calls and may start at any byte offset. Bad buffers (size, dtype, shape,
device, layout, memory shared with x or the residual) are refused with the same error by
the public op on every backend, by the C++ operators reached directly and by the fake
kernels, before anything is written.
"""

from __future__ import annotations

import backends
import gradzip
import inputs
import pytest
import torch
from gradzip import format as fmt
from gradzip.testing import assert_bits_equal, assert_payload_equal
from torch._subclasses.fake_tensor import FakeTensorMode

N = 3001  # odd: a short last block, several top-k chunks under the interpreter's cap


def _dirty(nbytes: int, device, offset: int = 0) -> torch.Tensor:
    """A buffer of ``nbytes`` bytes starting ``offset`` bytes into its allocation, filled
    with a pattern no payload byte sequence matches."""
    raw = torch.arange(nbytes + offset, dtype=torch.int64).mul_(37).add_(11).remainder_(251)
    return raw.to(torch.uint8).to(device)[offset:]


QUANTIZE_CASES = [
    # bits, block, rounding, dtype, residual, byte offset of out
    (8, 128, "nearest", torch.float32, True, 0),
    (4, 32, "stochastic", torch.bfloat16, True, 0),
    (2, 4096, "nearest", torch.float16, False, 0),
    (1, 64, "nearest", torch.float32, True, 0),
    (8, 64, "stochastic", torch.float32, True, 3),  # out off a 16-byte boundary
    (1, 32, "nearest", torch.float32, True, 5),
]


@pytest.mark.parametrize("case", QUANTIZE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("target", backends.targets("quantize_pack", reference=True))
def test_quantize_pack_out_matches_allocating_form(target, case):
    bits, block, rounding, dtype, with_r, offset = case
    dev = target.device
    x = inputs.grad_like(N, dtype, seed=bits).to(dev)
    r = inputs.residual_like(N).to(dev) if with_r else None
    r1 = None if r is None else r.clone()
    want = gradzip.quantize_pack(x, bits, block, r1, rounding, 7, backend=target.backend)
    r2 = None if r is None else r.clone()
    buf = _dirty(want.numel(), dev, offset)
    got = gradzip.quantize_pack(x, bits, block, r2, rounding, 7, backend=target.backend,
                                out=buf)
    assert got is buf, "the out= form returns the caller's buffer"
    assert_payload_equal(buf, want, f"{target}: out= payload vs the allocating form")
    if r is not None:
        assert_bits_equal(r2, r1, f"{target}: out= residual vs the allocating form")
    # Reused for a second call with other data: every byte is rewritten.
    x2 = inputs.grad_like(N, dtype, seed=bits + 100).to(dev)
    want2 = gradzip.quantize_pack(x2, bits, block, None, rounding, 8, backend=target.backend)
    gradzip.quantize_pack(x2, bits, block, None, rounding, 8, backend=target.backend, out=buf)
    assert_payload_equal(buf, want2, f"{target}: reused out= buffer, second call")


TOPK_CASES = [
    # k, exact, values, dtype, residual, byte offset of out
    (30, True, "fp32", torch.float32, True, 0),
    (30, False, "bf16", torch.float32, True, 0),
    (N, True, "int8", torch.float16, True, 0),  # k = n
    (17, False, "int8", torch.bfloat16, False, 0),
    (5, True, "fp32", torch.float32, True, 7),  # out off a 16-byte boundary
    (40, True, "int8", torch.float32, True, 9),
]


@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("target", backends.targets("topk_select", reference=True))
def test_topk_select_out_matches_allocating_form(target, case):
    k, exact, values, dtype, with_r, offset = case
    dev = target.device
    x = inputs.grad_like(N, dtype, seed=k).to(dev)
    r = inputs.residual_like(N).to(dev) if with_r else None
    r1 = None if r is None else r.clone()
    want = gradzip.topk_select(x, k, r1, exact, values, 3, backend=target.backend)
    r2 = None if r is None else r.clone()
    buf = _dirty(want.numel(), dev, offset)
    got = gradzip.topk_select(x, k, r2, exact, values, 3, backend=target.backend, out=buf)
    assert got is buf, "the out= form returns the caller's buffer"
    assert_payload_equal(buf, want, f"{target}: out= payload vs the allocating form")
    if r is not None:
        assert_bits_equal(r2, r1, f"{target}: out= residual vs the allocating form")
    x2 = inputs.grad_like(N, dtype, seed=k + 100).to(dev)
    want2 = gradzip.topk_select(x2, k, None, exact, values, 4, backend=target.backend)
    gradzip.topk_select(x2, k, None, exact, values, 4, backend=target.backend, out=buf)
    assert_payload_equal(buf, want2, f"{target}: reused out= buffer, second call")


def test_out_payload_decodes_like_the_allocating_one():
    """A payload written into a slice of a larger send buffer (how comm uses out=) is
    a normal payload: it decodes to the same values."""
    x = inputs.grad_like(10_000, seed=5)
    size = fmt.dense_payload_bytes(x.numel(), 4, 128)
    send = torch.zeros(3 * size, dtype=torch.uint8)
    gradzip.quantize_pack(x, 4, 128, out=send[size:2 * size])
    assert torch.equal(send[:size], torch.zeros(size, dtype=torch.uint8)), "wrote before out"
    assert torch.equal(send[2 * size:], torch.zeros(size, dtype=torch.uint8)), "wrote after out"
    assert_bits_equal(gradzip.dequantize(send[size:2 * size], numel=x.numel()),
                      gradzip.dequantize(gradzip.quantize_pack(x, 4, 128), numel=x.numel()),
                      "decoded out= payload")


def test_codec_compress_passes_out_through():
    x = inputs.grad_like(5000, seed=9)
    for spec in ("int8", "sign", "topk:0.01,values=bf16"):
        codec = gradzip.Codec(spec)
        r1, r2 = inputs.residual_like(5000), inputs.residual_like(5000)
        want = codec.compress(x, r1, seed=2)
        buf = _dirty(codec.compressed_size(x.numel()), "cpu")
        got = codec.compress(x, r2, seed=2, out=buf)
        assert got is buf
        assert_payload_equal(buf, want, f"Codec({spec!r}).compress(out=)")
        assert_bits_equal(r2, r1, f"Codec({spec!r}).compress(out=) residual")


# ---------------------------------------------------------------------------------------
# bad buffers: one error, whichever way the op is reached
# ---------------------------------------------------------------------------------------

X = inputs.grad_like(300, seed=2)
Q_SIZE = fmt.dense_payload_bytes(300, 8, 128)
T_SIZE = fmt.topk_payload_bytes(300, 10, "fp32")


def _bad_out_cases(size: int):
    """(name, make(x, residual) -> out, exception, message); buffers on x's device."""
    def empty(n, dtype=torch.uint8):
        return lambda x, r: torch.empty(n, dtype=dtype, device=x.device)

    return [
        ("short", empty(size - 1), ValueError,
         f"out has {size - 1} bytes but the payload is {size} bytes"),
        ("long", empty(size + 16), ValueError,
         f"out has {size + 16} bytes but the payload is {size} bytes"),
        ("int8 dtype", empty(size, torch.int8), TypeError, "out must be uint8"),
        ("float dtype", empty(size // 4, torch.float32), TypeError, "out must be uint8"),
        ("2-D", lambda x, r: torch.empty(1, size, dtype=torch.uint8, device=x.device),
         ValueError, "out must be 1-D"),
        ("strided", lambda x, r: empty(2 * size)(x, r)[::2], ValueError,
         "out must be contiguous"),
        ("meta device", lambda x, r: torch.empty(size, dtype=torch.uint8, device="meta"),
         ValueError, "out is on meta but x is on"),
        ("aliases x", lambda x, r: x.view(torch.uint8)[:size], ValueError,
         "out must not share memory with x"),
        ("overlaps x's end", lambda x, r: _tail_overlap(x, size), ValueError,
         "out must not share memory with x"),
        ("aliases residual", lambda x, r: r.view(torch.uint8)[4:4 + size], ValueError,
         "out must not share memory with residual"),
    ]


def _tail_overlap(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a buffer whose first bytes are x's last 4 bytes, a copy of x living in front of
    it in one allocation)."""
    base = torch.empty(x.numel() * 4 + size, dtype=torch.uint8, device=x.device)
    xv = base[: x.numel() * 4].view(torch.float32)
    xv.copy_(x)
    return base[x.numel() * 4 - 4: x.numel() * 4 - 4 + size], xv


def _materialise(make, x, r):
    """(out, x): the case's buffer, and x (replaced when the case needs it elsewhere)."""
    out = make(x, r)
    if isinstance(out, tuple):
        out, x = out
    return out, x


def _ids(cases):
    return [c[0] for c in cases]


Q_CASES = _bad_out_cases(Q_SIZE)
T_CASES = _bad_out_cases(T_SIZE)


@pytest.mark.parametrize("case", Q_CASES, ids=_ids(Q_CASES))
@pytest.mark.parametrize("target", backends.targets("quantize_pack", reference=True))
def test_quantize_pack_refuses_bad_out(target, case):
    name, make, exc, match = case
    x, r = X.clone().to(target.device), inputs.residual_like(300).to(target.device)
    out, x = _materialise(make, x, r)
    x_before, r_before = x.clone(), r.clone()
    out_before = out.clone() if out.device.type != "meta" else None
    with pytest.raises(exc, match=match):
        gradzip.quantize_pack(x, 8, 128, r, backend=target.backend, out=out)
    assert_bits_equal(x, x_before, f"{name}: x modified")
    assert_bits_equal(r, r_before, f"{name}: residual modified by a failed call")
    if out_before is not None and out.dtype == out_before.dtype:
        # bits, not torch.equal: the buffer is torch.empty, so a float case may hold NaNs
        assert_bits_equal(out, out_before, f"{name}: out written by a failed call")


@pytest.mark.parametrize("case", T_CASES, ids=_ids(T_CASES))
@pytest.mark.parametrize("target", backends.targets("topk_select", reference=True))
def test_topk_select_refuses_bad_out(target, case):
    name, make, exc, match = case
    x, r = X.clone().to(target.device), inputs.residual_like(300).to(target.device)
    out, x = _materialise(make, x, r)
    x_before, r_before = x.clone(), r.clone()
    with pytest.raises(exc, match=match):
        gradzip.topk_select(x, 10, r, backend=target.backend, out=out)
    assert_bits_equal(x, x_before, f"{name}: x modified")
    assert_bits_equal(r, r_before, f"{name}: residual modified by a failed call")


def _native():
    """Targets with C++ kernels (the operators reached without the Python wrapper)."""
    return [p for p in backends.targets(["quantize_pack", "topk_select"])
            if p.values[0].backend in ("cpu", "cuda")]


@pytest.mark.parametrize("case", Q_CASES, ids=_ids(Q_CASES))
@pytest.mark.parametrize("target", _native())
def test_direct_quantize_pack_out_op_refuses_bad_out(target, case):
    """torch.ops.gradzip.quantize_pack.out without the Python wrapper: the C++ checks
    (csrc/core/checks.h) give the same error, and nothing is written."""
    name, make, exc, match = case
    x, r = X.clone().to(target.device), inputs.residual_like(300).to(target.device)
    out, x = _materialise(make, x, r)
    r_before = r.clone()
    with pytest.raises(exc, match=match):
        torch.ops.gradzip.quantize_pack.out(x, 8, 128, r, False, 0, out=out)
    assert_bits_equal(r, r_before, f"{name}: residual modified by a failed call")


@pytest.mark.parametrize("case", T_CASES, ids=_ids(T_CASES))
@pytest.mark.parametrize("target", _native())
def test_direct_topk_select_out_op_refuses_bad_out(target, case):
    name, make, exc, match = case
    x, r = X.clone().to(target.device), inputs.residual_like(300).to(target.device)
    out, x = _materialise(make, x, r)
    r_before = r.clone()
    with pytest.raises(exc, match=match):
        torch.ops.gradzip.topk_select.out(x, 10, r, True, 1, 0, out=out)
    assert_bits_equal(r, r_before, f"{name}: residual modified by a failed call")


# The fake kernels see tensors without memory, so they check everything but sharing.
FAKE_Q = [c for c in Q_CASES if "aliases" not in c[0] and "overlaps" not in c[0]]
FAKE_T = [c for c in T_CASES if "aliases" not in c[0] and "overlaps" not in c[0]]


@pytest.mark.parametrize("case", FAKE_Q, ids=_ids(FAKE_Q))
def test_quantize_pack_out_fake_refuses_bad_out(case):
    _, make, exc, match = case
    out = make(X, None)
    mode = FakeTensorMode()
    fx, fo = mode.from_tensor(X), mode.from_tensor(out)
    with mode, pytest.raises(exc, match=match):
        torch.ops.gradzip.quantize_pack.out(fx, 8, 128, None, False, 0, out=fo)


@pytest.mark.parametrize("case", FAKE_T, ids=_ids(FAKE_T))
def test_topk_select_out_fake_refuses_bad_out(case):
    _, make, exc, match = case
    out = make(X, None)
    mode = FakeTensorMode()
    fx, fo = mode.from_tensor(X), mode.from_tensor(out)
    with mode, pytest.raises(exc, match=match):
        torch.ops.gradzip.topk_select.out(fx, 10, None, True, 1, 0, out=fo)


def test_fake_out_kernels_accept_a_good_buffer():
    mode = FakeTensorMode()
    fx = mode.from_tensor(X)
    with mode:
        assert torch.ops.gradzip.quantize_pack.out(
            fx, 8, 128, None, False, 0, out=torch.empty(Q_SIZE, dtype=torch.uint8)) is None
        assert torch.ops.gradzip.topk_select.out(
            fx, 10, None, True, 1, 0, out=torch.empty(T_SIZE, dtype=torch.uint8)) is None
