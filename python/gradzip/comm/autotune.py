"""``algorithm="auto"``: time the compressed candidates and the plain all-reduce, then settle.

Bytes are not time: on a fast link compression costs more than it saves, and on any link
a small tensor costs round trips, not bytes. So the first calls of each signature (group,
codec, numel, dtype, averaging) cycle through the compressed candidates of
:func:`gradzip.comm.plan.auto_candidates` (the plan that moves the fewest bytes and, where
that is the two-phase one, the all-gather: one round trip instead of two) and the plain
all-reduce, and time themselves (wall time from entry to completion; CUDA events on a
GPU); the first call of each kind is a warm-up and is not counted. After
``AUTO_FIRST_LOOK_ROUNDS`` calls of each kind and, if still undecided, after
``AUTO_PROBES`` of each, the ranks exchange their median times in one small
``all_reduce``; the fastest kind settles if it beats every other by ``AUTO_CLEAR`` (or at
the last look), and every rank keeps it for that signature from then on (a compressed
kind must beat the plain all-reduce, which is exact, by ``AUTO_MARGIN``; on a tie between
compressed kinds the all-gather, which compresses once). Every rank decides from the same
summed numbers, so they always agree.

A call asks its :class:`Tuner` for a :class:`Probe` at entry (``Tuner.begin``): the probe
knows at once whether the call will go plain (before any collective, so the caller can
skip the residual), chooses the plan after the agreement check (``Probe.plan``, which may
settle: one small collective, on every rank at the same call) and is told when the call's
result is complete (``Probe.end``).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .plan import Plan

AUTO_PROBES = 8  # calls of each kind "auto" times before it settles (the first is a warm-up)
AUTO_FIRST_LOOK_ROUNDS = 4  # "auto" first compares after 4 calls of each kind (3 timed) ...
AUTO_CLEAR = 1.5  # ... and settles there if the fastest is faster than all others by this
# A compressed kind must beat the plain all-reduce by this much to be kept: the plain sum
# is exact, and a near tie measured on a few noisy calls is as likely to go either way
# (4 MiB int8 on the loopback: 10.19 vs 10.24 ms in the probes, then 1.32x fp32 settled).
AUTO_MARGIN = 1.05


class Clock:
    """Times one call: wall clock on the CPU, CUDA events (read when settling) on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.kind = ""  # the algorithm of the call it times
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()
        self.end = None

    def stop(self) -> None:
        if self.cuda:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()
        else:
            self.end = time.perf_counter()

    def seconds(self) -> float | None:
        if self.end is None:  # an async call still running when the ranks settle
            return None
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.end - self.start


class Probe:
    """One call's view of its tuner (see the module docstring)."""

    def __init__(self, tuner: Tuner, device: torch.device) -> None:
        self.tuner = tuner
        # Only a call that may be a probe is timed (settled calls make no CUDA events).
        self.clock = Clock(device) if tuner.choice is None else None
        self.plain = tuner.upcoming_plain()
        self.timed = False

    def plan(self, group, device: torch.device) -> Plan:
        """This call's plan; may settle the tuner (a collective on every rank)."""
        p, clocks = self.tuner.next_plan(device, group)
        if clocks is not None:
            self.clock.kind = p.algorithm
            clocks.append(self.clock)
            self.timed = True
        return p

    def end(self) -> None:
        if self.timed:
            self.clock.stop()


