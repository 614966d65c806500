"""Exact comparisons for gradzip's outputs, with messages that say where two results differ.

Every backend promises byte-identical payloads and bit-identical residuals (DESIGN.md,
"Bit-exactness"), so the tests, :mod:`gradzip.selftest` and the benchmarks' correctness
checks all compare the same way, with these functions:

* :func:`payload_mismatch` / :func:`assert_payload_equal`: two 1-D ``uint8`` payloads, byte
  for byte; a difference is located in the payload layout of :mod:`gradzip.format` (which
  header field, which block's scale, which code byte, which top-k index or value).
* :func:`bits_mismatch` / :func:`assert_bits_equal`: two tensors of one dtype and shape,
  element by element on their bit patterns (``-0.0 != +0.0``; a NaN matches only the
  same NaN unless ``nan_equal``).

The ``*_mismatch`` functions return ``None`` when the inputs are identical and otherwise a
one-line message; the ``assert_*`` functions raise ``AssertionError`` with it. Tensors may
live on any device; they are compared on the CPU.
"""

from __future__ import annotations

import struct

import torch

from . import format as fmt

__all__ = ["assert_bits_equal", "assert_payload_equal", "bits_mismatch", "payload_mismatch"]

# Header field names in the order of format._STRUCT ("<4sHBBIBBHQQQ24x"), then the
# reserved tail; offsets are derived from the struct format so the two cannot drift apart.
_HEADER_NAMES = ("magic", "version", "codec", "bits", "block", "value_format",
                 "index_format", "flags", "numel", "k", "total_bytes")


def _header_fields() -> list[tuple[int, str]]:
    codes = fmt._STRUCT.format.lstrip("<")
    items, count = [], ""
    for ch in codes:
        if ch.isdigit():
            count += ch
            continue
        items.append(count + ch)
        count = ""
    fields, offset = [], 0
    for name, code in zip(_HEADER_NAMES + ("reserved",), items, strict=True):
        fields.append((offset, name))
        offset += struct.calcsize("<" + code)
    return fields


_HEADER_FIELDS = _header_fields()

# Signed integer dtypes of the same width, to compare floats on their bit patterns.
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous()


def _section(want: torch.Tensor, offset: int) -> str:
    """Where byte ``offset`` lies in ``want``'s layout, e.g. ``scales[block 3]``."""
    if offset < fmt.HEADER_BYTES:
        return "header." + [name for off, name in _HEADER_FIELDS if off <= offset][-1]
    try:
        header = fmt.parse_header(want)
    except ValueError as e:
        return f"after the header; the expected payload's header does not parse: {e}"
    previous = "header"
    for name, (start, length) in header.sections().items():
        if offset < start:
            break
        rel = offset - start
        if rel < length:
            if name == "scales":
                return f"scales[block {rel // 4}]"
            if name == "codes":
                return f"codes[byte {rel}, elements from {rel * 8 // header.bits}]"
            if name == "indices":
                return f"indices[{rel // fmt.INDEX_BYTES[header.index_format]}]"
            if name == "values":
                return f"values[{rel // fmt.VALUE_BYTES[header.value_format]}]"
            return name
        previous = name
    return f"padding after {previous}"


def payload_mismatch(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """``None`` when two payloads are identical byte for byte, else what differs and where.

    Both must be 1-D ``torch.uint8`` tensors. The message names the number of differing
    bytes, the first differing offset and the section of ``want``'s layout it falls in
    (``header.<field>``, ``scales[block i]``, ``codes[byte j, ...]``, ``indices[i]``,
    ``values[i]``, ``value_scale`` or padding).
    """
    for name, t in (("got", got), ("want", want)):
        if t.dtype != torch.uint8 or t.dim() != 1:
            return (f"{name} is not a payload: dtype {t.dtype}, shape {tuple(t.shape)} "
                    "(a payload is a 1-D torch.uint8 tensor)")
    g, w = _host(got), _host(want)
    if g.numel() != w.numel():
        return f"payload is {g.numel()} bytes, expected {w.numel()}"
    differ = torch.nonzero(g != w).reshape(-1)
    if differ.numel() == 0:
        return None
    first = int(differ[0])
    return (f"{differ.numel()} of {g.numel()} payload bytes differ; first at byte {first} "
            f"({_section(w, first)}): got 0x{int(g[first]):02x}, expected "
            f"0x{int(w[first]):02x}; differing offsets {differ[:8].tolist()}")


def _index(flat: int, shape: torch.Size) -> str:
    if len(shape) <= 1:
        return f"[{flat}]"
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return "[" + ", ".join(str(i) for i in reversed(idx)) + "]"


def bits_mismatch(got: torch.Tensor, want: torch.Tensor, *,
                  nan_equal: bool = False) -> str | None:
    """``None`` when two tensors are identical bit for bit, else what differs and where.

    dtype and shape must match. Floats compare on their bit patterns, so ``-0.0`` differs
    from ``+0.0`` and NaNs match only NaNs with the same bits; integer and bool tensors
    compare by value.

    ``nan_equal``: any NaN matches any NaN. For computed outputs such as accumulate's
    ``out``: IEEE 754 does not pin down which NaN an operation returns (x86 returns the
    first NaN operand or a negative default NaN, GPUs a canonical one). Payloads and
    residuals promise their exact bits; compare those strictly.
    """
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, expected {want.dtype}"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    g, w = _host(got).reshape(-1), _host(want).reshape(-1)
    if g.is_floating_point():
        as_int = _INT_OF_WIDTH[g.element_size()]
        gi, wi = g.view(as_int), w.view(as_int)
    elif g.is_complex():
        raise TypeError(f"bits_mismatch does not compare complex tensors ({g.dtype})")
    else:
        gi, wi = g, w
    differ = gi != wi
    if nan_equal and g.is_floating_point():
        differ &= ~(torch.isnan(g) & torch.isnan(w))
    bad = torch.nonzero(differ).reshape(-1)
    if bad.numel() == 0:
        return None
    i = int(bad[0])
    if g.is_floating_point():
        mask = (1 << (8 * g.element_size())) - 1
        width = 2 * g.element_size()
        shown = (f"got {g[i].item()!r} (0x{int(gi[i]) & mask:0{width}x}), expected "
                 f"{w[i].item()!r} (0x{int(wi[i]) & mask:0{width}x})")
    else:
        shown = f"got {g[i].item()!r}, expected {w[i].item()!r}"
    return (f"{bad.numel()} of {g.numel()} elements differ in bits; first at "
            f"{_index(i, got.shape)}: {shown}; flat indices {bad[:8].tolist()}")


def _fail(message: str | None, context: str) -> None:
    if message is not None:
        raise AssertionError(f"{context}: {message}" if context else message)


def assert_payload_equal(got: torch.Tensor, want: torch.Tensor, context: str = "") -> None:
    """Raise ``AssertionError`` (prefixed by ``context``) unless :func:`payload_mismatch`
    finds the payloads identical."""
    _fail(payload_mismatch(got, want), context)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, context: str = "", *,
                      nan_equal: bool = False) -> None:
    """Raise ``AssertionError`` (prefixed by ``context``) unless :func:`bits_mismatch`
    finds the tensors identical."""
    _fail(bits_mismatch(got, want, nan_equal=nan_equal), context)
