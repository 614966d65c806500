"""Error feedback: the residuals compression leaves behind, and the seeds of each compression.

:class:`ErrorFeedback` holds, per key (one per tensor being reduced), the *worker* residual
(what this rank's compression dropped, one float32 per element), for the two-phase
algorithm the *server* residual of the ranges this rank owns (its chunk of every pipeline
segment), and a step counter that feeds the stochastic-rounding seeds. The algorithms use
it only through its public methods; nothing else touches its slots.

Worker residuals can be stored compactly (``storage``): ``"fp32"`` (4 bytes per element,
exact), ``"bf16"`` (2 bytes: the residual rounded to bfloat16 after each call) or
``"int8"`` (about 1.03 bytes: the residual itself quantized with gradzip's int8 codec,
block 128, nearest rounding). A compact residual is decoded into a float32 working copy
for the call that uses it and encoded again right after the compression that updated it
(:meth:`ErrorFeedback.store`); what the encoding drops is lost, which is the price of the
memory. That matters for FSDP's compressed reduce-scatter, whose worker residual is the
size of the *unsharded* gradient. Server residuals (1/W of the tensor) are always float32.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from .._checks import check_choice, check_seed
from ..codecs import Codec
from ..spec import lowbias32

_MASK32 = 0xFFFFFFFF

STORAGES = ("fp32", "bf16", "int8")
_INT8 = Codec("int8")  # nearest rounding, block 128: a deterministic encoding


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


def _encode(worker: torch.Tensor, storage: str) -> torch.Tensor:
    if storage == "fp32":
        return worker
    if storage == "bf16":
        return worker.to(torch.bfloat16)
    return _INT8.compress(worker)


def _decode(stored: torch.Tensor, storage: str, numel: int) -> torch.Tensor:
    """A new float32 tensor (the stored one itself for fp32)."""
    if storage == "fp32":
        return stored
    if storage == "bf16":
        return stored.to(torch.float32)
    return _INT8.decompress_into(stored, torch.empty(numel, dtype=torch.float32,
                                                     device=stored.device))


@dataclass
class _Slot:
    worker: torch.Tensor | None = None  # in the feedback's storage format
    numel: int = 0
    working: torch.Tensor | None = None  # compact storage: the float32 copy of this call
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
        error is lost when the chunk layout or the algorithm changes. Needs the float32
        worker residual: the working copy with compact storage (see
        ErrorFeedback.server_residual_for)."""
        if self.server is None:
            return
        worker = self.working if self.working is not None else self.worker
        if worker is not None:
            self.add_server_to(worker)
        self.server = None
        self.layout = None


class Journal:
    """What one call changes of a key's residuals, kept so that it can be put back: a call
    whose agreement check is folded into its collectives (:mod:`.fold`) learns only after
    it has started that another rank made a different call, and must then leave no trace.

    ``whole`` (or a key that holds a server residual, which the all-gather folds into the
    worker residual first): everything (worker and server residual, step) is copied at once.
    Otherwise only the worker residual changes (the all-gather algorithm), and lazily: the call
    passes each piece to :meth:`save` just before compressing it, until :meth:`close` (the
    first collective came back clean, so the call stands); with compact storage nothing needs
    copying at all, as :meth:`ErrorFeedback.store` replaces the stored tensor instead of
    writing into it. So a large call copies only the pieces it compressed before its first
    piece had made the round trip, not the whole residual."""

    def __init__(self, fb: ErrorFeedback, key: Hashable, whole: bool) -> None:
        self._fb, self._key = fb, key
        slot = fb._slots.get(key)
        self._old: _Slot | None = None
        # A server residual (of a two-phase call) is folded into the worker residual by the
        # all-gather before its first piece: that is not a piecewise change.
        whole = whole or (slot is not None and slot.server is not None)
        if slot is not None:
            self._old = _Slot(worker=slot.worker, numel=slot.numel, server=slot.server,
                              layout=slot.layout, step=slot.step)
            if whole:
                self._old.worker = None if slot.worker is None else slot.worker.clone()
                self._old.server = None if slot.server is None else slot.server.clone()
        self._copies: list[tuple[int, torch.Tensor]] = []
        # whether save() must still copy: an fp32 worker residual updated in place
        self.open = not whole and self._old is not None and self._old.worker is not None \
            and fb.storage == "fp32"
        self._closed = False

    def save(self, start: int, stop: int, worker: torch.Tensor) -> None:
        """``worker[start:stop]`` (the live float32 worker residual) is about to change."""
        if self.open:
            self._copies.append((start, worker[start:stop].clone()))

    def close(self) -> None:
        """The call stands: nothing more to keep."""
        self.open, self._closed = False, True
        self._copies.clear()

    def restore(self) -> None:
        """Put the key back as it was when the journal started."""
        if self._closed:
            raise RuntimeError("gradzip internal error: a closed journal cannot restore")
        old = self._old
        if old is None:
            self._fb._slots.pop(self._key, None)
            return
        for start, copy in self._copies:
            old.worker[start : start + copy.numel()].copy_(copy)
        self._fb._slots[self._key] = old


