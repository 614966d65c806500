"""What ``algorithm="auto"`` costs where compression does not pay: interleaved against fp32.

    python bench/auto_overhead.py                     # 4 ranks, host loopback, 16 KiB..64 MiB
    python bench/auto_overhead.py --link 10gbit       # the same on an emulated link

Where the link is faster than the compression, ``gradzip.all_reduce(..., algorithm="auto")``
should settle on the plain all-reduce and cost no more than ``dist.all_reduce``; where
compression pays it should settle on it. Per size and codec, every rank first makes the
calls "auto" needs to settle (its probe calls, reported separately: they are its start-up
cost), then each timed round makes one fp32 call (``dist.all_reduce`` + division by W, the
baseline of bench/allreduce.py), a second identical fp32 call and one gradzip "auto" call
on the same input, in an order that rotates from round to round, so all see the same
machine state; a call's time is the slowest rank's, and the reported figure is the median
over the rounds (at least ``--rounds``, more for fast calls). The second fp32 copy
measures the noise floor: its ratio to the first would be 1.00 on a quiet machine. On a 2-core machine with 4 ranks the
scheduler makes single calls noisy: interleaving is what makes the ratio trustworthy.

Correctness before timing: per size and codec, a first "auto" call (fresh error-feedback
state, before "auto" has measured anything; its choice is then forgotten) must give
bit-identical, finite results on every rank within gradzip's error bound against the exact
mean (bench/harness.py); a failed check stops the run with exit status 3.

Writes JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # bench/harness.py: picks the gradzip build, so it comes before gradzip

# isort: split
import netlink

DEFAULT_SIZES = "16KiB,256KiB,1MiB,4MiB,16MiB,64MiB"
DEFAULT_CODECS = "int8,int4,sign,topk:0.01"


def worker(cfg: dict) -> None:
    import gradzip
    import torch
    import torch.distributed as dist

    rank, world = netlink.join_group(cfg["threads"], cfg["pg_timeout"])
    timed = harness.time_collective

    extra = {"verify": cfg["verify"]} if cfg.get("verify") else {}
    rows = []
    for size in cfg["sizes"]:
        numel = harness.parse_size(size, multiple_of=4) // 4
        x = torch.randn(numel, generator=torch.Generator().manual_seed(1000 + rank))
        buf = x.clone()

        def fp32(buf=buf, x=x) -> None:
            buf.copy_(x)
            dist.all_reduce(buf)
            buf.div_(world)

        fp32()
        exact = buf.clone()  # fp32's result is the exact mean
        for spec in cfg["codecs"]:
            codec = gradzip.Codec(spec)
            check_ef = gradzip.ErrorFeedback()
            buf.copy_(x)
            gradzip.all_reduce(buf, codec, state=check_ef, algorithm="auto", **extra)
            check = harness.check_all_reduce(
                buf, exact, tolerance=harness.all_reduce_tolerance(codec, x, exact, "auto"))
            if check.problem:
                harness.stop_before_timing(f"gradzip.all_reduce({spec}, algorithm='auto') at "
                                           f"{size} on {world} ranks", check.problem,
                                           show=rank == 0)
            gradzip.comm.reset_auto()  # the check call is not one of the timed probes
            ef = gradzip.ErrorFeedback()

            def gz(buf=buf, x=x, codec=codec, ef=ef) -> None:
                buf.copy_(x)
                gradzip.all_reduce(buf, codec, state=ef, algorithm="auto", **extra)

            settle = []
            while gradzip.comm.auto_choice(buf, codec) is None and len(settle) < 100:
                settle.append(timed(gz))
            # Small calls are noisy: enough rounds for about 2 s of fp32 calls.
            est = min(timed(fp32) for _ in range(3))
            rounds = min(cfg["max_rounds"], max(cfg["rounds"], int(2.0 / max(est, 1e-6))))
            # fp32 twice per round: the spread between the two copies is the noise floor.
            tf, tf2, tg = [], [], []
            order = [(fp32, tf), (fp32, tf2), (gz, tg)]
            for i in range(rounds):
                for fn, sink in order[i % 3:] + order[: i % 3]:  # rotate who goes first
                    sink.append(timed(fn))
            choice = gradzip.comm.auto_choice(buf, codec) or {}
            row = {"size_bytes": numel * 4, "codec": spec, "world": world,
                   "rel_err": check.rel_err, "choice": choice.get("algorithm"),
                   "probe_compressed_s": choice.get("compressed_s"),
                   "probe_plain_s": choice.get("plain_s"),
                   "probe_times_s": choice.get("times_s"),
                   "settle_calls": len(settle), "settle_s": sum(settle),
                   "rounds": rounds, "fp32_s": statistics.median(tf),
                   "fp32_again_s": statistics.median(tf2), "auto_s": statistics.median(tg),
                   "fp32_times_s": tf, "fp32_again_times_s": tf2, "auto_times_s": tg}
            row["auto_vs_fp32"] = row["auto_s"] / row["fp32_s"]
            row["fp32_again_vs_fp32"] = row["fp32_again_s"] / row["fp32_s"]
            rows.append(row)
            if rank == 0:
                print(f"[auto] {size:>7} {spec:<10} -> {row['choice']:<9} fp32 "
                      f"{row['fp32_s'] * 1e3:8.2f} ms  auto {row['auto_s'] * 1e3:8.2f} ms  "
                      f"({row['auto_vs_fp32']:.2f}x the time; settled in "
                      f"{row['settle_calls']} calls)", flush=True)
            gradzip.comm.reset_auto()
    if rank == 0:
        Path(cfg["result"]).write_text(json.dumps(rows))
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    fmt_bytes = harness.fmt_bytes
    head = (f"{'size':>10} {'codec':<10} {'auto chose':<10} {'fp32':>9} {'auto':>9} "
            f"{'auto/fp32':>9} {'noise':>6} {'rounds':>6} {'probes':>6} {'probe cost':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{fmt_bytes(r['size_bytes']):>10} {r['codec']:<10} {r['choice']:<10} "
                     f"{r['fp32_s'] * 1e3:7.2f}ms {r['auto_s'] * 1e3:7.2f}ms "
                     f"{r['auto_vs_fp32']:8.2f}x {r['fp32_again_vs_fp32']:5.2f}x "
                     f"{r['rounds']:>6} {r['settle_calls']:>6} {r['settle_s']:9.2f}s")
    lines.append("auto/fp32: median time of auto over median time of fp32, interleaved; "
                 "noise: the same ratio for a second fp32 copy (1.00x = no noise)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES)
    p.add_argument("--codecs", default=DEFAULT_CODECS)
    p.add_argument("--rounds", type=int, default=30,
                   help="minimum timed rounds (fp32, fp32 again, auto); more for fast calls")
    p.add_argument("--max-rounds", type=int, default=400)
    p.add_argument("--verify", default=None,
                   help="pass verify=... to gradzip.all_reduce (default: the library's, "
                        "'always' on CPU)")
    p.add_argument("--out", default="bench/results/auto_overhead.json")
    netlink.add_rank_arguments(p)
    a = p.parse_args(argv)
    if a.worker:
        worker(json.loads(Path(a.worker).read_text()))
        return 0
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    sizes = harness.split_list(a.sizes)
    try:
        for s in sizes:
            harness.parse_size(s, multiple_of=4)  # fails early on a bad size
    except ValueError as e:
        p.error(f"--sizes: {e} (bytes of fp32 elements)")
    netlink.parse_link(a.link, a.world)
    info = harness.machine_info()
    cfg = {"sizes": sizes, "codecs": harness.split_specs(a.codecs), "rounds": a.rounds,
           "max_rounds": a.max_rounds, "verify": a.verify}
    try:
        rows, eff, qdisc = netlink.run_worker_script(__file__, cfg, a, tag="auto")
    except netlink.RankFailed as e:
        return harness.stopped(e, "auto")
    print(table(rows))
    info["loadavg_end"] = os.getloadavg()
    doc = {"argv": sys.argv, "machine": info, "link": eff, "qdisc": qdisc, "world": a.world,
           "rounds": a.rounds, "verify": a.verify or "library default", "results": rows,
           "table": table(rows)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"[auto] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
