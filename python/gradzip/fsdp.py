"""FSDP2 and HSDP: a compressed reduce-scatter and a compressed replica all-reduce.

One call after ``fully_shard``::

    model = fully_shard(model, mesh=shard_mesh)            # and its submodules
    state = gradzip.fsdp.enable(model, "int8")             # compressed reduce-scatter
    state = gradzip.fsdp.enable(model, "int4", reduce_scatter=False,
                                replicate_group=replica_group)  # custom HSDP, see below

For every FSDP module (one with parameters) it installs, through FSDP2's own extension
points:

* ``reduce_scatter=True``: a :class:`CompressedReduceScatter` comm
  (``FSDPModule.set_custom_reduce_scatter``). FSDP hands it one flat buffer whose
  ``view(W, -1)[r]`` is rank r's shard; :func:`gradzip.reduce_scatter` compresses the W
  shards with worker error feedback, sends each to its owner with one all-to-all and
  decodes them there. Its residual is the size of the *unsharded* gradient, which is the
  memory FSDP exists to save, so it is stored compactly (``residual_storage``, default
  ``"int8"``: about 1 byte per parameter; see :class:`gradzip.ErrorFeedback`).
* ``replicate_group`` given ("custom HSDP": the model sharded with ``fully_shard`` on a
  1-D mesh inside a node, replicated across nodes): an all-reduce hook
  (``FSDPModule.set_all_reduce_hook``) that runs :func:`gradzip.all_reduce` on the rank's
  sharded gradient across ``replicate_group`` (``"auto"``, error feedback per module:
  shard-sized, so float32). This is the slow, inter-node hop.

Either can be used alone. The result equals what FSDP computes uncompressed, up to
compression error:

* FSDP's reduce op is honoured: ``AVG`` averages over the shard group, ``SUM`` sums,
  ``PREMUL_SUM`` (from ``set_gradient_divide_factor``) multiplies the decoded sum by its
  factor (after the sum, not before: same value up to rounding).
* The replica hook averages over the replicas, so that the gradient is the mean over every
  rank as in native HSDP, unless the module has a ``gradient_divide_factor``: then the
  factor is taken to cover every rank and the hook sums.
* Gradient accumulation: ``set_requires_gradient_sync(False)`` skips both (FSDP
  accumulates unsharded gradients and reduces nothing); ``set_requires_all_reduce(False)``
  (reduce-scatter, but no replica all-reduce) keeps the shard's partial sum here and adds
  it to the next synchronised step's, as native HSDP does.
* The first ``warmup_steps`` reductions of each module are uncompressed.

The comm runs on FSDP's reduce-scatter stream and the hook on its all-reduce stream; every
kernel and collective gradzip issues goes on the current stream.

Layout: :func:`enable` is collective over the default process group. Every rank sends its
settings and group layout once (``all_gather_object``) and every rank checks all of them,
so a rank whose codec or options differ from a peer's, a ``replicate_group`` that some of
its members do not give, or one that would join *different* shards (e.g. the whole world
as the replicate group of a sharded model: it would sum unrelated shards, silently) is the
same ``ValueError`` on every rank before anything is installed; so is an argument one rank
alone refuses.

Agreement: ``verify="once"`` by default, on CPU too (``gradzip.all_reduce`` checks every
call on CPU). The ranks exchange the fingerprint of each module's reduction on its first
call (a codec, option or layout that differs between ranks is the same ``ValueError``
everywhere), then not again: which module is reduced next, and its size, are fixed by FSDP
itself, whose own collectives around every hook keep the ranks in lockstep, so a later
disagreement cannot arise without FSDP's own collectives failing first. Checking every call
costs one more message across the slow hop per module, which queues behind the other
replica groups' payloads on a shared link: measured (bench/fsdp.py, 1 Gbit/s, 2 x 2 ranks,
int8) 11.5 ms of a 43 ms replica hop per step. On a GPU the first calls synchronise the
host; header checks need the host and are off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import _checks, comm
from .codecs import Codec, as_codec
from .comm import rank_state

_STATE_VERSION = 1
RESIDUAL_STORAGES = comm.feedback.STORAGES


def _fsdp_api():
    """FSDP2's module class and comm interface, with a clear error where torch lacks them."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    except ImportError as e:  # pragma: no cover (torch < 2.6)
        raise ImportError(f"gradzip.fsdp needs FSDP2 with custom comms (torch >= 2.6): {e}") \
            from None
    return FSDPModule, ReduceScatter


