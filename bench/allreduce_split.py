"""Where the time of one compressed all-reduce goes: compress / communicate / decompress.

Starts ``--world`` Gloo ranks on 127.0.0.1 (CPU tensors), and on each reduces a
``--mib`` MiB float32 tensor with every codec x algorithm through ``gradzip.all_reduce``
(with error feedback, as in training), plus the uncompressed all-reduce for reference.
Before timing, each configuration is checked: every rank must hold bit-identical results,
and the relative error against the exact (float64) mean is printed.

Per call, ``all_reduce(..., timings=...)`` splits the wall time into
``verify`` (the agreement fingerprint), ``compress`` (quantize/top-k, both phases),
``communicate`` (the collectives, including waiting for slower peers) and ``decompress``
(header checks and dequantize-accumulate). For each repeat the slowest rank's figure is
taken per phase, and the table shows the median over repeats.

    python bench/allreduce_split.py                         # 4 ranks, 64 MiB, all codecs
    python bench/allreduce_split.py --world 2 --mib 16 --codecs int8,int4 --repeat 3
    python bench/allreduce_split.py --json bench/results/split.json

Every rank gets ``--threads`` intra-op threads (default 1): with W ranks on a machine of C
cores, W * threads should not exceed C, or the figures measure time-slicing. Link speed is
loopback's (memory bandwidth), not a network's; see DESIGN.md for emulating a slow link.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# A source checkout with an in-place build (setup.py build_ext --inplace) wins; otherwise
# the installed package (pip install .) is used.
if glob.glob(os.path.join(HERE, "..", "python", "gradzip", "_C*.so")):
    sys.path.insert(0, os.path.join(HERE, "..", "python"))

from timing import measure  # bench/timing.py, the shared timing helper

CODECS = ["int8", "int4", "int2", "sign", "topk:0.01"]
ALGORITHMS = ["allgather", "alltoall"]
PHASES = ["verify", "compress", "communicate", "decompress"]


def _configs(args):
    out = [("none", "plain")]
    for spec in args.codecs:
        for algo in args.algorithms:
            out.append((spec, algo))
    return out


def _wire_bytes(codec, algo: str, numel: int, world: int) -> int:
    """Bytes one rank receives per call (the uncompressed ring all-reduce: 2(W-1)/W n)."""
    from gradzip import comm

    if algo == "plain":
        return int(2 * (world - 1) / world * numel * 4)
    p = comm.plan(codec, numel, torch.float32, world, algo)
    if algo == "allgather":
        return (world - 1) * p.payload_bytes
    return 2 * (world - 1) * p.payload_bytes


def rank_main(rank: int, world: int, port: int, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(args.threads)
    timeout = datetime.timedelta(seconds=args.timeout)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    import gradzip

    numel = args.mib * 2**20 // 4
    g = torch.Generator().manual_seed(1234 + rank)
    x0 = torch.randn(numel, generator=g)
    exact = x0.double()
    dist.all_reduce(exact)
    exact /= world
    x = torch.empty_like(x0)
    rows = []
    for spec, algo in _configs(args):
        codec = gradzip.Codec("int8" if spec == "none" else spec)
        state = gradzip.ErrorFeedback()
        # correctness first: one call from zero residuals
        x.copy_(x0)
        gradzip.all_reduce(x, codec, algorithm=algo, state=state, key="bench")
        digest = torch.tensor([int(x.view(torch.int32).to(torch.int64).sum())])
        digests = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(digests, digest)
        identical = all(int(d) == int(digests[0]) for d in digests)
        rel_err = float((x.double() - exact).norm() / exact.norm())
        samples: list[dict[str, float]] = []

        def setup(x=x):
            x.copy_(x0)
            dist.barrier()  # every rank starts the call together

        def call(x=x, codec=codec, algo=algo, state=state, samples=samples):
            timings: dict[str, float] = {}
            gradzip.all_reduce(x, codec, algorithm=algo, state=state, key="bench",
                               timings=timings)
            samples.append(timings)

        total = measure(call, repeat=args.repeat, warmup=args.warmup, setup=setup)
        samples = samples[args.warmup:]
        for s, ms in zip(samples, total.samples_ms):
            s["total"] = ms * 1e-3
        every: list = [None] * world
        dist.all_gather_object(every, samples)
        if rank == 0:
            row = {"codec": spec, "algorithm": algo, "identical_on_all_ranks": identical,
                   "relative_error": rel_err,
                   "received_bytes_per_rank": _wire_bytes(codec, algo, numel, world)}
            for phase in [*PHASES, "total"]:
                per_repeat = [max(s[r].get(phase, 0.0) for s in every)
                              for r in range(args.repeat)]
                row[phase + "_ms"] = 1e3 * statistics.median(per_repeat)
            rows.append(row)
            print(_format_row(row), flush=True)
    if rank == 0 and args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"world": world, "mib": args.mib, "threads": args.threads,
                       "repeat": args.repeat, "torch": torch.__version__,
                       "machine": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


HEADER = (f"{'codec':<11}{'algorithm':<11}{'verify':>8}{'compress':>10}{'communic.':>11}"
          f"{'decomp.':>9}{'total':>9}  {'MiB in/rank':>11}  {'rel.err':>8}  same")


def _format_row(r) -> str:
    return (f"{r['codec']:<11}{r['algorithm']:<11}{r['verify_ms']:8.1f}{r['compress_ms']:10.1f}"
            f"{r['communicate_ms']:11.1f}{r['decompress_ms']:9.1f}{r['total_ms']:9.1f}  "
            f"{r['received_bytes_per_rank'] / 2**20:11.1f}  {r['relative_error']:8.2e}  "
            f"{'yes' if r['identical_on_all_ranks'] else 'NO'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--mib", type=int, default=64, help="tensor size in MiB of float32")
    ap.add_argument("--codecs", type=lambda s: s.split(","), default=CODECS)
    ap.add_argument("--algorithms", type=lambda s: s.split(","), default=ALGORITHMS)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--timeout", type=float, default=300, help="process group timeout, s")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    import gradzip

    for spec in args.codecs:
        gradzip.Codec(spec)  # fail early on a bad spec
    print(f"gradzip.all_reduce split: {args.world} Gloo ranks on 127.0.0.1, {args.mib} MiB "
          f"float32, {args.threads} thread(s)/rank, median of {args.repeat} (slowest rank), "
          f"ms; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"gradzip cpu_isa={gradzip.build_info().get('cpu_isa')}")
    print(HEADER)
    store = dist.TCPStore("127.0.0.1", 0, args.world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=args.timeout))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, args.world, store.port, args))
             for r in range(args.world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 20 * args.timeout
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    for p in procs:
        if p.is_alive():
            p.kill()
    if failed:
        print(f"rank(s) {failed} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
