"""Compressed all-reduce vs fp32 and PyTorch's DDP compression hooks, on an emulated link.

    python bench/allreduce.py                                   # 4 ranks, 64 MiB, 1gbit
    python bench/allreduce.py --link 1gbit,10gbit,none --out bench/results/allreduce.json

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

Timing: before every call the input is restored and the ranks meet at a barrier; a call's
time is the slowest rank's; the reported time is the median over ``--reps`` calls (more
for fast calls) after ``--warmup`` calls. Before timing, every method's result is checked:
all ranks must hold bit-identical results, and the relative error against the exact
average is reported. Bytes on the wire are the ``lo`` transmit counter of the private
namespace over the timed calls, divided by W and the number of calls; the theory column
is the payload a rank must send for that algorithm (ring all-reduce 2(W-1)/W of the
tensor, ring all-gather (W-1) payloads, two-phase 2(W-1)/W of the compressed size).
For gradzip the time is split into compress, decompress and verify (the agreement check)
as reported by ``gradzip.all_reduce(..., timings=...)`` during the timed calls themselves
(each phase averaged over the ranks, then the median over calls), and "communicate +
other" = median call time minus those (the collectives and the wait for the slowest
rank). Without a ``timings`` sink the PyTorch profiler's CPU time of the gradzip ops is
used instead, from ``--split-reps`` extra calls.

Writes JSON (``--out``), prints a table and draws a PNG next to the JSON (``--plot``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netlink

MiB = 1 << 20
BASELINES = ("fp32", "fp16_hook", "bf16_hook", "perchannel_hook", "powersgd_r1", "powersgd_r4")
DEFAULT_CODECS = ("int8", "int4", "int2", "sign", "topk:0.01")
DEFAULT_ALGORITHMS = ("allgather", "alltoall", "auto")


def parse_size(s: str) -> int:
    """'64MiB' / '1M' / '4096' (bytes) -> bytes, a multiple of 4 (fp32 elements)."""
    s = s.strip()
    units = {"kib": 1 << 10, "k": 1 << 10, "mib": MiB, "m": MiB, "gib": 1 << 30, "g": 1 << 30,
             "b": 1, "": 1}
    i = len(s)
    while i > 0 and not s[i - 1].isdigit():
        i -= 1
    num, unit = s[:i], s[i:].lower()
    if not num or unit not in units:
        raise ValueError(f"bad size {s!r}: use e.g. 64MiB, 512KiB, 4096")
    n = int(num) * units[unit]
    if n <= 0 or n % 4:
        raise ValueError(f"size {s!r} must be a positive multiple of 4 bytes (fp32 elements)")
    return n


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def split_specs(text: str) -> list[str]:
    """'int8,topk:0.01,exact=false,sign' -> ['int8', 'topk:0.01,exact=false', 'sign'].

    Codec specs carry their options after commas too; a piece with '=' is an option of the
    spec before it.
    """
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and out:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


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


def _theory_bytes(method: str, numel: int, world: int, shape, gz=None) -> float | None:
    """Payload bytes one rank sends for one call (see module docstring)."""
    ring = 2 * (world - 1) / world
    if method == "fp32":
        return ring * 4 * numel
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
    if method.startswith("gz:") and gz is not None:
        codec, algo, chunk_bytes = gz
        if algo == "plain":
            return ring * 4 * numel
        if algo == "allgather":
            return (world - 1) * codec.compressed_size(numel)
        if algo == "alltoall":
            # W-1 chunk payloads out in the all-to-all, W-1 in the all-gather; every
            # message is padded to the largest chunk payload.
            if chunk_bytes is None:
                chunk_bytes = codec.compressed_size(-(-numel // world))
            return 2 * (world - 1) * chunk_bytes
    return None


def _has_timings(gz) -> bool:
    import inspect

    return "timings" in inspect.signature(gz.all_reduce).parameters


def _gz_split(call, restore, reps: int) -> tuple[float, float, float, str]:
    """Mean compress / decompress seconds per call from the PyTorch profiler's CPU time of
    the gradzip ops (``quantize_pack``/``topk_select`` = compress, ``dequantize_accumulate``
    = decompress); used when ``gradzip.all_reduce`` has no ``timings`` sink."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    compress = decompress = 0.0
    for _ in range(reps):
        restore()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
        for ev in prof.events():
            if ev.name in ("gradzip::quantize_pack", "gradzip::topk_select"):
                compress += ev.cpu_time_total / 1e6
            elif ev.name == "gradzip::dequantize_accumulate":
                decompress += ev.cpu_time_total / 1e6
    return compress / reps, decompress / reps, 0.0, "torch.profiler (gradzip ops only)"


