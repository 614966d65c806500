"""Error feedback: the residuals compression leaves behind, and the seeds of each compression.

:class:`ErrorFeedback` holds, per key (one per tensor being reduced), the *worker* residual
(what this rank's compression dropped, one float32 per element), for the two-phase
algorithm the *server* residual of the ranges this rank owns (its chunk of every pipeline
segment), and a step counter that feeds the stochastic-rounding seeds. The algorithms use
it only through its public methods; nothing else touches its slots.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from .._checks import check_seed
from ..spec import lowbias32

_MASK32 = 0xFFFFFFFF


def key_hash(key: Hashable) -> int:
    """A 32-bit hash of a residual key that is the same in every process.

    (Python's ``hash`` of strings changes between processes; ``repr`` of tuples of ints and
    strings does not.)
    """
    return zlib.crc32(repr(key).encode()) if key is not None else 0


def stochastic_seed(base: int, rank: int, step: int, key: int, phase: int, chunk: int) -> int:
    """The seed for one compression: different per rank, step, tensor key, phase (0 worker,
    1 server) and chunk, and a pure function of them, so a run is reproducible."""
    h = lowbias32((base & _MASK32) ^ 0x243F6A88)
    for v in (rank, step, key, phase, chunk):
        h = lowbias32((h + 0x9E3779B9 + lowbias32(v & _MASK32)) & _MASK32)
    return h


@dataclass(frozen=True)
class ServerLayout:
    """Where a server residual lives: the ``[start, stop)`` ranges of the tensor this rank
    owns (concatenated in the residual), in a group of ``world`` ranks, and ``scale``, the
    factor that turns it into input units (W when averaging, else 1)."""

    world: int
    ranges: tuple[tuple[int, int], ...]
    scale: float

    @property
    def numel(self) -> int:
        return sum(b - a for a, b in self.ranges)


@dataclass
class _Slot:
    worker: torch.Tensor | None = None
    server: torch.Tensor | None = None
    layout: ServerLayout | None = None
    step: int = 0

    def add_server_to(self, out: torch.Tensor) -> None:
        """``out`` (input units, the whole tensor) += the server residual where it lives."""
        off = 0
        for start, stop in self.layout.ranges:
            out[start:stop].add_(self.server[off : off + stop - start].to(out.device),
                                 alpha=self.layout.scale)
            off += stop - start

    def fold_server(self) -> None:
        """Move the server residual into the worker residual (in input units), so that no
        error is lost when the chunk layout or the algorithm changes."""
        if self.server is None:
            return
        if self.worker is not None:
            self.add_server_to(self.worker)
        self.server = None
        self.layout = None


class ErrorFeedback:
    """Residual memory for :func:`gradzip.all_reduce`, reused across calls.

    Args:
        seed: base of the stochastic-rounding seeds (combined with rank, step and key).
    """

    def __init__(self, seed: int = 0) -> None:
        check_seed(seed)
        self.seed = seed
        self._slots: dict[Hashable, _Slot] = {}

    def __repr__(self) -> str:
        return f"ErrorFeedback(seed={self.seed}, keys={len(self._slots)})"

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def keys(self) -> list[Hashable]:
        return list(self._slots)

    # ---- what a key owes -------------------------------------------------------------------
    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The worker residual of ``key`` (flat float32), or None. Live: do not modify."""
        slot = self._slots.get(key)
        return None if slot is None else slot.worker

    def server_residual(self, key: Hashable) -> torch.Tensor | None:
        """The server residual of ``key`` spread over the whole tensor (zero outside the
        ranges this rank owns), in the units it was accumulated in; None if there is none.
        A new tensor."""
        slot = self._slots.get(key)
        if slot is None or slot.server is None or slot.worker is None:
            return None
        out = torch.zeros_like(slot.worker)
        off = 0
        for a, b in slot.layout.ranges:
            out[a:b] = slot.server[off : off + b - a]
            off += b - a
        return out

    def pending(self, key: Hashable) -> torch.Tensor | None:
        """Everything this rank still owes for ``key``, in the units of its input: the worker
        residual plus, on the chunk it owns, the server residual times W (when averaging).
        Averaged over ranks this is what the sum of results lags behind the sum of exact
        all-reduces. A new tensor."""
        slot = self._slots.get(key)
        if slot is None or slot.worker is None:
            return None
        out = slot.worker.clone()
        if slot.server is not None:
            slot.add_server_to(out)
        return out

    def step(self, key: Hashable) -> int:
        """How many compressed calls ``key`` has made (0 for an unknown key)."""
        slot = self._slots.get(key)
        return 0 if slot is None else slot.step

    # ---- what the algorithms use -------------------------------------------------------------
    def worker_residual(self, key: Hashable, numel: int, device: torch.device) -> torch.Tensor:
        """The worker residual of ``key`` on ``device``, zeros on first use. Raises
        ``ValueError`` if ``key`` holds a residual of another size."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        if slot.worker is None:
            slot.worker = torch.zeros(numel, dtype=torch.float32, device=device)
        elif slot.worker.numel() != numel:
            raise ValueError(
                f"ErrorFeedback key {key!r} holds a residual of {slot.worker.numel()} elements "
                f"but the tensor has {numel}; give each tensor its own key")
        elif slot.worker.device != device:
            slot.worker = slot.worker.to(device)
        if slot.server is not None and slot.server.device != device:
            slot.server = slot.server.to(device)
        return slot.worker

    def next_step(self, key: Hashable) -> int:
        """The step number of this compressed call of ``key`` (then counts it)."""
        slot = self._slots.setdefault(key, _Slot())
        slot.step += 1
        return slot.step - 1

    def server_residual_for(self, key: Hashable, layout: ServerLayout,
                            device: torch.device) -> torch.Tensor | None:
        """The server residual of ``key`` for this layout (concatenated over its ranges),
        zeros on first use; None when the layout owns nothing. A server residual of another
        layout is first folded into the worker residual, so no error is lost."""
        slot = self._slots.setdefault(key, _Slot())
        if slot.server is not None and slot.layout != layout:
            slot.fold_server()
        if slot.server is None and layout.numel > 0:
            slot.server = torch.zeros(layout.numel, dtype=torch.float32, device=device)
            slot.layout = layout
        return slot.server

    # ---- changing keys -------------------------------------------------------------------
    def set_residual(self, key: Hashable, worker: torch.Tensor, step: int = 0) -> None:
        """Start ``key`` from the given worker residual (used to carry residuals over when a
        tensor's layout changes, e.g. DDP's bucket rebuild)."""
        if worker.dtype != torch.float32 or worker.dim() != 1 or not worker.is_contiguous():
            raise ValueError("a residual must be a contiguous 1-D float32 tensor")
        self._slots[key] = _Slot(worker=worker, step=step)

    def drop(self, key: Hashable) -> None:
        self._slots.pop(key, None)

    def reset(self) -> None:
        """Forget every residual."""
        self._slots.clear()

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's residuals and step counters (CPU copies), for ``torch.save``."""
        def cpu(t):
            return None if t is None else t.detach().cpu().clone()

        slots = {}
        for key, s in self._slots.items():
            layout = None if s.layout is None else (s.layout.world, s.layout.ranges,
                                                    s.layout.scale)
            slots[key] = {"worker": cpu(s.worker), "server": cpu(s.server),
                          "server_layout": layout, "step": s.step}
        return {"version": 1, "seed": self.seed, "slots": slots}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (on this same rank). Tensors move to the
        reduced tensor's device on first use."""
        if not isinstance(state, dict) or state.get("version") != 1 or "slots" not in state:
            raise ValueError("not an ErrorFeedback state_dict (version 1)")
        check_seed(state["seed"])
        slots = {}
        for key, s in state["slots"].items():
            layout = s["server_layout"]
            if layout is not None:
                world, ranges, scale = layout
                layout = ServerLayout(int(world), tuple((int(a), int(b)) for a, b in ranges),
                                      float(scale))
            slots[key] = _Slot(
                worker=None if s["worker"] is None else s["worker"].clone(),
                server=None if s["server"] is None else s["server"].clone(),
                layout=layout, step=int(s["step"]))
        self.seed = state["seed"]
        self._slots = slots


__all__ = ["ErrorFeedback", "ServerLayout", "key_hash", "stochastic_seed"]
