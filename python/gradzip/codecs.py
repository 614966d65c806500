"""Codecs: named, immutable configurations of gradzip's fused ops.

A :class:`Codec` says how one rank turns a gradient into a payload ("int8", "int4", "int2",
"sign" or "topk") and how payloads are decoded back. It holds no tensors, so it can be
compared, hashed, printed and pickled; the collectives in :mod:`gradzip.comm` and the DDP
hook in :mod:`gradzip.ddp` take one.

Spec strings::

    "int8" | "int4" | "int2" | "sign"                   dense codecs (8, 4, 2, 1 bits)
    "topk:0.01" | "topk:1%"                             top-k, a fraction of the elements
    "topk:k=1000" | "topk:1000"                         top-k, a count of elements
    "int4,block=256,rounding=stochastic"                options after commas
    "topk:0.01,values=bf16,exact=false"

A top-k amount is read by how it is written, never by its size: a fraction has a decimal
point or exponent and lies in (0, 1) (``0.02``, ``1e-3``), or is a percentage in (0, 100)
(``2%``); a count is a whole number (``k=2``, or plainly ``2``). So ``topk:2`` is two
entries and ``topk:2%`` is two percent; ``topk:2.0``, ``topk:150%`` and ``topk:k=0.5`` are
errors that say how to write either. ``str(codec)`` writes a count as ``topk:k=N``.

``str(codec)`` gives the canonical spec back (options that differ from the defaults only),
and ``Codec(str(codec)) == codec``.
"""

from __future__ import annotations

import decimal
import functools
import math
from dataclasses import dataclass

import torch

from . import _checks
from . import format as fmt

DENSE_KINDS = {"int8": 8, "int4": 4, "int2": 2, "sign": 1}
KINDS = (*DENSE_KINDS, "topk")
VALUES = tuple(fmt.VALUE_FORMATS)

_DEFAULTS = {"block": 128, "rounding": "nearest", "values": "fp32", "exact": True,
             "backend": "auto"}
_OPTIONS = ("k", *_DEFAULTS)
_DENSE_ONLY = ("block", "rounding")
_TOPK_ONLY = ("values", "exact")


def _parse_bool(text: str, name: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"codec option {name}={text!r} is not a boolean (true/false)")


_AMOUNT_HINT = ("write a fraction as 'topk:0.02' or 'topk:2%', a count of entries as "
                "'topk:k=2'")


def _parse_count(text: str) -> int:
    """The value of ``k=``: a count of entries (a whole number)."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    raise ValueError(f"top-k count k={t!r} is not a whole number: k= takes a count of "
                     f"entries; {_AMOUNT_HINT}")


def _parse_k(text: str) -> int | float:
    """The amount after ``topk:``. '1000' / 'k=1000' -> count 1000; '0.01' / '1e-3' -> a
    fraction; '1%' -> the fraction 0.01 (decimal arithmetic, rounded once)."""
    t = text.strip()
    name, eq, count = t.partition("=")
    if eq and name.strip().lower() == "k":
        return _parse_count(count)
    if t.isdigit():
        return int(t)
    if t.endswith("%"):
        try:
            pct = decimal.Decimal(t[:-1].strip())
        except decimal.InvalidOperation:
            raise ValueError(f"top-k amount {text!r} is not a percentage; "
                             f"{_AMOUNT_HINT}") from None
        if not (pct.is_finite() and 0 < pct < 100):
            raise ValueError(f"top-k percentage must be in (0%, 100%), got {t!r}; "
                             f"{_AMOUNT_HINT}")
        return float(pct / 100)
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"top-k amount {text!r} is neither a count nor a fraction; "
                         f"{_AMOUNT_HINT}") from None


def _parse_option(opt: str) -> tuple[str, object]:
    """One ``name=value`` part of a spec string, its value converted."""
    key, eq, val = opt.partition("=")
    key = key.strip().lower()
    if not eq or not key:
        raise ValueError(f"codec option {opt!r} must look like name=value")
    if key == "block":
        try:
            return key, int(val)
        except ValueError:
            raise ValueError(f"codec option block={val!r} is not an integer") from None
    if key == "exact":
        return key, _parse_bool(val, key)
    if key == "k":
        return key, _parse_count(val)
    if key in ("rounding", "values", "backend"):
        return key, val.strip().lower()
    raise ValueError(f"unknown codec option {key!r} (known: {', '.join(_OPTIONS)})")


def _split_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``"topk:0.01,values=bf16"`` -> ("topk", {"k": 0.01, "values": "bf16"})."""
    head, *opts = (p.strip() for p in spec.split(","))
    kind, _, ktext = head.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"unknown codec {kind!r}: expected one of {', '.join(KINDS)} "
                         "(e.g. 'int4' or 'topk:0.01')")
    options: dict[str, object] = {}
    if ktext:
        if kind != "topk":
            raise ValueError(f"codec {kind!r} takes no ':' amount (only 'topk:K' does)")
        options["k"] = _parse_k(ktext)
    options.update(_parse_option(opt) for opt in opts)
    return kind, options