class Tuner:
    """The measured choice between the compressed candidates (:func:`.plan.auto_candidates`)
    and the plain all-reduce for one signature."""

    def __init__(self, planned: Plan, candidates: tuple[Plan, ...] = ()) -> None:
        self.planned = planned  # what gradzip.comm.plan gave for "auto"
        self.plain = Plan("plain", planned.numel, planned.world, planned.itemsize,
                          op=planned.op)
        # The kinds it times, in the order of their calls: the planned one first.
        others = tuple(c for c in candidates if c != planned)
        self.kinds: tuple[Plan, ...] = (planned, *others, self.plain)
        # ... and in order of preference on a tie: the exact plain sum, then one
        # compression before two (less error)
        self.preference = sorted(range(len(self.kinds)), key=lambda i: (
            self.kinds[i].algorithm != "plain", self.kinds[i].algorithm != "allgather"))
        k = len(self.kinds)
        self.first_look = AUTO_FIRST_LOOK_ROUNDS * k  # the calls at which it compares
        self.last_look = AUTO_PROBES * k
        self.calls = 0
        self.clocks: tuple[list[Clock], ...] = tuple([] for _ in self.kinds)
        self.choice: Plan | None = None
        self.times: tuple[float | None, ...] = (None,) * k

    def begin(self, device: torch.device) -> Probe:
        return Probe(self, device)

    def upcoming_plain(self) -> bool:
        """Whether the next call is a plain all-reduce (settled on it, or a plain probe)."""
        if self.choice is not None:
            return self.choice.algorithm == "plain"
        k = len(self.kinds)
        return self.calls < self.last_look and self.calls % k == k - 1

    def folded_probe(self) -> Plan | None:
        """The plan of the next call if it is a probe whose agreement may be folded into its
        collectives (:mod:`.fold`): any probe but those that compare (a look runs its own
        collective, which a rank standing in for the call would not join)."""
        i = self.calls
        # Not the first call either: a tuner that has made no call may have been created
        # by this very call (after reset_auto), which a rank making another call has not.
        if self.choice is not None or i == 0 or i >= self.last_look or i == self.first_look:
            return None
        return self.kinds[i % len(self.kinds)]

    def stand_in(self) -> None:
        """This rank ran a decoy of the next (folded) probe call instead of the call
        (:mod:`.fold`): count the call as the ranks that ran it did, untimed, so that every
        rank's tuner stays in step."""
        self.calls += 1

    @property
    def last(self) -> Plan | None:
        """The plan of the latest call: what it settled on, or the latest probe's kind."""
        if self.choice is not None:
            return self.choice
        return self.kinds[(self.calls - 1) % len(self.kinds)] if self.calls else None

    def next_plan(self, device: torch.device, group) -> tuple[Plan, list | None]:
        """The plan of this call and, while probing, the list its clock goes into."""
        if self.choice is not None:
            return self.choice, None
        i = self.calls
        self.calls += 1
        # A first look after three timed calls of each kind settles clear cases early.
        if i in (self.first_look, self.last_look) and self._settle(
                device, group, final=i == self.last_look):
            return self.choice, None
        if i < self.last_look:
            kind = i % len(self.kinds)
            # The first call of each kind warms caches and allocators: not timed.
            return self.kinds[kind], (self.clocks[kind] if i >= len(self.kinds) else None)
        raise AssertionError("unreachable: the last probe settles")

    def _settle(self, device: torch.device, group, final: bool) -> bool:
        """Exchange the median times; settle if ``final`` or one kind is clearly faster
        (by ``AUTO_CLEAR``) than every other. Every rank sees the same sums, so all decide
        alike."""
        row = []
        for clocks in self.clocks:
            secs = [s for s in (c.seconds() for c in clocks) if s is not None]
            row += [float(torch.tensor(secs).median()) if secs else 0.0, float(bool(secs))]
        sums = torch.tensor(row, dtype=torch.float64, device=device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sums = sums.cpu().tolist()
        times = tuple(t / n if n else None for t, n in zip(sums[::2], sums[1::2]))
        timed = [(t, i) for i, t in enumerate(times) if t]
        if not timed:
            if not final:
                return False
            best = len(self.kinds) - 1  # nothing measured (async calls): the exact sum
        else:
            plain = len(self.kinds) - 1
            # plain's time counts as if AUTO_MARGIN faster (when it was timed)
            eff = [t / AUTO_MARGIN if t is not None and i == plain else t
                   for i, t in enumerate(times)]
            t_best = min(t for t in eff if t)
            best = next(i for i in self.preference if eff[i] == t_best)
            unclear = len(timed) < len(self.kinds) or any(
                eff[i] < AUTO_CLEAR * t_best for _, i in timed if i != best)
            if unclear and not final:
                return False
        self.times = times
        self.choice = self.kinds[best]
        self.clocks = tuple([] for _ in self.kinds)
        return True

    def report(self) -> dict | None:
        """What it settled on, or None while measuring."""
        if self.choice is None:
            return None
        compressed = [(self.times[i], self.kinds[i]) for i in self.preference
                      if self.kinds[i] is not self.plain and self.times[i] is not None]
        fastest = min(compressed, key=lambda tc: tc[0]) if compressed else \
            (None, self.kinds[0])
        return {"algorithm": self.choice.algorithm,
                "compressed_algorithm": fastest[1].algorithm,
                "compressed_s": fastest[0], "plain_s": self.times[-1],
                "times_s": {c.algorithm: t for c, t in zip(self.kinds, self.times)}}


def tuner_key(op: str, codec_spec: str, numel: int, dtype: torch.dtype, average: bool,
              world: int) -> tuple:
    """The signature a tuner measures, within one process group."""
    return (op, world, codec_spec, numel, str(dtype), bool(average))


__all__ = ["AUTO_CLEAR", "AUTO_FIRST_LOOK_ROUNDS", "AUTO_MARGIN", "AUTO_PROBES", "Clock",
           "Probe", "Tuner", "tuner_key"]
