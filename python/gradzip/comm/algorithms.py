"""The three ways :func:`gradzip.all_reduce` moves a tensor, each taking one :class:`Call`.

``plain``
    An uncompressed ``all_reduce`` (divided by W first when averaging, as DDP does).
``allgather``
    Every rank compresses its whole tensor (worker residual), the payloads are all-gathered
    and every rank decodes all W of them with one ``dequantize_accumulate`` in rank order.
    Traffic per rank: (W-1) payloads. Right for small W and for top-k.
``alltoall`` (two-phase, as in 1-bit Adam / ZeRO++ qgZ / CGX)
    Phase 1: each rank compresses its W chunks (worker residual) and ``all_to_all_single``
    sends chunk i to rank i, which accumulates the W payloads of its chunk in float32
    (times 1/W when averaging). Phase 2: it re-compresses that chunk (server residual), the
    W chunk payloads are all-gathered and every rank decodes every chunk. Payloads of a
    short chunk are padded with zero bytes so every message has the same size. Pipeline
    segments (see :mod:`gradzip.comm.plan`) are reduced this way one after the other, each
    segment's collectives started as soon as its payloads are ready: segment s+1 is
    compressed while segment s is on the wire, and segment s is decoded while s+1 is still
    arriving. Top-k works too (k is split over the chunks and re-selected on the owner),
    though ``"auto"`` only picks it for dense codecs.

Every rank decodes the same payloads in the same order, so the result is bit-identical on
every rank. Collectives are issued from the calling thread in the same order on every
rank; an algorithm returns a :class:`Finish`: the running collectives plus the decode that
follows them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from ..codecs import Codec
from .agreement import header_problems, mismatch_error
from .buffers import Staging
from .collectives import all_gather, all_reduce_sum, all_to_all, reduce_scatter_sum
from .feedback import ErrorFeedback, Journal, ServerLayout, key_hash, stochastic_seed
from .fold import flag_slots, flagged, poisoned
from .plan import Plan


class PhaseTimer:
    """Adds wall seconds per phase ("verify", "compress", "communicate", "decompress") into
    a dict, or does nothing without one (CPU work; on CUDA it sees launch time)."""

    def __init__(self, sink: dict[str, float] | None) -> None:
        self.sink = sink

    def __call__(self, name: str):
        # Without a dict, one shared do-nothing context (every call enters several phases).
        return _NO_PHASE if self.sink is None else _Phase(self.sink, name)


class _Phase:
    __slots__ = ("name", "sink", "t0")

    def __init__(self, sink: dict[str, float], name: str) -> None:
        self.sink, self.name = sink, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.sink[self.name] = self.sink.get(self.name, 0.0) + time.perf_counter() - self.t0


_NO_PHASE = contextlib.nullcontext()


@dataclass
class Call:
    """Everything one reduction needs, decided before the first payload is made."""

    flat: torch.Tensor  # the tensor, flat and contiguous; reduced in place
    plan: Plan
    codec: Codec
    group: object  # torch.distributed.ProcessGroup or None (the default group)
    rank: int
    world: int
    average: bool
    feedback: ErrorFeedback | None  # residuals (None: no error feedback)
    key: Hashable
    base_seed: int  # the feedback's seed, or the call's seed without one
    check_headers: bool
    timer: PhaseTimer
    out: torch.Tensor | None = None  # reduce-scatter: this rank's shard, flat, contiguous
    # payloads, receive rows and sums, given back when the call has completed
    staging: Staging | None = None
    # verify="always" folded into this call's collectives (comm.fold): marks of ranks that
    # deviated are looked for in what arrives, and nothing is written before they are
    fold: bool = False
    hand_over: torch.Tensor | None = None  # plain after compression: what it held back
    journal: Journal | None = None  # a folded call: what to restore if a rank deviated
    # plain: sum the padded buffer of a folded call even when this one is not (fold.pads_plain)
    padded: bool = False

    def __post_init__(self) -> None:
        if self.staging is None:
            self.staging = Staging(None, self.flat.device)
        # Seeds of this call: the feedback's step counter of this key, or 0 without one.
        if self.feedback is not None:
            self.step, self.khash = self.feedback.next_step(self.key), key_hash(self.key)
        else:
            self.step, self.khash = 0, 0

    @property
    def alpha(self) -> float:
        return 1.0 / self.world if self.average else 1.0

    def seed(self, phase: int, chunk: int) -> int:
        """The seed of one compression: phase 0 (worker) or 1 (server), chunk index."""
        return stochastic_seed(self.base_seed, self.rank, self.step, self.khash, phase, chunk)

    def worker_residual(self) -> torch.Tensor | None:
        if self.feedback is None:
            return None
        return self.feedback.worker_residual(self.key, self.plan.numel, self.flat.device)

    def store_worker_residual(self) -> None:
        """The worker compression is done (compact residual storage encodes it now)."""
        if self.feedback is not None:
            self.feedback.store(self.key)


class Finish:
    """The tail of an algorithm: the running collectives plus the decode that follows.
    ``wait`` waits for the first; the decode waits for the others as it goes, so that with
    several it decodes one while the next is still arriving."""

    def __init__(self, works, decode: Callable[[bool], None]) -> None:
        self.works = list(works) if isinstance(works, (list, tuple)) else [works]
        self.decode = decode
        self.via_future = False

    def wait(self) -> None:
        self.works[0].wait()

    def future(self) -> torch.futures.Future:
        # The decode then runs in this future's callback, when every collective is done:
        # it must not wait on them there (a work's wait inside its own callback deadlocks).
        self.via_future = True
        if len(self.works) == 1:
            return self.works[0].get_future()
        return torch.futures.collect_all([w.get_future() for w in self.works])

    def __call__(self) -> None:
        self.decode(not self.via_future)


def plain(call: Call) -> Finish:
    if call.fold or call.padded:
        return _folded_plain(call)
    if call.average and call.world > 1:
        call.flat.div_(call.world)  # before the sum, as DDP does, so fp16 sums overflow later
    with call.timer("communicate"):
        work = all_reduce_sum(call.flat, call.group, async_op=True)
    return Finish(work, lambda wait: None)


def _folded_plain(call: Call) -> Finish:
    """The plain all-reduce with the agreement's flag slots after the data (comm.fold),
    in a copy, so that the tensor is written only once no rank has deviated. Also the layout
    of an unfolded call that could have folded (``call.padded``): no rank runs a decoy of a
    call that no rank predicted, so its flags stay zero and are not read (on a GPU, reading
    them waits for the stream)."""
    flat, n, world = call.flat, call.flat.numel(), call.world
    slots = flag_slots(n, world, flat.element_size())
    buf = call.staging.bytes((n + slots) * flat.element_size()).view(flat.dtype)
    data = buf[:n]
    src = flat
    if call.hand_over is not None:
        src = torch.add(flat, call.hand_over.to(flat.dtype), out=data)
    if call.average and world > 1:
        torch.div(src, world, out=data)  # the copy in and the division in one pass
    elif src is flat:
        data.copy_(flat)
    buf[n:].zero_()
    with call.timer("communicate"):
        work = all_reduce_sum(buf, call.group, async_op=True)

    def decode(wait: bool) -> None:
        deviated = flagged(buf[n:]) if call.fold else []
        if deviated:
            raise FoldMismatch(deviated)
        flat.copy_(data)

    return Finish(work, decode)


class FoldMismatch(Exception):
    """Ranks ``deviated`` ran a decoy of this folded call (comm.fold); the caller turns it
    into the ``ValueError`` every rank raises."""

    def __init__(self, deviated: list[int]) -> None:
        super().__init__(deviated)
        self.deviated = deviated


def _check_fold(call: Call, rows: torch.Tensor) -> None:
    """A folded call: raise :class:`FoldMismatch` if any rank's rows carry a decoy mark."""
    if call.fold:
        deviated = poisoned(rows)
        if deviated:
            raise FoldMismatch(deviated)


