"""DDP communication hook: compressed gradient all-reduce with error feedback.

Adopting it is one line after wrapping the model::

    model = torch.nn.parallel.DistributedDataParallel(model)
    state = gradzip.ddp.CompressionState(codec="int4")
    model.register_comm_hook(state, gradzip.ddp.compress_hook)

What the hook does per gradient bucket (DDP packs parameters' gradients into buckets of
about 25 MB and calls the hook once per bucket per iteration):

* the first ``warmup_steps`` iterations, and every bucket with fewer than ``min_numel``
  elements, go through a plain (uncompressed) all-reduce;
* the others go through :func:`gradzip.all_reduce` with error feedback. Residuals are
  keyed by the bucket's content (the parameters it holds, in order), not its index. DDP
  rebuilds its buckets after the first iteration in the order gradients became ready; when
  a bucket with new content appears, each parameter's residual is carried over from the
  bucket that held it before (a server residual of the two-phase algorithm is first folded
  into the worker residual, so no error is lost);
* stochastic rounding draws from seeds that differ per rank, bucket and step and depend
  only on ``seed`` and those, so a run is reproducible.

``state.state_dict()`` / ``state.load_state_dict()`` save and restore one rank's residuals,
counters and the bucket layout last used (save one file per rank). A new DDP instance
starts with a layout of its own for its first iteration (with the default
``find_unused_parameters=False``, one bucket holding every parameter) and only then
rebuilds the layout the saved run was using. So that the resumed run continues
bit-identically with the run that never stopped, the hook replays the saved layout during
that first iteration: it splits a bucket that holds whole saved buckets into those, in
their saved order, reduces each exactly as the uninterrupted run did (same residual slot,
seeds, algorithm and plain/compressed choice) and writes the results back.
"""

# No "from __future__ import annotations": DDP's register_comm_hook compares the hook's
# annotations with the real dist.GradBucket / torch.futures.Future[torch.Tensor] objects.
from collections.abc import Hashable

import torch
import torch.distributed as dist

from . import _checks, comm
from .codecs import Codec, as_codec

_STATE_VERSION = 1

# A bucket's layout: (parameter ordinal, offset in the bucket, numel) per parameter.
Layout = tuple[tuple[int, int, int], ...]


