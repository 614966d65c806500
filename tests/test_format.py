"""gradzip.format: header byte layout, section alignment, sizes, index width, and header
validation, against the layout written out independently in tests/expect.py."""

from __future__ import annotations

import struct

import expect
import pytest
import torch
from gradzip import format as fmt


def header_bytes(h: fmt.Header) -> bytes:
    b = h.pack()
    assert len(b) == 64
    return b


def test_dense_header_byte_layout():
    h = fmt.dense_header(0x0102030405, 4, 256, stochastic=True)
    b = header_bytes(h)
    assert b[0:4] == b"GZPK"
    assert b[4:6] == (1).to_bytes(2, "little")  # version
    assert b[6] == 1 and b[7] == 4  # codec dense, bits
    assert b[8:12] == (256).to_bytes(4, "little")
    assert b[12] == 0 and b[13] == 0  # value / index format unused
    assert b[14:16] == (1).to_bytes(2, "little")  # stochastic flag
    assert b[16:24] == (0x0102030405).to_bytes(8, "little")
    assert b[24:32] == bytes(8)  # k
    _so, _co, total = expect.dense_layout(0x0102030405, 4, 256)
    assert b[32:40] == total.to_bytes(8, "little") and h.total_bytes == total
    assert b[40:64] == bytes(24)


def test_topk_header_byte_layout():
    h = fmt.topk_header(1000, 77, fmt.VALUE_INT8, approximate=True)
    f = expect.fields(header_bytes(h))
    assert (f.magic, f.version, f.codec, f.bits, f.block) == (b"GZPK", 1, 2, 0, 0)
    assert (f.value_format, f.index_format, f.flags) == (3, 1, 2)
    assert (f.numel, f.k) == (1000, 77)
    assert f.total_bytes == expect.topk_layout(1000, 77, 3)[3] == h.total_bytes


