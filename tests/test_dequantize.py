"""gradzip.dequantize's expected size: a header that claims another numel raises before the
output is allocated, on every backend."""

from __future__ import annotations

import backends
import gradzip
import inputs
import pytest
import torch
from gradzip import format as fmt
from gradzip import reference
from gradzip.testing import assert_bits_equal

OP = "dequantize_accumulate"
N = 1001


def _payloads():
    x = inputs.grad_like(N, seed=4)
    return {"dense": reference.quantize_pack(x, 4, 64),
            "topk": reference.topk_select(x, 50, values="bf16")}


def _claiming(numel: int) -> torch.Tensor:
    """A well-formed top-k payload of 96 bytes whose header claims ``numel`` elements: every
    field and the length agree, so only the caller's expected size can refuse it."""
    h = fmt.topk_header(numel, 1, fmt.VALUE_FP32)
    raw = bytearray(h.total_bytes)
    raw[: fmt.HEADER_BYTES] = h.pack()
    return torch.frombuffer(raw, dtype=torch.uint8)


@pytest.mark.parametrize("kind", ["dense", "topk"])
@pytest.mark.parametrize("target", backends.targets(OP, reference=True))
def test_expected_numel_decodes_as_without(target, kind):
    p = _payloads()[kind].to(target.device)
    want = gradzip.dequantize(p, backend=target.backend)
    got = gradzip.dequantize(p, backend=target.backend, numel=N)
    assert_bits_equal(got.cpu(), want.cpu(), f"{target} {kind} with numel")


@pytest.mark.parametrize("kind", ["dense", "topk"])
@pytest.mark.parametrize("target", backends.targets(OP, reference=True))
def test_numel_mismatch_raises(target, kind):
    p = _payloads()[kind].to(target.device)
    for expected in (N - 1, N + 1, 0):
        with pytest.raises(ValueError, match=f"holds {N} elements but numel={expected}"):
            gradzip.dequantize(p, backend=target.backend, numel=expected)


@pytest.mark.parametrize("target", backends.targets(OP, reference=True))
def test_oversized_claim_raises_before_allocating(target):
    """2**40 float32 elements (4 TiB) would fail to allocate with a RuntimeError, or take
    the machine's memory: the mismatch must be a ValueError first."""
    p = _claiming(2**40).to(target.device)
    assert fmt.parse_header(p).numel == 2**40 and p.numel() == 96
    with pytest.raises(ValueError, match="numel=1000 was expected"):
        gradzip.dequantize(p, backend=target.backend, numel=1000)


@pytest.mark.parametrize("bad", [-1, True, 2.0, "1001", [N]])
def test_numel_must_be_a_nonnegative_int(bad):
    with pytest.raises(ValueError, match="numel must be a non-negative int"):
        gradzip.dequantize(_payloads()["dense"], numel=bad)


def test_numel_is_keyword_only():
    with pytest.raises(TypeError):
        gradzip.dequantize(_payloads()["dense"], torch.float32, "auto", N)


def test_empty_payload_with_numel_zero():
    p = reference.quantize_pack(torch.zeros(0), 8, 128)
    out = gradzip.dequantize(p, numel=0)
    assert out.shape == (0,) and out.dtype == torch.float32
