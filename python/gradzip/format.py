"""The gradzip payload format: build, parse and validate headers.

This module mirrors ``csrc/core/format.h`` and ``docs/format.md``; the three must agree.
A payload is one flat ``torch.uint8`` tensor: a 64-byte little-endian header followed by
sections that each start at a 16-byte aligned offset.

Dense (quantized) payload::

    header | scales: float32[nblocks] | codes: ceil(numel * bits / 8) bytes

Top-k (sparse) payload::

    header | indices: int32|int64[k] (ascending) | values: float32|bfloat16|int8[k]
           | (int8 values only) value scale: float32

Every section is padded with zero bytes to a multiple of 16, so two payloads of one codec
and numel always have the same size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

MAGIC = b"GZPK"
VERSION = 1
HEADER_BYTES = 64
ALIGN = 16

CODEC_DENSE = 1
CODEC_TOPK = 2

VALUE_FP32 = 1
VALUE_BF16 = 2
VALUE_INT8 = 3
VALUE_FORMATS = {"fp32": VALUE_FP32, "bf16": VALUE_BF16, "int8": VALUE_INT8}
VALUE_FORMAT_NAMES = {v: k for k, v in VALUE_FORMATS.items()}
VALUE_BYTES = {VALUE_FP32: 4, VALUE_BF16: 2, VALUE_INT8: 1}

INDEX_INT32 = 1
INDEX_INT64 = 2
INDEX_BYTES = {INDEX_INT32: 4, INDEX_INT64: 8}

FLAG_STOCHASTIC = 1  # dense: codes were drawn with stochastic rounding
FLAG_APPROXIMATE = 2  # top-k: selection used the sampled threshold

DENSE_BITS = (1, 2, 4, 8)
MIN_BLOCK = 32
MAX_BLOCK = 4096

# magic, version, codec, bits, block, value_format, index_format, flags, numel, k, total_bytes
_STRUCT = struct.Struct("<4sHBBIBBHQQQ24x")
assert _STRUCT.size == HEADER_BYTES


def align16(n: int) -> int:
    """Round ``n`` bytes up to the next multiple of 16."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def index_format_for(numel: int) -> int:
    """int32 indices while every index fits, int64 from 2**31 elements on."""
    return INDEX_INT64 if numel >= 2**31 else INDEX_INT32


@dataclass(frozen=True)
class Header:
    """A parsed payload header. ``total_bytes`` is the whole payload length."""

    codec: int
    numel: int
    bits: int = 0
    block: int = 0
    value_format: int = 0
    index_format: int = 0
    flags: int = 0
    k: int = 0
    version: int = VERSION

    # ---- layout -----------------------------------------------------------------
    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.block) if self.codec == CODEC_DENSE else 0

    @property
    def code_bytes(self) -> int:
        return (self.numel * self.bits + 7) // 8

    def sections(self) -> dict[str, tuple[int, int]]:
        """Section name -> (byte offset, byte length without padding)."""
        off = HEADER_BYTES
        out = {}
        if self.codec == CODEC_DENSE:
            out["scales"] = (off, 4 * self.nblocks)
            off += align16(4 * self.nblocks)
            out["codes"] = (off, self.code_bytes)
        else:
            ib = INDEX_BYTES[self.index_format] * self.k
            out["indices"] = (off, ib)
            off += align16(ib)
            vb = VALUE_BYTES[self.value_format] * self.k
            out["values"] = (off, vb)
            if self.value_format == VALUE_INT8:
                off += align16(vb)
                out["value_scale"] = (off, 4)
        return out

    @property
    def total_bytes(self) -> int:
        off, length = list(self.sections().values())[-1]
        return off + align16(length)

    # ---- (de)serialisation --------------------------------------------------------
    def pack(self) -> bytes:
        return _STRUCT.pack(
            MAGIC, self.version, self.codec, self.bits, self.block, self.value_format,
            self.index_format, self.flags, self.numel, self.k, self.total_bytes,
        )

    def describe(self) -> str:
        if self.codec == CODEC_DENSE:
            return f"dense bits={self.bits} block={self.block} numel={self.numel}"
        return (f"topk k={self.k} values={VALUE_FORMAT_NAMES.get(self.value_format)} "
                f"numel={self.numel}")


def dense_header(numel: int, bits: int, block: int, stochastic: bool = False) -> Header:
    return Header(codec=CODEC_DENSE, numel=numel, bits=bits, block=block,
                  flags=FLAG_STOCHASTIC if stochastic else 0)


def topk_header(numel: int, k: int, value_format: int, approximate: bool = False) -> Header:
    return Header(codec=CODEC_TOPK, numel=numel, k=k, value_format=value_format,
                  index_format=index_format_for(numel),
                  flags=FLAG_APPROXIMATE if approximate else 0)