def _slowest(t: float) -> float:
    """The largest of every rank's ``t`` (a call takes as long as its slowest rank)."""
    import torch
    import torch.distributed as dist

    x = torch.tensor([t], dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


def _identical_across_ranks(t) -> bool:
    """Whether every rank holds the same values (compared through fp64 sum and sum of squares)."""
    import torch
    import torch.distributed as dist

    d = t.double()
    digest = torch.stack([d.sum(), (d * d).sum()])
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    same = torch.tensor([int(torch.equal(lo, hi))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


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

    def make(self, method: str, gz) -> tuple[object, dict, object]:
        """(call, record fields, codec or None) for ``method``."""
        if method == "fp32":
            return self.fp32_call, {"kind": "baseline"}, None
        if method.startswith("gz:"):
            spec, algo = method[3:].rsplit(":", 1)
            codec = gz.Codec(spec)
            ef = gz.ErrorFeedback()
            buf = self.buf
            fields = {"kind": "gradzip", "codec": spec, "algorithm": algo,
                      "codec_repr": repr(codec)}
            plan = getattr(getattr(gz, "comm", None), "plan", None)
            if plan is not None:
                pl = plan(codec, self.numel, buf.dtype, self.world, algo,
                          **({"min_numel": self.cfg["gz_min_numel"]}
                             if self.cfg.get("gz_min_numel") is not None else {}))
                fields["algorithm_used"] = pl.algorithm
                if pl.algorithm == "alltoall":
                    fields["chunk_payload_bytes"] = pl.payload_bytes

            # Only what the user chose is passed, so the library's defaults are what is timed.
            extra = {"verify": self.cfg["gz_verify"]} if self.cfg.get("gz_verify") else {}
            if self.cfg.get("gz_min_numel") is not None:
                extra["min_numel"] = self.cfg["gz_min_numel"]
            fields["options"] = extra

            def call(timings: dict | None = None) -> None:
                if timings is None:
                    gz.all_reduce(buf, codec, state=ef, algorithm=algo, **extra)
                else:
                    gz.all_reduce(buf, codec, state=ef, algorithm=algo, timings=timings,
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
        import torch.distributed as dist

        self.restore()
        dist.barrier()
        t0 = time.perf_counter()
        call()
        return _slowest(time.perf_counter() - t0)

    def run(self, method: str, gz, log) -> dict:
        import torch
        import torch.distributed as dist

        cfg, world = self.cfg, self.world
        rec = {"size_bytes": self.size, "numel": self.numel, "shape": list(self.shape),
               "method": method, "world": world}
        try:
            call, fields, codec = self.make(method, gz)
        except (ValueError, TypeError, NotImplementedError) as e:
            # Raised the same way on every rank before any collective: safe to skip.
            rec["error"] = f"{type(e).__name__}: {e}"
            log(f"{method}: not run ({rec['error']})")
            return rec
        rec.update(fields)

        # Correctness before timing: the first call (fresh error-feedback state) must give
        # identical results on every rank; its error against the exact mean is reported.
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
        rec["rel_err"] = float((self.buf - self.exact).norm() / self.exact.norm())
        rec["finite"] = bool(torch.isfinite(self.buf).all())
        rec["identical_across_ranks"] = _identical_across_ranks(self.buf)

        # "auto" measures its first calls of a signature before it settles (its probe
        # calls are its start-up cost, not its steady state): get past them first.
        auto = rec.get("algorithm") == "auto" and hasattr(getattr(gz, "comm", None),
                                                           "auto_choice")
        n_warm = max(cfg["warmup"], 2 * gz.comm.AUTO_PROBES + 1) if auto else cfg["warmup"]
        warm = [self.timed(call) for _ in range(n_warm)]
        if auto:
            choice = gz.comm.auto_choice(self.buf, codec)
            if choice is not None:
                rec["auto"] = choice
                rec["algorithm_used"] = choice["algorithm"]
                if choice["algorithm"] != "alltoall":
                    rec.pop("chunk_payload_bytes", None)
        est = min(warm) if warm else 1.0
        reps = cfg["reps"]
        if 0 < est and est * reps < cfg["min_time"]:
            reps = min(cfg["max_reps"], max(reps, int(cfg["min_time"] / est)))

        # gradzip's own phase timings come from the timed calls themselves when
        # all_reduce offers a ``timings`` sink (a few perf_counter calls per phase).
        sinks: list[dict] = []
        timed_call = call
        if codec is not None and _has_timings(gz):
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
        rec.update(times_s=times, median_s=statistics.median(times), reps=reps,
                   bytes_per_rank_measured=max(0.0, (tx1 - tx0) - (txb1 - txb0)) / world / reps,
                   bytes_per_rank_theory=_theory_bytes(
                       method, self.numel, world, self.shape,
                       (codec, rec.get("algorithm_used", rec.get("algorithm")),
                        rec.get("chunk_payload_bytes")) if codec is not None else None))
        if codec is not None:
            rec["compressed_size"] = codec.compressed_size(self.numel)
            if sinks:
                # Per call, each phase averaged over the ranks; then the median over calls.
                ph = torch.tensor([[sk.get(k, 0.0) for k in ("compress", "decompress", "verify")]
                                   for sk in sinks], dtype=torch.float64)
                dist.all_reduce(ph)
                c, d, v = (ph / world).median(dim=0).values.tolist()
                how = "gradzip.all_reduce(timings=...) during the timed calls"
            elif cfg["split_reps"] > 0:
                c, d, v, how = _gz_split(call, self.restore, cfg["split_reps"])
                cd = torch.tensor([c, d, v], dtype=torch.float64)
                dist.all_reduce(cd)
                c, d, v = (cd / world).tolist()
            if sinks or cfg["split_reps"] > 0:
                rec["split"] = {"compress_s": c, "decompress_s": d, "verify_s": v,
                                "communicate_other_s": max(0.0, rec["median_s"] - c - d - v),
                                "source": how}
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

    gz = None
    if cfg["gz_methods"]:
        try:
            import gradzip

            gradzip.Codec  # noqa: B018  (fails early if the comm layer is missing)
            gz = gradzip
        except (ImportError, AttributeError) as e:
            raise SystemExit(f"gradzip's comm layer is not importable ({e}); build the extension "
                             "in place and run with PYTHONPATH=$PWD/python, or pass --codecs ''"
                             ) from e

    results = []
    for size in cfg["sizes"]:
        bench = Bench(cfg, size, rank, world)
        for method in list(cfg["baselines"]) + list(cfg["gz_methods"]):
            results.append(bench.run(method, gz, log))
        del bench
    if rank == 0:
        Path(cfg["result_path"]).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# ===========================================================================================
# parent: links, launching, report
# ===========================================================================================


def machine_info() -> dict:
    import torch

    info = {"hostname": platform.node(), "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["mem_gib"] = round(int(mem[1]) / (1 << 20), 1)
    except OSError:
        pass
    try:
        import gradzip

        info["gradzip_build"] = gradzip.build_info()
    except Exception as e:  # noqa: BLE001 - recorded, not fatal: baselines still run
        info["gradzip_build"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                     text=True, check=False,
                                     cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def add_speedups(results: list[dict]) -> None:
    base = {(r["link"], r["size_bytes"]): r["median_s"] for r in results
            if r["method"] == "fp32" and "median_s" in r}
    for r in results:
        b = base.get((r["link"], r["size_bytes"]))
        if b and r.get("median_s"):
            r["speedup_vs_fp32"] = b / r["median_s"]


def _ms(v: float | None) -> str:
    return f"{v * 1e3:8.1f}ms" if v is not None else f"{'-':>10}"


def print_table(results: list[dict]) -> str:
    lines = []
    head = (f"{'link':>7} {'size':>9} {'method':<24} {'median':>10} {'speedup':>8} "
            f"{'wire/rank':>11} {'theory':>11} {'rel_err':>9} {'compress':>9} {'decomp':>9} "
            f"{'verify':>9} {'comm+':>9}")
    lines.append(head)
    lines.append("-" * len(head))
    for r in results:
        if "error" in r:
            lines.append(f"{r['link']:>7} {fmt_bytes(r['size_bytes']):>9} {r['method']:<24} "
                         f"{r['error']}")
            continue
        sp = r.get("split", {})
        lines.append(
            f"{r['link']:>7} {fmt_bytes(r['size_bytes']):>9} {r['method']:<24} "
            f"{_ms(r['median_s']):>10} {r.get('speedup_vs_fp32', float('nan')):7.2f}x "
            f"{fmt_bytes(r.get('bytes_per_rank_measured')):>11} "
            f"{fmt_bytes(r.get('bytes_per_rank_theory')):>11} {r['rel_err']:9.2e} "
            f"{_ms(sp.get('compress_s')):>9} {_ms(sp.get('decompress_s')):>9} "
            f"{_ms(sp.get('verify_s')):>9} {_ms(sp.get('communicate_other_s')):>9}")
    text = "\n".join(lines)
    print(text)
    return text


def markdown(doc: dict) -> str:
    """The results of a run as Markdown tables (for docs/results.md)."""
    out = []
    for link in dict.fromkeys(r["link"] for r in doc["results"]):
        for size in sorted({r["size_bytes"] for r in doc["results"] if r["link"] == link}):
            rr = [r for r in doc["results"] if r["link"] == link and r["size_bytes"] == size]
            per = netlink.per_rank_rate(link, doc["world"])
            share = f", {per / 1e9:g} Gbit/s per rank" if per else ""
            out.append(f"**{doc['world']} ranks, {fmt_bytes(size)} fp32, link `{link}`"
                       f"{share}**\n")
            out.append("| method | median | speed-up vs fp32 | wire/rank measured | theory "
                       "| rel. error | compress | decompress | verify | communicate + other |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in rr:
                name = r["method"]
                if r.get("algorithm_used") and r.get("algorithm") == "auto":
                    name += f" (→{r['algorithm_used']})"
                if "error" in r:
                    out.append(f"| {name} | fails: `{r['error']}` ||||||||| ")
                    continue
                sp = r.get("split", {})
                ms = lambda v: f"{v * 1e3:.1f} ms" if v is not None else "–"
                out.append(
                    f"| {name} | {ms(r['median_s'])} | {r['speedup_vs_fp32']:.2f}× | "
                    f"{fmt_bytes(r.get('bytes_per_rank_measured'))} | "
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
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"subset of {','.join(BASELINES)} (fp32 always runs)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per method (minimum)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 2 for PowerSGD)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="fast calls are repeated until this many seconds (up to --max-reps)")
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--split-reps", type=int, default=2,
                   help="profiled calls for the split when gradzip.all_reduce has no timings")
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
    if a.warmup < 2 and any(b.startswith("powersgd") for b in a.baselines.split(",")):
        p.error("PowerSGD starts compressing at its 2nd call: use --warmup >= 2")
    sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]
    baselines = ["fp32"] + [b for b in (s.strip() for s in a.baselines.split(","))
                            if b and b != "fp32"]
    for b in baselines:
        if b not in BASELINES:
            p.error(f"unknown baseline {b!r}; choose from {','.join(BASELINES)}")
    codecs = split_specs(a.codecs)
    algos = [x.strip() for x in a.algorithms.split(",") if x.strip()]
    gz_methods = [f"gz:{c}:{al}" for c in codecs for al in algos]
    links = [s.strip() for s in a.link.split(",") if s.strip()]
    for spec in links:
        netlink.parse_link(spec, a.world)

    info = machine_info()
    all_results: list[dict] = []
    link_info = []
    with tempfile.TemporaryDirectory(prefix="gz-bench-") as tmp:
        for i, spec in enumerate(links):
            link, eff = netlink.open_link(spec, world=a.world, netns=not a.no_netns)
            try:
                cfg = {"sizes": sizes, "baselines": baselines, "gz_methods": gz_methods,
                       "reps": a.reps, "warmup": a.warmup, "min_time": a.min_time,
                       "max_reps": a.max_reps, "split_reps": a.split_reps,
                       "threads": a.threads, "seed": a.seed, "pg_timeout": a.pg_timeout,
                       "gz_verify": a.gz_verify, "gz_min_numel": a.gz_min_numel,
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

    add_speedups(all_results)
    info["loadavg_end"] = os.getloadavg()
    table = print_table(all_results)
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
           "table": table}
    out.write_text(json.dumps(doc, indent=1))
    print(f"[bench] wrote {out}")
    png = Path(a.plot) if a.plot else out.with_suffix(".png")
    try:
        import plots

        plots.allreduce_plot(doc, png)
        print(f"[bench] wrote {png}")
    except ImportError as e:
        print(f"[bench] no plot ({e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
