"""Argument validation shared by every backend (C++ ops, Triton, reference), the fake
kernels, :class:`gradzip.Codec` and the communication layer.

One place, so that every backend refuses the same bad input with the same message, and
one definition of each set of legal values (:data:`BACKENDS`, :data:`ROUNDINGS`,
:data:`FLOAT_DTYPES`). The C++ kernels repeat the checks that guard memory safety
(csrc/core/checks.h) for callers who reach ``torch.ops.gradzip.*`` directly.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch._subclasses.fake_tensor import is_fake

from . import format as fmt

#: Floating dtypes the ops read (x) and accumulate into (out).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Rounding modes of the dense codecs.
ROUNDINGS = ("nearest", "stochastic")
#: Which kernels run an op (see gradzip.ops).
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_choice(value, choices: Collection, name: str) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_nonnegative_int(value, name: str) -> None:
    """ValueError unless ``value`` is an int >= 0 (a bool is not an int here)."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_bool(value, name: str) -> None:
    """TypeError unless ``value`` is a bool (1 and 0 are not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_block(block) -> None:
    if not _is_int(block) or not (fmt.MIN_BLOCK <= block <= fmt.MAX_BLOCK) \
            or block & (block - 1):
        raise ValueError(
            f"block must be a power of two in [{fmt.MIN_BLOCK}, {fmt.MAX_BLOCK}], got {block!r}")


def check_tensor(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def check_seed(seed) -> None:
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


def check_residual(residual, x: torch.Tensor) -> None:
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.dtype != torch.float32:
        raise TypeError(f"residual must be float32, got {residual.dtype}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if residual.numel() != x.numel():
        raise ValueError(
            f"residual has {residual.numel()} elements but x has {x.numel()}; "
            "error feedback needs one residual entry per element")
    if not residual.is_contiguous():
        raise ValueError("residual must be contiguous (it is updated in place)")
    if x.numel() > 0 and has_memory(x) and residual.data_ptr() == x.data_ptr():
        raise ValueError("residual must not share memory with x")


def has_memory(t: torch.Tensor) -> bool:
    # Fake tensors (torch.compile, opcheck, the fake kernels) and meta tensors have no
    # memory to compare: their data_ptr() is 0 for every tensor.
    return not (torch.compiler.is_compiling() or t.is_meta or is_fake(t))


def check_quantize(x, bits, block, residual, rounding, seed) -> None:
    check_tensor(x)
    if not _is_int(bits) or bits not in fmt.DENSE_BITS:  # 8.0 == 8 and True == 1
        raise ValueError(f"bits must be one of {fmt.DENSE_BITS}, got {bits!r}")
    check_block(block)
    check_choice(rounding, ROUNDINGS, "rounding")
    if bits == 1 and rounding == "stochastic":
        raise ValueError(
            "stochastic rounding is not defined for bits=1 (scaled sign); use "
            "rounding='nearest' and rely on error feedback")
    check_seed(seed)
    check_residual(residual, x)


def check_topk(x, k, residual, exact, values, seed) -> None:
    check_tensor(x)
    if not _is_int(k):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > x.numel():
        raise ValueError(f"k={k} is larger than the tensor's {x.numel()} elements")
    check_bool(exact, "exact")
    check_choice(values, fmt.VALUE_FORMATS, "values")
    check_seed(seed)
    check_residual(residual, x)


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes that ``t``'s elements occupy."""
    extent = t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))
    return t.data_ptr(), t.data_ptr() + extent


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the elements of ``a`` and ``b`` may share memory: their byte ranges intersect
    (whatever storages they belong to). False for tensors without memory (fake, meta)."""
    if a.numel() == 0 or b.numel() == 0 or not (has_memory(a) and has_memory(b)):
        return False
    a0, a1 = _byte_span(a)
    b0, b1 = _byte_span(b)
    return a0 < b1 and b0 < a1


def check_payload_out(out, nbytes: int, x: torch.Tensor, residual) -> None:
    """The ``out=`` payload buffer of quantize_pack / topk_select: a 1-D, contiguous uint8
    tensor of exactly ``nbytes`` bytes on x's device that shares no memory with ``x`` or
    ``residual`` (mirrored by csrc/core/checks.h check_payload_out)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != torch.uint8:
        raise TypeError(f"out must be uint8 (a payload buffer), got {out.dtype}")
    if out.dim() != 1:
        raise ValueError(f"out must be 1-D, got shape {tuple(out.shape)}")
    if out.numel() != nbytes:
        raise ValueError(f"out has {out.numel()} bytes but the payload is {nbytes} bytes")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device} but x is on {x.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (the payload is written in place)")
    if may_overlap(out, x):
        raise ValueError("out must not share memory with x")
    if residual is not None and may_overlap(out, residual):
        raise ValueError("out must not share memory with residual")


# The C++ operators take the rounding as a bool and the value format as its id. Their fake
# kernels check through these, so tracing refuses what the kernels would refuse.


def check_quantize_op(x, bits, block, residual, stochastic, seed, out=None) -> None:
    """Arguments of ``torch.ops.gradzip.quantize_pack`` (and of its ``.out`` overload)."""
    check_quantize(x, bits, block, residual, "stochastic" if stochastic else "nearest", seed)
    if out is not None:
        check_payload_out(out, fmt.dense_payload_bytes(x.numel(), bits, block), x, residual)


def check_topk_op(x, k, residual, exact, value_format, seed, out=None) -> None:
    """Arguments of ``torch.ops.gradzip.topk_select`` (and of its ``.out`` overload)."""
    if value_format not in fmt.VALUE_FORMAT_NAMES:
        raise ValueError(f"value_format must be one of {tuple(fmt.VALUE_FORMAT_NAMES)} "
                         f"(fp32, bf16, int8), got {value_format!r}")
    check_topk(x, k, residual, exact, fmt.VALUE_FORMAT_NAMES[value_format], seed)
    if out is not None:
        check_payload_out(out, fmt.topk_header(x.numel(), k, value_format).total_bytes, x,
                          residual)


def check_accumulate_op(payloads, out, alpha) -> None:
    """Arguments of ``torch.ops.gradzip.dequantize_accumulate``, but for the payload headers,
    which are bytes on the device (:func:`check_accumulate_headers` reads them)."""
    if isinstance(payloads, torch.Tensor) and payloads.dim() != 2:
        raise ValueError(f"payloads must be [W, P], got shape {tuple(payloads.shape)}")
    check_accumulate(payload_rows(payloads), out, alpha)


def payload_rows(payloads) -> torch.Tensor:
    """Normalise a [W, P] uint8 tensor, a 1-D payload or a list of payloads to [W, P]."""
    if isinstance(payloads, torch.Tensor):
        if payloads.dtype != torch.uint8:
            raise TypeError(f"payloads must be uint8, got {payloads.dtype}")
        if payloads.dim() == 1:
            return payloads.unsqueeze(0)
        if payloads.dim() != 2:
            raise ValueError(f"payloads must be [W, P] or 1-D, got shape {tuple(payloads.shape)}")
        return payloads
    rows = list(payloads)
    if not rows:
        raise ValueError("dequantize_accumulate needs at least one payload")
    for w, p in enumerate(rows):
        if not isinstance(p, torch.Tensor) or p.dtype != torch.uint8 or p.dim() != 1:
            raise TypeError(f"payload {w} must be a 1-D uint8 tensor")
        if p.device != rows[0].device:
            raise ValueError(f"payload {w} is on {p.device} but payload 0 is on {rows[0].device}")
    sizes = {p.numel() for p in rows}
    if len(sizes) != 1:
        raise ValueError(f"payloads of mixed sizes {sorted(sizes)}: mixed codecs or numels")
    return torch.stack(rows)


def check_accumulate(rows: torch.Tensor, out, alpha) -> None:
    check_tensor(out, "out")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is updated in place)")
    if rows.device != out.device:
        raise ValueError(f"payloads are on {rows.device} but out is on {out.device}")
    if rows.shape[0] < 1:
        raise ValueError("dequantize_accumulate needs at least one payload")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")


def check_accumulate_headers(rows: torch.Tensor, out: torch.Tensor) -> fmt.Header:
    """Parse every payload's header (reads 64 bytes per payload to the host)."""
    heads = rows[:, : fmt.HEADER_BYTES].cpu()
    headers = []
    for w in range(rows.shape[0]):
        try:
            headers.append(fmt.parse_header(heads[w].numpy().tobytes(), length=rows.shape[1]))
        except ValueError as e:
            raise ValueError(f"payload {w}: {e}") from None
    h = fmt.check_compatible(headers)
    if h.numel != out.numel():
        raise ValueError(f"out has {out.numel()} elements but the payloads hold {h.numel}")
    return h
