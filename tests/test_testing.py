"""gradzip.testing: the exact comparisons every test, the selftest and the benchmarks use.

Section names are checked against offsets worked out by hand from docs/format.md (64-byte
header, sections 16-byte aligned), not from gradzip.format.
"""

from __future__ import annotations

import pytest
import torch
from gradzip import reference
from gradzip.testing import (
    assert_bits_equal,
    assert_payload_equal,
    bits_mismatch,
    payload_mismatch,
)


def _flip(p: torch.Tensor, offset: int, mask: int = 0x01) -> torch.Tensor:
    q = p.clone()
    q[offset] ^= mask
    return q


@pytest.fixture(scope="module")
def dense() -> torch.Tensor:
    # numel 1000, 4 bits, block 64: 16 scales at 64..127, 500 code bytes at 128..627,
    # zero padding to 640.
    p = reference.quantize_pack(torch.randn(1000, generator=torch.Generator().manual_seed(0)),
                                4, 64)
    assert p.numel() == 640
    return p


@pytest.fixture(scope="module")
def sparse() -> torch.Tensor:
    # numel 1000, k 10, int8 values: 10 int32 indices at 64..103 (padding to 112),
    # 10 values at 112..121 (padding to 128), the float32 value scale at 128..131,
    # padding to 144.
    p = reference.topk_select(torch.randn(1000, generator=torch.Generator().manual_seed(1)),
                              10, values="int8")
    assert p.numel() == 144
    return p


# ---- payloads --------------------------------------------------------------------------


def test_identical_payloads(dense, sparse):
    assert payload_mismatch(dense, dense.clone()) is None
    assert payload_mismatch(sparse, sparse.clone()) is None
    assert_payload_equal(dense, dense.clone(), "no message")


def test_one_bit_in_one_byte(dense):
    msg = payload_mismatch(_flip(dense, 200, 0x80), dense)
    assert msg is not None
    assert "1 of 640 payload bytes differ" in msg
    assert "first at byte 200" in msg
    got, want = int(dense[200]) ^ 0x80, int(dense[200])
    assert f"got 0x{got:02x}, expected 0x{want:02x}" in msg


def test_counts_every_differing_byte_and_reports_the_first(dense):
    q = _flip(_flip(_flip(dense, 300), 90), 500)
    msg = payload_mismatch(q, dense)
    assert "3 of 640 payload bytes differ" in msg
    assert "first at byte 90 " in msg
    assert "[90, 300, 500]" in msg


@pytest.mark.parametrize("offset,section", [
    (0, "header.magic"), (3, "header.magic"), (5, "header.version"), (6, "header.codec"),
    (7, "header.bits"), (9, "header.block"), (16, "header.numel"), (23, "header.numel"),
    (33, "header.total_bytes"), (45, "header.reserved"),
    (64, "scales[block 0]"), (64 + 4 * 5 + 3, "scales[block 5]"), (127, "scales[block 15]"),
    (128, "codes[byte 0, elements from 0]"), (128 + 10, "codes[byte 10, elements from 20]"),
    (627, "codes[byte 499, elements from 998]"), (628, "padding after codes"),
    (639, "padding after codes"),
])
def test_dense_sections(dense, offset, section):
    msg = payload_mismatch(_flip(dense, offset), dense)
    assert f"first at byte {offset} ({section})" in msg, msg


@pytest.mark.parametrize("offset,section", [
    (14, "header.flags"), (24, "header.k"), (12, "header.value_format"),
    (13, "header.index_format"),
    (64, "indices[0]"), (64 + 4 * 3 + 1, "indices[3]"), (103, "indices[9]"),
    (104, "padding after indices"), (112, "values[0]"), (119, "values[7]"),
    (122, "padding after values"), (128, "value_scale"), (131, "value_scale"),
    (132, "padding after value_scale"),
])
def test_topk_sections(sparse, offset, section):
    msg = payload_mismatch(_flip(sparse, offset), sparse)
    assert f"first at byte {offset} ({section})" in msg, msg


def test_topk_fp32_values_are_four_bytes_each():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    p = reference.topk_select(x, 10, values="fp32")  # values at 112..151
    msg = payload_mismatch(_flip(p, 112 + 4 * 6 + 2), p)
    assert "(values[6])" in msg, msg


def test_section_of_an_unparsable_expected_payload(dense):
    broken = _flip(dense, 0)  # magic
    msg = payload_mismatch(_flip(broken, 300), broken)
    assert "first at byte 300" in msg
    assert "does not parse" in msg and "magic" in msg, msg


def test_payload_length_mismatch(dense):
    assert payload_mismatch(dense[:-16], dense) == "payload is 624 bytes, expected 640"
    assert payload_mismatch(dense, dense[:-16]) == "payload is 640 bytes, expected 624"


@pytest.mark.parametrize("bad", [
    lambda p: p.view(torch.int8),
    lambda p: p.reshape(2, -1),
    lambda p: p.to(torch.int32),
])
def test_payloads_must_be_1d_uint8(dense, bad):
    msg = payload_mismatch(bad(dense), dense)
    assert msg is not None and msg.startswith("got is not a payload"), msg
    msg = payload_mismatch(dense, bad(dense))
    assert msg is not None and msg.startswith("want is not a payload"), msg