def _merge(given: dict[str, object], from_spec: dict[str, object]) -> dict[str, object]:
    """Options from the arguments and from the spec string; given both ways, they must agree."""
    merged = {}
    for f in _OPTIONS:
        v, s = given[f], from_spec.get(f)
        if v is not None and s is not None and v != s:
            raise ValueError(f"codec option {f} given twice with different values: "
                             f"{s!r} in the spec, {v!r} as an argument")
        merged[f] = v if v is not None else s
    return merged


def _dense_fields(kind: str, m: dict) -> dict[str, object]:
    block = m["block"] if m["block"] is not None else _DEFAULTS["block"]
    _checks.check_block(block)
    rounding = m["rounding"] if m["rounding"] is not None else _DEFAULTS["rounding"]
    _checks.check_choice(rounding, _checks.ROUNDINGS, "rounding")
    if kind == "sign" and rounding == "stochastic":
        raise ValueError("stochastic rounding is not defined for the 'sign' codec "
                         "(scaled sign); use rounding='nearest' with error feedback")
    return {"k": None, "block": block, "rounding": rounding, "values": None, "exact": None}


def _topk_fields(m: dict) -> dict[str, object]:
    k = m["k"]
    if k is None:
        raise ValueError("the 'topk' codec needs an amount: 'topk:0.01' or 'topk:1%' "
                         "(a fraction), 'topk:k=1000' (a count)")
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be an int count or a float fraction, got {k!r}")
    if isinstance(k, int):
        if k < 1:
            raise ValueError(f"top-k count must be at least 1, got {k}")
    elif not (math.isfinite(k) and 0.0 < k < 1.0):
        # 1.0 would send everything; excluding it also keeps 'topk:1' (a count of one)
        # and a fraction from ever comparing equal.
        raise ValueError(f"top-k fraction must be in (0, 1), got {k}; {_AMOUNT_HINT}")
    values = m["values"] if m["values"] is not None else _DEFAULTS["values"]
    _checks.check_choice(values, VALUES, "values")
    exact = m["exact"] if m["exact"] is not None else _DEFAULTS["exact"]
    _checks.check_bool(exact, "exact")
    return {"k": k, "block": None, "rounding": None, "values": values, "exact": exact}


def _parse(spec: str, **given: object) -> dict[str, object]:
    """The canonical fields of a :class:`Codec` from a spec string and option arguments."""
    if not isinstance(spec, str):
        raise TypeError(f"codec spec must be a str, got {type(spec).__name__}")
    kind, from_spec = _split_spec(spec)
    merged = _merge(given, from_spec)
    # Options that do not apply to this kind are an error, not silently ignored.
    for f in ("k", *_TOPK_ONLY) if kind != "topk" else _DENSE_ONLY:
        if merged[f] is not None:
            raise ValueError(f"codec option {f!r} does not apply to {kind!r}")
    fields = _topk_fields(merged) if kind == "topk" else _dense_fields(kind, merged)
    backend = merged["backend"] if merged["backend"] is not None else _DEFAULTS["backend"]
    _checks.check_choice(backend, _checks.BACKENDS, "backend")
    return {"name": kind, **fields, "backend": backend}


