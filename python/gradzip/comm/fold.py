"""The agreement check folded into the call's own collectives, once a group's calls repeat.

``verify="always"`` (the CPU default) must catch any call on which ranks disagree, every
time. The explicit check (:func:`.agreement.exchange_fingerprints`) costs one more small
round trip per call: on 4 Gloo ranks sharing 2 cores that is as much as a whole all-reduce
of a few hundred KiB, so ``"auto"`` cost 1.25-1.7x ``dist.all_reduce`` up to 4 MiB
(docs/results.md). It cannot simply ride along in the data: when ranks disagree on the
size of a collective, Gloo aborts the process (SIGABRT, reproduced for all-reduce,
all-gather and all-to-all), so the sizes of every collective a call issues must be known to
agree *before* it is issued.

Training repeats itself: DDP reduces the same buckets in the same order every step, an
optimizer the same parameters. So every rank keeps, per process group, the sequence of
calls it has agreed on: the fingerprint of the previous agreed call and, for each
fingerprint, the call that followed it last time (:class:`Predictor`). Ranks that agreed on
every call so far hold the same history and therefore make the same *prediction* for the
next call. When a prediction exists and qualifies (:func:`fold_plan`), no explicit check is
made:

- a rank whose call matches the prediction runs it as usual; the collectives it issues have
  the predicted sizes, which every rank knows;
- a rank whose call does not (another size, codec or option, or an input it refuses) runs
  the predicted call's collectives anyway, with scratch buffers that carry a *poison* mark
  instead of data (:func:`run_decoy`), and touches nothing of its own.

The mark reaches every rank in the same collectives: in the payload headers that every
rank receives from every other (the all-gather, the phase-1 all-to-all), and for the plain
all-reduce in flag slots appended to the summed buffer (rank r adds 1 at slot r; zeros pad
the buffer to W shares of whole 64-byte lines, :func:`flag_slots`).
So every rank learns the same set of ranks that deviated, and then:

- nobody deviated: the call is complete, and it cost no extra message;
- some but not all deviated: every rank raises a ``ValueError`` naming them (a rank that
  refused its input raises its own error); ranks that ran the call restore the residuals
  they had updated and never wrote the result, so nothing of anyone's input or state is
  changed;
- every rank deviated (the pattern changed on all ranks together, e.g. a new bucket
  layout): they exchange fingerprints explicitly, as without a prediction, and either
  raise the usual error or run the call for real. The call before it is then *doubted*:
  nothing is predicted after it until the same call has followed it twice in a row, so an
  order that changes from round to round costs one explicit check per call instead of a
  decoy and a check.

A call that runs as predicted may be asynchronous; a deviating rank always waits for its
scratch collectives (it must know the outcome before it can run its own call). A call
whose prediction does not qualify, or with none, makes the explicit check, which also
records it for the next prediction. Every rank updates its history at the same points
(at call time, never on completion), so histories stay equal after an error as well.

Calls made with ``verify="once"`` or ``"never"`` are not part of the history (``verify``
must be the same on every rank for a call, as it always had to be). A folded plain
all-reduce sums a buffer longer than the tensor, so Gloo may cut it into other pieces and
add in another order: the last bit of a sum may differ from the same call made with
``verify="never"`` or ``"once"``; every rank still gets the same bits. Every plain call
that *may* fold sums that longer buffer, folded or not (:func:`pads_plain`), so its bits
never depend on whether a prediction existed: a run resumed from a checkpoint, whose
history starts empty, reproduces the uninterrupted run bit for bit.

What qualifies: the predicted signature's collectives must show every rank's mark to every
rank (no empty chunk in the two-phase algorithm's first segment), ``"auto"`` must know which
algorithm the call runs: the one it settled on, or the kind of its next probe (every rank's
tuner counts the same calls, a rank that stood in for a probe included:
:func:`stood_in`), except the probes at which the ranks compare their times (they run one
more collective), so that the probes time the call as it will run once settled; and the plain
and two-phase calls must be small enough: a folded call copies what it must be able to
restore (the plain all-reduce works in a copy with the flag slots, one more pass over the
tensor; the two-phase one keeps a copy of the worker and server residuals). On the unshaped
loopback, where the all-reduce itself is memory copies, that pass costs more than the
explicit round trip above a few MiB (4 Gloo ranks on 2 cores, plain all-reduce against
``dist.all_reduce``: folded 1.18x / 1.27x / 1.46x at 1 / 2 / 4 MiB, explicit 1.63x / 1.45x
/ 1.30x; re-measured with the padded flag slots of :func:`flag_slots`, 4 MiB folded
1.41-1.45x, explicit 1.33-1.34x), hence :data:`FOLD_MAX_BYTES`. The all-gather algorithm
folds at every size: it updates only the worker residual, piece by piece, and its first
piece's all-gather brings the verdict, so it copies only the pieces it compresses before
that piece has come back (:class:`.feedback.Journal`; nothing at all with compact residual
storage). On the 1 Gbit/s link a 64 MiB top-k 1 % call no longer starts with the explicit
round trip (which, with 4 ranks on 2 cores, held every rank's first piece back by 6-18
ms). The limit is a function of the signature alone (not of whether this rank passed a
residual state, which ranks need not agree on), so every rank applies it alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import format as fmt
from ..codecs import Codec
from .agreement import describe_fingerprint
from .autotune import tuner_key
from .buffers import Staging
from .collectives import all_gather, all_reduce_sum, all_to_all
from .plan import Plan

# Tensors of at most this many bytes fold the check into their collectives (see above).
FOLD_MAX_BYTES = 2 << 20
# Header of a decoy payload: "GZNO" where every real payload says "GZPK" (format.MAGIC),
# so the existing header check flags it, and :func:`poisoned` tells it from corruption.
POISON_HEADER = b"GZNO" + bytes(fmt.HEADER_BYTES - 4)
_POISON = torch.frombuffer(bytearray(POISON_HEADER), dtype=torch.uint8)
MAX_HISTORY = 4096  # fingerprints remembered per group (the table is cleared when full)


@dataclass(frozen=True)
class Signature:
    """One agreed call, as much as a rank needs to predict it and to stand in for it."""

    fp: tuple[int, ...]
    op: str  # "all_reduce" or "reduce_scatter"
    codec: Codec
    numel: int
    dtype: torch.dtype
    average: bool
    world: int
    auto: bool
    planned: Plan  # what gradzip.comm.plan gave (the compressed plan of "auto")


class Predictor:
    """The calls a group agreed on, as "what followed what" (see the module docstring)."""

    def __init__(self) -> None:
        self.prev: tuple[int, ...] | None = None
        self.next: dict[tuple[int, ...], Signature] = {}  # fingerprint -> the call after it
        # fingerprints after which every rank's call differed from the prediction: nothing
        # is predicted after them until the same call follows them twice in a row
        self.doubted: set[tuple[int, ...]] = set()

    def expected(self) -> Signature | None:
        if self.prev is None or self.prev in self.doubted:
            return None
        return self.next.get(self.prev)

    def agreed(self, sig: Signature) -> None:
        """``sig`` was verified by an explicit exchange on every rank."""
        if self.prev is not None:
            if len(self.next) >= MAX_HISTORY:
                self.next.clear()
                self.doubted.clear()
            last = self.next.get(self.prev)
            if last is not None and last.fp == sig.fp:
                self.doubted.discard(self.prev)  # the same successor again: trust it
            self.next[self.prev] = sig
        self.prev = sig.fp

    def advance(self, sig: Signature) -> None:
        """The predicted call ``sig`` ran (as itself or as a decoy) on every rank."""
        self.prev = sig.fp

    def mispredicted(self) -> None:
        """Every rank's call differed from the prediction (each ran the decoy): an order
        that changes from round to round would otherwise pay a decoy and the explicit
        check on every call; now it pays the check alone until it settles."""
        if self.prev is not None:
            self.doubted.add(self.prev)

    def lost(self) -> None:
        """Every rank stopped at the same call: start the chain again."""
        self.prev = None


def _tuner(sig: Signature, tuners: dict):
    """The "auto" tuner that measures ``sig`` (None when ``sig`` is not measured: not
    "auto", or planned plain; or when the tuner is not the one that planned it)."""
    if not sig.auto or sig.planned.algorithm == "plain":
        return None
    tuner = tuners.get(tuner_key(sig.op, sig.codec.spec, sig.numel, sig.dtype, sig.average,
                                 sig.world))
    return tuner if tuner is not None and tuner.planned == sig.planned else None


def stood_in(sig: Signature, tuners: dict) -> None:
    """This rank ran a decoy of the predicted call ``sig``: if that call is an "auto" probe,
    its tuner counts it as the ranks that ran it do (:meth:`.autotune.Tuner.stand_in`)."""
    tuner = _tuner(sig, tuners)
    if tuner is not None and tuner.choice is None:
        tuner.stand_in()


def fold_plan(sig: Signature | None, tuners: dict) -> Plan | None:
    """The plan a predicted call will run if its check can be folded, else None. A pure
    function of what every rank agreed on, so every rank gets the same answer."""
    if sig is None or sig.numel == 0:
        return None
    run = sig.planned
    if sig.auto and run.algorithm != "plain":
        tuner = _tuner(sig, tuners)
        run = None if tuner is None else tuner.choice or tuner.folded_probe()
        if run is None:
            return None
    if run.algorithm != "allgather" and not within_fold_limit(sig.numel, sig.dtype.itemsize):
        return None
    if sig.op == "reduce_scatter":
        return run if run.algorithm == "alltoall" else None
    if run.algorithm == "alltoall" and any(b <= a for a, b in run.stages()[0].chunks):
        return None
    return run


def within_fold_limit(numel: int, itemsize: int) -> bool:
    """Whether a plain or two-phase call of this size may fold (:data:`FOLD_MAX_BYTES`)."""
    return numel * itemsize <= FOLD_MAX_BYTES


def pads_plain(numel: int, itemsize: int, mode: str) -> bool:
    """Whether a plain all-reduce sums the padded buffer of :func:`flag_slots`: every call
    that may fold does, folded or not. Gloo cuts a buffer into segments by its length, so the
    padded and the bare sum may differ in the last bit; the layout must therefore depend on
    what the caller chose (size, dtype, ``verify``), never on the history that decides
    whether this particular call folds, or a run resumed from a checkpoint (no history yet:
    its first calls check explicitly) would not reproduce the uninterrupted one."""
    return mode == "always" and numel > 0 and within_fold_limit(numel, itemsize)


def poisoned(rows: torch.Tensor) -> list[int]:
    """The rows (ranks) of ``rows`` ([W, P] uint8) that carry a decoy's header."""
    heads = rows[:, : fmt.HEADER_BYTES].cpu()
    return [w for w in range(heads.shape[0]) if torch.equal(heads[w], _POISON)]


