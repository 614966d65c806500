"""The executable specification of gradzip's three fused ops and of their payloads.

Pure PyTorch, written to be read. Every backend (C++ CPU, CUDA, Triton) must produce
byte-identical payloads and bit-identical residuals to these functions. The arithmetic is
pinned down so that it can be reproduced exactly: float32 throughout, each operation
rounded on its own (no fused multiply-add), one correctly rounded division per block.

Shared definitions
------------------
``v = float32(x) + residual`` (or ``float32(x)`` without error feedback), flattened.

Error feedback: where ``v - decode(payload)`` is finite it becomes the new residual;
where it is not (a block or entry holding inf/NaN) the old residual is kept, so a step
that GradScaler skips does not poison later steps.

Random numbers (stochastic rounding, top-k sampling) come from ``uniform(seed, i)``, a
counter-based hash of the seed and the element's flat index, so every backend and every
thread layout draws the same number for the same element. The hash (``lowbias32``,
``hash32``, ``uniform``), the sample size and the threshold rank of approximate top-k
(``SAMPLE_SIZE``, ``approximate_rank``) are defined in :mod:`gradzip.spec`, which the
kernels share, and are part of this module's namespace.
"""

from __future__ import annotations

import torch

from . import format as fmt
from .spec import (  # the hash and the approximate top-k rule, shared with the kernels
    SAMPLE_SIZE,
    approximate_rank,
    hash32,
    lowbias32,
    uniform,
)

# ---------------------------------------------------------------------------------------
# quantize_pack
# ---------------------------------------------------------------------------------------


