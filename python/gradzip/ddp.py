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

from . import comm
from .codecs import Codec, as_codec

_STATE_VERSION = 1


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
        if algorithm not in ("auto", "allgather", "alltoall"):
            raise ValueError(f"algorithm must be 'auto', 'allgather' or 'alltoall', got "
                             f"{algorithm!r}")
        for name, v in (("warmup_steps", warmup_steps), ("min_numel", min_numel)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if verify not in comm.VERIFY_MODES:
            raise ValueError(f"verify must be one of {comm.VERIFY_MODES}, got {verify!r}")
        self.process_group = process_group
        self.warmup_steps = warmup_steps
        self.min_numel = min_numel
        self.algorithm = algorithm
        self.error_feedback = error_feedback
        self.verify = verify
        self.iteration = 0
        self.feedback = comm.ErrorFeedback(seed=seed)
        # Parameters get stable ordinals in the order the hook first meets them (DDP's
        # first layout, the same in every run of one model), so keys survive a restart.
        self._ordinal: dict[int, int] = {}
        self._params: list[torch.Tensor] = []  # keeps id()s of known parameters unique
        self._numels: dict[int, int] = {}
        self._layouts: dict[Hashable, tuple[tuple[int, int, int], ...]] = {}
        self._owner: dict[int, Hashable] = {}
        # Bucket layouts of the last complete iteration, in bucket order, and of the current.
        self._order: list[tuple[tuple[int, int, int], ...]] = []
        self._order_next: dict[int, tuple[tuple[int, int, int], ...]] = {}
        self._loaded_numels: dict[int, int] = {}  # from load_state_dict, checked on first use

    def __repr__(self) -> str:
        return (f"CompressionState(codec={str(self.codec)!r}, iteration={self.iteration}, "
                f"warmup_steps={self.warmup_steps}, min_numel={self.min_numel}, "
                f"algorithm={self.algorithm!r}, buckets={len(self._layouts)})")

    # ---- bucket identity and residual carry-over ------------------------------------------
    def _bucket_layout(self, bucket: dist.GradBucket) -> tuple[tuple[int, int, int], ...]:
        layout, off = [], 0
        for p in bucket.parameters():
            o = self._ordinal.get(id(p))
            if o is None:
                o = self._ordinal[id(p)] = len(self._params)
                self._params.append(p)
                self._numels[o] = p.numel()
            elif self._numels[o] != p.numel():
                raise ValueError(f"parameter #{o} had {self._numels[o]} elements and now has "
                                 f"{p.numel()}: this CompressionState belongs to another model")
            layout.append((o, off, p.numel()))
            off += p.numel()
        if off != bucket.buffer().numel():
            raise ValueError(f"DDP bucket {bucket.index()} holds {bucket.buffer().numel()} "
                             f"elements but its parameters add up to {off}; gradzip cannot "
                             "map residuals to parameters for this bucket layout")
        return tuple(layout)

    def _adopt(self, key: Hashable, layout, device: torch.device) -> None:
        """First compressed call of a bucket: carry residuals of its parameters over from the
        buckets that held them before (e.g. before DDP's rebuild)."""
        if key in self._layouts:
            return
        self._layouts[key] = layout
        sources: dict[Hashable, list[tuple[int, int, int]]] = {}
        for o, off, n in layout:
            old = self._owner.get(o)
            if old is not None and old != key:
                sources.setdefault(old, []).append((o, off, n))
            self._owner[o] = key
        if sources and self.error_feedback:
            worker = torch.zeros(sum(n for _, _, n in layout), dtype=torch.float32,
                                 device=device)
            for old, items in sources.items():
                pending = self.feedback.pending(old)
                if pending is None:
                    continue
                where = {o: off for o, off, _ in self._layouts[old]}
                pending = pending.to(device)
                for o, off, n in items:
                    worker[off : off + n] = pending[where[o] : where[o] + n]
            self.feedback.set_residual(key, worker)
        for old in list(self._layouts):
            if old != key and all(self._owner.get(o) != old for o, _, _ in self._layouts[old]):
                del self._layouts[old]
                self.feedback.drop(old)

    def _replay_parts(self, layout):
        """The saved buckets this bucket is made of, when it is a union of two or more whole
        buckets of the last iteration's layout (DDP's first iteration after a restart);
        else None."""
        if not self._order or layout in self._order:
            return None
        index = {o: i for i, lay in enumerate(self._order) for o, _, _ in lay}
        if any(o not in index for o, _, _ in layout):
            return None
        here = {o for o, _, _ in layout}
        parts = sorted({index[o] for o in here})
        if any(o not in here for i in parts for o, _, _ in self._order[i]):
            return None
        return [self._order[i] for i in parts]

    def residual_for(self, param: torch.Tensor) -> torch.Tensor | None:
        """What this rank still owes for ``param`` (its slice of the bucket's pending error,
        see :meth:`gradzip.ErrorFeedback.pending`), shaped like ``param``; None if none."""
        o = self._ordinal.get(id(param))
        key = self._owner.get(o) if o is not None else None
        if key is None:
            return None
        pending = self.feedback.pending(key)
        if pending is None:
            return None
        off = next(off for oo, off, _ in self._layouts[key] if oo == o)
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
            "numels": dict(self._numels),
            "layouts": dict(self._layouts),
            "owner": dict(self._owner),
            "order": list(self._order),
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
        if self._params:
            raise ValueError("load_state_dict must be called before the first iteration")
        self.iteration = int(state["iteration"])
        self._loaded_numels = {int(k): int(v) for k, v in state["numels"].items()}
        self._layouts = {k: tuple(tuple(x) for x in v) for k, v in state["layouts"].items()}
        self._owner = dict(state["owner"])
        self._order = [tuple(tuple(x) for x in lay) for lay in state["order"]]
        self._order_next = {}
        self.feedback.load_state_dict(state["feedback"])

    def _check_loaded(self, layout) -> None:
        loaded = self._loaded_numels
        for o, _, n in layout:
            if o in loaded and loaded[o] != n:
                raise ValueError(
                    f"parameter #{o} has {n} elements but had {loaded[o]} in the loaded "
                    "state_dict: it was saved from a different model")


def _reduce(state: CompressionState, tensor: torch.Tensor, layout, iteration: int,
            async_op: bool):
    """One bucket's worth of gradients (laid out as ``layout``), in place."""
    if iteration < state.warmup_steps or tensor.numel() < state.min_numel:
        return comm.all_reduce(tensor, state.codec, group=state.process_group,
                               algorithm="plain", average=True, async_op=async_op,
                               verify=state.verify)
    key = ("bucket", tuple(o for o, _, _ in layout))
    state._adopt(key, layout, tensor.device)
    # Without error feedback there is no per-key step counter: fold the iteration and the
    # bucket into the base seed instead (all_reduce still adds the rank).
    seed = comm.stochastic_seed(state.feedback.seed, 0, iteration, comm.key_hash(key), 2, 0)
    return comm.all_reduce(
        tensor, state.codec, state=state.feedback if state.error_feedback else None,
        group=state.process_group, algorithm=state.algorithm, average=True,
        async_op=async_op, key=key, min_numel=0, verify=state.verify, seed=seed)


def compress_hook(state: CompressionState, bucket: dist.GradBucket
                  ) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients averaged over the group through
    :func:`gradzip.all_reduce`. Register with ``model.register_comm_hook(state,
    gradzip.ddp.compress_hook)``."""
    buf = bucket.buffer()
    layout = state._bucket_layout(bucket)
    state._check_loaded(layout)
    iteration = state.iteration
    parts = state._replay_parts(layout)
    if parts is None:
        state._order_next[bucket.index()] = layout
        fut = _reduce(state, buf, layout, iteration, async_op=True)
    else:
        where = {o: off for o, off, _ in layout}
        for sub in parts:
            tmp = torch.cat([buf[where[o] : where[o] + n] for o, _, n in sub])
            _reduce(state, tmp, sub, iteration, async_op=False)
            for o, off, n in sub:
                buf[where[o] : where[o] + n].copy_(tmp[off : off + n])
            state._order_next[len(state._order_next)] = sub
        # A CUDA-aware future: its value is ready once the current stream's work is.
        fut = torch.futures.Future(devices=[buf.device] if buf.is_cuda else None)
        fut.set_result(buf)
    if bucket.is_last():
        state.iteration += 1
        state._order = [state._order_next[i] for i in sorted(state._order_next)]
        state._order_next = {}
    return fut


__all__ = ["CompressionState", "compress_hook"]
