"""Deterministic test inputs that look like gradients and stress the quantizers' edge cases."""

from __future__ import annotations

import torch


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grad_like(n: int, dtype: torch.dtype = torch.float32, seed: int = 0,
              device: str = "cpu") -> torch.Tensor:
    """Flat gradient-like values over several decades.

    Magnitudes change every 37 elements (not aligned to any block size) across 10^-3..10^3,
    about 3% of entries are exact zeros, one run of 300 zeros makes all-zero blocks at
    small block sizes, and a few entries repeat their neighbourhood's largest magnitude
    with the opposite sign (ties for amax).
    """
    g = generator(seed)
    x = torch.randn(n, generator=g)
    if n == 0:
        return x.to(dtype=dtype, device=device)
    nseg = -(-n // 37)
    mag = 10.0 ** (torch.rand(nseg, generator=g) * 6 - 3)
    x = x * mag.repeat_interleave(37)[:n]
    x[torch.rand(n, generator=g) < 0.03] = 0.0
    if n > 1000:
        start = int(torch.randint(0, n - 300, (1,), generator=g))
        x[start:start + 300] = 0.0
    for i in torch.randint(0, n, (max(1, n // 500),), generator=g).tolist():
        lo, hi = max(0, i - 16), min(n, i + 16)
        j = lo + int(x[lo:hi].abs().argmax())
        x[i] = -x[j]
    # Values must survive the cast: fp16 tops out at 65504.
    return x.to(dtype=dtype, device=device)


def residual_like(n: int, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    """A float32 residual comparable to what one compression step leaves behind."""
    g = generator(seed)
    r = torch.randn(n, generator=g) * 0.05 * (10.0 ** (torch.rand(n, generator=g) * 4 - 2))
    return r.to(device)


NONCONTIGUOUS = ("transposed", "strided", "sliced", "expanded", "channels_last")


def noncontiguous(kind: str, dtype: torch.dtype, seed: int = 0, device: str = "cpu",
                  scale: int = 1) -> torch.Tensor:
    """A non-contiguous tensor of the given layout; ``scale`` multiplies its size."""
    if kind == "transposed":
        base = grad_like(67 * 31 * scale, dtype, seed, device).view(31 * scale, 67)
        x = base.t()  # [67, 31*scale], strides (1, 67)
    elif kind == "strided":
        x = grad_like(3 * 1001 * scale, dtype, seed, device)[1::3]
    elif kind == "sliced":
        base = grad_like(29 * 73 * scale, dtype, seed, device).view(29 * scale, 73)
        x = base[:, 3:70]  # rows with gaps between them
    elif kind == "expanded":
        x = grad_like(389, dtype, seed, device).expand(3 * scale, 389)  # stride 0
    elif kind == "channels_last":
        x = grad_like(2 * 5 * 7 * 9 * scale, dtype, seed, device).view(2 * scale, 5, 7, 9)
        x = x.to(memory_format=torch.channels_last)
    else:
        raise ValueError(kind)
    assert not x.is_contiguous(), kind
    return x
