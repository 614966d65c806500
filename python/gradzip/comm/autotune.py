"""``algorithm="auto"``: measure the compressed plan against the plain all-reduce, then settle.

Bytes are not time: on a fast link compression costs more than it saves. So the first
calls of each signature (group, codec, numel, dtype, averaging) alternate between the
compressed plan that :func:`gradzip.comm.plan` picked and the plain all-reduce, and time
themselves (wall time from entry to completion; CUDA events on a GPU); the first call of
each kind is a warm-up and is not counted. At call ``AUTO_FIRST_LOOK`` and, if still
undecided, at call ``2 * AUTO_PROBES`` the ranks exchange their median times in one small
``all_reduce``; a ratio of at least ``AUTO_CLEAR`` (or the last look) settles, and every
rank keeps the faster algorithm for that signature from then on (the plain one on a tie:
it is exact). Every rank decides from the same summed numbers, so they always agree.

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
AUTO_FIRST_LOOK = 8  # "auto" first compares at this call (3 timed calls of each kind) ...
AUTO_CLEAR = 1.5  # ... and settles there if the ratio of median times is at least this


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
    """The measured choice between a compressed plan and the plain all-reduce for one
    signature."""

    def __init__(self, compressed: Plan) -> None:
        self.compressed = compressed
        self.plain = Plan("plain", compressed.numel, compressed.world, compressed.itemsize)
        self.calls = 0
        self.clocks: tuple[list[Clock], list[Clock]] = ([], [])  # compressed, plain
        self.choice: Plan | None = None
        self.times: tuple[float | None, float | None] = (None, None)

    def begin(self, device: torch.device) -> Probe:
        return Probe(self, device)

    def upcoming_plain(self) -> bool:
        """Whether the next call is a plain all-reduce (settled on it, or a plain probe)."""
        if self.choice is not None:
            return self.choice.algorithm == "plain"
        return self.calls < 2 * AUTO_PROBES and self.calls % 2 == 1

    def next_plan(self, device: torch.device, group) -> tuple[Plan, list | None]:
        """The plan of this call and, while probing, the list its clock goes into."""
        if self.choice is not None:
            return self.choice, None
        i = self.calls
        self.calls += 1
        # A first look after three timed calls of each kind settles clear cases early.
        if i in (AUTO_FIRST_LOOK, 2 * AUTO_PROBES) and self._settle(
                device, group, final=i == 2 * AUTO_PROBES):
            return self.choice, None
        if i < 2 * AUTO_PROBES:
            kind = i % 2
            # The first call of each kind warms caches and allocators: not timed.
            return (self.compressed if kind == 0 else self.plain), \
                (self.clocks[kind] if i >= 2 else None)
        raise AssertionError("unreachable: the last probe settles")

    def _settle(self, device: torch.device, group, final: bool) -> bool:
        """Exchange the median times; settle if ``final`` or one kind is clearly faster
        (by ``AUTO_CLEAR``). Every rank sees the same sums, so all decide alike."""
        row = []
        for clocks in self.clocks:
            secs = [s for s in (c.seconds() for c in clocks) if s is not None]
            row += [float(torch.tensor(secs).median()) if secs else 0.0, float(bool(secs))]
        both = torch.tensor(row, dtype=torch.float64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        t_c, n_c, t_p, n_p = both.cpu().tolist()
        t_c = t_c / n_c if n_c else None
        t_p = t_p / n_p if n_p else None
        if not final and not (t_c and t_p and max(t_c, t_p) >= AUTO_CLEAR * min(t_c, t_p)):
            return False
        self.times = (t_c, t_p)
        plain = t_c is not None and t_p is not None and t_p <= t_c
        self.choice = self.plain if plain else self.compressed
        self.clocks = ([], [])
        return True

    def report(self) -> dict | None:
        """What it settled on, or None while measuring."""
        if self.choice is None:
            return None
        return {"algorithm": self.choice.algorithm,
                "compressed_algorithm": self.compressed.algorithm,
                "compressed_s": self.times[0], "plain_s": self.times[1]}


def tuner_key(op: str, codec_spec: str, numel: int, dtype: torch.dtype, average: bool,
              world: int) -> tuple:
    """The signature a tuner measures, within one process group."""
    return (op, world, codec_spec, numel, str(dtype), bool(average))


__all__ = ["AUTO_CLEAR", "AUTO_FIRST_LOOK", "AUTO_PROBES", "Clock", "Probe", "Tuner",
           "tuner_key"]
