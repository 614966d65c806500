"""Argument validation shared by every backend (C++ ops, Triton, reference) and the fake kernels.

One place, so that every backend refuses the same bad input with the same message.
The C++ kernels repeat the checks that guard memory safety (csrc/core/checks.h) for
callers who reach ``torch.ops.gradzip.*`` directly.
"""

from __future__ import annotations

import torch

from . import format as fmt

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROUNDINGS = ("nearest", "stochastic")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    # Fake tensors under torch.compile have no storage to compare.
    if (not torch.compiler.is_compiling() and x.numel() > 0
            and residual.data_ptr() == x.data_ptr()):
        raise ValueError("residual must not share memory with x")


def check_quantize(x, bits, block, residual, rounding, seed) -> None:
    check_tensor(x)
    if not _is_int(bits) or bits not in fmt.DENSE_BITS:
        raise ValueError(f"bits must be one of {fmt.DENSE_BITS}, got {bits!r}")
    if not _is_int(block) or not (fmt.MIN_BLOCK <= block <= fmt.MAX_BLOCK) \
            or block & (block - 1):
        raise ValueError(
            f"block must be a power of two in [{fmt.MIN_BLOCK}, {fmt.MAX_BLOCK}], got {block!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
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
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
    if values not in fmt.VALUE_FORMATS:
        raise ValueError(f"values must be one of {tuple(fmt.VALUE_FORMATS)}, got {values!r}")
    check_seed(seed)
    check_residual(residual, x)


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
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"out must be float32, float16 or bfloat16, got {out.dtype}")
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
