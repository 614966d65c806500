"""Compressed all-reduce over ``torch.distributed`` (Gloo for CPU tensors, NCCL for CUDA).

One call of :func:`all_reduce` reads top to bottom: check the arguments, plan
(:mod:`.plan`: which algorithm, which chunks; for ``"auto"`` a measured choice,
:mod:`.autotune`), take the residuals (:mod:`.feedback`), agree with the other ranks
(:mod:`.agreement`: a mismatch is the same ``ValueError`` on every rank, never a hang),
run one algorithm (:mod:`.algorithms`: plain, allgather, alltoall, over the few collectives
in :mod:`.collectives`), and complete. State that belongs to a process group (verified
signatures, tuners) lives in :mod:`.groups`, tied to the group object.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.distributed as dist

from .. import _checks
from ..codecs import Codec, as_codec
from .agreement import (
    STATUS_OK,
    STATUS_REFUSED,
    VERIFY_MODES,
    exchange_fingerprints,
    fingerprint,
    resolve_mode,
)
from .algorithms import ALGORITHM_FUNCTIONS, Call, PhaseTimer
from .autotune import AUTO_CLEAR, AUTO_FIRST_LOOK, AUTO_PROBES, Probe, Tuner, tuner_key
from .collectives import completed
from .feedback import ErrorFeedback, ServerLayout, key_hash, stochastic_seed
from .groups import all_group_states, group_state
from .plan import (
    ALGORITHMS,
    DEFAULT_MIN_NUMEL,
    DEFAULT_PIPELINE,
    Pipeline,
    Plan,
    alltoall_chunks,
    pipeline_segments,
    plan,
)


def all_reduce(
    tensor: torch.Tensor,
    codec: Codec | str,
    *,
    state: ErrorFeedback | None = None,
    group: dist.ProcessGroup | None = None,
    algorithm: str = "auto",
    average: bool = True,
    async_op: bool = False,
    key: Hashable | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
    verify: str = "auto",
    seed: int = 0,
    timings: dict[str, float] | None = None,
    pipeline: Pipeline = DEFAULT_PIPELINE,
) -> torch.Tensor | torch.futures.Future:
    """All-reduce ``tensor`` in place across ``group`` through compressed payloads.

    Args:
        tensor: float32/float16/bfloat16 tensor of any shape (contiguous or not), CPU for
            Gloo or CUDA for NCCL. Overwritten with the (averaged) sum, bit-identical on
            every rank.
        codec: a :class:`gradzip.Codec` or spec string ("int8", "int4", "topk:0.01", ...).
        state: an :class:`ErrorFeedback` reused across calls; None for no error feedback.
        group: process group (default: the world).
        algorithm: "auto", "allgather", "alltoall" or "plain" (:mod:`gradzip.comm.plan`,
            :mod:`gradzip.comm.algorithms`, :mod:`gradzip.comm.autotune`).
        average: divide the sum by the group size.
        async_op: return a ``torch.futures.Future`` whose value is ``tensor`` once reduced
            (only the last collective is left running; the decode runs in its callback).
        key: names the residual slot in ``state`` (default: the tensor's shape and dtype).
            Give distinct keys to distinct tensors of one shape.
        min_numel: with "auto", tensors with fewer elements take the plain all-reduce.
        verify: "auto", "always", "once" or "never": how often ranks check that they agree
            (:mod:`gradzip.comm.agreement`).
        seed: base of the stochastic-rounding seeds when ``state`` is None (with a state,
            its seed and step counter are used). Seeds always differ per rank.
        timings: if a dict, wall seconds of this call are added to its "verify", "compress",
            "communicate" and "decompress" entries.
        pipeline: how "alltoall" cuts large tensors into overlapping segments.

    Returns:
        ``tensor`` (``async_op=False``) or a Future holding it.

    Raises:
        ValueError: ranks disagree on codec, numel, dtype, algorithm or format version, or
            a received payload header does not match (raised on every rank together);
            bad arguments.
        TypeError: a tensor of another dtype.
        RuntimeError: from torch.distributed, e.g. a peer died (within the group's timeout).
    """
    codec = as_codec(codec)
    rank, world = _check_arguments(tensor, state, group, algorithm, min_numel, verify, seed,
                                   pipeline)
    timer = PhaseTimer(timings)
    # 1. Plan. A rank that refuses its input still takes part in the agreement below, so
    #    that its peers raise too instead of waiting for it in the next collective.
    local_error = _input_error(tensor)
    p = None if local_error else plan(codec, tensor.numel(), tensor.dtype, world, algorithm,
                                      min_numel, pipeline)
    probe = _auto_probe(p, algorithm, group, codec, tensor, average, world)
    # 2. Residuals, for a call that will compress.
    compresses = p is not None and p.algorithm != "plain" and not (probe and probe.plain)
    if state is not None and key is None:
        key = (tuple(tensor.shape), str(tensor.dtype))
    if state is not None and compresses:
        try:
            state.worker_residual(key, tensor.numel(), tensor.device)
        except ValueError as e:
            local_error = e
    # 3. Agreement: every rank raises together.
    mode = resolve_mode(verify, tensor.device)
    _agree(mode, codec, tensor, p, average, group, world, local_error, timer)
    if tensor.numel() == 0:
        return completed(tensor) if async_op else tensor
    # 4. Run one algorithm.
    if probe is not None:
        p = probe.plan(group, tensor.device)
    with torch.no_grad():
        flat = tensor.detach().reshape(-1) if tensor.is_contiguous() \
            else tensor.detach().contiguous().view(-1)
        if p.algorithm == "plain" and probe is not None and probe.tuner.choice is p:
            _hand_over(state, key, flat)
        call = Call(flat, p, codec, group, rank, world, average,
                    state if p.algorithm != "plain" else None, key,
                    state.seed if state is not None and p.algorithm != "plain" else seed,
                    mode == "always", timer)
        finish = ALGORITHM_FUNCTIONS[p.algorithm](call)
    # 5. Complete: decode, copy back into a non-contiguous tensor, stop the probe's clock.

    def complete(_=None) -> torch.Tensor:
        with torch.no_grad():
            finish()
            if flat.data_ptr() != tensor.data_ptr() or not tensor.is_contiguous():
                tensor.copy_(flat.view(tensor.shape))
        if probe is not None:
            probe.end()
        return tensor

    if not async_op:
        with timer("communicate"):
            finish.wait()
        return complete()
    return finish.future().then(complete)


def _check_arguments(tensor, state, group, algorithm, min_numel, verify, seed, pipeline
                     ) -> tuple[int, int]:
    """Arguments that are wrong on this rank alone, before any collective: (rank, world)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    _checks.check_choice(algorithm, ALGORITHMS, "algorithm")
    _checks.check_choice(verify, VERIFY_MODES, "verify")
    if state is not None and not isinstance(state, ErrorFeedback):
        raise TypeError(f"state must be a gradzip.ErrorFeedback or None, got "
                        f"{type(state).__name__}")
    _checks.check_nonnegative_int(min_numel, "min_numel")
    _checks.check_seed(seed)
    if not isinstance(pipeline, Pipeline):
        raise TypeError(f"pipeline must be a gradzip.comm.Pipeline, got "
                        f"{type(pipeline).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("gradzip.all_reduce needs an initialised torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0 or world < 1:
        raise ValueError("this process is not a member of the given process group")
    return rank, world


def _input_error(tensor: torch.Tensor) -> Exception | None:
    """What is wrong with this rank's tensor (raised after the agreement, on every rank)."""
    if tensor.layout != torch.strided:
        return TypeError(f"gradzip.all_reduce needs a dense (strided) tensor, got layout "
                         f"{tensor.layout}")
    if tensor.dtype not in _checks.FLOAT_DTYPES:
        return TypeError(f"gradzip.all_reduce needs a float32, float16 or bfloat16 tensor, "
                         f"got {tensor.dtype}")
    return None


def _auto_probe(p: Plan | None, algorithm: str, group, codec: Codec, tensor: torch.Tensor,
                average: bool, world: int) -> Probe | None:
    """With "auto" and a compressed plan: this call's probe of its signature's tuner."""
    if p is None or algorithm != "auto" or p.algorithm == "plain":
        return None
    tuners = group_state(group).tuners
    tkey = tuner_key(codec.spec, tensor.numel(), tensor.dtype, average, world)
    tuner = tuners.get(tkey)
    if tuner is None or tuner.compressed != p:
        tuner = tuners[tkey] = Tuner(p)
    return tuner.begin(tensor.device)


def _agree(mode: str, codec: Codec, tensor: torch.Tensor, p: Plan | None, average: bool,
           group, world: int, local_error: Exception | None, timer: PhaseTimer) -> None:
    if mode != "never":
        fp = fingerprint(codec, tensor.numel(), tensor.dtype, p, average,
                         STATUS_OK if local_error is None else STATUS_REFUSED)
        verified = group_state(group).verified
        if mode == "always" or fp not in verified or local_error:
            with timer("verify"):
                exchange_fingerprints(fp, tensor.device, group, world, local_error)
            verified.add(fp)
    if local_error:
        raise local_error


def _hand_over(state: ErrorFeedback | None, key: Hashable, flat: torch.Tensor) -> None:
    """"auto" settled on plain: add what compression held back (the plain sum is exact)
    and forget it. A plain probe leaves it for the next compressed call."""
    if state is not None and key in state:
        flat.add_(state.pending(key).to(flat.dtype))
        state.drop(key)


def auto_choice(tensor_or_numel, codec: Codec | str, *, dtype: torch.dtype | None = None,
                group: dist.ProcessGroup | None = None, average: bool = True
                ) -> dict | None:
    """What ``algorithm="auto"`` settled on for this signature, or None while it is still
    measuring (or never saw it). Returns ``{"algorithm": ..., "compressed_algorithm": ...,
    "compressed_s": ..., "plain_s": ...}`` with the rank-averaged median times it compared
    (seconds)."""
    codec = as_codec(codec)
    if isinstance(tensor_or_numel, torch.Tensor):
        numel, dtype = tensor_or_numel.numel(), tensor_or_numel.dtype
    else:
        numel, dtype = int(tensor_or_numel), dtype or torch.float32
    key = tuner_key(codec.spec, numel, dtype, average, dist.get_world_size(group))
    tuner = group_state(group).tuners.get(key)
    return None if tuner is None else tuner.report()


def reset_auto() -> None:
    """Forget every choice "auto" has settled on, in every group; the next calls measure
    again. Call it on every rank at the same point."""
    for gs in all_group_states():
        gs.tuners.clear()


__all__ = [
    "ALGORITHMS",
    "AUTO_CLEAR",
    "AUTO_FIRST_LOOK",
    "AUTO_PROBES",
    "DEFAULT_MIN_NUMEL",
    "DEFAULT_PIPELINE",
    "VERIFY_MODES",
    "ErrorFeedback",
    "Pipeline",
    "Plan",
    "ServerLayout",
    "all_reduce",
    "alltoall_chunks",
    "auto_choice",
    "key_hash",
    "pipeline_segments",
    "plan",
    "reset_auto",
    "stochastic_seed",
]
