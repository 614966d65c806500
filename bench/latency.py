"""What a small collective costs on this machine: the latency behind ``verify="always"``.

    python bench/latency.py                      # 4 ranks, host loopback
    python bench/latency.py --world 2            # a core per rank on a 2-core machine

gradzip's explicit agreement check (``verify="always"`` where the check is not folded into
the call's own collectives: plain and two-phase calls above ``comm.FOLD_MAX_BYTES``, first
calls of a pattern) is one small all-gather of every rank's fingerprint. What it adds to a
call is the latency of that message round, which depends on the machine far more than on
gradzip: with one core per rank it is a fraction of a millisecond, with more ranks than
cores every hop waits for a process to be scheduled. This benchmark times, per size and
interleaved in rotating order (a call's time is the slowest rank's from a barrier, the
figure the median over the rounds):

- ``all_reduce``: ``dist.all_reduce`` of the size (the baseline);
- ``agreement``: gradzip's fingerprint exchange alone (``comm.collectives.all_gather_small``
  of the fingerprint's int64 fields, the same message whatever the size);
- ``agreement+all_reduce``: the two back to back, what an explicitly checked plain call
  pays; its ratio to ``all_reduce`` is the check's cost at that size;
- ``all_gather``: gradzip's all-gather of the size / W per rank (on Gloo an all-to-all);
- ``broadcast``: ``dist.broadcast`` of the size from rank 0 (one hop, only the root sends).

Then, back to back without barriers, ``--burst`` small all-reduces per rank with the
process's CPU time and context switches per call (``getrusage``): where a 64-byte
all-reduce takes milliseconds while the processes use a fraction of the CPU, the time is
spent waiting to be scheduled, not working.

Writes JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # bench/harness.py: picks the gradzip build, so it comes before gradzip

# isort: split
import netlink

DEFAULT_SIZES = "64B,16KiB,1MiB,4MiB"
OPS = ("all_reduce", "agreement", "agreement+all_reduce", "all_gather", "broadcast")


def worker(cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    from gradzip.comm import agreement, collectives

    rank, world = netlink.join_group(cfg["threads"], cfg["pg_timeout"])
    fp_len = len(agreement._FP_FIELDS)
    mine = torch.full((fp_len,), rank, dtype=torch.int64)
    every = torch.empty(world * fp_len, dtype=torch.int64)

    def agree() -> None:
        collectives.all_gather_small(every, mine, None)

    rows = []
    for size in cfg["sizes"]:
        numel = max(harness.parse_size(size, multiple_of=4) // 4, world)
        numel -= numel % world
        # Zeros for the all-reduce and the broadcast: their sums stay finite however
        # often they run (the time of a float add does not depend on its value).
        x = torch.zeros(numel)
        shard = torch.randn(numel // world, generator=torch.Generator().manual_seed(rank))
        gathered = torch.empty(numel)

        def all_reduce(x=x) -> None:
            dist.all_reduce(x)

        def agreement_then_all_reduce(x=x) -> None:
            agree()
            dist.all_reduce(x)

        def all_gather(shard=shard, gathered=gathered) -> None:
            collectives.all_gather(gathered, shard, None, async_op=False)

        def broadcast(x=x) -> None:
            dist.broadcast(x, 0)

        fns = dict(zip(OPS, (all_reduce, agree, agreement_then_all_reduce, all_gather,
                             broadcast)))
        # Every rank checks the all-gather's result once (rank r's shard is row r).
        all_gather()
        want = torch.cat([torch.randn(numel // world,
                                      generator=torch.Generator().manual_seed(r))
                          for r in range(world)])
        if not torch.equal(gathered, want):
            harness.stop_before_timing(f"all_gather of {size} on {world} ranks",
                                       "rows differ from every rank's input", show=True)
        for fn in fns.values():
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        keys = list(fns)
        for i in range(cfg["rounds"]):
            for k in keys[i % len(keys):] + keys[: i % len(keys)]:
                times[k].append(harness.time_collective(fns[k]))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"size_bytes": numel * 4, "world": world, "median_s": med,
                     "times_s": times,
                     "check_cost": med["agreement+all_reduce"] / med["all_reduce"]})
        if rank == 0:
            print(f"[latency] {size:>6}: " + "  ".join(f"{k} {v * 1e3:.3f} ms"
                                                    for k, v in med.items()), flush=True)

    small = torch.zeros(16)
    for _ in range(20):
        dist.all_reduce(small)
    dist.barrier()
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(cfg["burst"]):
        dist.all_reduce(small)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    n = cfg["burst"]
    mine_burst = [wall / n, (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / wall,
                  (r1.ru_nvcsw - r0.ru_nvcsw) / n, (r1.ru_nivcsw - r0.ru_nivcsw) / n]
    got = [torch.zeros(4, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(got, torch.tensor(mine_burst, dtype=torch.float64))
    if rank == 0:
        burst = [{"rank": r, "s_per_call": g[0].item(), "cpu_share": g[1].item(),
                  "voluntary_switches_per_call": g[2].item(),
                  "involuntary_switches_per_call": g[3].item()} for r, g in enumerate(got)]
        Path(cfg["result"]).write_text(json.dumps({"rows": rows, "burst": burst}))
    dist.destroy_process_group()


def table(doc: dict) -> str:
    head = f"{'size':>10} " + " ".join(f"{k:>21}" for k in OPS) + f" {'check cost':>10}"
    lines = [head, "-" * len(head)]
    for r in doc["rows"]:
        lines.append(f"{harness.fmt_bytes(r['size_bytes']):>10} "
                     + " ".join(f"{r['median_s'][k] * 1e3:18.3f} ms" for k in OPS)
                     + f" {r['check_cost']:9.2f}x")
    lines.append("ms: median over interleaved rounds of the slowest rank's time from a "
                 "barrier; check cost: (agreement+all_reduce) / all_reduce")
    for b in doc["burst"]:
        lines.append(f"burst, rank {b['rank']}: 16-float all_reduce back to back "
                     f"{b['s_per_call'] * 1e3:.3f} ms/call, {b['cpu_share'] * 100:.0f} % of a "
                     f"core, {b['voluntary_switches_per_call']:.1f} voluntary + "
                     f"{b['involuntary_switches_per_call']:.1f} involuntary context "
                     "switches per call")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="bytes of fp32 per rank")
    p.add_argument("--rounds", type=int, default=200, help="timed rounds (every op once each)")
    p.add_argument("--burst", type=int, default=500,
                   help="back-to-back small all-reduces for the CPU and context-switch count")
    p.add_argument("--out", default="bench/results/latency.json")
    netlink.add_rank_arguments(p)
    a = p.parse_args(argv)
    if a.worker:
        worker(json.loads(Path(a.worker).read_text()))
        return 0
    if a.world < 2:
        p.error("--world must be >= 2")
    if a.rounds < 1 or a.burst < 1:
        p.error("--rounds and --burst must be >= 1")
    sizes = harness.split_list(a.sizes)
    try:
        for s in sizes:
            harness.parse_size(s, multiple_of=4)
    except ValueError as e:
        p.error(f"--sizes: {e} (bytes of fp32 elements)")
    netlink.parse_link(a.link, a.world)
    info = harness.machine_info()
    print(f"[latency] {harness.machine_line(info)}", flush=True)
    cfg = {"sizes": sizes, "rounds": a.rounds, "burst": a.burst}
    try:
        result, eff, qdisc = netlink.run_worker_script(__file__, cfg, a, tag="latency")
    except netlink.RankFailed as e:
        return harness.stopped(e, "latency")
    print(table(result))
    info["loadavg_end"] = os.getloadavg()
    doc = {"argv": sys.argv, "machine": info, "link": eff, "qdisc": qdisc, "world": a.world,
           "rounds": a.rounds, **result, "table": table(result)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"[latency] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