def _came_back_clean(work, rows: torch.Tensor) -> bool:
    """A folded call's first collective is done and carries no decoy mark (so every rank
    runs this call: comm.fold). CPU only: on the GPU, reading the rows would wait for the
    stream."""
    return not rows.is_cuda and work.is_completed() and not poisoned(rows)


def allgather(call: Call) -> Finish:
    """Every rank's payload to every rank, decoded by each (one compression per rank).
    Segment by segment (large tensors): segment s+1 is compressed while s is on the wire,
    and s is decoded while s+1 arrives."""
    flat, codec, world = call.flat, call.codec, call.world
    segs = call.plan.stages()
    worker = call.worker_residual()
    if worker is not None:
        call.feedback.fold_server(call.key)  # after two-phase calls ("auto" probes them)
    journal = call.journal
    gathered, works = [], []
    for j, sp in enumerate(segs):
        a, b = sp.chunks[0]
        if journal is not None and journal.open:
            if j > 0 and _came_back_clean(works[0], gathered[0]):
                journal.close()  # nobody deviated: the call stands
            else:
                journal.save(a, b, worker)
        with call.timer("compress"):
            res = worker[a:b] if worker is not None else None
            payload = codec.compress(flat[a:b], res, seed=call.seed(0, j), k=sp.ks[0],
                                     out=call.staging.bytes(sp.payload_bytes))
        rows = call.staging.bytes(world, sp.payload_bytes)
        with call.timer("communicate"):
            works.append(all_gather(rows.view(-1), payload, call.group, async_op=True,
                                      staging=call.staging))
        gathered.append(rows)
    call.store_worker_residual()

    def decode(wait: bool) -> None:
        for j, sp in enumerate(segs):
            if wait and j > 0:  # Finish.wait() waited for the first
                with call.timer("communicate"):
                    works[j].wait()
            a, b = sp.chunks[0]
            with call.timer("decompress"):
                if call.check_headers:
                    problems = header_problems(gathered[j],
                                               [codec.header(b - a, k=sp.ks[0])] * world,
                                               [sp.payload_bytes] * world)
                    if problems:
                        for w in works[j + 1 :] if wait else ():
                            w.wait()  # leave no collective of this call running
                        _check_fold(call, gathered[j])
                        where = "" if len(segs) == 1 else f" (segment [{a}, {b}))"
                        raise mismatch_error(f"received payloads do not match this rank's "
                                             f"codec {codec.spec} for numel "
                                             f"{call.plan.numel}{where}", problems)
                codec.decompress_into(gathered[j], flat[a:b], call.alpha)

    return Finish(works, decode)