@pytest.mark.parametrize("bits", fmt.DENSE_BITS)
@pytest.mark.parametrize("block", (32, 64, 128, 1024, 4096))
def test_dense_sections_aligned_and_sized(bits, block):
    for n in (0, 1, 7, 31, 32, 33, block - 1, block, block + 1, 3 * block + 5, 100003):
        h = fmt.dense_header(n, bits, block)
        s = h.sections()
        so, co, total = expect.dense_layout(n, bits, block)
        assert s["scales"] == (so, 4 * -(-n // block))
        assert s["codes"] == (co, (n * bits + 7) // 8)
        assert h.total_bytes == total == fmt.dense_payload_bytes(n, bits, block)
        assert so % 16 == 0 and co % 16 == 0 and total % 16 == 0


@pytest.mark.parametrize("values", ("fp32", "bf16", "int8"))
def test_topk_sections_aligned_and_sized(values):
    vf = fmt.VALUE_FORMATS[values]
    for n, k in ((1, 1), (10, 3), (1000, 1), (1000, 999), (100003, 1000)):
        h = fmt.topk_header(n, k, vf)
        s = h.sections()
        io, vo, so, total = expect.topk_layout(n, k, vf)
        assert s["indices"] == (io, 4 * k)
        assert s["values"] == (vo, expect.VALUE_BYTES[vf] * k)
        assert s.get("value_scale", (None,))[0] == so
        assert h.total_bytes == total == fmt.topk_payload_bytes(n, k, values)
        assert all(off % 16 == 0 for off, _ in s.values()) and total % 16 == 0


def test_index_width_switches_at_2_pow_31():
    """int32 indices while every index fits; int64 from 2**31 elements on. Checked through
    the header and layout helpers: nothing of that size is allocated."""
    assert fmt.index_format_for(2**31 - 1) == fmt.INDEX_INT32
    assert fmt.index_format_for(2**31) == fmt.INDEX_INT64
    for n in (2**31 - 1, 2**31, 2**33 + 7):
        h = fmt.topk_header(n, 5, fmt.VALUE_FP32)
        width = 8 if n >= 2**31 else 4
        assert h.index_format == (2 if width == 8 else 1)
        assert h.sections()["indices"] == (64, 5 * width)
        assert h.total_bytes == expect.topk_layout(n, 5, 1)[3]
        b = h.pack()
        assert fmt.parse_header(b, length=h.total_bytes) == h
        # The wrong index width for the numel is refused.
        bad = bytearray(b)
        bad[13] = 1 if width == 8 else 2
        with pytest.raises(ValueError, match="index format"):
            fmt.parse_header(bytes(bad), length=h.total_bytes)


def test_large_dense_header_parses_without_the_payload():
    h = fmt.dense_header(2**33 + 3, 2, 4096)
    assert fmt.parse_header(h.pack(), length=h.total_bytes) == h
    with pytest.raises(ValueError, match="truncated"):
        fmt.parse_header(h.pack(), length=h.total_bytes - 16)


def test_same_codec_and_numel_same_size():
    for n in (1, 1000, 4097):
        sizes = {fmt.dense_header(n, 4, 128, s).total_bytes for s in (False, True)}
        assert len(sizes) == 1
        sizes = {fmt.topk_header(n, 1, 2, a).total_bytes for a in (False, True)}
        assert len(sizes) == 1


@pytest.mark.parametrize("h", [
    fmt.dense_header(0, 8, 32), fmt.dense_header(12345, 1, 4096, True),
    fmt.topk_header(5, 5, fmt.VALUE_BF16, True), fmt.topk_header(777, 3, fmt.VALUE_INT8),
], ids=lambda h: h.describe())
def test_pack_parse_round_trip(h):
    payload = torch.zeros(h.total_bytes, dtype=torch.uint8)
    payload[:64] = torch.frombuffer(bytearray(h.pack()), dtype=torch.uint8)
    assert fmt.parse_header(payload) == h
    assert fmt.parse_header(h.pack() + bytes(h.total_bytes - 64)) == h
    assert fmt.parse_header(bytearray(h.pack()), length=h.total_bytes) == h


def _field(h: fmt.Header, offset: int, fmt_char: str, value) -> bytes:
    b = bytearray(h.pack())
    struct.pack_into("<" + fmt_char, b, offset, value)
    return bytes(b) + bytes(h.total_bytes - 64)


D = fmt.dense_header(1000, 4, 128)
T = fmt.topk_header(1000, 10, fmt.VALUE_FP32)


@pytest.mark.parametrize("payload,match", [
    pytest.param(b"", "truncated payload: 0 bytes", id="empty"),
    pytest.param(D.pack()[:63], "truncated payload: 63 bytes", id="short_header"),
    pytest.param(_field(D, 0, "4s", b"GZPL"), "not a gradzip payload: magic", id="magic"),
    pytest.param(_field(D, 4, "H", 0), "unsupported gradzip payload format version 0",
                 id="version0"),
    pytest.param(_field(D, 4, "H", 2), "unsupported gradzip payload format version 2",
                 id="version2"),
    pytest.param(_field(D, 6, "B", 3), "unknown codec id 3", id="codec3"),
    pytest.param(_field(D, 6, "B", 0), "unknown codec id 0", id="codec0"),
    pytest.param(_field(D, 7, "B", 3), "dense bits=3", id="bits3"),
    pytest.param(_field(D, 7, "B", 0), "dense bits=0", id="bits0"),
    pytest.param(_field(D, 8, "I", 48), "block=48", id="block48"),
    pytest.param(_field(D, 8, "I", 16), "block=16", id="block16"),
    pytest.param(_field(D, 8, "I", 8192), "block=8192", id="block8192"),
    pytest.param(_field(D, 12, "B", 1), "top-k fields set in a dense payload", id="dense_vfmt"),
    pytest.param(_field(D, 14, "H", 2), "top-k fields set in a dense payload", id="dense_flags"),
    pytest.param(_field(D, 24, "Q", 5), "top-k fields set in a dense payload", id="dense_k"),
    pytest.param(_field(D, 16, "Q", 100), "total_bytes", id="numel_total"),
    pytest.param(_field(D, 16, "Q", 2**62), "implausibly large|total_bytes", id="numel_huge"),
    pytest.param(_field(D, 32, "Q", D.total_bytes + 16), "total_bytes", id="total_bytes"),
    pytest.param(_field(D, 40, "B", 1), "reserved bytes are not zero", id="reserved40"),
    pytest.param(_field(D, 63, "B", 0x80), "reserved bytes are not zero", id="reserved63"),
    pytest.param(_field(T, 12, "B", 0), "unknown value format 0", id="topk_vfmt0"),
    pytest.param(_field(T, 12, "B", 4), "unknown value format 4", id="topk_vfmt4"),
    pytest.param(_field(T, 13, "B", 2), "index format 2 for numel=1000", id="topk_ifmt"),
    pytest.param(_field(T, 7, "B", 8), "dense fields set in a top-k payload", id="topk_bits"),
    pytest.param(_field(T, 14, "H", 1), "dense fields set in a top-k payload", id="topk_flags"),
    pytest.param(_field(T, 24, "Q", 0), "k=0 outside", id="topk_k0"),
    pytest.param(_field(T, 24, "Q", 1001), "k=1001 outside", id="topk_k_big"),
    pytest.param(_field(T, 32, "Q", 0), "total_bytes=0", id="topk_total0"),
    pytest.param(D.pack() + bytes(D.total_bytes - 64 - 1), "truncated payload", id="truncated"),
    pytest.param(D.pack() + bytes(D.total_bytes - 64 + 16), "oversized payload", id="oversized"),
])
def test_parse_header_rejects(payload, match):
    with pytest.raises(ValueError, match=match):
        fmt.parse_header(payload)
    if len(payload) >= 64:  # the same problem through a uint8 tensor
        with pytest.raises(ValueError, match=match):
            fmt.parse_header(torch.frombuffer(bytearray(payload), dtype=torch.uint8))


def test_parse_header_rejects_wrong_types():
    b = bytearray(D.pack() + bytes(D.total_bytes - 64))
    with pytest.raises(TypeError, match="uint8"):
        fmt.parse_header(torch.frombuffer(b, dtype=torch.uint8).view(torch.int8))
    with pytest.raises(ValueError, match="1-D"):
        fmt.parse_header(torch.frombuffer(b, dtype=torch.uint8).view(2, -1))
    with pytest.raises(TypeError, match="uint8 tensor or bytes"):
        fmt.parse_header(list(b))


def test_check_compatible():
    a = fmt.dense_header(1000, 4, 128)
    assert fmt.check_compatible([a, a, a]) == a
    for other in (fmt.dense_header(1001, 4, 128), fmt.dense_header(1000, 4, 128, True),
                  fmt.dense_header(1000, 8, 128), fmt.dense_header(1000, 4, 256),
                  fmt.topk_header(1000, 10, 1)):
        with pytest.raises(ValueError, match="mixed codecs or numels.*payload 2"):
            fmt.check_compatible([a, a, other])
