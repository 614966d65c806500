"""The one timing helper every gradzip benchmark uses.

``measure(fn)`` runs ``fn`` a few times to warm up (allocator, caches, lazy init), then
times ``repeat`` calls with a synchronising timer — CUDA events on the current stream for
CUDA work, ``time.perf_counter`` otherwise — and reports the median, which is robust to
the odd slow run on a shared machine. ``threads(n)`` pins ``torch.set_num_threads`` for a
block of measurements and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Wall times of one measured function, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    def gbps(self, nbytes: int) -> float:
        """Bandwidth in GB/s (1e9 bytes) of ``nbytes`` moved per call, at the median."""
        return nbytes / (self.median_ms * 1e-3) / 1e9


def measure(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1,
            device: torch.device | str | None = None,
            setup: Callable[[], object] | None = None) -> Timing:
    """Median-of-``repeat`` timing of ``fn()`` after ``warmup`` untimed calls.

    ``device``: when it is a CUDA device the calls are timed with CUDA events recorded on
    the current stream (so only GPU time between them counts) and synchronised; otherwise
    with ``time.perf_counter``. ``setup`` (untimed) runs before every call, e.g. to restore
    an in-place argument.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = dev.type == "cuda"
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    if cuda:
        torch.cuda.synchronize(dev)
    out = Timing()
    for _ in range(repeat):
        if setup is not None:
            setup()
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.samples_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.samples_ms.append((time.perf_counter() - t0) * 1e3)
    return out


def timed_call(fn: Callable[[], object], *,
               device: torch.device | str | None = None) -> tuple[object, float]:
    """``(fn(), milliseconds)`` for one call, with the same synchronising timer as
    ``measure``: for a slow call whose result is also needed (e.g. a correctness check)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (no change when ``n`` is None)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def memcpy_gbps(nbytes: int, *, device: torch.device | str = "cpu", repeat: int = 5,
                warmup: int = 1) -> float:
    """Copy bandwidth of an ``nbytes`` buffer in logical bytes (read + write) per second.

    The same-run reference every kernel's GB/s is compared with: ``dst.copy_(src)`` is
    torch's parallel memcpy, so it honours the current ``torch.set_num_threads``.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), repeat=repeat, warmup=warmup, device=device)
    return t.gbps(2 * src.numel() * 4)
