"""The harness every gradzip benchmark shares: which gradzip it loads, how it times, how it
checks a result before timing it, how it reads sizes and names bytes, and what it records
about the machine.

Importing this module picks the gradzip the benchmarks use: a source checkout with an
in-place build (``python setup.py build_ext --inplace``) wins, otherwise the installed
package. Benchmarks import it before gradzip.

Timing (:func:`measure`): on the CPU ``torch.utils.benchmark.Timer.blocked_autorange`` (its
first call is the warm-up; calls are grouped into blocks long enough that the timer's own
cost is negligible; the clock is ``time.perf_counter`` behind ``torch.accelerator
.synchronize``; the thread count is the caller's ``torch.get_num_threads()``, not the
Timer's default of 1); on CUDA ``triton.testing.do_bench`` (CUDA events around every call,
the L2 cache flushed between calls). Both report the median, which is robust to the odd
slow call on a shared machine. Collectives (:func:`time_collective`): the ranks meet at a
barrier, each times its own call, and the call takes as long as the slowest rank
(:func:`slowest`).

Correctness before timing: a benchmark checks each configuration first (kernels against
:mod:`gradzip.reference` with :mod:`gradzip.testing`, collectives with
:func:`check_all_reduce`) and, when a check fails, calls :func:`stop_before_timing`, which
exits with :data:`CHECK_FAILED` before anything is timed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

ROOT = Path(__file__).resolve().parents[1]
if glob.glob(str(ROOT / "python" / "gradzip" / "_C*.so")):
    sys.path.insert(0, str(ROOT / "python"))

MiB = 1 << 20
CHECK_FAILED = 3  # exit status of a benchmark (and of its ranks) whose correctness check failed


def stopped(failure: Exception, tag: str) -> int:
    """What a benchmark's ``main`` returns when its ranks failed with ``failure`` (a
    ``netlink.RankFailed``): a failed correctness check is reported and its status
    returned, so that nothing more is timed or written; any other failure is re-raised."""
    if getattr(failure, "returncode", None) != CHECK_FAILED:
        raise failure
    print(f"[{tag}] stopped: a correctness check failed (above); nothing after it was timed "
          "and no results were written", file=sys.stderr)
    return CHECK_FAILED


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call wall times of one measured function, in milliseconds.

    Each sample is the mean over ``calls_per_sample`` back-to-back calls (a block; 1 for
    calls long enough to time one by one)."""

    samples_ms: list[float] = field(default_factory=list)
    calls_per_sample: int = 1
    timer: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    def gbps(self, nbytes: int) -> float:
        """Bandwidth in GB/s (1e9 bytes) of ``nbytes`` moved per call, at the median."""
        return nbytes / (self.median_ms * 1e-3) / 1e9


def measure(fn: Callable[[], object], *, device: torch.device | str | None = None,
            min_time_s: float = 0.2) -> Timing:
    """Median time of ``fn()`` after a warm-up, over at least ``min_time_s`` of calls.

    CPU (``device`` None or a CPU device): ``torch.utils.benchmark.Timer(...)
    .blocked_autorange(min_run_time=min_time_s)`` with the current torch thread count. A
    call slower than ``min_time_s`` is run twice: once to warm up, once timed.
    CUDA: ``triton.testing.do_bench(fn, rep=min_time_s in ms, return_mode="all")``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if min_time_s < 0:
        raise ValueError(f"min_time_s must be >= 0, got {min_time_s}")
    if dev.type == "cuda":
        import triton.testing

        with torch.cuda.device(dev):
            times = triton.testing.do_bench(fn, rep=max(1, round(min_time_s * 1e3)),
                                            return_mode="all")
        return Timing(list(times), 1, "triton.testing.do_bench")
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                            num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_time_s)
    return Timing([t * 1e3 for t in m.times], m.number_per_run,
                  "torch.utils.benchmark.Timer.blocked_autorange")


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (no change when ``n`` is None)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def memcpy_gbps(nbytes: int, *, device: torch.device | str = "cpu",
                min_time_s: float = 0.2) -> float:
    """Copy bandwidth of an ``nbytes`` buffer in logical bytes (read + write) per second.

    The same-run reference every kernel's GB/s is compared with: ``dst.copy_(src)`` is
    torch's parallel memcpy, so it honours the current ``torch.set_num_threads``.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, min_time_s=min_time_s)
    return t.gbps(2 * src.numel() * 4)


def slowest(seconds: float, group=None) -> float:
    """The largest of every rank's ``seconds``: a collective call takes as long as its
    slowest rank. Every rank of ``group`` must call it."""
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def time_collective(call: Callable[[], object], *, before: Callable[[], object] | None = None,
                    group=None, device: torch.device | str | None = None) -> float:
    """Seconds of one call of a collective: ``before()`` (untimed, e.g. restoring the
    input), a barrier so every rank starts together, ``call()`` timed with
    ``time.perf_counter`` on each rank (CUDA work synchronised), the slowest rank's time."""
    import torch.distributed as dist

    cuda = device is not None and torch.device(device).type == "cuda"
    if before is not None:
        before()
    if cuda:
        torch.cuda.synchronize(device)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    return slowest(time.perf_counter() - t0, group)


