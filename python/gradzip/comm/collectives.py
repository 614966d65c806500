"""The few ``torch.distributed`` calls gradzip makes, in the form that works on Gloo and NCCL.

Only ``all_gather_into_tensor`` (NCCL; Gloo: an ``all_to_all_single``, see
:func:`all_gather`), ``all_to_all_single`` and ``all_reduce(SUM)`` carry gradzip's
payloads and its agreement checks. Gloo emulates ``reduce_scatter`` with an all-reduce
(twice the traffic) and has no ``ReduceOp.AVG``. The uncompressed reduce-scatter uses the
backend's own where it is native (NCCL).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.14 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single; gradzip
# supports both spellings.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) \
    or dist.reduce_scatter_tensor


def all_gather(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool, staging=None):
    """``out`` (W * inp.numel()) = every rank's ``inp``, in rank order.

    On the GPU (NCCL) the backend's all-gather. On the CPU (Gloo) one ``all_to_all_single``
    of ``inp`` repeated W times (in a buffer of ``staging``, a :class:`.buffers.Staging`,
    when given): every rank sends to every other at once, where Gloo's all-gather is a ring
    of W-1 steps, each waiting for the previous hop's receiver to be scheduled and forward
    it. With 4 ranks on 2 cores that wait is what a compressed call loses: the small
    agreement message took 2.1-2.8 ms against 3.7 (2 ranks: 0.10 against 0.22 ms), and
    a 64 MiB top-k 1 % all-reduce on the 1 Gbit/s link, whose pieces each wait for the
    slowest rank, about 6 ms of 150 (docs/results.md). The copies cost W payloads of
    memory traffic, far below what the wire takes for them."""
    if inp.is_cuda:
        return _all_gather_single(out, inp, group=group, async_op=async_op)
    world = out.numel() // max(inp.numel(), 1)
    if staging is None:
        send = inp.repeat(world)
    else:
        send = staging.bytes(world, inp.numel())
        send.copy_(inp.view(1, -1).expand(world, -1))
    return dist.all_to_all_single(out, send.view(-1), group=group, async_op=async_op)


def all_gather_small(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """:func:`all_gather` of the few bytes of an agreement, blocking."""
    all_gather(out, inp, group, async_op=False)


def all_to_all(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool):
    """Row i of ``inp`` goes to rank i; row j of ``out`` comes from rank j."""
    return dist.all_to_all_single(out, inp, group=group, async_op=async_op)


def all_reduce_sum(t: torch.Tensor, group, async_op: bool):
    return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def reduce_scatter_sum(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool):
    """The backend's own reduce-scatter where it has one (NCCL), else None: Gloo emulates
    it with an all-reduce of the whole input, which sends twice the bytes of an
    all-to-all of the shards."""
    if dist.get_backend(group) != "nccl":
        return None
    return _reduce_scatter_single(out, inp, op=dist.ReduceOp.SUM, group=group,
                                  async_op=async_op)


def completed(value: torch.Tensor) -> torch.futures.Future:
    """A future that already holds ``value`` (CUDA-aware for a CUDA tensor)."""
    fut: torch.futures.Future = torch.futures.Future(
        devices=[value.device] if value.is_cuda else None)
    fut.set_result(value)
    return fut