def test_assert_payload_equal_raises_with_context(dense):
    with pytest.raises(AssertionError, match=r"^int4 n=1000: 1 of 640 payload bytes differ"):
        assert_payload_equal(_flip(dense, 64), dense, "int4 n=1000")
    with pytest.raises(AssertionError, match=r"^1 of 640"):
        assert_payload_equal(_flip(dense, 64), dense)


# ---- bits ------------------------------------------------------------------------------


FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_identical_floats(dtype):
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0, 0], x[1, 1], x[2, 2] = float("inf"), float("nan"), -0.0
    assert bits_mismatch(x, x.clone()) is None
    assert_bits_equal(x, x.clone(), "no message")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_one_bit_of_one_element(dtype):
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = x.clone()
    width = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    y.view(width)[1, 3] ^= 1  # the lowest mantissa bit
    msg = bits_mismatch(y, x)
    assert msg is not None and msg.startswith("1 of 15 elements differ in bits; first at [1, 3]")
    assert "flat indices [8]" in msg


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_signed_zeros_differ(dtype):
    pos, neg = torch.zeros(4, dtype=dtype), torch.zeros(4, dtype=dtype)
    neg[2] = -0.0
    assert pos.eq(neg).all()  # equal as numbers ...
    msg = bits_mismatch(pos, neg)  # ... but not in bits
    assert msg is not None and "first at [2]: got 0.0" in msg and "expected -0.0" in msg, msg
    assert bits_mismatch(pos, neg, nan_equal=True) is not None


def _nan(bits: int) -> torch.Tensor:
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)


def test_nan_handling():
    quiet, negative, payload = _nan(0x7FC00000), _nan(-0x00400000), _nan(0x7FC12345)
    assert torch.isnan(quiet).all() and torch.isnan(negative).all() and torch.isnan(payload).all()
    # strict: a NaN matches only the same NaN
    assert bits_mismatch(quiet, quiet.clone()) is None
    msg = bits_mismatch(quiet, negative)
    assert msg is not None and "0x7fc00000" in msg and "0xffc00000" in msg, msg
    assert bits_mismatch(quiet, payload) is not None
    # nan_equal: any NaN matches any NaN, and nothing else
    assert bits_mismatch(quiet, negative, nan_equal=True) is None
    assert bits_mismatch(payload, quiet, nan_equal=True) is None
    assert bits_mismatch(quiet, torch.zeros(1), nan_equal=True) is not None
    assert bits_mismatch(torch.tensor([float("inf")]), quiet, nan_equal=True) is not None


def test_nan_equal_still_sees_other_differences():
    a = torch.tensor([float("nan"), 1.0, 2.0])
    b = torch.tensor([-float("nan"), 1.0, 2.5])
    msg = bits_mismatch(a, b, nan_equal=True)
    assert msg is not None and msg.startswith("1 of 3 elements differ in bits; first at [2]")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_integer_tensors_compare_by_value(dtype):
    a = torch.tensor([0, 1, 1, 0], dtype=dtype)
    assert bits_mismatch(a, a.clone()) is None
    b = a.clone()
    b[3] = 1
    msg = bits_mismatch(a, b)
    assert msg is not None and msg.startswith("1 of 4 elements differ in bits; first at [3]")


def test_dtype_and_shape_must_match():
    x = torch.arange(6, dtype=torch.float32)
    assert bits_mismatch(x, x.double()) == "dtype torch.float32, expected torch.float64"
    assert bits_mismatch(x.view(torch.int32), x) == "dtype torch.int32, expected torch.float32"
    assert bits_mismatch(x, x.reshape(2, 3)) == "shape (6,), expected (2, 3)"
    assert bits_mismatch(x[:5], x) == "shape (5,), expected (6,)"


def test_strided_views_compare_by_element():
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    view = base.t()  # not contiguous
    assert bits_mismatch(view, view.contiguous()) is None
    other = view.contiguous()
    other[5, 1] = -other[5, 1]
    assert "first at [5, 1]" in bits_mismatch(view, other)


def test_empty_tensors_are_equal():
    assert bits_mismatch(torch.empty(0), torch.empty(0)) is None
    assert payload_mismatch(torch.empty(0, dtype=torch.uint8),
                            torch.empty(0, dtype=torch.uint8)) is None


def test_assert_bits_equal_raises_with_context():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, -2.0])
    with pytest.raises(AssertionError, match=r"^residual n=2: 1 of 2 elements differ"):
        assert_bits_equal(a, b, "residual n=2")
    with pytest.raises(AssertionError, match=r"^dtype"):
        assert_bits_equal(a, b.double())
    nan = torch.tensor([float("nan")])
    with pytest.raises(AssertionError):
        assert_bits_equal(nan, -nan)
    assert_bits_equal(nan, -nan, nan_equal=True)