def _param_group(module):
    groups = module._get_fsdp_state()._fsdp_param_groups
    return groups[0] if groups else None


class FSDPCompressionState:
    """What :func:`enable` installed, with the residuals and counters of every module.

    ``state_dict()`` / ``load_state_dict()`` save and restore one rank's (save one per
    rank); ``memory_bytes()`` says what the residuals cost.
    """

    def __init__(self, codec: Codec, reduce_scatter: bool, replicate_group,
                 residual_storage: str, warmup_steps: int, algorithm: str, min_numel: int,
                 verify: str, seed: int) -> None:
        self.codec = codec
        self.reduce_scatter = reduce_scatter
        self.replicate_group = replicate_group
        self.warmup_steps = warmup_steps
        self.algorithm = algorithm
        self.min_numel = min_numel
        self.verify = verify
        self.scatter_feedback = comm.ErrorFeedback(seed=seed, storage=residual_storage)
        self.replica_feedback = comm.ErrorFeedback(seed=seed)
        self.modules: list[str] = []  # FQNs of the modules gradzip serves, in model order
        self.calls: dict[tuple[str, str], int] = {}  # (hop, module) -> reductions so far
        # (hop, module) -> (numel, dtype, group, average, algorithm) of its last reduction
        self._last: dict[tuple[str, str], tuple] = {}
        self._partial: dict[str, torch.Tensor] = {}  # replica hop: unsynchronised sums
        # (hop, module) -> phase -> wall seconds ("verify", "compress", "communicate",
        # "decompress"; CPU work, launch time on CUDA), over every reduction so far
        self.seconds: dict[tuple[str, str], dict[str, float]] = {}

    def __repr__(self) -> str:
        hops = [h for h, on in (("reduce_scatter", self.reduce_scatter),
                                ("replicas", self.replicate_group is not None)) if on]
        return (f"FSDPCompressionState(codec={str(self.codec)!r}, hops={hops}, "
                f"modules={len(self.modules)}, residual_storage="
                f"{self.scatter_feedback.storage!r})")

    def _count(self, hop: str, name: str) -> int:
        n = self.calls.get((hop, name), 0)
        self.calls[hop, name] = n + 1
        return n

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the residuals hold between steps, per hop."""
        return {"reduce_scatter": self.scatter_feedback.memory_bytes(),
                "replicas": self.replica_feedback.memory_bytes()
                + sum(t.numel() * t.element_size() for t in self._partial.values())}

    # ---- the two hops --------------------------------------------------------------------
    def reduce_scatter_shards(self, name: str, output: torch.Tensor, input: torch.Tensor,
                              group, op) -> None:
        if op == dist.ReduceOp.AVG:
            average, factor = True, None
        elif op == dist.ReduceOp.SUM:
            average, factor = False, None
        elif op == dist.ReduceOp.PREMUL_SUM and hasattr(op, "factor"):
            average, factor = False, float(op.factor)
        else:
            raise ValueError(f"gradzip.fsdp: cannot honour reduce op {op} (supported: SUM, "
                             "AVG, PREMUL_SUM)")
        plain = self._count("reduce_scatter", name) < self.warmup_steps
        self._last["reduce_scatter", name] = (input.numel(), input.dtype, group, average,
                                              "plain" if plain else self.algorithm)
        comm.reduce_scatter(
            output, input, self.codec, state=self.scatter_feedback, group=group,
            algorithm="plain" if plain else self.algorithm, average=average,
            key=("reduce_scatter", name), min_numel=self.min_numel, verify=self.verify,
            timings=self.seconds.setdefault(("reduce_scatter", name), {}))
        if factor is not None:
            output.mul_(factor)

    def all_reduce_replicas(self, name: str, shard_grad: torch.Tensor, sync: bool,
                            average: bool) -> None:
        if not sync:  # set_requires_all_reduce(False): keep the partial sum for later
            part = self._partial.get(name)
            self._partial[name] = shard_grad.clone() if part is None else part.add_(shard_grad)
            shard_grad.zero_()
            return
        part = self._partial.pop(name, None)
        if part is not None:
            shard_grad.add_(part)
        plain = self._count("replicas", name) < self.warmup_steps
        self._last["replicas", name] = (shard_grad.numel(), shard_grad.dtype,
                                        self.replicate_group, average,
                                        "plain" if plain else self.algorithm)
        comm.all_reduce(
            shard_grad, self.codec, state=self.replica_feedback, group=self.replicate_group,
            algorithm="plain" if plain else self.algorithm, average=average,
            key=("replicas", name), min_numel=self.min_numel, verify=self.verify,
            timings=self.seconds.setdefault(("replicas", name), {}))

    def stats(self) -> list[dict]:
        """Per hop and module, what its last reduction did: the algorithm (for "auto" what
        it settled on, or "measuring"), the bytes this rank sent and what the uncompressed
        collective would have sent (from the plans), how many reductions ran, and the wall
        seconds of all of them per phase (``verify_s``, ``compress_s``, ``communicate_s``,
        ``decompress_s``; on CUDA the launch time)."""
        rows = []
        for (hop, name), (numel, dtype, group, average, algorithm) in self._last.items():
            op = "reduce_scatter" if hop == "reduce_scatter" else "all_reduce"
            world = dist.get_world_size(group)
            plan = comm.reduce_scatter_plan if op == "reduce_scatter" else comm.plan
            plain = plan(self.codec, numel, dtype, world, "plain")
            compressed = plan(self.codec, numel, dtype, world, algorithm, self.min_numel)
            used = algorithm
            if algorithm == "auto" and compressed.algorithm != "plain":
                choice = comm.auto_choice(numel, self.codec, dtype=dtype, group=group,
                                          average=average, op=op)
                used = "measuring" if choice is None else choice["algorithm"]
            else:
                used = compressed.algorithm
            if used in ("plain", "measuring"):
                sent = plain.bytes_sent
            elif used != compressed.algorithm:  # "auto" settled on its other candidate
                sent = plan(self.codec, numel, dtype, world, used).bytes_sent
            else:
                sent = compressed.bytes_sent
            rows.append({"hop": hop, "module": name, "calls": self.calls[hop, name],
                         "algorithm": used, "bytes_sent": sent,
                         "bytes_uncompressed": plain.bytes_sent,
                         **{f"{ph}_s": self.seconds.get((hop, name), {}).get(ph, 0.0)
                            for ph in ("verify", "compress", "communicate", "decompress")}})
        return rows

    # ---- checkpoints ---------------------------------------------------------------------
    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def state_dict(self) -> dict:
        """This rank's residuals and counters, for ``torch.save`` (one file per rank) or
        ``torch.distributed.checkpoint`` (a ``Stateful``: put the state itself in the dict
        you save). DCP writes a plain tensor once, as if every rank held the same; residuals
        differ per rank, so everything of this rank is one serialised entry under
        ``"rank{r}_of_{W}"`` (DCP keeps each rank's and gives it back to that rank), and the
        top level holds what every rank shares (version, codec, world size, modules)."""
        rank, world = self._rank_world()
        mine = {"rank": rank, "calls": dict(self.calls),
                "partial": {k: v.detach().cpu().clone() for k, v in self._partial.items()},
                "scatter_feedback": self.scatter_feedback.state_dict(),
                "replica_feedback": self.replica_feedback.state_dict()}
        return {"version": _STATE_VERSION, "codec": self.codec.spec, "world_size": world,
                "modules": list(self.modules), **rank_state.pack(mine, rank, world)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` of the same rank, world size and codec, before the
        first resumed step. Checks everything before changing anything."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("not a gradzip.fsdp state_dict (version "
                             f"{_STATE_VERSION})")
        if state["codec"] != self.codec.spec:
            raise ValueError(f"the state_dict was saved with codec {state['codec']!r}, this "
                             f"state uses {self.codec.spec!r}")
        if list(state["modules"]) != self.modules:
            raise ValueError("the state_dict was saved from a model whose FSDP modules are "
                             f"{state['modules']}, this one has {self.modules}")
        mine = rank_state.unpack(state, *self._rank_world())
        scatter = comm.ErrorFeedback(storage=self.scatter_feedback.storage)
        scatter.load_state_dict(mine["scatter_feedback"])
        replica = comm.ErrorFeedback()
        replica.load_state_dict(mine["replica_feedback"])
        self.scatter_feedback, self.replica_feedback = scatter, replica
        self.calls = {tuple(k): int(v) for k, v in mine["calls"].items()}
        self._partial = {k: v.clone() for k, v in mine["partial"].items()}


@dataclass
class _Hook:
    """The replica all-reduce hook of one FSDP module."""

    state: FSDPCompressionState
    name: str
    param_group: object

    def __call__(self, shard_grad: torch.Tensor) -> None:
        pg = self.param_group
        self.state.all_reduce_replicas(self.name, shard_grad, sync=pg.all_reduce_grads,
                                       average=pg.gradient_divide_factor is None)


def _make_comm(base):
    class CompressedReduceScatter(base):
        """FSDP2 ``ReduceScatter`` comm of one module: :func:`gradzip.reduce_scatter`."""

        def __init__(self, state: FSDPCompressionState, name: str) -> None:
            self.state, self.name = state, name

        def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            return torch.empty(size, dtype=dtype, device=device)

        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group,
                     op, async_op: bool = False):
            if async_op:
                raise ValueError("gradzip.fsdp: FSDP asked for an asynchronous "
                                 "reduce-scatter, which this comm does not offer")
            # Synchronous: FSDP reads no Work back (None).
            self.state.reduce_scatter_shards(self.name, output_tensor, input_tensor, group, op)

    return CompressedReduceScatter


def _agree_on_layout(settings: dict, shard_groups: list, replicate_group,
                     local: Exception | None = None) -> None:
    """One ``all_gather_object`` over the default group: every rank's settings and groups.
    Each rank then checks the whole layout (the same data everywhere, so the same verdict
    everywhere): ranks that share a shard group or a replicate group must have the same
    settings, a replicate group must be named the same by all its members, and it must hold
    one rank per replica of the *same* shard (the same index in shard groups of the same
    size) - anything else would all-reduce different shards together, silently."""
    groups = []
    for g in shard_groups:
        if all(g is not h for h in groups):
            groups.append(g)
    mine = {"error": None if local is None else f"{type(local).__name__}: {local}",
            "settings": settings,
            "shards": [(tuple(dist.get_process_group_ranks(g)), dist.get_rank(g))
                       for g in groups],
            "replicas": None if replicate_group is None
            else tuple(dist.get_process_group_ranks(replicate_group))}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if local is not None:
        raise local
    failed = [r for r, info in enumerate(every) if info["error"]]
    if failed:
        raise ValueError(f"gradzip.fsdp.enable failed on rank(s) {failed}: "
                         f"{every[failed[0]]['error']}")
    problems = []
    for r, info in enumerate(every):
        peers = {q for ranks, _ in info["shards"] for q in ranks}
        for q in sorted(peers | set(info["replicas"] or ())):
            differ = [k for k in info["settings"] if info["settings"][k]
                      != every[q]["settings"].get(k)]
            if q > r and differ:
                problems.append(f"ranks {r} and {q} share a group but disagree on "
                                + ", ".join(f"{k} ({info['settings'][k]!r} vs "
                                            f"{every[q]['settings'].get(k)!r})"
                                            for k in differ))
        if info["replicas"] is None:
            continue
        for q in info["replicas"]:
            theirs = every[q]["replicas"]
            if theirs != info["replicas"]:
                problems.append(f"rank {r} gives replicate_group {list(info['replicas'])} "
                                f"but rank {q} gives "
                                f"{'none' if theirs is None else list(theirs)}")
            elif q > r and [(len(ranks), i) for ranks, i in every[q]["shards"]] != \
                    [(len(ranks), i) for ranks, i in info["shards"]]:
                problems.append(
                    f"replicate_group {list(info['replicas'])} joins rank {r} (shard "
                    f"{[i for _, i in info['shards']]} of {[len(g) for g, _ in info['shards']]})"
                    f" and rank {q} (shard {[i for _, i in every[q]['shards']]} of "
                    f"{[len(g) for g, _ in every[q]['shards']]}): a replicate group must "
                    "hold one rank per replica of the same shard")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError("gradzip.fsdp.enable: the ranks' layouts do not fit together: "
                         + "; ".join(problems[:3]) + more)


def _checked(model, codec, replicate_group, reduce_scatter, residual_storage, warmup_steps,
             algorithm, min_numel, verify, seed, FSDPModule) -> tuple[Codec, list]:
    """:func:`enable`'s checks of this rank's arguments and model: (codec, [(name, FSDP
    module)])."""
    codec = as_codec(codec)
    _checks.check_bool(reduce_scatter, "reduce_scatter")
    _checks.check_choice(residual_storage, RESIDUAL_STORAGES, "residual_storage")
    _checks.check_nonnegative_int(warmup_steps, "warmup_steps")
    _checks.check_nonnegative_int(min_numel, "min_numel")
    _checks.check_choice(verify, comm.VERIFY_MODES, "verify")
    _checks.check_seed(seed)
    allowed = {"auto", "alltoall", "plain"} if reduce_scatter else set(comm.ALGORITHMS)
    if replicate_group is not None:
        allowed &= set(comm.ALGORITHMS)
    _checks.check_choice(algorithm, sorted(allowed), "algorithm")
    if not reduce_scatter and replicate_group is None:
        raise ValueError("gradzip.fsdp.enable: nothing to compress: give replicate_group "
                         "(custom HSDP) and/or reduce_scatter=True")
    if replicate_group is not None and not isinstance(replicate_group, dist.ProcessGroup):
        raise TypeError("gradzip.fsdp.enable: replicate_group must be a torch.distributed."
                        "ProcessGroup (e.g. mesh['replicate'].get_group()), got "
                        f"{type(replicate_group).__name__}")
    if replicate_group is not None and dist.get_rank(replicate_group) < 0:
        raise ValueError("gradzip.fsdp.enable: this rank is not in replicate_group")
    modules = [(name, m) for name, m in model.named_modules()
               if isinstance(m, FSDPModule) and _param_group(m) is not None]
    if not modules:
        raise ValueError("gradzip.fsdp.enable: no FSDP module with parameters in the model; "
                         "call it after torch.distributed.fsdp.fully_shard")
    for name, m in modules:
        n = len(m._get_fsdp_state()._fsdp_param_groups)
        if n > 1:
            raise ValueError(f"gradzip.fsdp.enable: FSDP module {name or '<root>'} has {n} "
                             "parameter groups (per-parameter meshes); torch's custom "
                             "reduce-scatter and all-reduce hook support one")
        if replicate_group is not None and _param_group(m)._all_reduce_hook is not None:
            raise ValueError(f"gradzip.fsdp.enable: FSDP module {name or '<root>'} already "
                             "has an all-reduce hook")
        if replicate_group is not None and \
                getattr(_param_group(m).mesh_info, "replicate_process_group", None) is not None:
            raise ValueError(f"gradzip.fsdp.enable: FSDP module {name or '<root>'} is "
                             "sharded on a 2-D (HSDP) mesh, so FSDP already all-reduces it "
                             "across replicas and a replicate_group would reduce it twice: "
                             "give replicate_group only with a 1-D mesh (custom HSDP), or "
                             "compress FSDP's reduce-scatter alone")
    return codec, modules


def enable(
    model: nn.Module,
    codec: Codec | str,
    *,
    replicate_group: dist.ProcessGroup | None = None,
    reduce_scatter: bool = True,
    residual_storage: str = "int8",
    warmup_steps: int = 0,
    algorithm: str = "auto",
    min_numel: int = comm.DEFAULT_MIN_NUMEL,
    verify: str = "once",
    seed: int = 0,
) -> FSDPCompressionState:
    """Compress the gradient communication of a ``fully_shard``-ed model (see the module
    docstring). Call it on every rank, after ``fully_shard`` and before the first backward.

    Args:
        model: the root module, after ``fully_shard`` (it and/or its submodules).
        codec: a :class:`gradzip.Codec` or spec ("int8", "int4", "topk:0.01", ...).
        replicate_group: the process group of this rank's replicas (custom HSDP); None for
            no replica hop.
        reduce_scatter: compress FSDP's reduce-scatter.
        residual_storage: how the reduce-scatter's unsharded-sized residuals are kept:
            "int8" (about 1 byte per parameter), "bf16" (2) or "fp32" (4).
        warmup_steps: reductions per module that go uncompressed first.
        algorithm: "auto" or a named algorithm of :func:`gradzip.reduce_scatter`
            ("alltoall", "plain") and :func:`gradzip.all_reduce` ("allgather", "alltoall",
            "plain"); "auto" suits both.
        min_numel, seed: as in :func:`gradzip.all_reduce`.
        verify: as in :func:`gradzip.all_reduce`, but "once" by default (module
            docstring: FSDP keeps the ranks in lockstep); "always" checks every call.

    Returns:
        The :class:`FSDPCompressionState` (save its ``state_dict()`` per rank).

    Raises:
        ValueError: no FSDP module in ``model``, a module with several parameter groups
            (torch's custom comms do not support them), a ``replicate_group`` for a model
            already on a 2-D (HSDP) mesh, nothing to enable, a replicate group this rank
            is not in, bad arguments; and, on every rank together, ranks whose layouts do
            not fit: peers (in a shard or replicate group) with different settings, a
            replicate group that some of its members do not give, or one that joins
            different shards.

    ``enable`` is collective over the default process group: every rank of the job calls
    it once (one small ``all_gather_object`` of the settings and group layout).
    """
    FSDPModule, ReduceScatter = _fsdp_api()
    # A rank whose arguments or model are refused still takes part in the exchange below,
    # so that every rank raises instead of its peers waiting for it.
    try:
        codec, modules = _checked(model, codec, replicate_group, reduce_scatter,
                                  residual_storage, warmup_steps, algorithm, min_numel,
                                  verify, seed, FSDPModule)
        local = None
    except Exception as e:  # noqa: BLE001  (re-raised unchanged after the exchange)
        local, modules = e, []
    settings = {"codec": repr(codec), "reduce_scatter": reduce_scatter,
                "residual_storage": residual_storage, "warmup_steps": warmup_steps,
                "algorithm": algorithm, "min_numel": min_numel, "verify": verify,
                "replicate_group": replicate_group is not None,
                "modules": [name for name, _ in modules]}
    _agree_on_layout(settings, [_param_group(m).mesh_info.shard_process_group
                                for _, m in modules],
                     replicate_group if local is None else None, local)
    state = FSDPCompressionState(codec, reduce_scatter, replicate_group, residual_storage,
                                 warmup_steps, algorithm, min_numel, verify, seed)
    comm_class = _make_comm(ReduceScatter)
    for name, m in modules:
        state.modules.append(name)
        if reduce_scatter:
            m.set_custom_reduce_scatter(comm_class(state, name))
        if replicate_group is not None:
            m.set_all_reduce_hook(_Hook(state, name, _param_group(m)))
    return state


__all__ = ["FSDPCompressionState", "enable"]