def fill_poison(buf: torch.Tensor) -> torch.Tensor:
    """``buf`` ([..., P] uint8, P >= the header) as decoy payloads: the poison header, then
    zeros."""
    buf.zero_()
    buf[..., : fmt.HEADER_BYTES] = _POISON.to(buf.device)
    return buf


def run_decoy(sig: Signature, run: Plan, group, rank: int, world: int,
              device: torch.device, staging: Staging) -> list[int]:
    """Issue the collectives of the predicted call ``sig`` (plan ``run``) in its order and
    sizes, carrying this rank's poison mark instead of data; wait for them; return the
    ranks that deviated, as every rank sees them."""
    if run.algorithm == "plain":
        n = sig.numel
        buf = torch.zeros(n + flag_slots(n, world, sig.dtype.itemsize), dtype=sig.dtype,
                          device=device)
        buf[n + rank] = 1
        all_reduce_sum(buf, group, async_op=False)
        return flagged(buf[n:])
    segs = run.stages()
    if run.algorithm == "allgather":
        gathered, works = [], []
        for sp in segs:
            gathered.append(staging.bytes(world, sp.payload_bytes))
            works.append(all_gather(gathered[-1].view(-1),
                                    fill_poison(staging.bytes(sp.payload_bytes)), group,
                                    async_op=True, staging=staging))
        for w in works:
            w.wait()
        return poisoned(gathered[0])
    # alltoall (all-reduce: both phases; reduce-scatter: phase 1), in the order the
    # algorithm issues them: every phase-1 all-to-all, then one all-gather per segment
    recvs, works = [], []
    for sp in segs:
        recv = staging.bytes(world, sp.payload_bytes)
        works.append(all_to_all(recv.view(-1),
                                fill_poison(staging.bytes(world, sp.payload_bytes)).view(-1),
                                group, async_op=True))
        recvs.append(recv)
    gworks = []
    for j, sp in enumerate(segs):
        works[j].wait()
        if sig.op == "all_reduce":
            g = staging.bytes(world, sp.payload_bytes)
            gworks.append(all_gather(g.view(-1), fill_poison(staging.bytes(sp.payload_bytes)),
                                     group, async_op=True, staging=staging))
    for w in gworks:
        w.wait()
    return poisoned(recvs[0])