class BucketLayouts:
    """Which parameters each DDP bucket holds, across DDP's bucket rebuilds and restarts.

    Parameters get stable ordinals in the order the hook first meets them (DDP's first
    layout, the same in every run of one model), so layouts and residual keys survive a
    restart. Residuals follow their parameters into new buckets (:meth:`adopt`), and after
    a restart the saved layout is replayed (:meth:`replay_parts`).
    """

    def __init__(self) -> None:
        self.ordinal: dict[int, int] = {}  # id(parameter) -> ordinal
        self.params: list[torch.Tensor] = []  # keeps id()s of known parameters unique
        self.numels: dict[int, int] = {}
        self.layouts: dict[Hashable, Layout] = {}  # residual key -> layout
        self.owner: dict[int, Hashable] = {}  # ordinal -> residual key holding it
        self.order: list[Layout] = []  # the last complete iteration's buckets, in order
        self.order_next: dict[int, Layout] = {}  # the current iteration's so far
        self.loaded_numels: dict[int, int] = {}  # from a state_dict, checked on first use

    @staticmethod
    def key(layout: Layout) -> Hashable:
        return ("bucket", tuple(o for o, _, _ in layout))

    def layout_of(self, bucket: dist.GradBucket) -> Layout:
        layout, off = [], 0
        for p in bucket.parameters():
            o = self.ordinal.get(id(p))
            if o is None:
                o = self.ordinal[id(p)] = len(self.params)
                self.params.append(p)
                self.numels[o] = p.numel()
            elif self.numels[o] != p.numel():
                raise ValueError(f"parameter #{o} had {self.numels[o]} elements and now has "
                                 f"{p.numel()}: this CompressionState belongs to another model")
            layout.append((o, off, p.numel()))
            off += p.numel()
        if off != bucket.buffer().numel():
            raise ValueError(f"DDP bucket {bucket.index()} holds {bucket.buffer().numel()} "
                             f"elements but its parameters add up to {off}; gradzip cannot "
                             "map residuals to parameters for this bucket layout")
        for o, _, n in layout:
            if o in self.loaded_numels and self.loaded_numels[o] != n:
                raise ValueError(
                    f"parameter #{o} has {n} elements but had {self.loaded_numels[o]} in the "
                    "loaded state_dict: it was saved from a different model")
        return tuple(layout)

    def adopt(self, layout: Layout, feedback: comm.ErrorFeedback | None,
              device: torch.device) -> Hashable:
        """The residual key of ``layout``. On its first compressed call, carry residuals of
        its parameters over from the buckets that held them before."""
        key = self.key(layout)
        if key in self.layouts:
            return key
        self.layouts[key] = layout
        sources: dict[Hashable, list[tuple[int, int, int]]] = {}
        for o, off, n in layout:
            old = self.owner.get(o)
            if old is not None and old != key:
                sources.setdefault(old, []).append((o, off, n))
            self.owner[o] = key
        if sources and feedback is not None:
            worker = torch.zeros(sum(n for _, _, n in layout), dtype=torch.float32,
                                 device=device)
            for old, items in sources.items():
                pending = feedback.pending(old)
                if pending is None:
                    continue
                where = {o: off for o, off, _ in self.layouts[old]}
                pending = pending.to(device)
                for o, off, n in items:
                    worker[off : off + n] = pending[where[o] : where[o] + n]
            feedback.set_residual(key, worker)
        for old in list(self.layouts):
            if old != key and all(self.owner.get(o) != old for o, _, _ in self.layouts[old]):
                del self.layouts[old]
                if feedback is not None:
                    feedback.drop(old)
        return key

    def replay_parts(self, layout: Layout) -> list[Layout] | None:
        """The saved buckets this bucket is made of, when it is a union of two or more whole
        buckets of the last iteration's layout (DDP's first iteration after a restart);
        else None."""
        if not self.order or layout in self.order:
            return None
        index = {o: i for i, lay in enumerate(self.order) for o, _, _ in lay}
        if any(o not in index for o, _, _ in layout):
            return None
        here = {o for o, _, _ in layout}
        parts = sorted({index[o] for o in here})
        if any(o not in here for i in parts for o, _, _ in self.order[i]):
            return None
        return [self.order[i] for i in parts]

    def record(self, layout: Layout, index: int | None = None) -> None:
        """This iteration reduced a bucket of ``layout`` (at DDP bucket ``index``)."""
        self.order_next[len(self.order_next) if index is None else index] = layout

    def end_iteration(self) -> None:
        self.order = [self.order_next[i] for i in sorted(self.order_next)]
        self.order_next = {}

    def where(self, param: torch.Tensor) -> tuple[Hashable, int] | None:
        """(residual key, offset) of ``param``'s gradient, if it was compressed."""
        o = self.ordinal.get(id(param))
        key = self.owner.get(o) if o is not None else None
        if key is None:
            return None
        return key, next(off for oo, off, _ in self.layouts[key] if oo == o)

    def state_dict(self) -> dict:
        return {"numels": dict(self.numels), "layouts": dict(self.layouts),
                "owner": dict(self.owner), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        if self.params:
            raise ValueError("load_state_dict must be called before the first iteration")
        self.loaded_numels = {int(k): int(v) for k, v in state["numels"].items()}
        self.layouts = {k: tuple(tuple(x) for x in v) for k, v in state["layouts"].items()}
        self.owner = dict(state["owner"])
        self.order = [tuple(tuple(x) for x in lay) for lay in state["order"]]
        self.order_next = {}


class CompressionState:
    """State of :func:`compress_hook` on one rank.

    Args:
        codec: a :class:`gradzip.Codec` or spec string ("int8", "int4", "int2", "sign",
            "topk:0.01", ...).
        process_group: the DDP model's process group (default: the world).
        warmup_steps: iterations that use a plain all-reduce before compression starts.
        min_numel: buckets with fewer elements always use a plain all-reduce.
        algorithm: "auto", "allgather", "alltoall" (see :mod:`gradzip.comm`).
        error_feedback: keep residuals (strongly recommended; without them the compression
            error is simply lost).
        seed: base of the stochastic-rounding seeds.
        verify: agreement checks of :func:`gradzip.all_reduce` ("auto", "always", "once",
            "never").
    """

    def __init__(
        self,
        codec: Codec | str = "int4",
        process_group: dist.ProcessGroup | None = None,
        warmup_steps: int = 10,
        min_numel: int = comm.DEFAULT_MIN_NUMEL,
        algorithm: str = "auto",
        error_feedback: bool = True,
        seed: int = 0,
        verify: str = "auto",
    ) -> None:
        self.codec = as_codec(codec)
        _checks.check_choice(algorithm, ("auto", "allgather", "alltoall"), "algorithm")
        _checks.check_nonnegative_int(warmup_steps, "warmup_steps")
        _checks.check_nonnegative_int(min_numel, "min_numel")
        _checks.check_bool(error_feedback, "error_feedback")
        _checks.check_choice(verify, comm.VERIFY_MODES, "verify")
        self.process_group = process_group
        self.warmup_steps = warmup_steps
        self.min_numel = min_numel
        self.algorithm = algorithm
        self.error_feedback = error_feedback
        self.verify = verify
        self.iteration = 0
        self.feedback = comm.ErrorFeedback(seed=seed)
        self.buckets = BucketLayouts()

    def __repr__(self) -> str:
        return (f"CompressionState(codec={str(self.codec)!r}, iteration={self.iteration}, "
                f"warmup_steps={self.warmup_steps}, min_numel={self.min_numel}, "
                f"algorithm={self.algorithm!r}, buckets={len(self.buckets.layouts)})")

    # ---- the hook ------------------------------------------------------------------------
    def hook(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """The bucket's gradients averaged over the group (what :func:`compress_hook`
        does)."""
        buf = bucket.buffer()
        layout = self.buckets.layout_of(bucket)
        parts = self.buckets.replay_parts(layout)
        if parts is None:
            self.buckets.record(layout, bucket.index())
            fut = self._reduce(buf, layout, async_op=True)
        else:
            where = {o: off for o, off, _ in layout}
            for sub in parts:
                tmp = torch.cat([buf[where[o] : where[o] + n] for o, _, n in sub])
                self._reduce(tmp, sub, async_op=False)
                for o, off, n in sub:
                    buf[where[o] : where[o] + n].copy_(tmp[off : off + n])
                self.buckets.record(sub)
            fut = comm.collectives.completed(buf)
        if bucket.is_last():
            self.iteration += 1
            self.buckets.end_iteration()
        return fut

    def _reduce(self, tensor: torch.Tensor, layout: Layout, async_op: bool):
        """One bucket's worth of gradients (laid out as ``layout``), in place."""
        if self.iteration < self.warmup_steps or tensor.numel() < self.min_numel:
            return comm.all_reduce(tensor, self.codec, group=self.process_group,
                                   algorithm="plain", average=True, async_op=async_op,
                                   verify=self.verify)
        feedback = self.feedback if self.error_feedback else None
        key = self.buckets.adopt(layout, feedback, tensor.device)
        # Without error feedback there is no per-key step counter: fold the iteration and
        # the bucket into the base seed instead (all_reduce still adds the rank).
        seed = comm.stochastic_seed(self.feedback.seed, 0, self.iteration, comm.key_hash(key),
                                    2, 0)
        return comm.all_reduce(
            tensor, self.codec, state=feedback, group=self.process_group,
            algorithm=self.algorithm, average=True, async_op=async_op, key=key, min_numel=0,
            verify=self.verify, seed=seed)

    def residual_for(self, param: torch.Tensor) -> torch.Tensor | None:
        """What this rank still owes for ``param`` (its slice of the bucket's pending error,
        see :meth:`gradzip.ErrorFeedback.pending`), shaped like ``param``; None if none."""
        where = self.buckets.where(param)
        if where is None:
            return None
        key, off = where
        pending = self.feedback.pending(key)
        if pending is None:
            return None
        return pending[off : off + param.numel()].view(param.shape)

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's residuals, counters and bucket layouts (tensors copied to the CPU).
        Save one per rank and give each rank its own back."""
        return {
            "version": _STATE_VERSION,
            "codec": self.codec.spec,
            "iteration": self.iteration,
            "rank": dist.get_rank(self.process_group) if dist.is_initialized() else 0,
            "world_size": (dist.get_world_size(self.process_group)
                           if dist.is_initialized() else 1),
            **self.buckets.state_dict(),
            "feedback": self.feedback.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` of the same rank, before the first resumed iteration."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("not a gradzip.ddp.CompressionState state_dict "
                             f"(version {_STATE_VERSION})")
        if state["codec"] != self.codec.spec:
            raise ValueError(f"the state_dict was saved with codec {state['codec']!r}, this "
                             f"state uses {self.codec.spec!r}")
        if dist.is_initialized():
            rank = dist.get_rank(self.process_group)
            world = dist.get_world_size(self.process_group)
            if (state["rank"], state["world_size"]) != (rank, world):
                raise ValueError(f"the state_dict belongs to rank {state['rank']} of "
                                 f"{state['world_size']}, this is rank {rank} of {world}")
        if self.buckets.params:
            raise ValueError("load_state_dict must be called before the first iteration")
        self.feedback.load_state_dict(state["feedback"])  # validates before it changes
        self.buckets.load_state_dict(state)
        self.iteration = int(state["iteration"])


def compress_hook(state: CompressionState, bucket: dist.GradBucket
                  ) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients averaged over the group through
    :func:`gradzip.all_reduce`. Register with ``model.register_comm_hook(state,
    gradzip.ddp.compress_hook)``."""
    return state.hook(bucket)


__all__ = ["BucketLayouts", "CompressionState", "compress_hook"]
