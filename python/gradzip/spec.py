"""Spec constants and rules that production code and the reference share.

The counter-based hash behind stochastic rounding, the approximate top-k sample and the
seeds of :mod:`gradzip.comm` is defined here, once, together with the two numbers of the
approximate top-k rule (how many positions are sampled, which sampled rank becomes the
threshold). :mod:`gradzip.reference` (the executable specification), the Triton kernels
and the communication layer import them from here, so no production module depends on
the reference. ``csrc/core/quant.h`` mirrors this module for the C++ and CUDA kernels.

All hash arithmetic is on uint32 values held in Python ints or int64 tensors.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF

#: XORed into the seed before it is hashed (the 32-bit golden ratio), so that seed 0 does
#: not hash from 0.
SEED_GOLDEN = 0x9E3779B9

#: Sampled elements for the approximate top-k threshold.
SAMPLE_SIZE = 16384


def _mul32(a: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """(a * c) mod 2**32 for 0 <= a, c < 2**32, without int64 overflow."""
    lo = a * (c & 0xFFFF)
    hi = (a * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def lowbias32(x):
    """A 32-bit integer finaliser (xorshift-multiply, constants from C. Wellons' hash-prospector)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def seed_key(seed: int) -> int:
    """k1 = lowbias32(seed ^ SEED_GOLDEN): the per-seed part of :func:`hash32`, which kernels
    compute once on the host."""
    return lowbias32((seed ^ SEED_GOLDEN) & MASK32)


def hash32(seed: int, index: torch.Tensor) -> torch.Tensor:
    """uint32 hash of (seed, index) for 0 <= seed < 2**32 and int64 indices >= 0."""
    lo = index & MASK32
    hi = index >> 32
    k1 = seed_key(seed)
    k2 = lowbias32(hi ^ k1)
    return lowbias32((lowbias32(lo ^ k2) + k1) & MASK32)


def uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1): the top 24 bits of hash32, times 2**-24 (exact)."""
    return (hash32(seed, index) >> 8).to(torch.float32) * (2.0**-24)


def sample_count(n: int) -> int:
    """How many positions the approximate top-k samples out of ``n`` elements."""
    return min(n, SAMPLE_SIZE)


def approximate_rank(n: int, k: int) -> int:
    """Rank (1-based) in the sorted sample whose key becomes the candidate threshold:
    ceil(1.25 * k * S / n) + 16, at most S — a margin so that the candidates nearly
    always number at least k."""
    s = sample_count(n)
    return min(s, (5 * k * s + 4 * n - 1) // (4 * n) + 16)


__all__ = [
    "MASK32",
    "SAMPLE_SIZE",
    "SEED_GOLDEN",
    "approximate_rank",
    "hash32",
    "lowbias32",
    "sample_count",
    "seed_key",
    "uniform",
]