def _flat_v(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    v = x.reshape(-1).to(torch.float32)
    if residual is not None:
        v = v + residual.reshape(-1)
    return v.clone()


def _update_residual(residual: torch.Tensor | None, v: torch.Tensor, dec: torch.Tensor):
    if residual is None:
        return
    new = v - dec
    flat = residual.view(-1)
    flat.copy_(torch.where(torch.isfinite(new), new, flat))


def _blocks(v: torch.Tensor, block: int) -> torch.Tensor:
    """v zero-padded to whole blocks, shape [nblocks, block]."""
    nb = -(-v.numel() // block)
    padded = torch.zeros(nb * block, dtype=torch.float32)
    padded[: v.numel()] = v
    return padded.view(nb, block)


def block_abs_sum(vb: torch.Tensor) -> torch.Tensor:
    """Sum of |v| per block in the one fixed order every backend uses.

    32 lanes: lane j adds elements j, j+32, j+64, ... of the block in increasing order
    (starting from its first element); then the lanes are folded pairwise,
    lane[i] += lane[i + h] for h = 16, 8, 4, 2, 1 (a warp shuffle-down tree).
    Elements past the end of a short last block are +0.0 and change nothing.
    """
    a = vb.abs().view(vb.shape[0], vb.shape[1] // 32, 32)
    lane = a[:, 0, :].clone()
    for s in range(1, a.shape[1]):
        lane = lane + a[:, s, :]
    h = 16
    while h >= 1:
        lane = lane[:, :h] + lane[:, h : 2 * h]
        h //= 2
    return lane[:, 0]


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Element i's code at bit (i*bits) % 8 of byte (i*bits) // 8, least significant first."""
    per = 8 // bits
    n = codes.numel()
    nbytes = (n * bits + 7) // 8
    c = torch.zeros(nbytes * per, dtype=torch.int64)
    c[:n] = codes
    c = c.view(nbytes, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return (c << shifts).sum(dim=1).to(torch.uint8)


def _unpack_codes(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    c = (data.to(torch.int64)[:, None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(-1)[:n]


def canonical_nan(t: torch.Tensor) -> torch.Tensor:
    """Every NaN written into a payload is the canonical quiet NaN (float32 0x7FC00000,
    bfloat16 0x7FC0): NaN bit patterns otherwise depend on the hardware and code path."""
    if not t.is_floating_point():
        return t
    return torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)


def _assemble(header: fmt.Header, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(header.total_bytes, dtype=torch.uint8)
    out[: fmt.HEADER_BYTES] = torch.frombuffer(bytearray(header.pack()), dtype=torch.uint8)
    for name, (off, length) in header.sections().items():
        raw = canonical_nan(parts[name].contiguous()).view(torch.uint8).reshape(-1)
        assert raw.numel() == length, (name, raw.numel(), length)
        out[off : off + length] = raw
    return out


def quantize_pack(
    x: torch.Tensor,
    bits: int,
    block: int = 128,
    residual: torch.Tensor | None = None,
    rounding: str = "nearest",
    seed: int = 0,
) -> torch.Tensor:
    """Reference quantize + bit-pack with error feedback. Returns the uint8 payload.

    Per block of ``v`` (the last one may be short):

    * bits 8, 4, 2 (symmetric absmax, ``qmax = 2**(bits-1) - 1``):
      ``amax = max |v|`` (NaN if any element is NaN), ``scale = amax / qmax``,
      ``inv = qmax / amax``.
      - amax not finite: codes 0, scale stored as computed (inf, or the canonical NaN):
        the block decodes to NaN, so the overflow reaches every rank.
      - amax == 0, or ``inv`` overflows to inf (amax tiny): codes 0, scale stored as 0.
      - otherwise ``t = v * inv``; nearest: ``q = round_half_even(t)``; stochastic:
        ``q = floor(t + uniform(seed, i))``; then ``q = clamp(q, -qmax, qmax)``.
      The code stored is ``q + qmax`` (offset binary, ``bits`` wide).
      Decode: ``q * scale``.
    * bits 1 (scaled sign): ``scale = block_abs_sum(v) / n_block`` (n_block is the
      block's real length); the code bit is 1 where ``v < 0``; decode ``±scale``.
      Stochastic rounding is not defined for 1 bit (ValueError in the public API).
    """
    v = _flat_v(x, residual)
    n = v.numel()
    hdr = fmt.dense_header(n, bits, block, stochastic=(rounding == "stochastic"))
    vb = _blocks(v, block)
    nb = vb.shape[0]
    if bits == 1:
        lengths = torch.full((nb,), float(block))
        if nb:
            lengths[-1] = float(n - (nb - 1) * block)
        scale = block_abs_sum(vb) / lengths
        neg = vb < 0
        codes = neg.to(torch.int64).reshape(-1)[:n]
        dec = torch.where(neg, -scale[:, None], scale[:, None]).reshape(-1)[:n]
    else:
        qmax = float(2 ** (bits - 1) - 1)
        amax = vb.abs().amax(dim=1) if nb else torch.zeros(0)
        nonfinite = ~torch.isfinite(amax)
        # tensor / tensor: one correctly rounded division (a Python number divided by a
        # tensor is evaluated as reciprocal-then-multiply, which rounds twice).
        qmax_t = torch.full_like(amax, qmax)
        inv = qmax_t / amax
        zero = ~nonfinite & ((amax == 0) | torch.isinf(inv))
        scale = torch.where(zero, torch.zeros_like(amax), amax / qmax_t)
        t = vb * inv[:, None]
        if rounding == "stochastic":
            u = uniform(seed, torch.arange(nb * block, dtype=torch.int64)).view(nb, block)
            q = torch.floor(t + u)
        else:
            q = torch.round(t)  # round half to even
        q = torch.clamp(q, -qmax, qmax)
        q = torch.where((zero | nonfinite)[:, None], torch.zeros_like(q), q)
        dec = (q * scale[:, None]).reshape(-1)[:n]
        codes = (q.reshape(-1)[:n] + qmax).to(torch.int64)
    _update_residual(residual, v, dec)
    return _assemble(hdr, {"scales": scale, "codes": _pack_codes(codes, bits)})


# ---------------------------------------------------------------------------------------
# topk_select
# ---------------------------------------------------------------------------------------

CANONICAL_NAN_KEY = 0x7FC00000


def magnitude_key(v: torch.Tensor) -> torch.Tensor:
    """Order key of |v|: the float32 bit pattern with the sign cleared, as int64.

    For non-negative floats the bit pattern is monotonic in the value. Every NaN gets the
    key of the canonical quiet NaN (0x7FC00000, above +inf's 0x7F800000): non-finite
    entries are always selected first, and NaNs tie (lower index first) whatever their
    bit patterns, which differ between hardware.
    """
    key = (v.view(torch.int32).to(torch.int64)) & 0x7FFFFFFF
    return torch.where(torch.isnan(v), torch.full_like(key, CANONICAL_NAN_KEY), key)


def _top_by_key(key: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries of largest key; ties go to the lowest index. Returns sorted indices."""
    order = torch.sort(key, descending=True, stable=True).indices  # idx ascending
    return torch.sort(idx[order[:k]]).values


def sample_positions(n: int, seed: int) -> torch.Tensor:
    """One position per stratum: S = min(n, SAMPLE_SIZE) strata
    ``[floor(j*n/S), floor((j+1)*n/S))``, position ``start + hash32(seed, j) % size``."""
    s = min(n, SAMPLE_SIZE)
    j = torch.arange(s, dtype=torch.int64)
    start = j * n // s
    size = (j + 1) * n // s - start
    return start + hash32(seed, j) % size


def select_indices(v: torch.Tensor, k: int, exact: bool, seed: int) -> torch.Tensor:
    """Sorted int64 indices of the selected entries of flat float32 ``v``.

    exact: the k largest |v|, ties to the lowest index.
    approximate: threshold ``t`` = the ``approximate_rank``-th largest key among the
    sampled positions; candidates are the entries with key >= t. If there are at least
    k candidates the result is the exact top-k (they all lie among the candidates);
    otherwise every candidate plus the lowest-index non-candidates up to k.
    """
    n = v.numel()
    key = magnitude_key(v)
    idx = torch.arange(n, dtype=torch.int64)
    if exact:
        return _top_by_key(key, idx, k)
    skeys = torch.sort(key[sample_positions(n, seed)], descending=True).values
    t = skeys[approximate_rank(n, k) - 1]
    cand = key >= t
    ncand = int(cand.sum())
    if ncand >= k:
        return _top_by_key(key[cand], idx[cand], k)
    fill = idx[~cand][: k - ncand]
    return torch.sort(torch.cat([idx[cand], fill])).values


def _quantize_values_int8(vals: torch.Tensor):
    """One-block symmetric int8 (qmax 127) of the selected values, same rules as dense."""
    amax = vals.abs().amax() if vals.numel() else torch.tensor(0.0)
    nonfinite = not bool(torch.isfinite(amax))
    qmax_t = torch.full_like(amax, 127.0)
    inv = qmax_t / amax  # tensor / tensor: correctly rounded (see quantize_pack)
    if nonfinite:
        scale, q = amax / qmax_t, torch.zeros_like(vals)
    elif amax == 0 or torch.isinf(inv):
        scale, q = torch.tensor(0.0), torch.zeros_like(vals)
    else:
        scale = amax / qmax_t
        q = torch.clamp(torch.round(vals * inv), -127.0, 127.0)
    return q, scale.reshape(1).to(torch.float32)


def topk_select(
    x: torch.Tensor,
    k: int,
    residual: torch.Tensor | None = None,
    exact: bool = True,
    values: str = "fp32",
    seed: int = 0,
) -> torch.Tensor:
    """Reference top-k selection with error feedback. Returns the uint8 payload.

    Indices (ascending) from ``select_indices``; values ``v[idx]`` as float32, as bfloat16
    (round to nearest even), or as int8 codes with one float32 scale (``_quantize_values_int8``).
    The residual becomes ``v - decode(payload)``: zero at selected fp32 entries, the
    rounding error at bf16/int8 ones, ``v`` elsewhere (old residual where non-finite).
    """
    v = _flat_v(x, residual)
    n = v.numel()
    vf = fmt.VALUE_FORMATS[values]
    hdr = fmt.topk_header(n, k, vf, approximate=not exact)
    idx = select_indices(v, k, exact, seed)
    sel = v[idx]
    parts = {}
    if vf == fmt.VALUE_FP32:
        parts["values"], dec_sel = sel, sel
    elif vf == fmt.VALUE_BF16:
        b = sel.to(torch.bfloat16)
        parts["values"], dec_sel = b, b.to(torch.float32)
    else:
        q, scale = _quantize_values_int8(sel)
        parts["values"], parts["value_scale"] = q.to(torch.int8), scale
        dec_sel = q * scale
    itype = torch.int64 if hdr.index_format == fmt.INDEX_INT64 else torch.int32
    parts["indices"] = idx.to(itype)
    dec = torch.zeros(n, dtype=torch.float32)
    dec[idx] = dec_sel
    _update_residual(residual, v, dec)
    return _assemble(hdr, parts)


# ---------------------------------------------------------------------------------------
# decode / dequantize_accumulate
# ---------------------------------------------------------------------------------------


def _section(payload: torch.Tensor, hdr: fmt.Header, name: str, dtype: torch.dtype):
    off, length = hdr.sections()[name]
    return payload[off : off + length].clone().view(dtype)


def dequantize(payload: torch.Tensor) -> torch.Tensor:
    """Decode one payload into a flat float32 tensor of ``numel`` elements."""
    hdr = fmt.parse_header(payload)
    payload = payload.cpu()
    n = hdr.numel
    if hdr.codec == fmt.CODEC_DENSE:
        scales = _section(payload, hdr, "scales", torch.float32)
        codes = _unpack_codes(_section(payload, hdr, "codes", torch.uint8), hdr.bits, n)
        s = scales.repeat_interleave(hdr.block)[:n]
        if hdr.bits == 1:
            return torch.where(codes == 1, -s, s)
        qmax = 2 ** (hdr.bits - 1) - 1
        return (codes - qmax).to(torch.float32) * s
    itype = torch.int64 if hdr.index_format == fmt.INDEX_INT64 else torch.int32
    idx = _section(payload, hdr, "indices", itype).to(torch.int64)
    if bool((idx < 0).any()) or bool((idx >= n).any()):
        raise ValueError("corrupt gradzip top-k payload: index out of range")
    if hdr.k > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError("corrupt gradzip top-k payload: indices not strictly ascending")
    if hdr.value_format == fmt.VALUE_FP32:
        vals = _section(payload, hdr, "values", torch.float32)
    elif hdr.value_format == fmt.VALUE_BF16:
        vals = _section(payload, hdr, "values", torch.bfloat16).to(torch.float32)
    else:
        q = _section(payload, hdr, "values", torch.int8).to(torch.float32)
        vals = q * _section(payload, hdr, "value_scale", torch.float32)
    out = torch.zeros(n, dtype=torch.float32)
    out[idx] = vals
    return out


def dequantize_accumulate(payloads, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha * sum_w decode(payload_w)``, in place; returns ``out``.

    In float32: ``acc = ((0 + d_0) + d_1) + ...`` in payload order, then
    ``out = to_out_dtype(float32(out) + float32(alpha) * acc)`` (round to nearest even).
    """
    rows = list(payloads) if not isinstance(payloads, torch.Tensor) or payloads.dim() == 2 \
        else [payloads]
    fmt.check_compatible([fmt.parse_header(p) for p in rows])
    acc = torch.zeros(out.numel(), dtype=torch.float32)
    for p in rows:
        acc = acc + dequantize(p)
    a32 = torch.tensor(alpha, dtype=torch.float32)
    res = out.reshape(-1).to(torch.float32) + a32 * acc
    out.copy_(res.to(out.dtype).view(out.shape))
    return out


def compressed_bytes_per_element(bits: int, block: int) -> float:
    """Asymptotic payload bytes per element of a dense codec (for size estimates)."""
    return bits / 8 + 4 / block


__all__ = [
    "SAMPLE_SIZE",
    "approximate_rank",
    "block_abs_sum",
    "dequantize",
    "dequantize_accumulate",
    "hash32",
    "lowbias32",
    "magnitude_key",
    "quantize_pack",
    "sample_positions",
    "select_indices",
    "topk_select",
    "uniform",
]