@dataclass(frozen=True, init=False)
class Codec:
    """How a gradient is compressed for communication.

    Build it from a spec string (``Codec("int4")``, ``Codec("topk:0.01,values=bf16")``) or
    from arguments (``Codec("topk", k=0.01, values="bf16")``). Options given both ways must
    agree. The fields hold the canonical values (defaults filled in, None where an option
    does not apply to the kind).

    Args:
        name: "int8", "int4", "int2", "sign" or "topk", optionally with a ``:amount`` (top-k)
            and ``,option=value`` parts (see the module docstring).
        k: top-k only: a count (int >= 1) or a fraction of the elements (float in (0, 1)).
            A count larger than a tensor is clamped to its numel. In a spec string a
            fraction is written ``topk:0.02`` or ``topk:2%`` and a count ``topk:k=2`` (or
            ``topk:2``); ``topk:2.0`` is an error, not a guess.
        block: dense only: elements per scale, a power of two in [32, 4096] (default 128).
        rounding: dense only: "nearest" (half to even, default) or "stochastic" (unbiased;
            not defined for "sign").
        values: top-k only: how the chosen values travel, "fp32" (default), "bf16" or "int8".
        exact: top-k only: exact selection (default) or the sampled-threshold approximation.
        backend: which kernels run the ops: "auto" (default), "cpu", "cuda", "triton" or
            "torch" (the reference). Not part of the wire format: ranks may differ in it.

    Raises:
        ValueError: an unknown codec or option, or an option that does not apply.
    """

    name: str
    k: int | float | None
    block: int | None
    rounding: str | None
    values: str | None
    exact: bool | None
    backend: str

    def __init__(self, name: str, k: float | None = None, block: int | None = None,
                 rounding: str | None = None, values: str | None = None,
                 exact: bool | None = None, backend: str | None = None) -> None:
        fields = _parse(name, k=k, block=block, rounding=rounding, values=values, exact=exact,
                        backend=backend)
        # Parsed before anything is stored: each field is set once, as a frozen
        # dataclass's own __init__ does.
        for field, value in fields.items():
            object.__setattr__(self, field, value)

    # ---- description ------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec of what goes on the wire (everything but ``backend``)."""
        if self.is_sparse:
            head = f"topk:k={self.k}" if isinstance(self.k, int) else f"topk:{self.k!r}"
            opts = [f"values={self.values}"] if self.values != "fp32" else []
            if not self.exact:
                opts.append("exact=false")
        else:
            head = self.name
            opts = [f"block={self.block}"] if self.block != _DEFAULTS["block"] else []
            if self.rounding != "nearest":
                opts.append(f"rounding={self.rounding}")
        return ",".join([head, *opts])

    def __str__(self) -> str:
        return self.spec + (f",backend={self.backend}" if self.backend != "auto" else "")

    def __repr__(self) -> str:
        return f"Codec({str(self)!r})"

    @property
    def is_sparse(self) -> bool:
        """True for top-k (sparse payloads), False for the dense codecs."""
        return self.name == "topk"

    @property
    def bits(self) -> int | None:
        """Bits per element of a dense codec (8, 4, 2, 1), None for top-k."""
        return DENSE_KINDS.get(self.name)

    @property
    def alignment(self) -> int:
        """Granularity in elements at which a tensor may be split into independent chunks
        whose payloads decode to the same values as the whole (the block for dense codecs)."""
        return self.block if not self.is_sparse else 1

    # ---- sizes --------------------------------------------------------------------------
    def k_for(self, numel: int) -> int:
        """Top-k: the number of entries kept out of ``numel`` (1 <= k <= numel).

        A fraction keeps ``round(fraction * numel)`` entries (at least one); a count is
        clamped to ``numel``.
        """
        if not self.is_sparse:
            raise ValueError(f"k_for applies to top-k codecs, not {self.name!r}")
        if numel < 1:
            raise ValueError("a top-k codec needs at least one element")
        if isinstance(self.k, int):
            return min(self.k, numel)
        return max(1, min(numel, round(self.k * numel)))

    def header(self, numel: int, k: int | None = None) -> fmt.Header:
        """The payload header every rank expects for a tensor of ``numel`` elements
        (``k`` overrides the top-k count, as in :meth:`compress`)."""
        if self.is_sparse:
            return fmt.topk_header(numel, k if k is not None else self.k_for(numel),
                                   fmt.VALUE_FORMATS[self.values], approximate=not self.exact)
        return fmt.dense_header(numel, self.bits, self.block,
                                stochastic=self.rounding == "stochastic")

    def compressed_size(self, numel: int) -> int:
        """Payload bytes for one tensor of ``numel`` elements (0 for an empty tensor,
        which is never sent)."""
        _checks.check_nonnegative_int(numel, "numel")
        if numel == 0:
            return 0
        return self.header(numel).total_bytes

    # ---- the ops, configured ---------------------------------------------------------------
    def compress(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                 seed: int = 0, k: int | None = None, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """Compress ``x`` (at least one element) into a payload; ``residual`` (float32,
        ``x.numel()`` elements) is updated in place for error feedback. ``seed`` drives
        stochastic rounding and the approximate top-k sample. ``k`` overrides the top-k
        count for this call (the alltoall algorithm splits k over chunks). ``out``: a
        caller-owned uint8 buffer of exactly the payload's size to write into and return
        (see :func:`gradzip.quantize_pack`)."""
        from . import ops

        if self.is_sparse:
            return ops.topk_select(x, k if k is not None else self.k_for(x.numel()), residual,
                                   exact=self.exact, values=self.values, seed=seed,
                                   backend=self.backend, out=out)
        return ops.quantize_pack(x, self.bits, self.block, residual, rounding=self.rounding,
                                 seed=seed, backend=self.backend, out=out)

    def decompress_accumulate(self, payloads: torch.Tensor, out: torch.Tensor,
                              alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha * sum_w decode(payloads[w])`` with this codec's backend."""
        from . import ops

        return ops.dequantize_accumulate(payloads, out, alpha, backend=self.backend)

    def decompress_into(self, payloads: torch.Tensor, out: torch.Tensor,
                        alpha: float = 1.0) -> torch.Tensor:
        """``out = alpha * sum_w decode(payloads[w])`` (``out``'s old contents unread):
        the same bits as zeroing ``out`` and :meth:`decompress_accumulate`."""
        from . import ops

        return ops._dequantize_into(payloads, out, alpha, backend=self.backend)


@functools.lru_cache(maxsize=256)
def _parsed(spec: str) -> Codec:
    return Codec(spec)


def as_codec(codec: Codec | str) -> Codec:
    """A :class:`Codec` from a Codec or a spec string (parsed once per spec: a Codec is
    immutable, so the per-call hot path of all_reduce does not re-parse it)."""
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str):
        return _parsed(codec)
    raise TypeError(f"codec must be a gradzip.Codec or a spec string, got {type(codec).__name__}")


__all__ = ["KINDS", "Codec", "as_codec"]