def alltoall(call: Call) -> Finish:
    flat, codec, world, rank = call.flat, call.codec, call.world, call.rank
    dev = flat.device
    segs = call.plan.stages()
    worker = call.worker_residual()
    # This rank's server residual: its chunk of every segment, concatenated.
    server = None
    if call.feedback is not None:
        layout = ServerLayout(world, tuple(s.chunks[rank] for s in segs),
                              float(world) if call.average else 1.0)
        server = call.feedback.server_residual_for(call.key, layout, dev)

    # Phase 1: compress each segment's W chunks and start its all-to-all at once, so the
    # next segment is compressed while this one is on the wire.
    recvs, works = [], []
    for j, sp in enumerate(segs):
        with call.timer("compress"):
            # each chunk's payload written straight into its row of the send buffer
            send = call.staging.bytes(world, sp.payload_bytes)
            for i, ((a, b), k, size) in enumerate(zip(sp.chunks, sp.ks, sp.sizes)):
                if b > a:
                    res = worker[a:b] if worker is not None else None
                    codec.compress(flat[a:b], res, seed=call.seed(0, j * world + i), k=k,
                                   out=send[i, :size])
                send[i, size:].zero_()  # padding of a short (or empty) chunk
        recv = call.staging.bytes(world, sp.payload_bytes)
        with call.timer("communicate"):
            works.append(all_to_all(recv.view(-1), send.view(-1), call.group, async_op=True))
        recvs.append(recv)
    call.store_worker_residual()

    # Phase 2, segment by segment as they arrive: accumulate this rank's chunk, re-compress
    # it (server residual), start its all-gather.
    phase1_problems: list[tuple[int, str]] = []
    gathered, gworks = [], []
    off = 0
    for j, sp in enumerate(segs):
        with call.timer("communicate"):
            works[j].wait()
        a, b = sp.chunks[rank]
        my_size, my_k = sp.sizes[rank], sp.ks[rank]
        gathered_in = call.staging.bytes(sp.payload_bytes)
        sent = False
        problems: list[tuple[int, str]] = []
        if b > a:
            with call.timer("decompress"):
                if call.check_headers:
                    problems = header_problems(recvs[j], [codec.header(b - a, k=my_k)] * world,
                                               [my_size] * world)
                if not problems:
                    rows = recvs[j][:, :my_size]
                    acc = call.staging.floats(b - a)
                    codec.decompress_into(rows if my_size == sp.payload_bytes
                                          else rows.contiguous(), acc, call.alpha)
            if not problems:
                with call.timer("compress"):
                    res = server[off : off + b - a] if server is not None else None
                    codec.compress(acc, res, seed=call.seed(1, j * world + rank), k=my_k,
                                   out=gathered_in[:my_size])
                    gathered_in[my_size:].zero_()
                    sent = True
        if not sent:
            # An empty chunk, or the zero header that tells every other rank that this one
            # found bad payloads, after it has taken part in the all-gather, so nobody waits.
            gathered_in.zero_()
        off += b - a
        phase1_problems += problems
        g = call.staging.bytes(world, sp.payload_bytes)
        with call.timer("communicate"):
            gworks.append(all_gather(g.view(-1), gathered_in, call.group, async_op=True,
                                      staging=call.staging))
        gathered.append(g)

    def decode(wait: bool) -> None:
        for j, sp in enumerate(segs):
            if wait and j > 0:  # Finish.wait() waited for the first
                with call.timer("communicate"):
                    gworks[j].wait()
            with call.timer("decompress"):
                if phase1_problems:
                    for w in gworks[j + 1 :] if wait else ():
                        w.wait()  # leave no collective of this call running
                    _check_fold(call, recvs[0])
                    a, b = sp.chunks[rank]
                    raise mismatch_error(
                        f"received payloads do not match this rank's codec {codec.spec} for "
                        f"chunk [{a}, {b}) of numel {call.plan.numel}", phase1_problems)
                if call.check_headers:
                    expected = [codec.header(e - s, k=k) if e > s else None
                                for (s, e), k in zip(sp.chunks, sp.ks)]
                    problems = header_problems(gathered[j], expected, list(sp.sizes))
                    if problems:
                        raise mismatch_error(
                            "phase-2 payloads do not match (a rank whose phase-1 payloads "
                            "were bad sends an empty header)", problems, "chunk of rank")
                for i, ((s, e), size) in enumerate(zip(sp.chunks, sp.sizes)):
                    if e > s:
                        codec.decompress_into(gathered[j][i : i + 1, :size], flat[s:e], 1.0)

    return Finish(gworks, decode)