def flag_slots(numel: int, world: int, itemsize: int) -> int:
    """How many elements a folded plain all-reduce appends to ``numel``: one flag per rank,
    then zeros up to a length that splits into W equal shares of whole 64-byte lines (the
    shares a ring all-reduce sends). Ad-hoc, 4 Gloo ranks on the 2-core AVX-512 VM,
    interleaved rounds against ``dist.all_reduce`` on the same data: a copy-in, all-reduce,
    copy-out of a 4 MiB tensor took 1.15-1.31x with W slots (three runs) and 1.01-1.11x
    aligned (four runs); gradzip's folded plain call at 1 MiB 1.34x -> 1.24x, at 2 MiB
    1.39x -> 1.34x (one run each)."""
    unit = world * max(1, 64 // itemsize)
    return world + (-(numel + world)) % unit


def flagged(slots: torch.Tensor) -> list[int]:
    """The ranks whose slot of the plain all-reduce's flags is set."""
    return [w for w, v in enumerate(slots.cpu().tolist()) if v != 0]


def deviated_error(who: str, deviated: list[int], mine: tuple[int, ...]) -> ValueError:
    """On a rank that ran the predicted call: others ran another one."""
    return ValueError(
        f"{who}: rank(s) {deviated} made a different call than this rank's "
        f"({describe_fingerprint(mine)}), or refused their input (see the error raised "
        "there); every rank must reduce the same tensor size and dtype with the same codec "
        "and options, in the same order; every rank stops, no tensor or residual was "
        "changed")


def decoy_error(who: str, deviated: list[int], mine: tuple[int, ...], expected: Signature,
                world: int) -> ValueError:
    """On a rank that did not run the predicted call while others did."""
    others = [r for r in range(world) if r not in deviated]
    return ValueError(
        f"{who}: this rank's call ({describe_fingerprint(mine)}) differs from the call of "
        f"rank(s) {others} ({describe_fingerprint(expected.fp)}); every rank must reduce the "
        "same tensor size and dtype with the same codec and options, in the same order; "
        "every rank stops, no tensor or residual was changed")


__all__ = ["FOLD_MAX_BYTES", "MAX_HISTORY", "POISON_HEADER", "Predictor", "Signature",
           "decoy_error", "deviated_error", "fill_poison", "flag_slots", "flagged",
           "fold_plan", "pads_plain", "poisoned", "run_decoy", "within_fold_limit"]
