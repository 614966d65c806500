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
from dataclasses import dataclass

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
from .algorithms import ALGORITHM_FUNCTIONS, Call, FoldMismatch, PhaseTimer
from .autotune import (
    AUTO_CLEAR,
    AUTO_FIRST_LOOK_ROUNDS,
    AUTO_MARGIN,
    AUTO_PROBES,
    Probe,
    Tuner,
    tuner_key,
)
from .buffers import Staging
from .collectives import completed
from .feedback import ErrorFeedback, ServerLayout, key_hash, stochastic_seed
from .fold import Signature, decoy_error, deviated_error, fold_plan, pads_plain, run_decoy, stood_in
from .groups import GroupState, all_group_states, group_state, rank_and_world
from .plan import (
    ALGORITHMS,
    DEFAULT_MIN_NUMEL,
    DEFAULT_PIPELINE,
    REDUCE_SCATTER_ALGORITHMS,
    Pipeline,
    Plan,
    alltoall_chunks,
    auto_candidates,
    pipeline_segments,
    plan,
    reduce_scatter_plan,
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
            (:mod:`gradzip.comm.agreement`; "always", the CPU default, rides inside the
            call's own collectives once a group's calls repeat: :mod:`gradzip.comm.fold`).
            Must be the same on every rank.
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
    return _run(_Request("all_reduce", tensor, tensor, as_codec(codec), state, group,
                         algorithm, average, async_op, key, min_numel, verify, seed, timings,
                         pipeline))


def reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    codec: Codec | str,
    *,
    state: ErrorFeedback | None = None,
    group: dist.ProcessGroup | None = None,
    algorithm: str = "auto",
    average: bool = False,
    async_op: bool = False,
    key: Hashable | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
    verify: str = "auto",
    seed: int = 0,
    timings: dict[str, float] | None = None,
) -> torch.Tensor | torch.futures.Future:
    """Reduce-scatter ``input`` across ``group`` through compressed payloads: ``output`` =
    the (averaged) sum over ranks of shard ``rank`` of ``input``, where ``input.view(W,
    -1)[r]`` is rank r's shard (the argument order of
    ``torch.distributed.reduce_scatter_tensor``).

    Each rank compresses its W shards (worker error feedback, an input-sized residual in
    ``state``), one ``all_to_all_single`` sends shard r to rank r, and rank r decodes the W
    payloads of its shard with one ``dequantize_accumulate``: phase 1 of the two-phase
    all-reduce. Traffic per rank: (W-1) shard payloads.

    Args:
        output: ``input.numel() // W`` elements of ``input``'s dtype; overwritten.
        input: float32/float16/bfloat16, ``W * output.numel()`` elements; not modified.
        codec, state, group, async_op, key, min_numel, verify, seed, timings: as in
            :func:`all_reduce` (``key`` default: the input's shape and dtype).
        algorithm: "auto" (compressed when it sends fewer bytes than the plain
            reduce-scatter; measured against it as in :func:`all_reduce`), "alltoall" or
            "plain".
        average: divide the sum by the group size.

    Returns:
        ``output`` (``async_op=False``) or a Future holding it.

    Raises:
        ValueError: ranks disagree (codec, sizes, dtype, algorithm, format version), a
            received header does not match, or ``output`` and ``input`` do not fit
            together (raised on every rank together); bad arguments.
        TypeError: a tensor of another dtype.
    """
    return _run(_Request("reduce_scatter", input, output, as_codec(codec), state, group,
                         algorithm, average, async_op, key, min_numel, verify, seed, timings,
                         DEFAULT_PIPELINE))


@dataclass(frozen=True)
class _Request:
    op: str  # "all_reduce" or "reduce_scatter"
    tensor: torch.Tensor  # what is reduced (the input)
    output: torch.Tensor  # where the result goes (the tensor itself for all_reduce)
    codec: Codec
    state: ErrorFeedback | None
    group: dist.ProcessGroup | None
    algorithm: str
    average: bool
    async_op: bool
    key: Hashable | None
    min_numel: int
    verify: str
    seed: int
    timings: dict[str, float] | None
    pipeline: Pipeline

    @property
    def who(self) -> str:
        return f"gradzip.{self.op}"


