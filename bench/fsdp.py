"""FSDP2 / HSDP training with gradzip on two emulated nodes.

    python bench/fsdp.py                          # 2 nodes x 2 ranks, 1gbit between nodes
    python bench/fsdp.py --link 1gbit,10gbit --steps 300
    python bench/fsdp.py --quick --steps 6        # smoke test

Two nodes on one machine (bench/netlink.py ``EmulatedNodes``: one network namespace per
node, joined by a veth pair shaped with ``tc tbf``; ranks of one node talk over the
node's own loopback, unshaped), each started with ``torchrun --nnodes 2 --nproc-per-node
N`` inside its namespace and c10d rendezvous on node 0: the real multi-node start-up. Needs
root; without it the script says so and stops.

Model and data: the character-level transformer of bench/train.py (``CharGPTTask``, its
text and batches; here 256 wide and 4 blocks by default, 3.2 M parameters, so the hops
carry megabytes), AdamW, the same initial weights, batches and schedule for every method.

Methods (``--methods``):

* ``hsdp``        native HSDP, fp32: ``fully_shard`` on the 2-D mesh (replicate x shard).
* ``hsdp-bf16``   the same with ``MixedPrecisionPolicy(reduce_dtype=bfloat16)``.
* ``rep-plain``   custom HSDP: sharded on each node's 1-D mesh, the replica all-reduce done
  by an ``all_reduce_hook`` with a plain fp32 ``dist.all_reduce`` (as torchtitan does):
  the baseline of the replica-hop speed-ups.
* ``rep:<codec>`` custom HSDP with ``gradzip.fsdp.enable(model, codec,
  replicate_group=..., reduce_scatter=False)``; ``rep:<codec>/<algorithm>`` with a named
  algorithm instead of ``auto`` (``allgather``, ``alltoall``).
* ``fsdp``        FSDP over all ranks (1-D mesh: the reduce-scatter crosses the nodes), fp32.
* ``rs:<codec>``  the same with gradzip's compressed reduce-scatter (``gradzip.fsdp.enable``);
  ``rs:<codec>/<storage>`` with another residual storage (``fp32``, ``bf16``; default
  ``int8``).

Measured per step on rank 0: the step time (forward, backward with FSDP's communication,
optimizer step) and the time spent in the replica all-reduce (``rep-*``, ``hsdp*``) and in
the reduce-scatter (every method): wall time inside the collectives, which on CPU run
synchronously. The speed-up of the replica hop is ``rep-plain``'s time over
``rep:<codec>``'s, the same hop in the same run. The training loss is evaluated every
``--eval-every`` steps on a fixed training subset.

Correctness before timing: every method first trains a throwaway copy for 2 steps, then
every rank gathers the full parameters, which must be finite and bit-identical on every
rank (the replicas must agree); otherwise the run stops with status 3 before it is timed. Writes JSON (``--out``) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # bench/harness.py: picks the gradzip build, so it comes before gradzip

# isort: split
import netlink

DEFAULT_METHODS = ("hsdp", "hsdp-bf16", "rep-plain", "rep:int8", "rep:int4", "rep:topk:0.01",
                   "fsdp", "rs:int8", "rs:int4")


# ---------------------------------------------------------------------------------------
# one rank (under torchrun, inside a node's namespace)
# ---------------------------------------------------------------------------------------

class CommClock:
    """Wall seconds spent inside the collectives of one step, per hop."""

    def __init__(self) -> None:
        self.seconds = {"reduce_scatter": 0.0, "replicas": 0.0}
        self.depth = 0  # only the outermost timed call counts (gradzip calls dist inside)
        self.sizes: list[int] = []  # numel of each replica-hop call of the current step
        self.last_sizes: list[int] = []  # ... of the step before

    def wrap(self, fn, hop: str):
        def timed(*args, **kwargs):
            if self.depth == 0 and hop == "replicas" and args:
                self.sizes.append(args[0].numel())
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds[hop] += time.perf_counter() - t0
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {"reduce_scatter": 0.0, "replicas": 0.0}
        self.last_sizes, self.sizes = self.sizes, []
        return out


def build(method: str, task, mesh, clock: CommClock, cfg: dict):
    import gradzip
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(cfg["seed"])
    model = task.model()
    kind, _, spec = method.partition(":")
    if kind in ("hsdp", "hsdp-bf16"):
        shard_mesh = mesh["2d"]
    elif kind in ("fsdp", "rs"):
        shard_mesh = mesh["all"]
    else:
        shard_mesh = mesh["shard"]
    mp = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16) if kind == "hsdp-bf16" \
        else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=shard_mesh, mp_policy=mp)
    fully_shard(model, mesh=shard_mesh, mp_policy=mp)
    group = mesh["replicate"].get_group()
    state = None
    if kind == "rep-plain":
        world = dist.get_world_size(group)
        hook = clock.wrap(lambda g: dist.all_reduce(g.div_(world), group=group), "replicas")
        for m in [*model.blocks, model]:
            m.set_all_reduce_hook(hook)
    elif kind == "rep":
        spec, _, algorithm = spec.partition("/")
        state = gradzip.fsdp.enable(model, spec, replicate_group=group, reduce_scatter=False,
                                    warmup_steps=cfg["compress_warmup"],
                                    algorithm=algorithm or "auto")
    elif kind == "rs":
        spec, _, storage = spec.partition("/")
        state = gradzip.fsdp.enable(model, spec, warmup_steps=cfg["compress_warmup"],
                                    residual_storage=storage or "int8")
    return model, state


def instrument(clock: CommClock) -> None:
    """Time the collectives FSDP and gradzip call, wherever they are called from."""
    import gradzip
    import torch.distributed as dist

    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        if hasattr(dist, name):
            setattr(dist, name, clock.wrap(getattr(dist, name), "reduce_scatter"))
    # native HSDP's replica all-reduce (FSDP looks it up on torch.distributed per call)
    dist.all_reduce = clock.wrap(dist.all_reduce, "replicas")
    gradzip.comm.reduce_scatter = clock.wrap(gradzip.comm.reduce_scatter, "reduce_scatter")
    gradzip.comm.all_reduce = clock.wrap(gradzip.comm.all_reduce, "replicas")


def time_hop(method: str, sizes: list[int], state, mesh, cfg: dict, rank: int
             ) -> dict | None:
    """The replica hop alone, after training: per round, every rank leaves a barrier and
    reduces one step's worth of shard gradients (the modules' sizes, in backward's order)
    across replicas as the method does, both replica groups at once as in training but
    with no compute between the calls. Rank 0's median round time over ``--hop-rounds``
    (after 3 untimed rounds). What a step's hop costs without the ranks' skew, which the
    in-training figure includes (a rank waits in the hop for its peer to finish backward)."""
    import torch
    import torch.distributed as dist

    kind = method.partition(":")[0]
    if kind not in ("rep-plain", "rep"):
        return None
    group = mesh["replicate"].get_group()
    world = dist.get_world_size(group)
    # the modules' shard gradients, in the order the last training step reduced them
    names = [name for hop, name in state.calls if hop == "replicas"] if state else []
    names = names or [""] * len(sizes)  # state.calls: in first-call (backward's) order
    shards = list(zip(names, sizes))
    gen = torch.Generator().manual_seed(cfg["seed"] + rank)
    grads = [torch.randn(n, generator=gen) * 1e-3 for _, n in shards]
    def phases() -> dict[str, float]:
        total: dict[str, float] = {}
        for (hop, _), sec in (state.seconds.items() if state else ()):
            for ph, v in sec.items():
                if hop == "replicas":
                    total[ph] = total.get(ph, 0.0) + v
        return total

    times = []
    for i in range(3 + cfg["hop_rounds"]):
        if i == 3:
            before = phases()
        bufs = [g.clone() for g in grads]
        dist.barrier()
        t0 = time.perf_counter()
        for (name, _), b in zip(shards, bufs):
            if kind == "rep-plain":
                dist.all_reduce(b.div_(world), group=group)
            else:
                state.all_reduce_replicas(name, b, sync=True, average=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    after = phases()
    # gradzip's own split of the timed rounds (mean per round; CPU wall seconds)
    split = {ph: (after[ph] - before.get(ph, 0.0)) / len(times) for ph in after}
    return {"median_s": statistics.median(times), "rounds": len(times),
            "shards": [n for _, n in shards], "phases_s": split}


def full_params(model) -> list:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def train(method: str, task, mesh, clock: CommClock, cfg: dict, rank: int, steps: int,
          seed_offset: int = 0) -> dict:
    import torch
    import torch.distributed as dist
    from train import lr_factor

    model, state = build(method, task, mesh, clock, cfg)
    opt = task.optimizer(model.parameters(), cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(cfg["seed"] + 1000 * (rank + 1) + seed_offset)
    batches = task.batch_iter(gen)
    log = {"method": method, "steps": [], "evals": []}
    wall = 0.0
    clock.take()
    for step in range(steps):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * lr_factor(step, steps, cfg["lr_warmup"])
        batch = next(batches)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        opt.step()
        dt = time.perf_counter() - t0
        wall += dt
        comm = clock.take()
        log["steps"].append({"step": step, "seconds": dt, **{f"{k}_s": v for k, v in
                                                             comm.items()}})
        if (step + 1) % cfg["eval_every"] == 0 or step == steps - 1:
            params = full_params(model)  # a collective: every rank
            if rank == 0:
                loss, acc = task.evaluate(_unsharded_copy(task, params))
                log["evals"].append({"step": step + 1, "wall": wall, "loss": loss,
                                     "acc": acc})
            dist.barrier()
    log["memory_bytes"] = state.memory_bytes() if state is not None else None
    # what gradzip really did per module and hop ("auto" may settle on the plain collective)
    log["gradzip_stats"] = state.stats() if state is not None else None
    return log, model, state


def _unsharded_copy(task, params):
    import torch

    model = task.model()
    with torch.no_grad():
        for p, full in zip(model.parameters(), params):
            p.copy_(full)
    return model


def worker(cfg_path: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from train import make_task

    cfg = json.loads(Path(cfg_path).read_text())
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg["pg_timeout"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    nproc = int(os.environ["LOCAL_WORLD_SIZE"])
    mesh = {"2d": init_device_mesh("cpu", (world // nproc, nproc),
                                   mesh_dim_names=("replicate", "shard")),
            "all": init_device_mesh("cpu", (world,))}
    mesh["replicate"], mesh["shard"] = mesh["2d"]["replicate"], mesh["2d"]["shard"]
    task = make_task("chargpt", cfg)
    if not cfg["quick"]:  # a wider model than train.py's, so the hops carry megabytes
        task.d, task.layers, task.heads = cfg["width"], cfg["layers"], 4
    clock = CommClock()
    instrument(clock)
    for method, out_path in zip(cfg["methods"], cfg["result_paths"]):
        # correctness before timing: 2 steps, then every rank gathers the full parameters,
        # which must be finite and the same on every rank
        _, model, _ = train(method, task, mesh, clock, cfg, rank, 2, seed_offset=777)
        params = torch.cat([p.reshape(-1) for p in full_params(model)])
        problem = harness.identical_on_every_rank(params) or (
            None if bool(torch.isfinite(params).all()) else "non-finite parameters")
        if problem:
            harness.stop_before_timing(f"FSDP with {method}", problem, show=rank == 0)
        log, model, state = train(method, task, mesh, clock, cfg, rank, cfg["steps"])
        log["hop"] = time_hop(method, clock.last_sizes, state, mesh, cfg, rank) \
            if cfg["hop_rounds"] else None
        if rank == 0:
            Path(out_path).write_text(json.dumps(log))
        dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------

def summarize(runs: list[dict], warm: int) -> list[dict]:
    rows = []
    base = {r["method"]: r for r in runs}
    ref_rep = base.get("rep-plain")
    ref_loss = (base.get("hsdp") or base.get("rep-plain") or runs[0])["evals"][-1]["loss"]
    for r in runs:
        steps = r["steps"][warm:] or r["steps"]
        med = {k: statistics.median(s[k] for s in steps)
               for k in ("seconds", "replicas_s", "reduce_scatter_s")}
        final = r["evals"][-1]
        reach = next((e["wall"] for e in r["evals"] if e["loss"] <= ref_loss), None)
        row = {"method": r["method"], "step_s": med["seconds"], "replicas_s": med["replicas_s"],
               "reduce_scatter_s": med["reduce_scatter_s"], "final_loss": final["loss"],
               "loss_vs_ref": final["loss"] / ref_loss - 1, "wall_s": final["wall"],
               "wall_to_ref_loss_s": reach, "memory_bytes": r["memory_bytes"]}
        if ref_rep is not None and r["method"].startswith("rep") and med["replicas_s"] > 0:
            ref = statistics.median(s["replicas_s"] for s in ref_rep["steps"][warm:]
                                    or ref_rep["steps"])
            row["replica_speedup"] = ref / med["replicas_s"]
        if r.get("hop"):
            row["hop_s"] = r["hop"]["median_s"]
            if ref_rep is not None and ref_rep.get("hop"):
                row["hop_speedup"] = ref_rep["hop"]["median_s"] / r["hop"]["median_s"]
        rows.append(row)
    return rows


def print_table(rows: list[dict], link: str) -> None:
    print(f"\n== {link} between nodes ==")
    print(f"{'method':16s} {'step ms':>8s} {'replica ms':>10s} {'rs ms':>7s} "
          f"{'x replica':>9s} {'hop ms':>7s} {'x hop':>6s} {'final loss':>10s} {'vs ref':>7s} "
          f"{'to ref loss':>11s}")
    for r in rows:
        sp = f"{r['replica_speedup']:.2f}x" if "replica_speedup" in r else ""
        reach = f"{r['wall_to_ref_loss_s']:.1f}s" if r["wall_to_ref_loss_s"] else "-"
        hop = f"{1e3 * r['hop_s']:.1f}" if "hop_s" in r else ""
        hsp = f"{r['hop_speedup']:.2f}x" if "hop_speedup" in r else ""
        print(f"{r['method']:16s} {1e3 * r['step_s']:8.1f} {1e3 * r['replicas_s']:10.1f} "
              f"{1e3 * r['reduce_scatter_s']:7.1f} {sp:>9s} {hop:>7s} {hsp:>6s} "
              f"{r['final_loss']:10.4f} {100 * r['loss_vs_ref']:+6.2f}% {reach:>11s}")
    print("x replica: the replica all-reduce inside training steps (rank 0's wall time in "
          "it, including waiting for its peer); hop / x hop: the same step's shards reduced "
          "alone after training (--hop-rounds), against rep-plain")


def plot(doc: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(doc["links"])
    fig, axes = plt.subplots(len(links), 3, figsize=(16, 4.2 * len(links)), squeeze=False)
    for row, link in zip(axes, links):
        runs = doc["links"][link]["runs"]
        for r in runs:
            steps = [e["step"] for e in r["evals"]]
            row[0].plot(steps, [e["loss"] for e in r["evals"]], label=r["method"])
            row[1].plot([e["wall"] for e in r["evals"]], [e["loss"] for e in r["evals"]],
                        label=r["method"])
        summary = doc["links"][link]["summary"]
        names = [s["method"] for s in summary]
        rep = [1e3 * s["replicas_s"] for s in summary]
        rs = [1e3 * s["reduce_scatter_s"] for s in summary]
        rest = [1e3 * s["step_s"] - a - b for s, a, b in zip(summary, rep, rs)]
        row[2].barh(names, rs, label="reduce-scatter")
        row[2].barh(names, rep, left=rs, label="replica all-reduce")
        row[2].barh(names, rest, left=[a + b for a, b in zip(rs, rep)], label="rest of step")
        row[0].set(xlabel="step", ylabel="training loss", title=f"{link}: loss vs step")
        row[1].set(xlabel="wall seconds (rank 0)", ylabel="training loss",
                   title=f"{link}: loss vs wall time")
        row[2].set(xlabel="median ms per step", title=f"{link}: where a step's time goes")
        row[2].invert_yaxis()
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--link", default="1gbit", help="inter-node rate(s), comma-separated")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--compress-warmup", type=int, default=10,
                   help="uncompressed reductions per module before gradzip compresses")
    p.add_argument("--width", type=int, default=256, help="transformer width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--quick", action="store_true", help="tiny model, for smoke tests")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hop-rounds", type=int, default=20,
                   help="rounds of the replica hop timed alone after training (0: none)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default="bench/results/fsdp.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker)
        return 0
    problem = netlink.root_problem()
    if problem:
        print(f"bench/fsdp.py needs two emulated nodes: {problem}", file=sys.stderr)
        return 2
    methods = harness.split_specs(a.methods)
    info = harness.machine_info()
    print(harness.machine_line(info))
    doc = {"machine": info, "config": vars(a) | {"methods": methods}, "links": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    netlink.remove_stale()
    for link in harness.split_list(a.link):
        rate = netlink.parse_rate(link)
        with tempfile.TemporaryDirectory() as tmp:
            paths = [str(Path(tmp) / f"run{i}.json") for i in range(len(methods))]
            cfg = {"methods": methods, "result_paths": paths, "steps": a.steps,
                   "eval_every": a.eval_every, "compress_warmup": a.compress_warmup,
                   "batch": a.batch, "lr": a.lr, "quick": a.quick, "threads": a.threads,
                   "width": a.width, "layers": a.layers, "hop_rounds": a.hop_rounds,
                   "pg_timeout": 600, "seed": 1234, "lr_warmup": max(1, a.steps // 10)}
            cfg_path = Path(tmp) / "cfg.json"
            cfg_path.write_text(json.dumps(cfg))
            t0 = time.time()
            with netlink.EmulatedNodes(rate) as nodes:
                try:
                    netlink.launch_nodes([str(Path(__file__).resolve()), "--worker",
                                          str(cfg_path)], nodes, a.nproc_per_node,
                                         threads=a.threads, timeout=a.timeout)
                except netlink.RankFailed as e:
                    print(f"bench/fsdp.py: {e}", file=sys.stderr)
                    return harness.CHECK_FAILED if e.returncode == harness.CHECK_FAILED else 1
            runs = [json.loads(Path(q).read_text()) for q in paths]
        rows = summarize(runs, warm=a.compress_warmup + 2)
        print_table(rows, link)
        print(f"({time.time() - t0:.0f} s)")
        doc["links"][link] = {"runs": runs, "summary": rows}
    out.write_text(json.dumps(doc, indent=1))
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
