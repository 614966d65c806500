"""Staging buffers kept across calls: payloads, receive rows and the two-phase sums.

On the CPU every fresh tensor of more than glibc's mmap threshold (at most 32 MiB, less
until it has adapted) is a new mapping that the first writes fault in page by page and
``free`` unmaps again: at 64 MiB of float32 the int8 payloads and receive rows of one call
are some 30 000 page faults, and faults on one address space serialise across threads. A
:class:`BufferPool` keeps the buffers of finished calls and hands them to the next call
that needs the same number of bytes, so the hot path touches no new page. Buffers are
taken per call and given back only when the call has completed (its collectives are done
and its payloads decoded), so calls that overlap (DDP's asynchronous buckets, several of
one size) never share one.

CUDA tensors do not use the pool: the caching allocator already reuses device memory
without faults, and it knows which stream last used a block, which a pool shared by
FSDP's reduce-scatter and all-reduce streams would have to track itself.
"""

from __future__ import annotations

import threading

import torch

MAX_FREE_PER_SIZE = 4  # buffers of one size kept for later calls; more are freed


class BufferPool:
    """uint8 buffers by (device, bytes); thread-safe (an asynchronous call completes in a
    collective's callback thread)."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A 1-D uint8 buffer of ``nbytes`` bytes, contents undefined."""
        with self._lock:
            free = self._free.get((device, nbytes))
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def give(self, buffers: list[torch.Tensor]) -> None:
        """Keep ``buffers`` (taken from this pool, no longer in use) for later calls."""
        with self._lock:
            for b in buffers:
                free = self._free.setdefault((b.device, b.numel()), [])
                if len(free) < MAX_FREE_PER_SIZE:
                    free.append(b)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    def nbytes(self) -> int:
        """Bytes held for later calls."""
        with self._lock:
            return sum(b.numel() for free in self._free.values() for b in free)


class Staging:
    """The buffers of one call: taken from a pool on the CPU, allocated elsewhere, all given
    back by :meth:`release` when the call has completed."""

    def __init__(self, pool: BufferPool | None, device: torch.device) -> None:
        self.pool = pool if device.type == "cpu" else None
        self.device = device
        self.taken: list[torch.Tensor] = []

    def bytes(self, *shape: int, zero: bool = False) -> torch.Tensor:
        """A uint8 tensor of ``shape``; zero-filled when ``zero``, else undefined."""
        n = 1
        for s in shape:
            n *= s
        if self.pool is None:
            t = (torch.zeros if zero else torch.empty)(n, dtype=torch.uint8,
                                                       device=self.device)
        else:
            t = self.pool.take(n, self.device)
            self.taken.append(t)
            if zero:
                t.zero_()
        return t.view(*shape)

    def floats(self, n: int, zero: bool = False) -> torch.Tensor:
        """A float32 tensor of ``n`` elements; zero-filled when ``zero``."""
        return self.bytes(4 * n, zero=zero).view(torch.float32)

    def release(self) -> None:
        if self.pool is not None and self.taken:
            self.pool.give(self.taken)
        self.taken = []


__all__ = ["MAX_FREE_PER_SIZE", "BufferPool", "Staging"]