def _run(r: _Request) -> torch.Tensor | torch.futures.Future:
    """The steps of one collective call, the same for both operations."""
    rank, world, gs = _check_arguments(r)
    tensor, state = r.tensor, r.state
    timer = PhaseTimer(r.timings)
    # 1. Plan. A rank that refuses its input still takes part in the agreement below, so
    #    that its peers raise too instead of waiting for it in the next collective.
    local_error = _input_error(r, world)
    p = None if local_error else _plan(r, world)
    probe = _auto_probe(p, r, world, gs)
    # 2. Residuals, for a call that will compress.
    compresses = p is not None and p.algorithm != "plain" and not (probe and probe.plain)
    key = r.key
    if state is not None and key is None:
        key = (tuple(tensor.shape), str(tensor.dtype))
        key = key if r.op == "all_reduce" else ("reduce_scatter", *key)
    if state is not None and compresses:
        try:
            state.check_key(key, tensor.numel())
        except ValueError as e:
            local_error = e
    # 3. Agreement: every rank raises together (folded into step 4 once calls repeat).
    mode = resolve_mode(r.verify, tensor.device)
    folded, fp = _agree(mode, r, p, probe, world, rank, local_error, timer, gs)
    if tensor.numel() == 0:
        return completed(r.output) if r.async_op else r.output
    # 4. Run one algorithm.
    if probe is not None:
        p = probe.plan(r.group, tensor.device)
    compressed = p.algorithm != "plain"
    # A folded call may still learn that another rank deviated: it changes nothing of the
    # caller's until it knows (comm.fold), so it keeps what it must be able to restore.
    journal = None
    if folded and compressed and state is not None:
        journal = state.journal(key, whole=p.algorithm != "allgather")
    hand_over, drop_key = None, False
    with torch.no_grad():
        flat = _flat(tensor)
        out = None if r.op == "all_reduce" else _flat(r.output)
        if p.algorithm == "plain" and probe is not None and probe.tuner.choice is p:
            if folded:  # as _hand_over, once the call has completed
                drop_key = state is not None and key in state
                hand_over = state.pending(key) if drop_key else None
            else:
                flat = _hand_over(state, key, flat, r.op)
        call = Call(flat, p, r.codec, r.group, rank, world, r.average,
                    state if compressed else None, key,
                    state.seed if state is not None and compressed else r.seed,
                    mode == "always", timer, out, Staging(gs.buffers, tensor.device),
                    fold=folded, hand_over=hand_over, journal=journal,
                    padded=r.op == "all_reduce" and pads_plain(tensor.numel(),
                                                               tensor.element_size(), mode))
        finish = ALGORITHM_FUNCTIONS[r.op, p.algorithm](call)
    # 5. Complete: decode, copy back into a non-contiguous tensor, stop the probe's clock.
    result = r.output
    written = flat if r.op == "all_reduce" else out

    def complete(_=None) -> torch.Tensor:
        with torch.no_grad():
            try:
                finish()
            except FoldMismatch as e:
                call.staging.release()
                if journal is not None:
                    journal.restore()
                raise deviated_error(r.who, e.deviated, fp) from None
            call.staging.release()  # every collective is done and every payload decoded
            if drop_key:
                state.drop(key)
            if written.data_ptr() != result.data_ptr() or not result.is_contiguous():
                result.copy_(written.view(result.shape))
        if probe is not None:
            probe.end()
        return result

    if not r.async_op:
        with timer("communicate"):
            finish.wait()
        return complete()
    return finish.future().then(complete)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a flat contiguous tensor: a view when it can be, else a copy."""
    return t.detach().reshape(-1) if t.is_contiguous() else t.detach().contiguous().view(-1)


def _check_arguments(r: _Request) -> tuple[int, int, GroupState]:
    """Arguments that are wrong on this rank alone, before any collective: (rank, world,
    the group's state)."""
    for name, t in (("tensor", r.tensor), ("output", r.output)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{r.who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    algorithms = ALGORITHMS if r.op == "all_reduce" else REDUCE_SCATTER_ALGORITHMS
    _checks.check_choice(r.algorithm, algorithms, "algorithm")
    _checks.check_choice(r.verify, VERIFY_MODES, "verify")
    if r.state is not None and not isinstance(r.state, ErrorFeedback):
        raise TypeError(f"state must be a gradzip.ErrorFeedback or None, got "
                        f"{type(r.state).__name__}")
    _checks.check_nonnegative_int(r.min_numel, "min_numel")
    _checks.check_seed(r.seed)
    if not isinstance(r.pipeline, Pipeline):
        raise TypeError(f"pipeline must be a gradzip.comm.Pipeline, got "
                        f"{type(r.pipeline).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{r.who} needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    gs = group_state(r.group)
    rank, world = rank_and_world(r.group, gs)
    if rank < 0 or world < 1:
        raise ValueError("this process is not a member of the given process group")
    return rank, world, gs


def _input_error(r: _Request, world: int) -> Exception | None:
    """What is wrong with this rank's tensors (raised after the agreement, on every rank)."""
    for name, t in (("input", r.tensor), ("output", r.output)):
        if t.layout != torch.strided:
            return TypeError(f"{r.who} needs dense (strided) tensors, got {name} of layout "
                             f"{t.layout}")
        if t.dtype not in _checks.FLOAT_DTYPES:
            return TypeError(f"{r.who} needs float32, float16 or bfloat16 tensors, got "
                             f"{name} of {t.dtype}")
    if r.op == "reduce_scatter":
        if r.output.dtype != r.tensor.dtype:
            return TypeError(f"{r.who}: output is {r.output.dtype} but input is "
                             f"{r.tensor.dtype}")
        if r.tensor.numel() != world * r.output.numel():
            return ValueError(f"{r.who}: input has {r.tensor.numel()} elements, which is not "
                              f"{world} ranks x output's {r.output.numel()}")
        if r.output.device != r.tensor.device:
            return ValueError(f"{r.who}: output is on {r.output.device} but input is on "
                              f"{r.tensor.device}")
        if r.output.numel() and r.output.untyped_storage().data_ptr() == \
                r.tensor.untyped_storage().data_ptr():
            return ValueError(f"{r.who}: output must not share memory with input")
    return None


def _plan(r: _Request, world: int) -> Plan:
    numel, dtype = r.tensor.numel(), r.tensor.dtype
    if r.op == "all_reduce":
        return plan(r.codec, numel, dtype, world, r.algorithm, r.min_numel, r.pipeline)
    return reduce_scatter_plan(r.codec, numel, dtype, world, r.algorithm, r.min_numel)


def _auto_probe(p: Plan | None, r: _Request, world: int, gs: GroupState) -> Probe | None:
    """With "auto" and a compressed plan: this call's probe of its signature's tuner."""
    if p is None or r.algorithm != "auto" or p.algorithm == "plain":
        return None
    tuners = gs.tuners
    tkey = tuner_key(r.op, r.codec.spec, r.tensor.numel(), r.tensor.dtype, r.average, world)
    tuner = tuners.get(tkey)
    if tuner is None or tuner.planned != p:
        candidates = (p,) if r.op != "all_reduce" else auto_candidates(
            r.codec, r.tensor.numel(), r.tensor.dtype, world, r.min_numel, r.pipeline)
        tuner = tuners[tkey] = Tuner(p, candidates)
    return tuner.begin(r.tensor.device)


def _agree(mode: str, r: _Request, p: Plan | None, probe: Probe | None, world: int,
           rank: int, local_error: Exception | None, timer: PhaseTimer, gs
           ) -> tuple[bool, tuple[int, ...] | None]:
    """The agreement of one call: (whether it is folded into the call's collectives, this
    rank's fingerprint). Raises on every rank together when ranks disagree."""
    # Calls with "once" or "never" leave the history of "always" calls alone: every rank
    # makes the same calls, so every rank skips the same ones.
    if mode == "never":
        if local_error:
            raise local_error
        return False, None
    status = STATUS_OK if local_error is None else STATUS_REFUSED
    fp = fingerprint(r.codec, r.tensor.numel(), r.tensor.dtype, p, r.average, status,
                     auto=probe is not None)
    if mode == "once":
        if fp not in gs.verified or local_error:
            with timer("verify"):
                exchange_fingerprints(fp, r.tensor.device, r.group, world, local_error,
                                      r.who)
            gs.verified.add(fp)
        return False, fp
    expected = gs.predictor.expected()
    run = fold_plan(expected, gs.tuners)
    if run is not None:
        if fp == expected.fp and local_error is None:
            gs.predictor.advance(expected)
            return True, fp
        # Not the call the others may be making: stand in for it, then see who deviated.
        with timer("verify"):
            staging = Staging(gs.buffers, r.tensor.device)
            deviated = run_decoy(expected, run, r.group, rank, world, r.tensor.device,
                                 staging)
            staging.release()
        stood_in(expected, gs.tuners)
        if len(deviated) < world:
            gs.predictor.advance(expected)
            if local_error:
                raise local_error
            raise decoy_error(r.who, deviated, fp, expected, world)
        # every rank deviated (the pattern changed everywhere): check explicitly
        gs.predictor.mispredicted()
    try:
        with timer("verify"):
            exchange_fingerprints(fp, r.tensor.device, r.group, world, local_error, r.who)
    except Exception:
        gs.predictor.lost()
        raise
    gs.verified.add(fp)
    gs.predictor.agreed(Signature(fp, r.op, r.codec, r.tensor.numel(), r.tensor.dtype,
                                  r.average, world, probe is not None, p))
    return False, fp


def _hand_over(state: ErrorFeedback | None, key: Hashable, flat: torch.Tensor,
               op: str) -> torch.Tensor:
    """"auto" settled on plain: add what compression held back (the plain sum is exact)
    and forget it. A plain probe leaves it for the next compressed call. The input of a
    reduce-scatter is the caller's: it gets a copy."""
    if state is not None and key in state:
        if op == "reduce_scatter":
            flat = flat.clone()
        flat.add_(state.pending(key).to(flat.dtype))
        state.drop(key)
    return flat


def auto_choice(tensor_or_numel, codec: Codec | str, *, dtype: torch.dtype | None = None,
                group: dist.ProcessGroup | None = None, average: bool = True,
                op: str = "all_reduce") -> dict | None:
    """What ``algorithm="auto"`` settled on for this signature (``op``: "all_reduce" or
    "reduce_scatter", whose numel is the input's), or None while it is still measuring (or
    never saw it). Returns ``{"algorithm": ..., "compressed_algorithm": ...,
    "compressed_s": ..., "plain_s": ..., "times_s": {algorithm: seconds}}``: what it
    settled on, the fastest compressed candidate and the rank-averaged median times it
    compared (seconds; None for a kind it could not time)."""
    codec = as_codec(codec)
    if isinstance(tensor_or_numel, torch.Tensor):
        numel, dtype = tensor_or_numel.numel(), tensor_or_numel.dtype
    else:
        numel, dtype = int(tensor_or_numel), dtype or torch.float32
    tuner = _tuner(op, codec, numel, dtype, group, average, dist.get_world_size(group))
    return None if tuner is None else tuner.report()


def last_auto_algorithm(numel: int, codec: Codec, dtype: torch.dtype, group, average: bool,
                        world: int) -> str | None:
    """The algorithm the latest ``"auto"`` all-reduce of this signature ran (what it settled
    on, or the kind of its latest probe); None if none ran. For statistics (gradzip.ddp)."""
    tuner = _tuner("all_reduce", codec, numel, dtype, group, average, world)
    p = None if tuner is None else tuner.last
    return None if p is None else p.algorithm


def _tuner(op: str, codec: Codec, numel: int, dtype: torch.dtype, group, average: bool,
           world: int) -> Tuner | None:
    return group_state(group).tuners.get(tuner_key(op, codec.spec, numel, dtype, average,
                                                   world))


def release_buffers() -> None:
    """Free the staging buffers (payloads, receive rows) kept for later calls, in every
    group (:mod:`gradzip.comm.buffers`). Call between calls, e.g. before a phase of
    training that reduces other sizes; the next calls allocate afresh."""
    for gs in all_group_states():
        gs.buffers.clear()


def reset_auto() -> None:
    """Forget every choice "auto" has settled on, in every group; the next calls measure
    again. Call it on every rank at the same point."""
    for gs in all_group_states():
        gs.tuners.clear()


__all__ = [
    "ALGORITHMS",
    "AUTO_CLEAR",
    "AUTO_FIRST_LOOK_ROUNDS",
    "AUTO_MARGIN",
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
    "auto_candidates",
    "auto_choice",
    "key_hash",
    "pipeline_segments",
    "plan",
    "reduce_scatter",
    "reduce_scatter_plan",
    "release_buffers",
    "reset_auto",
    "stochastic_seed",
]