# ---------------------------------------------------------------------------------------
# correctness before timing
# ---------------------------------------------------------------------------------------


def stop_before_timing(what: str, problem: str, *, show: bool = True) -> NoReturn:
    """A correctness check failed: say what and why (``show``: on this process; ranks but
    one pass False) and exit with :data:`CHECK_FAILED` before anything more is timed (a
    rank of a process group exits at once, after its peers reach the same point)."""
    if show:
        print(f"[bench] correctness check FAILED, stopping before timing: {what}: {problem}",
              file=sys.stderr, flush=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # A rank: every rank stops here together (the verdicts agree). Tearing down the
        # interpreter with the group and a DDP model still alive can abort the process
        # ("terminate called without an active exception", status -6) and hide the status,
        # so the ranks meet once more and leave without running destructors.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(CHECK_FAILED)
    raise SystemExit(CHECK_FAILED)


@dataclass
class AllReduceCheck:
    """The verdict on one all-reduce result, the same on every rank."""

    identical: bool  # every rank holds the same bits
    finite: bool  # on every rank
    rel_err: float  # ||result - expected|| / ||expected|| (rank 0's)
    problem: str | None  # None when the result passes


def _digest(t: torch.Tensor) -> int:
    data = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def identical_on_every_rank(t: torch.Tensor, group=None) -> str | None:
    """``None`` when ``t`` holds the same bits on every rank of ``group`` (all must call
    it), else where this rank's copy differs from rank 0's. A 64-bit BLAKE2 digest of the
    bytes is compared; only on a mismatch is rank 0's tensor broadcast, and
    :func:`gradzip.testing.bits_mismatch` says where."""
    import torch.distributed as dist
    from gradzip import testing

    world = dist.get_world_size(group)
    digests = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(digests, torch.tensor([_digest(t)]), group=group)
    if all(int(d) == int(digests[0]) for d in digests):
        return None
    ref = t.detach().clone()
    dist.broadcast(ref, dist.get_global_rank(group, 0) if group is not None else 0,
                   group=group)
    mismatch = testing.bits_mismatch(t, ref)
    return mismatch and f"differs from rank 0's: {mismatch}"


def check_all_reduce(result: torch.Tensor, expected: torch.Tensor | None, *,
                     tolerance: float | None = None, group=None) -> AllReduceCheck:
    """Check the result of an all-reduce on every rank of ``group`` (all must call it; all
    get the same verdict): bit-identical on every rank (:func:`identical_on_every_rank`),
    finite, and, when ``tolerance`` is given, within that relative error of ``expected``
    (the exact mean; ``None``: no error is measured).
    """
    import torch.distributed as dist

    mismatch = identical_on_every_rank(result, group)
    finite = bool(torch.isfinite(result).all())
    rel_err = math.nan
    if expected is not None:
        rel_err = float((result.double() - expected.double()).norm()
                        / expected.double().norm().clamp_min(1e-300))
    problems = [mismatch] if mismatch else []
    if not finite:
        problems.append("holds NaN or infinity")
    if tolerance is not None and not rel_err <= tolerance:
        problems.append(f"relative error {rel_err:.3e} against the exact mean exceeds "
                        f"{tolerance:.3e}")
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, (problems, mismatch is None, finite, rel_err), group=group)
    lines = [f"rank {r}: {'; '.join(e[0])}" for r, e in enumerate(every) if e[0]]
    return AllReduceCheck(identical=all(e[1] for e in every), finite=all(e[2] for e in every),
                          rel_err=every[0][3], problem="; ".join(lines) or None)