def dense_payload_bytes(numel: int, bits: int, block: int) -> int:
    """Size in bytes of a dense payload (same for every payload of this codec and numel)."""
    return dense_header(numel, bits, block).total_bytes


def topk_payload_bytes(numel: int, k: int, values: str = "fp32") -> int:
    """Size in bytes of a top-k payload."""
    return topk_header(numel, k, VALUE_FORMATS[values]).total_bytes


def _as_bytes(payload: torch.Tensor | bytes | bytearray, limit: int | None = None) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload[:limit])
    if not isinstance(payload, torch.Tensor):
        raise TypeError(f"payload must be a uint8 tensor or bytes, got {type(payload).__name__}")
    if payload.dtype != torch.uint8:
        raise TypeError(f"payload must be a torch.uint8 tensor, got dtype {payload.dtype}")
    if payload.dim() != 1:
        raise ValueError(f"payload must be 1-D, got shape {tuple(payload.shape)}")
    head = payload[:limit] if limit is not None else payload
    return head.detach().cpu().numpy().tobytes()


def parse_header(payload: torch.Tensor | bytes | bytearray, length: int | None = None) -> Header:
    """Parse and validate a payload's header against its length.

    ``length`` overrides the buffer's own length (for a header read apart from its payload).

    Raises ``ValueError`` naming the problem for a truncated buffer, wrong magic, an
    unsupported version, an unknown codec or field, or a length that does not match.
    """
    if isinstance(payload, torch.Tensor):
        _as_bytes(payload, 0)  # type / dtype / dim checks
        buffer_length = payload.numel()
    else:
        buffer_length = len(payload)
    if length is None:
        length = buffer_length
    elif buffer_length < min(length, HEADER_BYTES):
        raise ValueError("truncated payload header")
    if length < HEADER_BYTES:
        raise ValueError(
            f"truncated payload: {length} bytes is shorter than the {HEADER_BYTES}-byte header")
    raw = _as_bytes(payload, HEADER_BYTES)
    (magic, version, codec, bits, block, vfmt, ifmt, flags, numel, k,
     total) = _STRUCT.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"not a gradzip payload: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(
            f"unsupported gradzip payload format version {version} (this build reads {VERSION})")
    if raw[40:64] != bytes(24):
        raise ValueError("corrupt gradzip header: reserved bytes are not zero")
    if codec == CODEC_DENSE:
        if bits not in DENSE_BITS:
            raise ValueError(f"corrupt gradzip header: dense bits={bits} not in {DENSE_BITS}")
        if not (MIN_BLOCK <= block <= MAX_BLOCK and block & (block - 1) == 0):
            raise ValueError(f"corrupt gradzip header: block={block} is not a power of two "
                             f"in [{MIN_BLOCK}, {MAX_BLOCK}]")
        if vfmt or ifmt or k or flags & ~FLAG_STOCHASTIC:
            raise ValueError("corrupt gradzip header: top-k fields set in a dense payload")
    elif codec == CODEC_TOPK:
        if vfmt not in VALUE_BYTES:
            raise ValueError(f"corrupt gradzip header: unknown value format {vfmt}")
        if ifmt != index_format_for(numel):
            raise ValueError(f"corrupt gradzip header: index format {ifmt} for numel={numel}")
        if bits or block or flags & ~FLAG_APPROXIMATE:
            raise ValueError("corrupt gradzip header: dense fields set in a top-k payload")
        if not 1 <= k <= numel:
            raise ValueError(f"corrupt gradzip header: k={k} outside [1, numel={numel}]")
    else:
        raise ValueError(f"corrupt gradzip header: unknown codec id {codec}")
    if numel >= 2**62:
        raise ValueError(f"corrupt gradzip header: numel={numel} is implausibly large")
    h = Header(codec=codec, numel=numel, bits=bits, block=block, value_format=vfmt,
               index_format=ifmt, flags=flags, k=k, version=version)
    if total != h.total_bytes:
        raise ValueError(f"corrupt gradzip header: total_bytes={total} but the fields "
                         f"imply {h.total_bytes}")
    if length != total:
        what = "truncated" if length < total else "oversized"
        raise ValueError(f"{what} payload: {length} bytes, header says {total}")
    return h


def check_compatible(headers: list[Header]) -> Header:
    """All payloads of one accumulate must share codec, options and numel."""
    first = headers[0]
    for w, h in enumerate(headers[1:], start=1):
        if h != first:
            raise ValueError(
                f"payloads of mixed codecs or numels: payload 0 is {first.describe()}, "
                f"payload {w} is {h.describe()}")
    return first
