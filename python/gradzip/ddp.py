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
counters and the bucket layout last used. The state is a ``Stateful`` object for
``torch.distributed.checkpoint`` too: put it next to the model and optimizer
(``dcp.save({"model": ..., "optim": ..., "gradzip": state})``) and every rank gets its own
residuals back from ``dcp.load`` (see :meth:`CompressionState.state_dict` for how). With
``torch.save`` instead, save one file per rank. A new DDP instance
starts with a layout of its own for its first iteration (with the default
``find_unused_parameters=False``, one bucket holding every parameter) and only then
rebuilds the layout the saved run was using. So that the resumed run continues
bit-identically with the run that never stopped, the hook replays the saved layout during
that first iteration: it splits a bucket that holds whole saved buckets into those, in
their saved order, reduces each exactly as the uninterrupted run did (same residual slot,
seeds, algorithm and plain/compressed choice) and writes the results back.

``state.stats()`` says what really happened per bucket: which algorithm ran (``"auto"``
may settle on the plain all-reduce where compression does not pay), the bytes this rank
sent against the uncompressed all-reduce, and the time spent compressing;
``state.stats_table()`` prints it.

Compiled DDP (``torch._dynamo.config.optimize_ddp = "python_reducer"`` with compiled
autograd) calls the hook once per parameter with ``(grad, param)`` instead of a bucket:
see :meth:`CompressionState.param_hook`.
"""

# No "from __future__ import annotations": DDP's register_comm_hook compares the hook's
# annotations with the real dist.GradBucket / torch.futures.Future[torch.Tensor] objects.
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import _checks, comm
from .codecs import Codec, as_codec
from .comm import rank_state

_STATE_VERSION = 2  # 1: the per-rank dict of gradzip 0.1 (still loaded)
DEFAULT_MIN_NUMEL = comm.DEFAULT_MIN_NUMEL

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

    def param_ordinal(self, param: torch.Tensor) -> int:
        """``param``'s ordinal (a new one the first time), checked against the model it
        was first met in and against a loaded state (compiled DDP's per-parameter calls)."""
        o = self.ordinal.get(id(param))
        if o is None:
            o = self.ordinal[id(param)] = len(self.params)
            self.params.append(param)
            self.numels[o] = param.numel()
        elif self.numels[o] != param.numel():
            raise ValueError(f"parameter #{o} had {self.numels[o]} elements and now has "
                             f"{param.numel()}: this CompressionState belongs to another model")
        if o in self.loaded_numels and self.loaded_numels[o] != param.numel():
            raise ValueError(
                f"parameter #{o} has {param.numel()} elements but had {self.loaded_numels[o]} "
                "in the loaded state_dict: it was saved from a different model")
        return o

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


@dataclass
class _CallRecord:
    """What the hook did with one bucket (or, under compiled DDP, one parameter) so far."""

    numel: int
    params: int
    dtype: torch.dtype
    index: int | None = None  # the DDP bucket index at the last call
    calls: int = 0
    compressed: int = 0  # calls that sent compressed payloads
    warmup: int = 0  # plain calls because of warmup_steps
    small: int = 0  # plain calls because of min_numel
    algorithm: str = ""  # of the last call
    by_algorithm: Counter = field(default_factory=Counter)  # calls per algorithm
    bytes_sent: int = 0
    uncompressed_bytes: int = 0  # what the plain all-reduce of the same calls sends
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> wall seconds
    open: list[dict[str, float]] = field(default_factory=list)  # async calls' timings

    def close(self) -> None:
        """Fold the timings of finished calls in (an async call's decode adds its time when
        its collective completes)."""
        for t in self.open:
            for k, v in t.items():
                self.seconds[k] = self.seconds.get(k, 0.0) + v
        self.open = []


@torch.compiler.disable
def _refuse_in_graph(message: str) -> None:
    """Raise ``ValueError(message)`` from a traced hook. Run eagerly (a graph break), so that
    the error reaches the caller as it is instead of through dynamo's tracing."""
    raise ValueError(message)


def _plain_bytes(numel: int, dtype: torch.dtype, world: int) -> int:
    return comm.Plan("plain", numel, world, dtype.itemsize).bytes_sent


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
        min_numel: int = DEFAULT_MIN_NUMEL,
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
        self._records: dict[Hashable, _CallRecord] = {}
        self._world: int | None = None
        # compiled DDP (param_hook): eager calls per parameter ordinal
        self._param_calls: dict[int, int] = {}
        self._warm = warmup_steps > 0  # compiled DDP: warm-up iterations still to run
        self._traced_calls: dict[int, torch.Tensor] = {}  # compiled DDP: calls per ordinal
        self._traced_dtypes: dict[int, torch.dtype] = {}

    def __repr__(self) -> str:
        return (f"CompressionState(codec={str(self.codec)!r}, iteration={self.iteration}, "
                f"warmup_steps={self.warmup_steps}, min_numel={self.min_numel}, "
                f"algorithm={self.algorithm!r}, buckets={len(self.buckets.layouts)})")

    def _world_size(self) -> int:
        if self._world is None:
            self._world = dist.get_world_size(self.process_group)
        return self._world

    # ---- the hook ------------------------------------------------------------------------
    def hook(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """The bucket's gradients averaged over the group (what :func:`compress_hook`
        does)."""
        buf = bucket.buffer()
        layout = self.buckets.layout_of(bucket)
        parts = self.buckets.replay_parts(layout)
        if parts is None:
            self.buckets.record(layout, bucket.index())
            fut = self._reduce(buf, layout, async_op=True, index=bucket.index())
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

    def _reduce(self, tensor: torch.Tensor, layout: Layout, async_op: bool,
                index: int | None = None):
        """One bucket's worth of gradients (laid out as ``layout``), in place."""
        rec = self._record(BucketLayouts.key(layout), tensor, len(layout), index)
        timings: dict[str, float] = {}
        rec.open.append(timings)
        if self.iteration < self.warmup_steps or tensor.numel() < self.min_numel:
            out = comm.all_reduce(tensor, self.codec, group=self.process_group,
                                  algorithm="plain", average=True, async_op=async_op,
                                  verify=self.verify, timings=timings)
            self._count(rec, tensor, "plain",
                        "warmup" if self.iteration < self.warmup_steps else "small")
            return out
        feedback = self.feedback if self.error_feedback else None
        key = self.buckets.adopt(layout, feedback, tensor.device)
        # Without error feedback there is no per-key step counter: fold the iteration and
        # the bucket into the base seed instead (all_reduce still adds the rank).
        seed = comm.stochastic_seed(self.feedback.seed, 0, self.iteration, comm.key_hash(key),
                                    2, 0)
        out = comm.all_reduce(
            tensor, self.codec, state=feedback, group=self.process_group,
            algorithm=self.algorithm, average=True, async_op=async_op, key=key, min_numel=0,
            verify=self.verify, seed=seed, timings=timings)
        # A call that compressed has timed its compression by now (it happens before the
        # collective starts); "auto" may have run the plain all-reduce instead.
        self._count(rec, tensor, self._compressed_algorithm(tensor)
                    if "compress" in timings else "plain")
        return out

    def _compressed_algorithm(self, tensor: torch.Tensor) -> str:
        world = self._world_size()
        if self.algorithm == "auto":  # "auto" may time more than one compressed algorithm
            ran = comm.last_auto_algorithm(tensor.numel(), self.codec, tensor.dtype,
                                           self.process_group, True, world)
            if ran is not None and ran != "plain":
                return ran
        return comm.plan(self.codec, tensor.numel(), tensor.dtype, world, self.algorithm,
                         0).algorithm

    def _record(self, key: Hashable, tensor: torch.Tensor, params: int,
                index: int | None) -> _CallRecord:
        rec = self._records.get(key)
        if rec is None:
            rec = self._records[key] = _CallRecord(tensor.numel(), params, tensor.dtype)
        rec.close()
        rec.index = index
        return rec

    def _count(self, rec: _CallRecord, tensor: torch.Tensor, algorithm: str,
               why: str = "", calls: int = 1) -> None:
        world = self._world_size()
        rec.calls += calls
        rec.algorithm = algorithm
        rec.by_algorithm[algorithm] += calls
        if why:
            setattr(rec, why, getattr(rec, why) + calls)
        plain = _plain_bytes(tensor.numel(), tensor.dtype, world)
        rec.uncompressed_bytes += calls * plain
        if algorithm == "plain":
            rec.bytes_sent += calls * plain
        else:
            rec.compressed += calls
            rec.bytes_sent += calls * comm.plan(self.codec, tensor.numel(), tensor.dtype,
                                                world, algorithm, 0).bytes_sent

    # ---- compiled DDP ----------------------------------------------------------------------
    def param_hook(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """Compiled DDP's per-parameter call: ``grad`` (``param.grad``) is replaced in place by
        its average over the group; returns it. Each parameter has its own residual.

        Under compiled autograd the hook is traced into the backward graph: the all-gather
        algorithm with gradzip's ops (``torch.library`` ops with fake kernels) and the
        functional collectives of ``torch.distributed._functional_collectives``, or the
        plain all-reduce where compression would not send fewer bytes (``"auto"`` is that
        byte count: nothing is timed in a graph) or the parameter has fewer than
        ``min_numel`` elements. There is no agreement check in the graph. What the graph
        cannot do raises a ``ValueError`` when it is traced: codecs whose payload depends
        on a per-step seed (stochastic rounding, approximate top-k),
        ``algorithm="alltoall"``, and counting warm-up iterations (a counter read in the
        graph would recompile it every step). Run the ``warmup_steps`` iterations with
        compiled autograd off, or use ``warmup_steps=0``.

        Without compiled autograd (DDP's python reducer in eager mode) the call runs
        eagerly through :func:`gradzip.all_reduce`, counts warm-up iterations, and waits
        for its result (DDP ignores what this hook returns, so an unwaited future would
        leave ``grad`` unreduced).
        """
        if torch.compiler.is_compiling():
            return self._traced_param_reduce(grad, param)
        return self._eager_param_reduce(grad, param)

    def _param_algorithm(self, numel: int, dtype: torch.dtype) -> str:
        """The traced path's algorithm for a parameter of ``numel`` elements."""
        if numel < self.min_numel:
            return "plain"
        if self.algorithm == "allgather":
            return "allgather"
        algo = comm.plan(self.codec, numel, dtype, self._world_size(), "auto",
                         self.min_numel).algorithm
        return "plain" if algo == "plain" else "allgather"

    def _eager_param_reduce(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        o = self.buckets.param_ordinal(param)
        calls = self._param_calls.get(o, 0)
        self._param_calls[o] = calls + 1
        if o == 0:
            self.iteration = calls + 1
        key = ("param", o)
        rec = self._record(key, grad, 1, None)
        timings: dict[str, float] = {}
        rec.open.append(timings)
        if calls < self.warmup_steps or grad.numel() < self.min_numel:
            comm.all_reduce(grad, self.codec, group=self.process_group, algorithm="plain",
                            average=True, verify=self.verify, timings=timings)
            self._count(rec, grad, "plain",
                        "warmup" if calls < self.warmup_steps else "small")
        else:
            feedback = self.feedback if self.error_feedback else None
            seed = comm.stochastic_seed(self.feedback.seed, 0, calls, comm.key_hash(key), 2, 0)
            comm.all_reduce(grad, self.codec, state=feedback, group=self.process_group,
                            algorithm=self.algorithm, average=True, key=key, min_numel=0,
                            verify=self.verify, seed=seed, timings=timings)
            self._count(rec, grad, self._compressed_algorithm(grad)
                        if "compress" in timings else "plain")
        self._warm = any(c < self.warmup_steps for c in self._param_calls.values())
        return grad

    def _traced_param_reduce(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as fcol

        c = self.codec
        if self.algorithm == "alltoall" or c.rounding == "stochastic" or c.exact is False \
                or self.feedback.storage != "fp32":
            _refuse_in_graph(
                f"gradzip under compiled DDP runs codec {c.spec!r} with "
                f"algorithm={self.algorithm!r}, which a compiled graph cannot: its payloads "
                "depend on a per-step seed (stochastic rounding, approximate top-k) or it "
                "needs the two-phase algorithm. Supported there: nearest rounding, exact "
                "top-k, algorithm 'auto' or 'allgather' (or turn compiled autograd off: the "
                "hook then runs eagerly with everything)")
        if self._warm:
            _refuse_in_graph(
                f"gradzip under compiled DDP: this CompressionState still has warm-up "
                f"iterations to run (warmup_steps={self.warmup_steps}), and a compiled graph "
                "cannot count them without recompiling every step. Run the first "
                f"{self.warmup_steps} iterations with compiled autograd off (the hook counts "
                "them eagerly), or use warmup_steps=0")
        o = self.buckets.param_ordinal(param)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world = self._world_size()
        flat = grad.view(-1)
        counter = self._traced_calls.get(o)
        if counter is None:
            counter = self._traced_calls[o] = torch.zeros((), dtype=torch.int64,
                                                          device=grad.device)
            self._traced_dtypes[o] = flat.dtype
        if self._param_algorithm(flat.numel(), flat.dtype) == "plain":
            # what gradzip's plain all-reduce does: divide first, then sum
            flat.copy_(fcol.all_reduce(flat / world, "sum", group))
        else:
            residual = (self.feedback.worker_residual(("param", o), flat.numel(), flat.device)
                        if self.error_feedback else None)
            payload = c.compress(flat, residual)
            rows = fcol.all_gather_tensor(payload, 0, group).view(world, -1)
            flat.zero_()
            c.decompress_accumulate(rows, flat, 1.0 / world)
        counter.add_(1)
        return grad

    def residual_for(self, param: torch.Tensor) -> torch.Tensor | None:
        """What this rank still owes for ``param`` (its slice of the bucket's pending error,
        see :meth:`gradzip.ErrorFeedback.pending`), shaped like ``param``; None if none."""
        o = self.buckets.ordinal.get(id(param))
        if o is not None and ("param", o) in self.feedback:  # compiled DDP
            return self.feedback.pending(("param", o)).view(param.shape)
        where = self.buckets.where(param)
        if where is None:
            return None
        key, off = where
        pending = self.feedback.pending(key)
        if pending is None:
            return None
        return pending[off : off + param.numel()].view(param.shape)

    # ---- what happened ---------------------------------------------------------------------
    def stats(self) -> dict:
        """What the hook really did on this rank since it was created (or
        :meth:`reset_stats`): per bucket and in total, calls, compressed calls, the
        algorithm of the last call, bytes sent against the plain all-reduce of the same
        tensors, and wall seconds per phase.

        Returns a dict: ``codec``, ``algorithm`` (as configured), ``world_size``,
        ``iterations``, ``bytes_sent``, ``uncompressed_bytes``, ``compression`` (their
        ratio), ``compress_s``, ``decompress_s``, ``communicate_s``, ``verify_s`` and
        ``buckets``, a list (in order of first appearance) of dicts with ``bucket`` (DDP's
        index at the last call; under compiled DDP ``param``, the parameter's ordinal),
        ``current`` (False for a bucket layout DDP has since rebuilt, e.g. its first
        iteration's),
        ``params``, ``numel``, ``calls``, ``compressed_calls``, ``warmup_calls``,
        ``small_calls`` (plain because of ``warmup_steps`` / ``min_numel``), ``algorithm``
        (of the last call: "plain", "allgather" or "alltoall"), ``calls_by_algorithm``
        (how many calls ran each of them: "auto" may time both compressed ones), ``auto`` (with
        ``algorithm="auto"``: what it settled on, see :func:`gradzip.comm.auto_choice`;
        None while measuring), ``bytes_sent``, ``uncompressed_bytes`` and the seconds.

        Bytes are counted from the plan of each call as it ran (:attr:`gradzip.comm.Plan.
        bytes_sent`: headers, scales and padding included, the plain all-reduce counted
        as a ring). Seconds are wall time on the calling thread (on a GPU: launch time).
        Under compiled DDP the traced calls are counted by the graph itself and carry no
        timings.
        """
        world = self._world if self._world is not None else (
            dist.get_world_size(self.process_group) if dist.is_initialized() else 1)
        rows = []
        total = {"bytes_sent": 0, "uncompressed_bytes": 0}
        phases = ("compress", "decompress", "communicate", "verify")
        seconds = dict.fromkeys(phases, 0.0)
        records = dict(self._records)
        current = {BucketLayouts.key(lay) for lay in self.buckets.order}
        for o, dtype in self._traced_dtypes.items():
            if ("param", o) not in records:
                records["param", o] = _CallRecord(self.buckets.numels[o], 1, dtype)
        for key, rec in records.items():
            rec.close()
            calls, compressed, small = rec.calls, rec.compressed, rec.small
            sent, plain = rec.bytes_sent, rec.uncompressed_bytes
            traced = int(self._traced_calls[key[1]]) if key[0] == "param" and \
                key[1] in self._traced_calls else 0
            by_algorithm = rec.by_algorithm
            if traced:
                # counted in the graph; the traced path's algorithm is fixed per parameter
                algo = self._param_algorithm(rec.numel, rec.dtype)
                one = _plain_bytes(rec.numel, rec.dtype, world)
                per = one if algo == "plain" else comm.plan(
                    self.codec, rec.numel, rec.dtype, world, algo, 0).bytes_sent
                calls += traced
                rec.algorithm = algo
                by_algorithm = rec.by_algorithm + Counter({algo: traced})
                compressed += traced if algo != "plain" else 0
                small += traced if rec.numel < self.min_numel else 0
                sent, plain = sent + traced * per, plain + traced * one
            auto = None
            if self.algorithm == "auto" and dist.is_initialized() and key[0] == "bucket":
                auto = comm.auto_choice(rec.numel, self.codec, dtype=rec.dtype,
                                        group=self.process_group)
            row = {"bucket" if key[0] == "bucket" else "param":
                   rec.index if key[0] == "bucket" else key[1],
                   "current": key[0] != "bucket" or key in current,
                   "params": rec.params, "numel": rec.numel, "calls": calls,
                   "compressed_calls": compressed, "warmup_calls": rec.warmup,
                   "small_calls": small, "algorithm": rec.algorithm,
                   "calls_by_algorithm": dict(by_algorithm), "auto": auto,
                   "bytes_sent": sent, "uncompressed_bytes": plain}
            for ph in phases:
                row[f"{ph}_s"] = rec.seconds.get(ph, 0.0)
                seconds[ph] += row[f"{ph}_s"]
            total["bytes_sent"] += sent
            total["uncompressed_bytes"] += plain
            rows.append(row)
        return {"codec": self.codec.spec, "algorithm": self.algorithm, "world_size": world,
                "iterations": self._iterations(), **total,
                "compression": (total["uncompressed_bytes"] / total["bytes_sent"]
                                if total["bytes_sent"] else None),
                **{f"{ph}_s": v for ph, v in seconds.items()}, "buckets": rows}

    def _iterations(self) -> int:
        """Iterations so far (under compiled DDP: eager plus traced calls of the first
        parameter)."""
        traced = self._traced_calls.get(0)
        return self.iteration + (int(traced) if traced is not None else 0)

    def _param_calls_all(self) -> dict[int, int]:
        calls = dict(self._param_calls)
        for o, counter in self._traced_calls.items():
            calls[o] = calls.get(o, 0) + int(counter)
        return calls

    def stats_table(self) -> str:
        """:meth:`stats` as a few lines of text, for a log or the console."""
        st = self.stats()
        mib = 2.0**20
        lines = [f"gradzip {st['codec']} (algorithm={st['algorithm']}, "
                 f"{st['world_size']} ranks, {st['iterations']} iterations): sent "
                 f"{st['bytes_sent'] / mib:.2f} MiB vs {st['uncompressed_bytes'] / mib:.2f} MiB "
                 "uncompressed" + (f" ({st['compression']:.2f}x less)" if st["compression"]
                                   else "") +
                 f"; compressing {st['compress_s']:.3f} s, decompressing "
                 f"{st['decompress_s']:.3f} s"]
        for b in st["buckets"]:
            where = (f"bucket {b['bucket']}" if "bucket" in b else f"param {b['param']}")
            if not b["current"]:
                where += " (a layout DDP has since rebuilt)"
            why = []
            if b["warmup_calls"]:
                why.append(f"{b['warmup_calls']} warm-up")
            if b["small_calls"]:
                why.append(f"{b['small_calls']} below min_numel")
            if b["auto"] is not None:
                why.append(f"auto settled on {b['auto']['algorithm']}")
            plain = b["calls"] - b["compressed_calls"]
            lines.append(
                f"  {where}: {b['numel']} elements in {b['params']} params; "
                f"{b['compressed_calls']}/{b['calls']} calls compressed, {plain} plain"
                + (f" ({', '.join(why)})" if why else "") + f"; last: {b['algorithm']}; "
                f"sent {b['bytes_sent'] / mib:.3f} of {b['uncompressed_bytes'] / mib:.3f} MiB; "
                f"compress {b['compress_s']:.3f} s")
        return "\n".join(lines)

    def reset_stats(self) -> None:
        """Start :meth:`stats` from zero (the residuals and counters are kept)."""
        for r in self._records.values():
            r.close()
            r.calls = r.compressed = r.warmup = r.small = r.bytes_sent = 0
            r.by_algorithm.clear()
            r.uncompressed_bytes = 0
            r.seconds = {}
        for counter in self._traced_calls.values():
            counter.zero_()  # in place: a compiled graph holds these tensors

    # ---- checkpoints ---------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    @staticmethod
    def rank_key(rank: int, world: int) -> str:
        """The key under which :meth:`state_dict` keeps rank ``rank``'s state."""
        return rank_state.key(rank, world)

    def state_dict(self) -> dict:
        """This rank's residuals, counters and bucket layouts, in a form that works both with
        ``torch.save`` (one file per rank) and with ``torch.distributed.checkpoint``.

        ``torch.distributed.checkpoint`` treats every plain tensor and value in a state
        dict as the same on every rank and writes it once; residuals differ per rank. So
        everything that belongs to this rank is one serialised entry under a key that
        names the rank and the world size, ``"rank{r}_of_{W}"`` (bytes; DCP writes each
        rank's and gives it back to that rank only), and the top-level entries are what
        every rank shares: ``version``, ``codec``, ``world_size``, ``iteration`` and
        ``layouts`` (the parameter layout of each bucket that holds residuals).

        A checkpoint is for the same world size and codec: loading it with another world
        size through DCP fails in DCP's planning, before anything is read, with "Missing
        key in checkpoint state_dict: <name>.rank{r}_of_{W}" (the key this rank asked for);
        :meth:`load_state_dict` raises for another codec or world size.
        """
        rank, world = self._rank_world()
        mine = {"rank": rank, "world_size": world, "iteration": self._iterations(),
                "param_calls": self._param_calls_all(), **self.buckets.state_dict(),
                "feedback": self.feedback.state_dict()}
        return {"version": _STATE_VERSION, "codec": self.codec.spec, "world_size": world,
                "iteration": self._iterations(),
                "layouts": list(self.buckets.layouts.values()),
                **rank_state.pack(mine, rank, world)}

    def gathered_state_dict(self) -> dict:
        """Every rank's :meth:`state_dict` in one dict, on every rank: the shared fields once
        and one ``"rank{r}_of_{W}"`` entry per rank. For frameworks that write one
        checkpoint file from one process (Lightning, Accelerate's custom objects): each
        rank's :meth:`load_state_dict` takes its own entry from it. A collective
        (``all_gather_object`` over the state's process group): call it on every rank.
        Every rank holds all ranks' residuals while it runs."""
        mine = self.state_dict()
        if not (dist.is_available() and dist.is_initialized()):
            return mine
        everyone: list = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(everyone, mine, group=self.process_group)
        merged = dict(mine)
        for sd in everyone:
            merged.update((k, v) for k, v in sd.items() if k.startswith("rank"))
        return merged

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` of the same rank (and world size and codec), before
        the first resumed iteration. Everything is checked before anything changes: on an
        error this state is as it was."""
        version = state.get("version") if isinstance(state, dict) else None
        if version not in (1, _STATE_VERSION):
            raise ValueError("not a gradzip.ddp.CompressionState state_dict "
                             f"(version 1 or {_STATE_VERSION})")
        if state["codec"] != self.codec.spec:
            raise ValueError(f"the state_dict was saved with codec {state['codec']!r}, this "
                             f"state uses {self.codec.spec!r}: residuals of one codec mean "
                             "nothing to another (resume with the same codec, or start "
                             "without the gradzip state)")
        rank, world = self._rank_world()
        if version == _STATE_VERSION:
            mine = rank_state.unpack(state, rank, world)
        else:
            mine = state
        if dist.is_available() and dist.is_initialized() and \
                (mine["rank"], mine["world_size"]) != (rank, world):
            raise ValueError(f"the state_dict belongs to rank {mine['rank']} of "
                             f"{mine['world_size']}, this is rank {rank} of {world}")
        if self.buckets.params:
            raise ValueError("load_state_dict must be called before the first iteration")
        # Into new objects first: nothing is half-loaded if one of them refuses.
        feedback = comm.ErrorFeedback(seed=self.feedback.seed, storage=self.feedback.storage)
        feedback.load_state_dict(mine["feedback"])
        buckets = BucketLayouts()
        buckets.load_state_dict(mine)
        self.feedback, self.buckets = feedback, buckets
        self.iteration = int(mine["iteration"])
        self._param_calls = {int(k): int(v) for k, v in mine.get("param_calls", {}).items()}
        self._warm = self.warmup_steps > 0 and (
            not self._param_calls or min(self._param_calls.values()) < self.warmup_steps)


def compress_hook(state: CompressionState, bucket: dist.GradBucket
                  ) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients averaged over the group through
    :func:`gradzip.all_reduce`. Register with ``model.register_comm_hook(state,
    gradzip.ddp.compress_hook)``.

    Compiled DDP calls it with a ``(grad, param)`` tuple instead of a bucket
    (:meth:`CompressionState.param_hook`); it then reduces ``grad`` in place."""
    if isinstance(bucket, tuple):
        return state.param_hook(*bucket)
    return state.hook(bucket)


__all__ = ["DEFAULT_MIN_NUMEL", "BucketLayouts", "Codec", "CompressionState", "compress_hook"]
