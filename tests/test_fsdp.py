"""gradzip.fsdp on FSDP2 (2 and 3 ranks) and on a 2x2 custom-HSDP mesh, Gloo on CPU.

Two kinds of expectation. Exact: every reduce-scatter and replica all-reduce gradzip ran
inside FSDP is recorded (its inputs on every rank and its output), and the parent replays
it with the single-process simulations of test_reduce_scatter.py / test_comm.py built from
``gradzip.reference``. Approximate: the gradients FSDP ends with are within the codec's
error of the uncompressed FSDP/HSDP run's.
"""

from __future__ import annotations

import gradzip
import pytest
import torch
import torch.distributed as dist
from dist_helpers import assert_survivors_raise, catch, run_ranks
from gradzip import Codec, comm
from test_comm import Simulation as AllReduceSimulation
from test_reduce_scatter import Simulation as ReduceScatterSimulation
from torch import nn

pytestmark = pytest.mark.distributed

STEPS = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(48, 96), nn.Linear(96, 96), nn.Linear(96, 10)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def build(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Net()
    for layer in net.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def batch(rank: int, step: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + 17 * rank + 7 * micro)
    return torch.randn(16, 48, generator=g), torch.randint(0, 10, (16,), generator=g)


def backward(net, rank: int, step: int, micro: int = 0) -> None:
    x, y = batch(rank, step, micro)
    nn.functional.cross_entropy(net(x), y).backward()


def full_grads(net) -> list[torch.Tensor]:
    return [p.grad.full_tensor().clone() for p in net.parameters()]


def record(mp: pytest.MonkeyPatch, log: list) -> None:
    """Record every gradzip collective that FSDP drives (inputs before, outputs after)."""
    real_rs, real_ar = comm.reduce_scatter, comm.all_reduce

    def reduce_scatter(output, input, codec, **kw):
        x = input.detach().clone()
        real_rs(output, input, codec, **kw)
        log.append(("rs", kw["key"], kw["algorithm"], kw["average"], x, output.detach().clone()))

    def all_reduce(tensor, codec, **kw):
        x = tensor.detach().clone()
        real_ar(tensor, codec, **kw)
        log.append(("ar", kw["key"], kw["algorithm"], kw["average"], x, tensor.detach().clone()))

    mp.setattr(comm, "reduce_scatter", reduce_scatter)
    mp.setattr(comm, "all_reduce", all_reduce)


def train_recorded(net, rank: int) -> tuple[list, list[torch.Tensor]]:
    """STEPS backward passes with every gradzip collective recorded; (the record, the
    full gradients after the first step)."""
    log: list = []
    with pytest.MonkeyPatch.context() as mp:
        record(mp, log)
        for step in range(STEPS):
            net.zero_grad()
            backward(net, rank, step)
            if step == 0:
                first = full_grads(net)
    return log, first


# ---------------------------------------------------------------------------------------
# FSDP: the compressed reduce-scatter
# ---------------------------------------------------------------------------------------

def fsdp_battery(rank: int, world: int, spec: str, storage: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}
    net = build(mesh)
    state = gradzip.fsdp.enable(net, spec, residual_storage=storage, min_numel=0,
                                algorithm="alltoall")
    out["log"], _ = train_recorded(net, rank)
    out["memory"] = state.memory_bytes()
    out["modules"] = list(state.modules)
    out["stats"] = state.stats()
    return out


@pytest.mark.parametrize("world,spec,storage", [
    (2, "int8", "int8"), (3, "int4", "fp32"), (2, "sign", "bf16"), (2, "topk:0.1", "int8")])
def test_reduce_scatter_inside_fsdp(world, spec, storage):
    res = run_ranks(world, fsdp_battery, spec, storage)
    assert res[0]["modules"] == ["layers.0", "layers.1", "layers.2"]
    logs = [r["log"] for r in res]
    assert len(logs[0]) == STEPS * 3 and all(len(lg) == len(logs[0]) for lg in logs)
    # exact: every reduce-scatter FSDP asked for is the simulated compressed reduce-scatter
    # of the buffers FSDP built, residuals carried over per module, stored as configured
    sims = {}
    for i, entry in enumerate(logs[0]):
        kind, key, algo, average, _, _ = entry
        assert (kind, algo, average) == ("rs", "alltoall", True)  # FSDP asks for AVG here
        n = entry[4].numel()
        sim = sims.setdefault(key, ReduceScatterSimulation(
            Codec(spec), world, n // world, ef=True, average=True, key=key, storage=storage))
        want = sim([logs[r][i][4] for r in range(world)])
        for r in range(world):
            assert logs[r][i][1] == key
            assert torch.equal(logs[r][i][5], want[r]), (key, i, r)
    # stats: what each module's reduce-scatter sent, from the plans of what really ran
    from gradzip import format as fmt
    for row, (_, key, _, _, x, _) in zip(sorted(res[0]["stats"], key=lambda r: r["module"]),
                                          sorted(logs[0][:3], key=lambda e: e[1])):
        assert row["hop"] == "reduce_scatter" and ("reduce_scatter", row["module"]) == key
        assert row["algorithm"] == "alltoall" and row["calls"] == STEPS
        shard = x.numel() // world
        c = Codec(spec)
        payload = (fmt.topk_payload_bytes(shard, round(c.k * shard)) if c.is_sparse
                   else fmt.dense_payload_bytes(shard, c.bits, c.block))
        assert row["bytes_sent"] == (world - 1) * payload
        assert row["bytes_uncompressed"] == (world - 1) * shard * 4
        # the phases of compressed calls were timed (verify: the CPU default checks always)
        assert all(row[f"{ph}_s"] > 0 for ph in ("verify", "compress", "communicate",
                                                  "decompress")), row
    # the residuals cost what the storage format says (about 1 byte per parameter for int8)
    n_params = sum(p.numel() for p in Net().parameters())
    per_param = {"int8": 1.2, "bf16": 2.2, "fp32": 4.2}[storage]
    # padding of each module's buffer to a multiple of the world size adds a little
    assert res[0]["memory"]["reduce_scatter"] <= per_param * n_params + 64 * 3 * world


def fsdp_grads_battery(rank: int, world: int, spec: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    plain = build(mesh)
    backward(plain, rank, 0)
    net = build(mesh)
    gradzip.fsdp.enable(net, spec, min_numel=0)
    backward(net, rank, 0)
    return {"plain": full_grads(plain), "gz": full_grads(net)}


# Gradient tolerances are stated in units of the codec's own error on the uncompressed
# gradient (``codec_error``, below): W ranks round independently (errors add about as
# sqrt(W)) and each rank's block maximum can exceed the sum's, so one compressed hop stays
# within ONE_HOP of it; two compressed hops (reduce-scatter and replicas) add a second error.
ONE_HOP = 2.5
TWO_HOPS = 3.5


def assert_close(spec: str, got: list, want: list, hops: int, what) -> None:
    for i, (g, p) in enumerate(zip(got, want)):
        err = float((g - p).norm() / p.norm())
        assert err <= (ONE_HOP if hops == 1 else TWO_HOPS) * codec_error(spec, p), (what, i, err)


def test_fsdp_gradients_close_to_uncompressed():
    res = run_ranks(2, fsdp_grads_battery, "int8")
    for r in range(2):
        assert_close("int8", res[r]["gz"], res[r]["plain"], 1, r)


# ---------------------------------------------------------------------------------------
# custom HSDP: the replica all-reduce
# ---------------------------------------------------------------------------------------

def hsdp_battery(rank: int, world: int, spec: str, both: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    out: dict = {}
    native = build(mesh)  # torch's own HSDP on the 2-D mesh, uncompressed
    backward(native, rank, 0)
    out["native"] = full_grads(native)
    net = build(mesh["shard"])  # sharded inside the "node", replicated by gradzip's hook
    gradzip.fsdp.enable(net, spec, reduce_scatter=both,
                        replicate_group=mesh["replicate"].get_group(), min_numel=0,
                        algorithm="alltoall" if both else "allgather")
    out["log"], out["gz0"] = train_recorded(net, rank)
    out["replica_ranks"] = dist.get_process_group_ranks(mesh["replicate"].get_group())
    return out


@pytest.mark.parametrize("spec,both", [("int4", False), ("int8", True)])
def test_custom_hsdp_on_two_nodes(spec, both):
    world = 4
    res = run_ranks(world, hsdp_battery, spec, both)
    groups = {tuple(r["replica_ranks"]) for r in res}
    assert groups == {(0, 2), (1, 3)}
    # exact: each replica all-reduce is the simulated one over the two replicas' shards
    for group in groups:
        logs = [res[r]["log"] for r in group]
        sims = {}
        ars = [i for i, e in enumerate(logs[0]) if e[0] == "ar"]
        assert len(ars) == STEPS * 3
        for i in ars:
            _, key, algo, average, _, _ = logs[0][i]
            assert algo == "allgather" or both
            assert average  # no divide factor: the mean over replicas, as native HSDP
            n = logs[0][i][4].numel()
            sim = sims.setdefault(key, AllReduceSimulation(Codec(spec), algo, 2, n, ef=True,
                                                           key=key))
            want = sim([logs[j][i][4] for j in range(2)])
            for j in range(2):
                assert torch.equal(logs[j][i][5], want), (group, key, i)
    # approximate, first step: within the codec's error of native (uncompressed) HSDP
    for r in range(world):
        assert_close(spec, res[r]["gz0"], res[r]["native"], 2 if both else 1, r)


# ---------------------------------------------------------------------------------------
# accumulation, divide factors, checkpoints, errors
# ---------------------------------------------------------------------------------------

def accumulation_battery(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for label, gz in (("plain", False), ("gz", True)):
        net = build(mesh["shard"])
        group = mesh["replicate"].get_group()
        if gz:
            gradzip.fsdp.enable(net, "int8", replicate_group=group, min_numel=0,
                                algorithm="alltoall")
        else:  # the uncompressed replica all-reduce, as torchtitan writes it
            for m in net.layers:
                m.set_all_reduce_hook(lambda g, group=group: dist.all_reduce(
                    g.div_(2), group=group))
        # micro-batch 0: no sync at all; 1: reduce-scatter but no replica all-reduce;
        # 2: everything
        net.set_requires_gradient_sync(False)
        backward(net, rank, 0, micro=0)
        net.set_requires_gradient_sync(True)
        net.set_requires_all_reduce(False)
        backward(net, rank, 0, micro=1)
        net.set_requires_all_reduce(True)
        backward(net, rank, 0, micro=2)
        out[label] = full_grads(net)
    # divide factor 4 on a 1-D mesh: FSDP asks for PREMUL_SUM(1/4)
    mesh1 = init_device_mesh("cpu", (world,))
    for label, gz in (("factor-plain", False), ("factor-gz", True)):
        net = build(mesh1)
        net.set_gradient_divide_factor(4.0 * world)
        if gz:
            gradzip.fsdp.enable(net, "int8", min_numel=0)
        backward(net, rank, 0)
        out[label] = full_grads(net)
    return out


def test_accumulation_and_divide_factor():
    """Accumulated micro-batches (both hops compressed) and a custom divide factor give
    what uncompressed FSDP gives, within the codec's error."""
    res = run_ranks(4, accumulation_battery)
    for r in range(4):
        assert_close("int8", res[r]["gz"], res[r]["plain"], 2, r)
        assert_close("int8", res[r]["factor-gz"], res[r]["factor-plain"], 1, r)


def resume_battery(rank: int, world: int, ckdir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    group = mesh["replicate"].get_group()

    def setup():
        net = build(mesh["shard"])
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        st = gradzip.fsdp.enable(net, "int4", replicate_group=group, min_numel=0,
                                 algorithm="alltoall", warmup_steps=1)
        return net, opt, st

    def train(net, opt, steps):
        for step in steps:
            opt.zero_grad()
            backward(net, rank, step)
            opt.step()

    net, opt, st = setup()
    train(net, opt, range(4))
    straight = [p.full_tensor().clone() for p in net.parameters()]
    net, opt, st = setup()
    train(net, opt, range(2))
    # torch.distributed.checkpoint, with gradzip's state as a Stateful beside model and
    # optimizer (every rank's residuals differ: DCP must give each rank its own back)
    msd, osd = get_state_dict(net, opt)
    dcp.save({"model": msd, "optim": osd, "gradzip": st}, checkpoint_id=ckdir)
    saved = st.state_dict()
    net, opt, st = setup()
    msd, osd = get_state_dict(net, opt)
    sd = {"model": msd, "optim": osd, "gradzip": st}
    dcp.load(sd, checkpoint_id=ckdir)
    set_state_dict(net, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    loaded = st.state_dict()
    train(net, opt, range(2, 4))
    resumed = [p.full_tensor().clone() for p in net.parameters()]
    errors = {}
    try:
        other = gradzip.fsdp.enable(build(mesh["shard"]), "int8", replicate_group=group)
        other.load_state_dict(saved)
    except ValueError as e:
        errors["codec"] = str(e)
    return {"straight": straight, "resumed": resumed, "errors": errors,
            "saved": saved, "loaded": loaded}


def test_checkpoint_resume_is_bit_identical(tmp_path):
    res = run_ranks(4, resume_battery, str(tmp_path / "ckpt"))
    for r in range(4):
        for a, b in zip(res[r]["straight"], res[r]["resumed"]):
            assert torch.equal(a, b), r
        assert "codec" in res[r]["errors"]["codec"]
        # each rank got its own residuals back through DCP (they differ between ranks)
        assert res[r]["loaded"] == res[r]["saved"], r
        assert f"rank{r}_of_4" in res[r]["saved"]
    assert res[0]["saved"]["rank0_of_4"] != res[1]["saved"]["rank1_of_4"]


def errors_battery(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    out["not-fsdp"] = catch(lambda: gradzip.fsdp.enable(Net(), "int8"))
    out["nothing"] = catch(lambda: gradzip.fsdp.enable(build(mesh), "int8",
                                                       reduce_scatter=False))
    out["bad-storage"] = catch(lambda: gradzip.fsdp.enable(build(mesh), "int8",
                                                           residual_storage="fp16"))
    net = build(mesh)
    out["codec-differs"] = catch(lambda: gradzip.fsdp.enable(
        net, "int8" if rank == 0 else "int4", min_numel=0))
    # refused on one rank only: its peers raise too instead of waiting for it
    out["one-rank-refuses"] = catch(lambda: gradzip.fsdp.enable(
        build(mesh), "int8", residual_storage="fp16" if rank == 0 else "int8"))
    out["param-groups"] = catch(lambda: gradzip.fsdp.enable(two_param_groups(mesh, world),
                                                            "int8"))
    state = gradzip.fsdp.enable(build(mesh), "int8", min_numel=0)
    out["bad-op"] = catch(lambda: state.reduce_scatter_shards(
        "layers.0", torch.empty(4), torch.ones(4 * world), None, dist.ReduceOp.MAX))
    # the group still works afterwards
    x = torch.ones(8)
    dist.all_reduce(x)
    out["still-works"] = x
    return out


def test_errors():
    world = 2
    res = run_ranks(world, errors_battery)
    for r in range(world):
        e = res[r]
        assert e["not-fsdp"][0] == "ValueError" and "fully_shard" in e["not-fsdp"][1]
        assert e["nothing"][0] == "ValueError" and "nothing to compress" in e["nothing"][1]
        assert e["bad-storage"][0] == "ValueError" and "residual_storage" in e["bad-storage"][1]
        assert e["codec-differs"][0] == "ValueError", e
        assert "ranks 0 and 1 share a group but disagree on codec (\"Codec('int8')\" vs " \
            "\"Codec('int4')\")" in e["codec-differs"][1], e
        assert e["one-rank-refuses"][0] == "ValueError", e
        assert "residual_storage" in e["one-rank-refuses"][1], e
        if r > 0:
            assert "failed on rank(s) [0]" in e["one-rank-refuses"][1], e
        assert e["param-groups"][0] == "ValueError", e
        assert "has 2 parameter groups" in e["param-groups"][1], e
        assert e["bad-op"][0] == "ValueError" and "cannot honour" in e["bad-op"][1]
        assert torch.equal(e["still-works"], torch.full((8,), float(world)))


def two_param_groups(mesh, world: int) -> nn.Module:
    """A model whose root FSDP module has two parameter groups: the last layer's weight is
    sharded on another mesh (1-rank groups) through ``shard_placement_fn``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_common import (
        FSDPMeshInfo,
        ShardPlacementResult,
    )
    from torch.distributed.tensor import Shard

    alone = init_device_mesh("cpu", (world, 1), mesh_dim_names=("x", "alone"))["alone"]
    info = FSDPMeshInfo(alone, shard_mesh_dim=0)
    net = Net()
    last = net.layers[-1].weight

    def placement(p):
        return ShardPlacementResult(placement=Shard(0), mesh_info=info) if p is last else None

    fully_shard(net, mesh=mesh, shard_placement_fn=placement)
    return net


def layout_battery(rank: int, world: int) -> dict:
    """Replica layouts that cannot work, on a 2 x 2 mesh: every rank raises in enable."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    group = mesh["replicate"].get_group()
    out = {}
    # rank 1 forgets its replicate group (its shard peer and its replica give theirs)
    out["one-without"] = catch(lambda: gradzip.fsdp.enable(
        build(mesh["shard"]), "int8", replicate_group=None if rank == 1 else group))
    # the whole world as the replicate group: it would sum different shards together
    out["mixes-shards"] = catch(lambda: gradzip.fsdp.enable(
        build(mesh["shard"]), "int8", reduce_scatter=False, replicate_group=dist.group.WORLD))
    # a DeviceMesh where a process group belongs
    out["mesh-not-group"] = catch(lambda: gradzip.fsdp.enable(
        build(mesh["shard"]), "int8", replicate_group=mesh["replicate"]))
    # native HSDP (2-D mesh): FSDP already all-reduces across replicas
    out["native-hsdp"] = catch(lambda: gradzip.fsdp.enable(build(mesh), "int8",
                                                           replicate_group=group))
    # a layout that fits still works after all this
    net = build(mesh["shard"])
    gradzip.fsdp.enable(net, "int8", replicate_group=group, min_numel=0)
    backward(net, rank, 0)
    out["grads-finite"] = all(bool(torch.isfinite(g).all()) for g in full_grads(net))
    return out


def test_layouts_that_do_not_fit():
    world = 4
    res = run_ranks(world, layout_battery)
    for r in range(world):
        e = res[r]
        assert e["one-without"][0] == "ValueError", e
        assert "rank 3 gives replicate_group [1, 3] but rank 1 gives none" in \
            e["one-without"][1], e
        assert "ranks 0 and 1 share a group but disagree on replicate_group (True vs " \
            "False)" in e["one-without"][1], e
        assert e["mixes-shards"][0] == "ValueError", e
        assert "replicate_group [0, 1, 2, 3] joins rank 0 (shard [0] of [2]) and rank 1 " \
            "(shard [1] of [2])" in e["mixes-shards"][1], e
        assert e["mesh-not-group"][0] == "TypeError", e
        assert "replicate_group must be a torch.distributed.ProcessGroup" in \
            e["mesh-not-group"][1] and "got DeviceMesh" in e["mesh-not-group"][1], e
        assert e["native-hsdp"][0] == "ValueError", e
        assert "2-D (HSDP) mesh" in e["native-hsdp"][1], e
        assert e["grads-finite"], e


def die_in_backward(rank: int, world: int) -> dict:
    """The last rank exits inside gradzip's reduce-scatter during FSDP's backward; the
    others must raise (not hang) within the process group's timeout."""
    import os
    import time

    from torch.distributed.device_mesh import init_device_mesh

    net = build(init_device_mesh("cpu", (world,)))
    gradzip.fsdp.enable(net, "int8", min_numel=0)
    if rank == world - 1:
        def die(*a, **kw):
            os._exit(3)

        pytest.MonkeyPatch().setattr(comm, "reduce_scatter", die)
    t0 = time.monotonic()
    err = catch(lambda: backward(net, rank, 0))
    return {"error": err, "elapsed": time.monotonic() - t0}


def test_dead_rank_in_backward_raises_within_timeout():
    assert_survivors_raise(3, die_in_backward)


def codec_error(spec: str, g: torch.Tensor) -> float:
    """Relative L2 error of compressing ``g`` once with ``spec`` (the reference, block 128,
    nearest): the yardstick the gradient tolerances above are stated in."""
    from gradzip import reference

    c = Codec(spec)
    flat = g.reshape(-1).float()
    payload = reference.quantize_pack(flat, c.bits, c.block, None, "nearest", 0)
    out = torch.zeros_like(flat)
    reference.dequantize_accumulate(payload[None], out, 1.0)
    return float((out - flat).norm() / flat.norm())


def replica_stats_battery(rank: int, world: int) -> list:
    """The replica hop's stats when "auto" settles on its second candidate: int8 on 3 ranks
    plans the two-phase algorithm and also times the all-gather (comm.autotune); the clock
    is faked so that the all-gather is the fastest."""
    from gradzip.fsdp import FSDPCompressionState

    state = FSDPCompressionState(Codec("int8"), False, dist.group.WORLD, "fp32", 0, "auto",
                                 comm.DEFAULT_MIN_NUMEL, "always", 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comm.autotune.Clock, "seconds",
                   lambda self: {"allgather": 0.01}.get(self.kind, 0.05))
        for step in range(3 * comm.AUTO_PROBES + 1):
            g = torch.randn(20_000, generator=torch.Generator().manual_seed(rank + 7 * step))
            state.all_reduce_replicas("layer", g, sync=True, average=True)
    return state.stats()


def test_replica_stats_count_the_algorithm_auto_settled_on():
    world = 3
    assert comm.plan(Codec("int8"), 20_000, torch.float32, world, "auto").algorithm == \
        "alltoall"
    res = run_ranks(world, replica_stats_battery)
    gathered = comm.plan(Codec("int8"), 20_000, torch.float32, world, "allgather")
    for rows in res:
        (row,) = rows
        assert row["hop"] == "replicas" and row["algorithm"] == "allgather", row
        # the all-gather's bytes (W-1 payloads of the whole shard), not the two-phase plan's
        assert row["bytes_sent"] == gathered.bytes_sent == (world - 1) * \
            Codec("int8").compressed_size(20_000)