class ErrorFeedback:
    """Residual memory for :func:`gradzip.all_reduce`, reused across calls.

    Args:
        seed: base of the stochastic-rounding seeds (combined with rank, step and key).
        storage: how worker residuals are kept between calls: "fp32", "bf16" or "int8"
            (see the module docstring).
    """

    def __init__(self, seed: int = 0, storage: str = "fp32") -> None:
        check_seed(seed)
        check_choice(storage, STORAGES, "storage")
        self.seed = seed
        self.storage = storage
        self._slots: dict[Hashable, _Slot] = {}

    def __repr__(self) -> str:
        return (f"ErrorFeedback(seed={self.seed}, storage={self.storage!r}, "
                f"keys={len(self._slots)})")

    def memory_bytes(self) -> int:
        """Bytes held between calls by every residual (worker and server)."""
        return sum(t.numel() * t.element_size() for s in self._slots.values()
                   for t in (s.worker, s.server) if t is not None)

    def _worker32(self, slot: _Slot) -> torch.Tensor | None:
        if slot.worker is None:
            return None
        if slot.working is not None:
            return slot.working
        return _decode(slot.worker, self.storage, slot.numel)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def keys(self) -> list[Hashable]:
        return list(self._slots)

    # ---- what a key owes -------------------------------------------------------------------
    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The worker residual of ``key`` (flat float32), or None. Live with fp32 storage:
        do not modify."""
        slot = self._slots.get(key)
        return None if slot is None else self._worker32(slot)

    def server_residual(self, key: Hashable) -> torch.Tensor | None:
        """The server residual of ``key`` spread over the whole tensor (zero outside the
        ranges this rank owns), in the units it was accumulated in; None if there is none.
        A new tensor."""
        slot = self._slots.get(key)
        if slot is None or slot.server is None or slot.worker is None:
            return None
        out = torch.zeros(slot.numel, dtype=torch.float32, device=slot.server.device)
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
        out = self._worker32(slot).clone()
        if slot.server is not None:
            slot.add_server_to(out)
        return out

    def step(self, key: Hashable) -> int:
        """How many compressed calls ``key`` has made (0 for an unknown key)."""
        slot = self._slots.get(key)
        return 0 if slot is None else slot.step

    # ---- what the algorithms use -------------------------------------------------------------
    def check_key(self, key: Hashable, numel: int) -> None:
        """Raise ``ValueError`` if ``key`` holds a residual of another size."""
        slot = self._slots.get(key)
        if slot is not None and slot.worker is not None and slot.numel != numel:
            raise ValueError(
                f"ErrorFeedback key {key!r} holds a residual of {slot.numel} elements "
                f"but the tensor has {numel}; give each tensor its own key")

    def worker_residual(self, key: Hashable, numel: int, device: torch.device) -> torch.Tensor:
        """The worker residual of ``key`` on ``device`` as float32, zeros on first use,
        updated in place by the compression; with compact storage a working copy that
        :meth:`store` encodes again. Raises ``ValueError`` if ``key`` holds a residual of
        another size."""
        self.check_key(key, numel)
        slot = self._slots.setdefault(key, _Slot())
        if slot.worker is None:
            slot.worker = _encode(torch.zeros(numel, dtype=torch.float32, device=device),
                                  self.storage)
            slot.numel = numel
        elif slot.worker.device != device:
            slot.worker = slot.worker.to(device)
        if slot.server is not None and slot.server.device != device:
            slot.server = slot.server.to(device)
        if self.storage == "fp32":
            return slot.worker
        if slot.working is None:
            slot.working = _decode(slot.worker, self.storage, numel)
        return slot.working

    def store(self, key: Hashable) -> None:
        """The compression that updated ``key``'s worker residual is done: encode the
        working copy into compact storage (nothing to do for fp32)."""
        slot = self._slots.get(key)
        if slot is not None and slot.working is not None:
            slot.worker = _encode(slot.working, self.storage)
            slot.working = None

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
            if self.storage != "fp32" and slot.worker is not None and slot.working is None:
                slot.working = _decode(slot.worker, self.storage, slot.numel)
                slot.fold_server()
                self.store(key)
            else:
                slot.fold_server()
        if slot.server is None and layout.numel > 0:
            slot.server = torch.zeros(layout.numel, dtype=torch.float32, device=device)
            slot.layout = layout
        return slot.server

    def fold_server(self, key: Hashable) -> None:
        """Move ``key``'s server residual into its worker residual, for an algorithm that
        has none (the all-gather, after two-phase calls of the same key), so no error is
        lost. Call after :meth:`worker_residual` (compact storage: its working copy)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.fold_server()

    def journal(self, key: Hashable, *, whole: bool) -> Journal:
        """Start keeping what a call is about to change of ``key``, for
        :meth:`Journal.restore` (see :class:`Journal`)."""
        return Journal(self, key, whole)

    # ---- changing keys -------------------------------------------------------------------
    def set_residual(self, key: Hashable, worker: torch.Tensor, step: int = 0) -> None:
        """Start ``key`` from the given worker residual (used to carry residuals over when a
        tensor's layout changes, e.g. DDP's bucket rebuild)."""
        if worker.dtype != torch.float32 or worker.dim() != 1 or not worker.is_contiguous():
            raise ValueError("a residual must be a contiguous 1-D float32 tensor")
        self._slots[key] = _Slot(worker=_encode(worker, self.storage), numel=worker.numel(),
                                 step=step)

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
            slots[key] = {"worker": cpu(s.worker), "numel": s.numel, "server": cpu(s.server),
                          "server_layout": layout, "step": s.step}
        return {"version": 1, "seed": self.seed, "storage": self.storage, "slots": slots}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (on this same rank). Tensors move to the
        reduced tensor's device on first use."""
        if not isinstance(state, dict) or state.get("version") != 1 or "slots" not in state:
            raise ValueError("not an ErrorFeedback state_dict (version 1)")
        check_seed(state["seed"])
        if state.get("storage") != self.storage:
            raise ValueError(f"the state_dict holds {state.get('storage')!r} residuals, this "
                             f"ErrorFeedback stores {self.storage!r}")
        slots = {}
        for key, s in state["slots"].items():
            layout = s["server_layout"]
            if layout is not None:
                world, ranges, scale = layout
                layout = ServerLayout(int(world), tuple((int(a), int(b)) for a, b in ranges),
                                      float(scale))
            slots[key] = _Slot(
                worker=None if s["worker"] is None else s["worker"].clone(),
                numel=int(s["numel"]),
                server=None if s["server"] is None else s["server"].clone(),
                layout=layout, step=int(s["step"]))
        self.seed = state["seed"]
        self._slots = slots


__all__ = ["STORAGES", "ErrorFeedback", "ServerLayout", "key_hash", "stochastic_seed"]
