"""Compressed all-reduce vs fp32 and PyTorch's DDP compression hooks, on an emulated link.

    python bench/allreduce.py                                   # 4 ranks, 64 MiB, 1gbit
    python bench/allreduce.py --link 1gbit,10gbit,none --out bench/results/allreduce.json
    python bench/allreduce.py --split --link none --codecs int8,int4 --algorithms allgather,alltoall

W ranks (``--world``, default 4) run on Gloo, all on 127.0.0.1 inside a private network
namespace whose loopback is rate-limited with ``tc tbf`` (bench/netlink.py; needs root,
otherwise the run says so and falls back to ``--link none`` on the host loopback).

Every method reduces (averages) the same per-rank fp32 tensor in place:

* ``fp32``          ``dist.all_reduce`` (Gloo ring) and a division by W.
* ``fp16_hook`` / ``bf16_hook``   ``torch.distributed.algorithms.ddp_comm_hooks
  .default_hooks.fp16_compress_hook`` / ``bf16_compress_hook``.
* ``perchannel_hook``  ``quantization_hooks.quantization_perchannel_hook`` (uint8, 512-element
  channels, all-gather).
* ``powersgd_r1`` / ``powersgd_r4``  ``powerSGD_hook.powerSGD_hook`` with a ``PowerSGDState``
  of rank 1 / 4 (error feedback and warm start on, as by default; compression starts at
  iteration 2, reached during the warm-up calls).
* ``gz:<codec>:<algorithm>``  ``gradzip.all_reduce(t, gradzip.Codec(codec), state=
  gradzip.ErrorFeedback(), algorithm=...)``.

The hooks take a ``torch.distributed.GradBucket``, which has no public constructor. Each
rank therefore builds a real one the public way: a DDP model whose only parameter has the
benchmark tensor's shape (so DDP puts it in one bucket of its own), a comm hook that keeps
the bucket DDP passes it, and one backward pass. The PyTorch hooks are then called through
their public functions on that bucket (``hook(state, bucket).wait()``), exactly as DDP
calls them, and their result is copied into the bucket's buffer when they return a new
tensor (DDP does the same copy). The tensor is a matrix (4096 x 4096 for 64 MiB) because
PowerSGD compresses only matrices.

Correctness before timing: every method's first call (fresh error-feedback state) must
give bit-identical, finite results on every rank, within a relative error of the exact
mean (bench/harness.py: for gradzip, a bound from each rank's own compression error; for
the hooks, one from their number formats). A failed check stops the run before anything
more is timed, with exit status 3. A method that raises is recorded as failing and the
others go on.

Timing: before every call the input is restored and the ranks meet at a barrier; a call's
time is the slowest rank's (bench/harness.py); the reported time is the median over
``--reps`` calls (more for fast calls) after ``--warmup`` calls. Bytes on the wire are the
``lo`` transmit counter of the private namespace over the timed calls, divided by W and
the number of calls; the plan column is what a rank must send: gradzip's own plan for
gradzip and for fp32 (``gradzip.comm.plan(...).bytes_sent``: a ring all-reduce sends
2(W-1)/W of the tensor, an all-gather W-1 payloads, two-phase 2(W-1) chunk payloads,
headers and scales included), the hooks' formats for the hooks.

Wire-bytes limit: the ratio of what a rank sends in the fp32 ring all-reduce to what it
sends in the method (for "auto", the algorithm it settled on); no method can beat fp32 by
more on a link that is the bottleneck. The tables print it next to the measured speed-up
and their ratio ("of limit").

Phases: for gradzip, ``gradzip.all_reduce(..., timings=...)`` splits every timed call into
verify (the agreement check), compress, communicate and decompress. The main table shows
each phase averaged over the ranks (median over calls) and "communicate + other" = median
call time minus compress, decompress and verify. ``--split`` prints where the time goes:
each phase of the slowest rank (median over calls), next to the call time and the bytes
sent, and times only fp32 of the baselines unless ``--baselines`` names more.

Writes JSON (``--out``), prints a table and draws a PNG next to the JSON (``--plot``).
``--report JSON`` prints the Markdown tables of an earlier run (also of runs made before
the limit columns existed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # bench/harness.py: picks the gradzip build, so it comes before gradzip

# isort: split
import netlink
from harness import MiB, fmt_bytes

BASELINES = ("fp32", "fp16_hook", "bf16_hook", "perchannel_hook", "powersgd_r1", "powersgd_r4")
DEFAULT_CODECS = ("int8", "int4", "int2", "sign", "topk:0.01")
DEFAULT_ALGORITHMS = ("allgather", "alltoall", "auto")
PHASES = ("verify", "compress", "communicate", "decompress")

# Relative error against the exact mean that each baseline's first call stays within.
BASELINE_TOLERANCE = {
    "fp32": 1e-6,  # the exact mean is computed by this very collective
    "fp16_hook": 1e-2,  # every element and the W - 1 partial sums rounded to 11 bits
    "bf16_hook": 1e-1,  # ... to 8 bits
    "perchannel_hook": 5e-2,  # 255 levels between each 512-element channel's min and max
    # A projection onto r dimensions never adds energy: the error is at most the mean itself.
    "powersgd_r1": 1.0 + 1e-3,
    "powersgd_r4": 1.0 + 1e-3,
}


def matrix_shape(numel: int) -> tuple[int, int]:
    """The most square (rows, cols) with rows a power of two dividing numel."""
    rows = 1
    while rows * 2 <= math.isqrt(numel) and numel % (rows * 2) == 0:
        rows *= 2
    return rows, numel // rows


# ===========================================================================================
# worker (one rank)
# ===========================================================================================


def _capture_bucket(shape):
    """A real GradBucket holding one parameter of ``shape``, built through DDP's public API."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    class OneMatrix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(shape))

        def forward(self, x):
            return (self.weight * x).sum()

    model = DDP(OneMatrix(), bucket_cap_mb=max(1, 2 * shape[0] * shape[1] * 4 // MiB))
    kept = []

    def keep(state, bucket):
        kept.append(bucket)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    model.register_comm_hook(None, keep)
    model(torch.ones(shape)).backward()
    dist.barrier()
    if len(kept) != 1:
        raise RuntimeError(f"expected DDP to make one bucket, it made {len(kept)}")
    bucket = kept[0]
    if bucket.buffer().numel() != shape[0] * shape[1] or not bucket.is_last():
        raise RuntimeError("captured bucket does not hold exactly the benchmark tensor")
    return model, bucket


def _hook_method(name, bucket, world):
    """A callable that reduces ``bucket.buffer()`` in place with PyTorch hook ``name``."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import (
        default_hooks,
        powerSGD_hook,
        quantization_hooks,
    )

    buf = bucket.buffer()

    def finish(fut):
        out = fut.wait()
        if isinstance(out, (list, tuple)):
            out = out[0]
        if out.data_ptr() != buf.data_ptr():
            buf.copy_(out.view_as(buf))

    if name == "fp16_hook":
        return lambda: finish(default_hooks.fp16_compress_hook(None, bucket)), None
    if name == "bf16_hook":
        return lambda: finish(default_hooks.bf16_compress_hook(None, bucket)), None
    if name == "perchannel_hook":
        return lambda: finish(quantization_hooks.quantization_perchannel_hook(None, bucket)), None
    if name.startswith("powersgd_r"):
        rank = int(name[len("powersgd_r"):])
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                            start_powerSGD_iter=2, random_seed=0)
        torch.manual_seed(0)
        return lambda: finish(powerSGD_hook.powerSGD_hook(state, bucket)), state
    raise ValueError(f"unknown baseline {name!r}")


def _innermost(e: BaseException) -> str:
    """The root message of an error re-raised through future callbacks, on one line."""
    text = f"{type(e).__name__}: {e}"
    text = text.split("Got the following error when running the callback: ")[-1]
    return text.strip().splitlines()[0]


def hook_bytes_sent(method: str, numel: int, world: int, shape) -> float:
    """Bytes one rank sends in one call of a PyTorch hook (its number format and collective)."""
    ring = 2 * (world - 1) / world
    if method in ("fp16_hook", "bf16_hook"):
        return ring * 2 * numel
    if method == "perchannel_hook":
        chans = numel // 512 + 1  # the hook pads by 512 - numel % 512, so always >= 1 element
        # fp32 (scale, zero point) per channel, then one uint8 per padded element.
        return (world - 1) * (2 * 4 * chans + chans * 512)
    if method.startswith("powersgd_r"):
        r = int(method[len("powersgd_r"):])
        n, m = shape
        r = min(r, n, m)
        return ring * 4 * r * (n + m)
    raise ValueError(f"unknown baseline {method!r}")


def plan_bytes_sent(codec, numel: int, world: int, algorithm: str) -> int:
    """Bytes one rank sends in one ``gradzip.all_reduce`` of ``numel`` fp32 with
    ``algorithm``, from gradzip's own plan; ``"plain"`` is the fp32 ring all-reduce (the
    codec plays no part in it)."""
    import torch
    from gradzip import comm

    return comm.plan(codec, numel, torch.float32, world, algorithm).bytes_sent


class Bench:
    """One tensor size on one rank: the input, its exact mean, and the captured bucket."""

    def __init__(self, cfg: dict, size: int, rank: int, world: int):
        import torch
        import torch.distributed as dist

        self.cfg, self.size, self.rank, self.world = cfg, size, rank, world
        self.numel = size // 4
        self.shape = matrix_shape(self.numel)
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
        self.x = torch.randn(self.shape, generator=gen).reshape(-1)
        self.exact = self.x.clone()
        dist.all_reduce(self.exact)
        self.exact.div_(world)
        self.ddp_model, self.bucket = _capture_bucket(self.shape)
        self.buf = self.bucket.buffer()

    def restore(self) -> None:
        self.buf.copy_(self.x)

    def fp32_call(self) -> None:
        import torch.distributed as dist

        dist.all_reduce(self.buf)
        self.buf.div_(self.world)

    def make(self, method: str) -> tuple[object, dict, object]:
        """(call, record fields, codec or None) for ``method``. A gradzip call takes an
        optional ``timings`` dict (gradzip.all_reduce's phase sink)."""
        if method == "fp32":
            return self.fp32_call, {"kind": "baseline"}, None
        if method.startswith("gz:"):
            import gradzip

            spec, algo = method[3:].rsplit(":", 1)
            codec = gradzip.Codec(spec)
            ef = gradzip.ErrorFeedback()
            buf = self.buf
            # Only what the user chose is passed, so the library's defaults are what is timed.
            extra = {"verify": self.cfg["gz_verify"]} if self.cfg.get("gz_verify") else {}
            if self.cfg.get("gz_min_numel") is not None:
                extra["min_numel"] = self.cfg["gz_min_numel"]
            pl = gradzip.comm.plan(codec, self.numel, buf.dtype, self.world, algo,
                                   **({"min_numel": extra["min_numel"]}
                                      if "min_numel" in extra else {}))
            fields = {"kind": "gradzip", "codec": spec, "algorithm": algo,
                      "codec_repr": repr(codec), "algorithm_used": pl.algorithm,
                      "options": extra}

            def call(timings: dict | None = None) -> None:
                gradzip.all_reduce(buf, codec, state=ef, algorithm=algo, timings=timings,
                                   **extra)

            return call, fields, codec
        call, state = _hook_method(method, self.bucket, self.world)
        if state is not None:
            # PowerSGD all-reduces uncompressed until its iteration counter (advanced once
            # per call on the last bucket) reaches start_powerSGD_iter: get past that, so
            # the check and every timed call below are compressed calls.
            while state.iter < state.start_powerSGD_iter:
                self.restore()
                call()
        return call, {"kind": "baseline"}, None

    def timed(self, call) -> float:
        return harness.time_collective(call, before=self.restore)

    def check(self, method: str, rec: dict, codec) -> None:
        """The first call's result (in the buffer) against the exact mean, on every rank;
        stops the run before timing when it fails."""
        if codec is not None:
            tol = harness.all_reduce_tolerance(codec, self.x, self.exact, rec["algorithm"])
        else:
            tol = BASELINE_TOLERANCE.get(method)
        c = harness.check_all_reduce(self.buf, self.exact, tolerance=tol)
        rec.update(rel_err=c.rel_err, rel_err_limit=tol, finite=c.finite,
                   identical_across_ranks=c.identical)
        if c.problem:
            harness.stop_before_timing(f"{method} at {fmt_bytes(self.size)} on {self.world} "
                                       "ranks", c.problem, show=self.rank == 0)

    def phases(self, sinks: list[dict], median_s: float) -> dict:
        """The timed calls' phases: averaged over the ranks ("split", as always recorded)
        and of the slowest rank ("phases_slowest_s"), each the median over calls."""
        import torch
        import torch.distributed as dist

        mine = torch.tensor([[sk.get(k, 0.0) for k in PHASES] for sk in sinks],
                            dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        every = torch.stack(every)  # [rank, call, phase]
        mean = dict(zip(PHASES, every.mean(dim=0).median(dim=0).values.tolist()))
        worst = dict(zip(PHASES, every.max(dim=0).values.median(dim=0).values.tolist()))
        c, d, v = mean["compress"], mean["decompress"], mean["verify"]
        return {"split": {"compress_s": c, "decompress_s": d, "verify_s": v,
                          "communicate_s": mean["communicate"],
                          "communicate_other_s": max(0.0, median_s - c - d - v),
                          "source": "gradzip.all_reduce(timings=...) during the timed calls"},
                "phases_slowest_s": worst}

    def run(self, method: str, log) -> dict:
        import torch.distributed as dist

        cfg, world = self.cfg, self.world
        rec = {"size_bytes": self.size, "numel": self.numel, "shape": list(self.shape),
               "method": method, "world": world}
        try:
            call, fields, codec = self.make(method)
        except (ValueError, TypeError, NotImplementedError) as e:
            # Raised the same way on every rank before any collective: safe to skip.
            rec["error"] = f"{type(e).__name__}: {e}"
            log(f"{method}: not run ({rec['error']})")
            return rec
        rec.update(fields)

        # Correctness before timing: the first call (fresh error-feedback state).
        try:
            self.restore()
            dist.barrier()
            call()
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
            rec["error"] = _innermost(e)
            rec["error_full"] = f"{type(e).__name__}: {e}"
            log(f"{method}: failed ({rec['error']})")
            dist.barrier()
            return rec
        self.check(method, rec, codec)

        # "auto" measures its first calls of a signature before it settles (its probe
        # calls are its start-up cost, not its steady state): get past them first.
        auto = rec.get("algorithm") == "auto"
        if auto:
            from gradzip import comm

            n_warm = max(cfg["warmup"], 3 * comm.AUTO_PROBES + 1)  # up to 3 kinds
        else:
            n_warm = cfg["warmup"]
        warm = [self.timed(call) for _ in range(n_warm)]
        if auto:
            choice = comm.auto_choice(self.buf, codec)
            if choice is not None:
                rec["auto"] = choice
                rec["algorithm_used"] = choice["algorithm"]
        est = min(warm) if warm else 1.0
        reps = cfg["reps"]
        if 0 < est and est * reps < cfg["min_time"]:
            reps = min(cfg["max_reps"], max(reps, int(cfg["min_time"] / est)))

        sinks: list[dict] = []
        timed_call = call
        if codec is not None:
            def timed_call():
                sinks.append({})
                call(sinks[-1])

        dist.barrier()
        tx0 = netlink.lo_bytes()[1]
        times = [self.timed(timed_call) for _ in range(reps)]
        dist.barrier()
        tx1 = netlink.lo_bytes()[1]
        # What the barriers and the timing reductions send by themselves, measured the same
        # way with no call in between, is subtracted from the counter.
        txb0 = netlink.lo_bytes()[1]
        for _ in range(reps):
            self.timed(lambda: None)
        dist.barrier()
        txb1 = netlink.lo_bytes()[1]
        if codec is not None:
            theory = plan_bytes_sent(codec, self.numel, world, rec["algorithm_used"])
        elif method == "fp32":
            theory = plan_bytes_sent("int8", self.numel, world, "plain")
        else:
            theory = hook_bytes_sent(method, self.numel, world, self.shape)
        rec.update(times_s=times, median_s=statistics.median(times), reps=reps,
                   bytes_per_rank_measured=max(0.0, (tx1 - tx0) - (txb1 - txb0)) / world / reps,
                   bytes_per_rank_theory=theory,
                   bytes_per_rank_theory_source="gradzip.comm.plan(...).bytes_sent"
                   if codec is not None or method == "fp32" else "the hook's number format")
        if codec is not None:
            rec["compressed_size"] = codec.compressed_size(self.numel)
            rec.update(self.phases(sinks, rec["median_s"]))
        log(f"{fmt_bytes(self.size):>10} {method:<22} {rec['median_s'] * 1e3:9.2f} ms  "
            f"reps={reps} rel_err={rec['rel_err']:.2e} "
            f"wire/rank={fmt_bytes(rec['bytes_per_rank_measured'])}")
        return rec


def worker(cfg_path: str) -> None:
    import torch.distributed as dist

    cfg = json.loads(Path(cfg_path).read_text())
    rank, world = netlink.join_group(cfg["threads"], cfg["pg_timeout"])

    def log(*a):
        if rank == 0:
            print("[bench]", *a, flush=True)

    results = []
    for size in cfg["sizes"]:
        bench = Bench(cfg, size, rank, world)
        for method in list(cfg["baselines"]) + list(cfg["gz_methods"]):
            results.append(bench.run(method, log))
        del bench
    if rank == 0:
        Path(cfg["result_path"]).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# ===========================================================================================
# parent: links, launching, report
# ===========================================================================================


def add_derived(results: list[dict]) -> None:
    """Per row: the speed-up over fp32 (same link and size), the wire-bytes limit (fp32's
    bytes per rank over the row's, from the plan columns) and the speed-up as a fraction
    of that limit. Also fills these in for result files written before they existed."""
    fp32 = {(r["link"], r["size_bytes"]): r for r in results
            if r["method"] == "fp32" and "median_s" in r}
    for r in results:
        base = fp32.get((r["link"], r["size_bytes"]))
        if base is None or not r.get("median_s"):
            continue
        r["speedup_vs_fp32"] = base["median_s"] / r["median_s"]
        ring, mine = base.get("bytes_per_rank_theory"), r.get("bytes_per_rank_theory")
        if ring and mine:
            r["wire_limit"] = ring / mine
            r["of_limit"] = r["speedup_vs_fp32"] / r["wire_limit"]


def _ms(v: float | None) -> str:
    return f"{v * 1e3:8.1f}ms" if v is not None else f"{'-':>10}"


def _x(v: float | None, width: int = 7) -> str:
    return f"{v:{width - 1}.2f}x" if v is not None else f"{'-':>{width}}"


def _pct(v: float | None) -> str:
    return f"{v * 100:5.0f}%" if v is not None else f"{'-':>6}"


def _name(r: dict) -> str:
    if r.get("algorithm") == "auto" and r.get("algorithm_used"):
        return f"{r['method']} (->{r['algorithm_used']})"
    return r["method"]


def print_table(results: list[dict]) -> str:
    lines = []
    head = (f"{'link':>7} {'size':>9} {'method':<34} {'median':>10} {'speedup':>8} "
            f"{'limit':>8} {'of lim':>6} {'wire/rank':>11} {'plan':>11} {'rel_err':>9} "
            f"{'compress':>9} {'decomp':>9} {'verify':>9} {'comm+':>9}")
    lines.append(head)
    lines.append("-" * len(head))
    for r in results:
        if "error" in r:
            lines.append(f"{r['link']:>7} {fmt_bytes(r['size_bytes']):>9} {_name(r):<34} "
                         f"{r['error']}")
            continue
        sp = r.get("split", {})
        lines.append(
            f"{r['link']:>7} {fmt_bytes(r['size_bytes']):>9} {_name(r):<34} "
            f"{_ms(r['median_s']):>10} {_x(r.get('speedup_vs_fp32'), 8)} "
            f"{_x(r.get('wire_limit'), 8)} {_pct(r.get('of_limit'))} "
            f"{fmt_bytes(r.get('bytes_per_rank_measured')):>11} "
            f"{fmt_bytes(r.get('bytes_per_rank_theory')):>11} {r['rel_err']:9.2e} "
            f"{_ms(sp.get('compress_s')):>9} {_ms(sp.get('decompress_s')):>9} "
            f"{_ms(sp.get('verify_s')):>9} {_ms(sp.get('communicate_other_s')):>9}")
    lines.append("limit: the wire-bytes limit, fp32 ring bytes per rank over the method's "
                 "(plan column); of lim: speed-up / limit")
    text = "\n".join(lines)
    print(text)
    return text


def phase_table(results: list[dict]) -> str:
    """Where the time of each gradzip call goes (``--split``): each phase of the slowest
    rank, median over the timed calls."""
    head = (f"{'link':>7} {'size':>9} {'method':<34} {'verify':>9} {'compress':>9} "
            f"{'communic.':>10} {'decomp.':>9} {'call':>9} {'sent/rank':>11} {'rel_err':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        ph = r.get("phases_slowest_s")
        if ph is None:
            continue
        lines.append(
            f"{r['link']:>7} {fmt_bytes(r['size_bytes']):>9} {_name(r):<34} "
            f"{_ms(ph['verify']):>9} {_ms(ph['compress']):>9} {_ms(ph['communicate']):>10} "
            f"{_ms(ph['decompress']):>9} {_ms(r['median_s']):>9} "
            f"{fmt_bytes(r.get('bytes_per_rank_theory')):>11} {r['rel_err']:9.2e}")
    lines.append("each phase of the slowest rank, median over the timed calls; call: median "
                 "call time (the slowest rank's); sent/rank: gradzip.comm.plan(...).bytes_sent")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    """The results of a run as Markdown tables (for docs/results.md)."""
    add_derived(doc["results"])
    out = []
    for link in dict.fromkeys(r["link"] for r in doc["results"]):
        for size in sorted({r["size_bytes"] for r in doc["results"] if r["link"] == link}):
            rr = [r for r in doc["results"] if r["link"] == link and r["size_bytes"] == size]
            per = netlink.per_rank_rate(link, doc["world"])
            share = f", {per / 1e9:g} Gbit/s per rank" if per else ""
            out.append(f"**{doc['world']} ranks, {fmt_bytes(size)} fp32, link `{link}`"
                       f"{share}**\n")
            out.append("| method | median | speed-up vs fp32 | wire-bytes limit | of limit "
                       "| wire/rank measured | plan | rel. error | compress | decompress "
                       "| verify | communicate + other |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in rr:
                name = r["method"]
                if r.get("algorithm_used") and r.get("algorithm") == "auto":
                    name += f" (→{r['algorithm_used']})"
                if "error" in r:
                    out.append(f"| {name} | fails: `{r['error']}` ||||||||||| ")
                    continue
                sp = r.get("split", {})
                ms = lambda v: f"{v * 1e3:.1f} ms" if v is not None else "–"
                lim = f"{r['wire_limit']:.2f}×" if r.get("wire_limit") else "–"
                of = f"{r['of_limit'] * 100:.0f} %" if r.get("of_limit") else "–"
                out.append(
                    f"| {name} | {ms(r['median_s'])} | {r['speedup_vs_fp32']:.2f}× | {lim} | "
                    f"{of} | {fmt_bytes(r.get('bytes_per_rank_measured'))} | "
                    f"{fmt_bytes(r.get('bytes_per_rank_theory'))} | {r['rel_err']:.2e} | "
                    f"{ms(sp.get('compress_s'))} | {ms(sp.get('decompress_s'))} | "
                    f"{ms(sp.get('verify_s'))} | {ms(sp.get('communicate_other_s'))} |")
            out.append("")
    n_shaped = len({r["rate_bps"] for r in doc["results"] if r.get("rate_bps")})
    if doc.get("crossover") and n_shaped >= 3:
        out.append("| size | method | speed-up at each bucket rate | measured crossover "
                   "(bucket / per rank) | bandwidth model (bucket / per rank) |")
        out.append("|---|---|---|---:|---:|")
        for c in doc["crossover"]:
            pts = ", ".join(f"{r / 1e9:g}G: {v:.2f}×" for r, v in c["points"])
            ms, mo = c["measured_crossover_bps"], c["model_crossover_bps"]
            fmt_x = (lambda v: f"{v / 1e9:.1f} / {v / doc['world'] / 1e9:.2f} Gbit/s"
                     if v else "–")
            out.append(f"| {fmt_bytes(c['size_bytes'])} | {c['method']} | {pts} | "
                       f"{fmt_x(ms) if ms else c['status']} | {fmt_x(mo)} |")
        out.append("")
    return "\n".join(out)


def crossover(results: list[dict], world: int) -> list[dict]:
    """Link rate where each gradzip method stops paying: measured and the bandwidth model.

    Measured: the speed-up against fp32 across the shaped rates, interpolated linearly in
    log(rate) between the last rate where it is >= 1 and the first where it is < 1.
    Model (per call): t_gz = compress + decompress + W*bytes_gz/rate and t_fp32 =
    W*bytes_fp32/rate on the shared emulated medium, so they cross at
    rate* = W*(bytes_fp32 - bytes_gz) / (compress + decompress), with the measured bytes
    and the median over the shaped runs of the measured compress + decompress time.
    """
    out = []
    shaped = sorted({(r["rate_bps"], r["link"]) for r in results if r.get("rate_bps")})
    sizes = sorted({r["size_bytes"] for r in results})
    methods = sorted({r["method"] for r in results if r["method"].startswith("gz:")})
    for size in sizes:
        for m in methods:
            pts, cds, dbs = [], [], []
            for rate, link in shaped:
                rr = [r for r in results if r["method"] == m and r["size_bytes"] == size
                      and r["link"] == link and "speedup_vs_fp32" in r]
                f32 = [r for r in results if r["method"] == "fp32" and r["size_bytes"] == size
                       and r["link"] == link and "median_s" in r]
                if not rr or not f32:
                    continue
                pts.append((rate, rr[0]["speedup_vs_fp32"]))
                if "split" in rr[0] and rr[0].get("bytes_per_rank_measured") is not None:
                    cds.append(rr[0]["split"]["compress_s"] + rr[0]["split"]["decompress_s"])
                    dbs.append(f32[0]["bytes_per_rank_measured"]
                               - rr[0]["bytes_per_rank_measured"])
            model = None
            if cds and statistics.median(cds) > 0 and statistics.median(dbs) > 0:
                model = world * statistics.median(dbs) * 8 / statistics.median(cds)
            measured = None
            status = "pays at every rate measured"
            for (r0, s0), (r1, s1) in itertools.pairwise(pts):
                if s0 >= 1 > s1:
                    f = math.log(s0) / (math.log(s0) - math.log(s1))
                    measured = math.exp(math.log(r0) + f * (math.log(r1) - math.log(r0)))
                    status = "crosses"
                    break
            if pts and pts[0][1] < 1:
                status = "does not pay at any rate measured"
            if pts:
                out.append({"size_bytes": size, "method": m, "points": pts,
                            "measured_crossover_bps": measured, "status": status,
                            "model_crossover_bps": model,
                            "measured_crossover_per_rank_bps":
                                measured / world if measured else None,
                            "model_crossover_per_rank_bps": model / world if model else None})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4, help="number of ranks (default 4)")
    p.add_argument("--link", default="1gbit",
                   help="emulated link(s), comma-separated: none, 1gbit, 10gbit, 500mbit, ... "
                        "(one bucket shared by all ranks) or 1gbit/rank (each rank's share)")
    p.add_argument("--sizes", default="64MiB", help="tensor sizes in bytes of fp32, e.g. 1MiB,64MiB")
    p.add_argument("--codecs", default=",".join(DEFAULT_CODECS),
                   help="gradzip codec specs ('' for none); topk:0.01 is top-k 1%%")
    p.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS))
    p.add_argument("--gz-verify", default=None,
                   help="pass verify=... to gradzip.all_reduce (default: the library's)")
    p.add_argument("--gz-min-numel", type=int, default=None,
                   help="pass min_numel=... to gradzip.all_reduce (default: the library's)")
    p.add_argument("--baselines", default=None,
                   help=f"subset of {','.join(BASELINES)} (fp32 always runs; default all, "
                        "with --split only fp32)")
    p.add_argument("--split", action="store_true",
                   help="where the time goes: print each gradzip phase (verify, compress, "
                        "communicate, decompress) of the slowest rank")
    p.add_argument("--reps", type=int, default=5, help="timed calls per method (minimum)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 2 for PowerSGD)")
    p.add_argument("--min-time", type=float, default=3.0,
                   help="fast calls are repeated until this many seconds (up to --max-reps); "
                        "at 1 s the median of a 64 MiB top-k call on the 1 Gbit/s link (7 "
                        "calls) moved by +-3 %% from run to run")
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-netns", action="store_true", help="use the host loopback, no namespace")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per link before giving up")
    p.add_argument("--pg-timeout", type=float, default=900,
                   help="process-group timeout: a hung collective fails after this long")
    p.add_argument("--out", default="bench/results/allreduce.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the Markdown tables of an earlier run's JSON and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        worker(a.worker)
        return 0
    if a.report:
        print(markdown(json.loads(Path(a.report).read_text())))
        return 0

    if a.world < 2:
        p.error("--world must be at least 2")
    if a.baselines is None:
        a.baselines = "fp32" if a.split else ",".join(BASELINES)
    baselines = ["fp32"] + [b for b in harness.split_list(a.baselines) if b != "fp32"]
    for b in baselines:
        if b not in BASELINES:
            p.error(f"unknown baseline {b!r}; choose from {','.join(BASELINES)}")
    if a.warmup < 2 and any(b.startswith("powersgd") for b in baselines):
        p.error("PowerSGD starts compressing at its 2nd call: use --warmup >= 2")
    try:
        sizes = harness.parse_sizes(a.sizes, multiple_of=4)
    except ValueError as e:
        p.error(f"--sizes: {e} (bytes of fp32 elements)")
    codecs = harness.split_specs(a.codecs)
    algos = harness.split_list(a.algorithms)
    gz_methods = [f"gz:{c}:{al}" for c in codecs for al in algos]
    if gz_methods:
        import gradzip

        for c in codecs:
            gradzip.Codec(c)  # a bad spec fails here, not in every rank
    links = harness.split_list(a.link)
    for spec in links:
        netlink.parse_link(spec, a.world)

    info = harness.machine_info()
    all_results: list[dict] = []
    link_info = []
    with tempfile.TemporaryDirectory(prefix="gz-bench-") as tmp:
        for i, spec in enumerate(links):
            link, eff = netlink.open_link(spec, world=a.world, netns=not a.no_netns)
            try:
                cfg = {"sizes": sizes, "baselines": baselines, "gz_methods": gz_methods,
                       "reps": a.reps, "warmup": a.warmup, "min_time": a.min_time,
                       "max_reps": a.max_reps, "threads": a.threads, "seed": a.seed,
                       "pg_timeout": a.pg_timeout, "gz_verify": a.gz_verify,
                       "gz_min_numel": a.gz_min_numel,
                       "result_path": os.path.join(tmp, f"result{i}.json")}
                cfg_path = os.path.join(tmp, f"cfg{i}.json")
                Path(cfg_path).write_text(json.dumps(cfg))
                qdisc = link.qdisc() if link is not None else "host loopback (not isolated)"
                print(f"[bench] link {eff}: {qdisc}; {a.world} ranks, "
                      f"{a.threads} thread(s) each", flush=True)
                link_info.append({"requested": spec, "effective": eff, "qdisc": qdisc,
                                  "namespace": link.name if link is not None else None})
                netlink.launch([sys.executable, os.path.abspath(__file__), "--worker", cfg_path],
                               a.world, link, threads=a.threads, timeout=a.timeout)
            except netlink.RankFailed as e:
                return harness.stopped(e, "bench")
            finally:
                if link is not None:
                    link.remove()
            res = json.loads(Path(cfg["result_path"]).read_text())
            rate = netlink.parse_link(eff, a.world)
            for r in res:
                r["link"] = eff
                r["rate_bps"] = rate  # of the shared token bucket
                r["per_rank_bps"] = None if rate is None else rate / a.world
                if link is None:
                    # Host loopback: other processes' traffic is in the counters too.
                    r["bytes_per_rank_measured"] = None
            all_results.extend(res)

    add_derived(all_results)
    info["loadavg_end"] = os.getloadavg()
    table = print_table(all_results)
    phases = phase_table(all_results)
    if a.split:
        print()
        print(phases)
    xo = crossover(all_results, a.world)
    for c in xo:
        ms = c["measured_crossover_bps"]
        mo = c["model_crossover_bps"]
        print(f"[crossover] {fmt_bytes(c['size_bytes'])} {c['method']}: {c['status']}"
              + (f" at a {ms / 1e9:.2f} Gbit/s bucket ({ms / a.world / 1e9:.2f}/rank)"
                 if ms else "")
              + (f"; bandwidth model {mo / 1e9:.2f} Gbit/s ({mo / a.world / 1e9:.2f}/rank)"
                 if mo else ""))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"argv": sys.argv, "machine": info, "links": link_info, "world": a.world,
           "threads_per_rank": a.threads, "results": all_results, "crossover": xo,
           "table": table, "phase_table": phases}
    out.write_text(json.dumps(doc, indent=1))
    print(f"[bench] wrote {out}")
    png = Path(a.plot) if a.plot else out.with_suffix(".png")
    import plots

    plots.allreduce_plot(doc, png)
    print(f"[bench] wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