def all_reduce_tolerance(codec, x: torch.Tensor, expected: torch.Tensor, algorithm: str, *,
                         group=None) -> float:
    """The largest relative error a correct first call (fresh residuals) of
    ``gradzip.all_reduce(x, codec, algorithm=algorithm)`` can show against ``expected``
    (the exact mean), with a margin of 1.5x. Every rank of ``group`` must call it.

    Each rank compresses its own ``x`` as the plan does (whole for all-gather, chunk by
    chunk for two-phase) and decodes it: the error ``e_w``. An all-gather result is
    ``mean_w decode(payload_w)``, so its error is at most ``mean_w ||e_w||``; two-phase
    adds the second compression of the partial mean, estimated as the largest relative
    error ``||e_w|| / ||x_w||`` of the ranks times the partial mean's norm. A plain
    all-reduce is exact but for rounding.
    """
    import torch.distributed as dist
    from gradzip import comm

    world = dist.get_world_size(group)
    flat = x.detach().reshape(-1)
    p = comm.plan(codec, flat.numel(), flat.dtype, world, algorithm)
    if p.algorithm == "plain":
        return 1e-5
    if p.algorithm == "allgather":
        pieces = [(0, flat.numel(), None)]
    else:
        pieces = [(a, b, k) for s in p.stages() for (a, b), k in zip(s.chunks, s.ks) if b > a]
    sq = 0.0
    for a, b, k in pieces:
        part = flat[a:b]
        decoded = torch.zeros(b - a, dtype=torch.float32, device=flat.device)
        codec.decompress_accumulate(codec.compress(part, k=k).unsqueeze(0), decoded)
        sq += float(((part.double() - decoded.double()) ** 2).sum())
    e = math.sqrt(sq)
    stats = torch.tensor([e / world, e / max(float(flat.double().norm()), 1e-300)],
                         dtype=torch.float64)
    mean_e = stats[:1].clone()
    dist.all_reduce(mean_e, group=group)
    rho = stats[1:].clone()
    dist.all_reduce(rho, op=dist.ReduceOp.MAX, group=group)
    first = float(mean_e) / max(float(expected.double().norm()), 1e-300)
    second = float(rho) * (1 + first) if p.algorithm == "alltoall" else 0.0
    return 1.5 * (first + second) + 1e-5


# ---------------------------------------------------------------------------------------
# command lines: sizes, lists, codec specs, bytes
# ---------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": MiB, "mib": MiB,
          "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str, *, multiple_of: int = 1) -> int:
    """A size on the command line -> an int: ``4096``, ``2^24``, ``64MiB``, ``512K``
    (binary units: K/KiB, M/MiB, G/GiB; the caller says whether it counts bytes or
    elements). Must be positive and a multiple of ``multiple_of``."""
    s = text.strip()
    if s.startswith("2^") and s[2:].isdigit():
        n = 2 ** int(s[2:])
    else:
        i = len(s)
        while i > 0 and not s[i - 1].isdigit():
            i -= 1
        num, unit = s[:i], s[i:].strip().lower()
        if not num.isdigit() or unit not in _UNITS:
            raise ValueError(f"bad size {text!r}: use e.g. 4096, 2^24, 64MiB, 512KiB")
        n = int(num) * _UNITS[unit]
    if n <= 0 or n % multiple_of:
        raise ValueError(f"size {text!r} must be positive"
                         + (f" and a multiple of {multiple_of}" if multiple_of > 1 else ""))
    return n


def split_list(text: str) -> list[str]:
    """``'a, b,,c'`` -> ``['a', 'b', 'c']``."""
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_sizes(text: str, *, multiple_of: int = 1) -> list[int]:
    """A comma-separated list of :func:`parse_size` sizes."""
    return [parse_size(s, multiple_of=multiple_of) for s in split_list(text)]


def split_specs(text: str) -> list[str]:
    """``'int8,topk:0.01,exact=false,sign'`` -> ``['int8', 'topk:0.01,exact=false', 'sign']``.

    Codec specs carry their options after commas too; a piece with ``=`` is an option of
    the spec before it.
    """
    out: list[str] = []
    for piece in split_list(text):
        if "=" in piece and out:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def fmt_bytes(n: float | None) -> str:
    """``67108864`` -> ``'64.00 MiB'``; ``None`` -> ``'-'``."""
    if n is None:
        return "-"
    for unit, div in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------


def machine_info() -> dict:
    """What a result was measured on: ``torch.utils.collect_env`` (OS, compilers, CUDA,
    GPUs, Python packages, ``lscpu``), the CPU model, memory and load, the gradzip build
    (``gradzip.build_info()``) with the CPU ISA path its kernels picked (``cpu_isa``,
    after ``GRADZIP_CPU_ISA``), torch's own CPU capability, and the git commit."""
    import gradzip
    from torch.utils import collect_env

    env = collect_env.get_env_info()._asdict()
    build = gradzip.build_info()
    info = {"hostname": platform.node(), "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "gradzip_build": build, "cpu_isa": build["cpu_isa"],
            "GRADZIP_CPU_ISA": os.environ.get("GRADZIP_CPU_ISA"),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "collect_env": env}
    for line in (env.get("cpu_info") or "").splitlines():
        if line.startswith("Model name:"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
            break
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["mem_gib"] = round(int(mem[1]) / (1 << 20), 1)
    except (OSError, IndexError, ValueError):
        pass
    git = ["git", "-C", str(ROOT)]
    try:
        info["git"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True,
                                     text=True, check=False).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(
            git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, check=False).stdout.strip())
    except OSError:
        pass
    return info


def machine_line(info: dict) -> str:
    """One line for the top of a benchmark's output."""
    b = info["gradzip_build"]
    return (f"gradzip {b.get('version')} (cpu_isa {info['cpu_isa']}, cuda "
            f"{'yes' if b.get('cuda_kernels_registered') else 'no'}) | torch {info['torch']} "
            f"| {info.get('cpu_model', platform.machine())} | {info['cpus']} cores")