def plain_reduce_scatter(call: Call) -> Finish:
    """Uncompressed: the native reduce-scatter where the backend has one (NCCL), else the
    W shards through one all-to-all and a float32 sum in rank order (Gloo emulates
    reduce-scatter with a full all-reduce: twice the traffic). The input is not changed."""
    flat, out, world = call.flat, call.out, call.world
    with call.timer("communicate"):
        work = reduce_scatter_sum(out, flat, call.group, async_op=True)
    if work is not None:
        def scale(wait: bool) -> None:
            if call.average and world > 1:
                out.div_(world)
        return Finish(work, scale)
    recv = torch.empty_like(flat)
    with call.timer("communicate"):
        work = all_to_all(recv, flat, call.group, async_op=True)

    def accumulate(wait: bool) -> None:
        with call.timer("decompress"):
            acc = recv.view(world, -1).to(torch.float32).sum(0)
            if call.average and world > 1:
                acc.mul_(call.alpha)
            out.copy_(acc)

    return Finish(work, accumulate)


def alltoall_reduce_scatter(call: Call) -> Finish:
    """Phase 1 of the two-phase all-reduce on its own: each of the W shards compressed with
    its slice of the worker residual, sent to its owner, which decodes the W payloads of
    its shard with one ``dequantize_accumulate``."""
    flat, p, codec, world = call.flat, call.plan, call.codec, call.world
    worker = call.worker_residual()
    with call.timer("compress"):
        send = call.staging.bytes(world, p.payload_bytes)
        for i, ((a, b), k) in enumerate(zip(p.chunks, p.ks)):
            res = worker[a:b] if worker is not None else None
            codec.compress(flat[a:b], res, seed=call.seed(0, i), k=k, out=send[i])
        call.store_worker_residual()
    recv = call.staging.bytes(world, p.payload_bytes)
    with call.timer("communicate"):
        work = all_to_all(recv.view(-1), send.view(-1), call.group, async_op=True)
    shard = p.numel // world

    def decode(wait: bool) -> None:
        with call.timer("decompress"):
            if call.check_headers:
                problems = header_problems(recv, [codec.header(shard, k=p.ks[call.rank])] *
                                           world, [p.payload_bytes] * world)
                if problems:
                    _check_fold(call, recv)
                    raise mismatch_error(f"received payloads do not match this rank's codec "
                                         f"{codec.spec} for a shard of {shard}", problems,
                                         who="gradzip.reduce_scatter")
            codec.decompress_into(recv, call.out, call.alpha)

    return Finish(work, decode)


ALGORITHM_FUNCTIONS: dict[tuple[str, str], Callable[[Call], Finish]] = {
    ("all_reduce", "plain"): plain, ("all_reduce", "allgather"): allgather,
    ("all_reduce", "alltoall"): alltoall, ("reduce_scatter", "plain"): plain_reduce_scatter,
    ("reduce_scatter", "alltoall"): alltoall_reduce_scatter}

__all__ = ["ALGORITHM_FUNCTIONS", "Call", "Finish", "FoldMismatch", "PhaseTimer", "allgather",
           "alltoall", "alltoall_reduce_scatter", "plain", "plain_reduce_scatter"]
