"""Microbenchmarks of gradzip's three fused ops: the project's main benchmark.

    python bench/kernels.py                       # defaults: 2^24 and 2^26 elements, 1 and 2 threads
    python bench/kernels.py --sizes 2^20 --ops quantize,topk --threads 1 --min-time 0.2
    python bench/kernels.py --isas avx2,avx512 --threads 1    # both x86 paths, one run

For every op x configuration x backend it

1. proves correctness before timing anything: byte-exact payloads, bit-exact residuals
   and outputs against ``gradzip.reference`` at a small size (2^16 + 3 elements, compared
   with ``gradzip.testing``), and agreement with the pure-PyTorch baseline at each timed
   size. A failed check stops the run before the next timing, with exit status 3;
2. times it (bench/harness.py: the median over at least ``--min-time`` seconds of calls
   after a warm-up, ``torch.utils.benchmark`` on the CPU, ``triton.testing.do_bench`` on
   CUDA) next to (a) the pure-PyTorch code a user would write without gradzip, and (b) a
   memcpy of the op's input measured in the same run, with the same thread count;
3. prints a table (size, op, backend, CPU ISA path, form, threads, median ms, GB/s of
   logical bytes, % of memcpy, speedup vs the PyTorch baseline) and writes JSON
   (``--json``).

Logical bytes count each input read once and each output written once: quantize_pack
with error feedback reads x and the residual and writes the residual and the payload.

Backends: ``cpu`` (C++ kernels) always; ``cuda`` and ``triton`` when a GPU is present and
those backends are available (timed with CUDA events); ``reference`` (gradzip.reference,
pure PyTorch written for clarity, not speed) only at sizes up to 2^20, because it takes
seconds per call beyond that.

quantize_pack and topk_select are timed in two forms: ``alloc`` returns a fresh payload per
call, so part of its time is the kernel faulting in the new pages (glibc hands allocations
above its mmap threshold, at most 32 MiB, back to the kernel on free: the int8 and int4
payloads at 2^26); ``out=`` writes into one buffer reused by every call, as a training loop
or gradzip's communication layer does. torch's allocator can also use transparent huge pages
for large tensors (THP_MEM_ALLOC_ENABLE=1 in the environment), which removes most of the
faults of the allocating form.

The CPU rows say which vector ISA path of the C++ kernels ran (``isa``); ``--isas
avx2,avx512`` times each path in turn on a CPU that has both (``GRADZIP_CPU_ISA`` picks
one for the whole run). bitsandbytes' ``quantize_blockwise`` (its dynamic 8-bit code, same
block size) is a peer column for 8-bit quantize_pack without error feedback when
bitsandbytes is importable; it is optional and not a gradzip dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # bench/harness.py: picks the gradzip build, so it comes before gradzip

# isort: split
import gradzip
from gradzip import format as fmt
from gradzip import reference, testing

# This file is a module named "kernels", and bitsandbytes probes for an unrelated package
# of that name at import: take bench/ off the path so that it cannot find this file.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

SMALL_N = 2**16 + 3  # byte-exact check size: odd, several chunks and a short last block
REFERENCE_MAX_N = 2**20  # the reference backend is timed only up to this size
BLOCK = 128
WORLD = 8  # payloads per dequantize_accumulate
TOPK_FRACTION = 0.01


# ---------------------------------------------------------------------------------------
# The pure-PyTorch code a user would write without gradzip
# ---------------------------------------------------------------------------------------


def torch_quantize_pack(x: torch.Tensor, bits: int, block: int,
                        residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax (or scaled-sign) quantization with error feedback and bit packing."""
    v = x.reshape(-1).float()
    if residual is not None:
        v = v + residual
    n = v.numel()
    nb = -(-n // block)
    vb = torch.nn.functional.pad(v, (0, nb * block - n)).view(nb, block)
    if bits == 1:
        lengths = torch.full((nb, 1), float(block), device=v.device)
        lengths[-1] = n - (nb - 1) * block
        scale = vb.abs().sum(dim=1, keepdim=True) / lengths
        neg = vb < 0
        dec = torch.where(neg, -scale, scale)
        codes = neg.to(torch.uint8)
    else:
        qmax = 2 ** (bits - 1) - 1
        scale = vb.abs().amax(dim=1, keepdim=True) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(vb / safe).clamp_(-qmax, qmax)
        dec = q * scale
        codes = (q + qmax).to(torch.uint8)
    if residual is not None:
        residual.copy_((vb - dec).reshape(-1)[:n])
    codes = codes.reshape(-1)[:n]
    per = 8 // bits
    if per > 1:
        codes = torch.nn.functional.pad(codes, (0, (-n) % per)).view(-1, per)
        packed = codes[:, 0].clone()
        for j in range(1, per):
            packed |= codes[:, j] << (j * bits)
        codes = packed
    return scale.reshape(-1), codes


def torch_topk_select(x: torch.Tensor, k: int,
                      residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk on |v| with the error-feedback residual update."""
    v = x.reshape(-1).float()
    if residual is not None:
        v = v + residual
    idx = torch.topk(v.abs(), k, sorted=False).indices
    vals = v[idx]
    if residual is not None:
        residual.copy_(v)
        residual[idx] = 0
    return idx, vals


def torch_decode_dense(scales: torch.Tensor, packed: torch.Tensor, bits: int, block: int,
                       n: int) -> torch.Tensor:
    """Unpack codes with shifts and masks and scale them per block (broadcast, no copies of
    the scales)."""
    per = 8 // bits
    nb = scales.numel()
    if per > 1:
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        codes = ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    else:
        codes = packed
    codes = torch.nn.functional.pad(codes, (0, nb * block - codes.numel())).view(nb, block)
    s = scales.view(nb, 1)
    if bits == 1:
        dec = torch.where(codes == 1, -s, s)
    else:
        dec = (codes.float() - (2 ** (bits - 1) - 1)) * s
    return dec.reshape(-1)[:n]


def torch_accumulate_dense(sections: list[tuple[torch.Tensor, torch.Tensor]], bits: int,
                           block: int, out: torch.Tensor, alpha: float) -> None:
    """Decode (scales, packed codes) pairs with torch ops and add alpha * their sum to out."""
    acc = torch.zeros(out.numel(), dtype=torch.float32, device=out.device)
    for scales, packed in sections:
        acc += torch_decode_dense(scales, packed, bits, block, out.numel())
    out.add_(acc, alpha=alpha)


def torch_accumulate_sparse(sections: list[tuple[torch.Tensor, torch.Tensor]],
                            out: torch.Tensor, alpha: float) -> None:
    """Scatter-add (indices, values) pairs with index_add_ and add alpha * the sum to out."""
    acc = torch.zeros(out.numel(), dtype=torch.float32, device=out.device)
    for idx, vals in sections:
        acc.index_add_(0, idx.long(), vals.float())
    out.add_(acc, alpha=alpha)


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One op configuration. ``build(n, device)`` returns a State with the callables."""

    op: str       # quantize_pack / topk_select / dequantize_accumulate
    group: str    # --ops name
    config: str   # human-readable options
    build: Callable[[int, torch.device], State]


@dataclass
class State:
    logical_bytes: int
    run: Callable[[str], object]               # backend -> payload / out
    torch_baseline: Callable[[], object]
    agree: Callable[[], tuple[bool, str]]       # gradzip (cpu/cuda) vs torch baseline
    peers: dict[str, Callable[[], object]] = field(default_factory=dict)
    # backend -> payload written into one buffer reused by every call (the out= form);
    # None for ops that allocate nothing (dequantize_accumulate updates out in place)
    run_out: Callable[[str], object] | None = None


_DATA: dict[tuple[int, str], torch.Tensor] = {}


def _gen(n: int, device: torch.device, seed: int) -> torch.Tensor:
    """Gaussian data: one randn per size, varied per seed by a roll and a scale (drawing a
    fresh 2^26-element randn for every input would dominate the run time)."""
    key = (n, device.type)
    if key not in _DATA:
        _DATA.clear()
        g = torch.Generator(device="cpu").manual_seed(0)
        _DATA[key] = torch.randn(n, generator=g).to(device)
    base = _DATA[key]
    return base.roll(seed * 7919 % max(1, n)) * (1.0 + 0.125 * seed)


def quantize_case(bits: int, ef: bool, stochastic: bool = False) -> Case:
    rounding = "stochastic" if stochastic else "nearest"

    def build(n: int, device: torch.device) -> State:
        x = _gen(n, device, 1)
        r = (_gen(n, device, 2) * 0.01) if ef else None
        r_torch = r.clone() if ef else None
        payload_size = fmt.dense_payload_bytes(n, bits, BLOCK)
        logical = 4 * n + payload_size + (8 * n if ef else 0)

        def run(backend: str):
            return gradzip.quantize_pack(x, bits, BLOCK, r, rounding, 0, backend=backend)

        buf = torch.empty(payload_size, dtype=torch.uint8, device=device)

        def run_out(backend: str):
            return gradzip.quantize_pack(x, bits, BLOCK, r, rounding, 0, backend=backend,
                                         out=buf)

        def base():
            return torch_quantize_pack(x, bits, BLOCK, r_torch)

        def agree() -> tuple[bool, str]:
            rg = r.clone() if ef else None
            rt = r.clone() if ef else None
            p = gradzip.quantize_pack(x, bits, BLOCK, rg, rounding, 0,
                                      backend="cuda" if device.type == "cuda" else "cpu")
            dec = gradzip.dequantize(p, numel=n)
            scale, packed = torch_quantize_pack(x, bits, BLOCK, rt)
            dec_t = torch_decode_dense(scale, packed, bits, BLOCK, n)
            step = scale.float().repeat_interleave(BLOCK)[:n].clamp_min(1e-30)
            err = ((dec - dec_t).abs() / step).max().item()
            frac = (dec != dec_t).float().mean().item()
            if bits == 1:
                # Same signs; the scales differ only by summation order.
                return err <= 1e-5, f"decode vs torch: max {err:.1e} of the scale (limit 1e-5)"
            if stochastic:
                # The baseline rounds to nearest: stochastic codes are floor or ceil of it.
                return err <= 1.0 + 1e-3, (f"decode vs torch (nearest): max {err:.3f} steps "
                                           "(limit 1 step)")
            # A code may differ by one step where v * (qmax / amax) and the baseline's
            # v / scale round a near-tie differently; never by more.
            return err <= 1.0 + 1e-3, (f"decode vs torch: max {err:.3f} steps, {frac:.1e} of "
                                       "elements differ (limit 1 step)")

        peers = {}
        if bits == 8 and not ef and not stochastic:
            bnb = _bitsandbytes()
            if bnb is not None:
                peers["bitsandbytes"] = lambda: bnb.functional.quantize_blockwise(x, blocksize=BLOCK)
        return State(logical, run, base, agree, peers, run_out)

    ef_s = "ef" if ef else "no-ef"
    cfg = f"bits={bits} block={BLOCK} {ef_s}" + (" stochastic" if stochastic else "")
    return Case("quantize_pack", "quantize" if ef else "quantize_noef", cfg, build)


def topk_case(exact: bool) -> Case:
    def build(n: int, device: torch.device) -> State:
        x = _gen(n, device, 3)
        r = _gen(n, device, 4) * 0.01
        r_torch = r.clone()
        k = max(1, int(n * TOPK_FRACTION))
        logical = 12 * n + fmt.topk_payload_bytes(n, k, "fp32")

        def run(backend: str):
            return gradzip.topk_select(x, k, r, exact, "fp32", 0, backend=backend)

        buf = torch.empty(fmt.topk_payload_bytes(n, k, "fp32"), dtype=torch.uint8,
                          device=device)

        def run_out(backend: str):
            return gradzip.topk_select(x, k, r, exact, "fp32", 0, backend=backend, out=buf)

        def base():
            return torch_topk_select(x, k, r_torch)

        def agree() -> tuple[bool, str]:
            rg = r.clone()
            p = gradzip.topk_select(x, k, rg, exact, "fp32", 0,
                                    backend="cuda" if device.type == "cuda" else "cpu")
            h = fmt.parse_header(p)
            off, length = h.sections()["indices"]
            idx = p[off:off + length].view(torch.int32 if h.index_format == 1 else torch.int64)
            mag = (x.float() + r).abs()
            rt = r.clone()
            t_idx, _ = torch_topk_select(x, k, rt)
            kth = mag[t_idx].min()
            recall = torch.isin(idx.long(), t_idx).float().mean().item()
            unique = torch.unique(idx).numel() == k
            if exact:
                # Every selected |v| is at least the k-th largest (ties may pick either).
                ok = unique and bool((mag[idx.long()] >= kth).all())
                return ok, f"all {k} picks >= k-th largest |v|; recall vs torch.topk {recall:.4f}"
            return unique and recall >= 0.95, f"recall vs torch.topk {recall:.4f} (limit 0.95)"

        return State(logical, run, base, agree, run_out=run_out)

    return Case("topk_select", "topk", f"k=1% {'exact' if exact else 'approximate'} ef fp32",
                build)


def accumulate_case(bits: int | None) -> Case:
    """bits: dense payloads of that width; None: top-k payloads (k = 1%, fp32 values)."""

    def build(n: int, device: torch.device) -> State:
        alpha = 1.0 / WORLD
        k = max(1, int(n * TOPK_FRACTION))
        rows = []
        for w in range(WORLD):
            x = _gen(n, torch.device("cpu"), 10 + w)
            rows.append(gradzip.topk_select(x, k, None, True, "fp32") if bits is None
                        else gradzip.quantize_pack(x, bits, BLOCK))
        del x
        payloads = torch.stack(rows).to(device)
        del rows
        h = fmt.parse_header(payloads[0])
        sec = h.sections()
        sections = []
        for w in range(WORLD):
            row = payloads[w]
            if bits is None:
                o, ln = sec["indices"]
                vo, vl = sec["values"]
                sections.append((row[o:o + ln].view(torch.int32).long(),
                                 row[vo:vo + vl].view(torch.float32)))
            else:
                so, sl = sec["scales"]
                co, cl = sec["codes"]
                sections.append((row[so:so + sl].view(torch.float32), row[co:co + cl]))
        out = torch.zeros(n, dtype=torch.float32, device=device)
        out_torch = out.clone()
        logical = payloads.numel() + 8 * n

        def run(backend: str):
            return gradzip.dequantize_accumulate(payloads, out, alpha, backend=backend)

        def base():
            if bits is None:
                torch_accumulate_sparse(sections, out_torch, alpha)
            else:
                torch_accumulate_dense(sections, bits, BLOCK, out_torch, alpha)

        def agree() -> tuple[bool, str]:
            a = torch.randn(n, device=device)
            b = a.clone()
            gradzip.dequantize_accumulate(payloads, a, alpha,
                                          backend="cuda" if device.type == "cuda" else "cpu")
            if bits is None:
                torch_accumulate_sparse(sections, b, alpha)
            else:
                torch_accumulate_dense(sections, bits, BLOCK, b, alpha)
            # Same decode and summation order, but torch's add_(alpha=) may fuse alpha * acc
            # + out into one FMA: allow a few ulps of the largest |out|.
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            return err <= 1e-6, (f"vs torch decode+sum: max diff {err:.1e} of max |out| "
                                 "(limit 1e-6)")

        return State(logical, run, base, agree)

    what = f"dense bits={bits} block={BLOCK}" if bits else "top-k k=1% fp32"
    return Case("dequantize_accumulate", "accumulate", f"W={WORLD} {what} -> fp32", build)


def all_cases() -> list[Case]:
    cases = [quantize_case(b, ef=True) for b in (8, 4, 2, 1)]
    cases.append(quantize_case(8, ef=False))
    cases.append(quantize_case(4, ef=True, stochastic=True))
    cases += [topk_case(True), topk_case(False)]
    cases += [accumulate_case(b) for b in (8, 4, 2, 1)]
    cases.append(accumulate_case(None))
    return cases


GROUPS = ("quantize", "quantize_noef", "topk", "accumulate")


# ---------------------------------------------------------------------------------------
# Byte-exact check against the reference
# ---------------------------------------------------------------------------------------


def exact_check(case: Case, backend: str, device: torch.device) -> tuple[str | None, str]:
    """The backend vs gradzip.reference at SMALL_N: payload bytes and residual/out bits.

    Returns (what differs, or None when identical; what was compared)."""
    n = SMALL_N
    cfg = case.config
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, generator=g) * 3
    r = torch.randn(n, generator=g) * 0.1

    if case.op == "quantize_pack":
        bits = int(cfg.split("bits=")[1].split()[0])
        ef = " ef" in f" {cfg}"
        rounding = "stochastic" if "stochastic" in cfg else "nearest"
        r1 = r.clone() if ef else None
        r2 = r.clone().to(device) if ef else None
        want = reference.quantize_pack(x, bits, BLOCK, r1, rounding, 7)
        got = gradzip.quantize_pack(x.to(device), bits, BLOCK, r2, rounding, 7, backend=backend)
        problem = testing.payload_mismatch(got, want)
        if problem is None and ef:
            problem = testing.bits_mismatch(r2, r1)
            problem = problem and f"residual: {problem}"
        if problem is None:  # the out= form, into a buffer holding other bytes
            r3 = r.clone().to(device) if ef else None
            buf = torch.full_like(want, 0xA5).to(device)
            gradzip.quantize_pack(x.to(device), bits, BLOCK, r3, rounding, 7, backend=backend,
                                  out=buf)
            problem = testing.payload_mismatch(buf, want)
            problem = problem and f"out= payload: {problem}"
        what = "payload bytes (allocating and out=)" + (" + residual bits" if ef else "")
    elif case.op == "topk_select":
        exact = "exact" in cfg
        k = max(1, n // 100)
        r1, r2 = r.clone(), r.clone().to(device)
        want = reference.topk_select(x, k, r1, exact, "fp32", 7)
        got = gradzip.topk_select(x.to(device), k, r2, exact, "fp32", 7, backend=backend)
        problem = testing.payload_mismatch(got, want)
        if problem is None:
            problem = testing.bits_mismatch(r2, r1)
            problem = problem and f"residual: {problem}"
        if problem is None:
            buf = torch.full_like(want, 0xA5).to(device)
            gradzip.topk_select(x.to(device), k, r.clone().to(device), exact, "fp32", 7,
                                backend=backend, out=buf)
            problem = testing.payload_mismatch(buf, want)
            problem = problem and f"out= payload: {problem}"
        what = "payload bytes (allocating and out=) + residual bits"
    else:
        dense = "dense" in cfg
        bits = int(cfg.split("bits=")[1].split()[0]) if dense else None
        rows = []
        for w in range(WORLD):
            xw = torch.randn(n, generator=g)
            rows.append(reference.quantize_pack(xw, bits, BLOCK) if dense
                        else reference.topk_select(xw, n // 100))
        payloads = torch.stack(rows)
        out = torch.randn(n, generator=g)
        o1, o2 = out.clone(), out.clone().to(device)
        reference.dequantize_accumulate(payloads, o1, 0.125)
        gradzip.dequantize_accumulate(payloads.to(device), o2, 0.125, backend=backend)
        problem = testing.bits_mismatch(o2, o1)
        what = "out bits"
    return problem, f"{what} vs reference at n={n}"


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


@dataclass
class Row:
    size: int
    op: str
    config: str
    backend: str
    threads: str
    median_ms: float
    gbps: float
    pct_memcpy: float
    speedup_vs_torch: float | None
    samples_ms: list[float]  # each the mean of calls_per_sample back-to-back calls
    calls_per_sample: int
    cpu_isa: str  # the vector ISA path of gradzip's CPU kernels on this row; "-" for others
    # "alloc": a fresh payload per call (its pages faulted in by the kernel); "out=": one
    # payload buffer reused by every call; "-": the op allocates nothing, or not gradzip
    form: str = "-"


def _bitsandbytes():
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes
            import bitsandbytes.functional
        return bitsandbytes
    except (ImportError, OSError, RuntimeError):  # not installed, or a broken native library
        return None


def _bnb_status() -> str:
    bnb = _bitsandbytes()
    if bnb is None:
        return "not installed (pip install bitsandbytes to add the peer column)"
    try:
        x = torch.randn(4096)
        q, state = bnb.functional.quantize_blockwise(x, blocksize=BLOCK)
        back = bnb.functional.dequantize_blockwise(q, state)
        err = (back - x).abs().max().item()
        return f"bitsandbytes {bnb.__version__}: CPU quantize_blockwise works (max roundtrip error {err:.3g})"
    except (RuntimeError, NotImplementedError, OSError, ValueError) as e:
        # report exactly why its CPU path does not work
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} CPU path fails: {type(e).__name__}: {e}"


def backends_for(device: torch.device, n: int, info: dict) -> list[str]:
    if device.type == "cpu":
        return ["cpu"] + (["reference"] if n <= REFERENCE_MAX_N else [])
    return (["cuda"] if info["cuda_kernels_registered"] else []) + \
        (["triton"] if info["triton"] else [])


@contextlib.contextmanager
def cpu_isa(isa: str):
    """Run the block with gradzip's CPU kernels on the vector ISA path ``isa`` ("-": as is)."""
    if isa == "-":
        yield
        return
    old = torch.ops.gradzip._cpu_set_isa(isa)
    try:
        yield
    finally:
        torch.ops.gradzip._cpu_set_isa(old)


def _api_backend(backend: str) -> str:
    return "torch" if backend == "reference" else backend


def _size_name(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2^24,2^26",
                    help="comma-separated element counts, e.g. 2^24,2^26, 1000000 or 16M")
    ap.add_argument("--ops", default=",".join(GROUPS),
                    help=f"comma-separated subset of {','.join(GROUPS)}")
    ap.add_argument("--threads", default="1,2", help="CPU thread counts, e.g. 1,2")
    ap.add_argument("--min-time", type=float, default=0.5,
                    help="seconds of timed calls per measurement (after a warm-up call)")
    ap.add_argument("--torch-min-time", type=float, default=0.0,
                    help="the same for the PyTorch baseline and the reference (10-100x "
                         "slower than gradzip: by default one warm-up call and one timed "
                         "call, whose noise barely moves the speedup)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "kernels.json"),
                    help="where to write the results")
    ap.add_argument("--no-gpu", action="store_true", help="CPU only even when a GPU is present")
    ap.add_argument("--isas", default=None,
                    help="vector ISA paths of the C++ CPU kernels to time, e.g. avx2,avx512 "
                         "(each forced in turn; default: the one in use, see GRADZIP_CPU_ISA)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    groups = harness.split_list(args.ops)
    for g in groups:
        if g not in GROUPS:
            ap.error(f"unknown op group {g!r}; choose from {GROUPS}")
    try:
        sizes = harness.parse_sizes(args.sizes)
    except ValueError as e:
        ap.error(str(e))
    thread_counts = [int(t) for t in harness.split_list(args.threads)]
    isas = harness.split_list(args.isas) if args.isas else [torch.ops.gradzip._cpu_isa()]
    for isa in isas:
        try:
            with cpu_isa(isa):
                pass
        except ValueError as e:
            ap.error(f"--isas: {e}")
    cases = [c for c in all_cases() if c.group in groups]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_gpu:
        devices.append(torch.device("cuda"))
    machine = harness.machine_info()
    info = machine["gradzip_build"]
    print(harness.machine_line(machine))
    bnb_status = _bnb_status()
    print(f"peer: {bnb_status}")
    skipped: list[str] = []
    if any(n > REFERENCE_MAX_N for n in sizes):
        skipped.append(f"backend 'reference' (gradzip.reference) not timed above n={REFERENCE_MAX_N}: "
                       "pure PyTorch written for clarity, it takes seconds per call there; it is "
                       f"still the byte-exact check at n={SMALL_N}")

    # ---- 1. correctness first: every backend byte-exact against the reference ----------
    checks = []
    failed = []
    for device in devices:
        for case in cases:
            for backend in backends_for(device, SMALL_N, info):
                if backend == "reference":
                    continue
                for isa in isas if backend == "cpu" else ["-"]:
                    with cpu_isa(isa):
                        problem, what = exact_check(case, _api_backend(backend), device)
                    msg = f"{what}: {problem or 'identical'}"
                    where = backend if isa == "-" else f"{backend} {isa}"
                    checks.append({"op": case.op, "config": case.config, "backend": backend,
                                   "cpu_isa": isa, "kind": "byte-exact",
                                   "ok": problem is None, "detail": msg})
                    print(f"check {'FAIL' if problem else 'ok  '} {case.op} {case.config} "
                          f"[{where}]: {msg}")
                    if problem:
                        failed.append(f"{case.op} {case.config} [{where}]")
    if failed:
        harness.stop_before_timing(f"{len(failed)} of {len(checks)} byte-exact checks",
                                   ", ".join(failed))

    # ---- 2. timing, each case after its agreement with the PyTorch baseline ------------
    rows: list[Row] = []
    memcpy: list[dict] = []
    for device in devices:
        for n in sizes:
            tcounts = thread_counts if device.type == "cpu" else [None]
            mc = {}
            for t in tcounts:
                with harness.threads(t):
                    mc[t] = harness.memcpy_gbps(4 * n, device=device, min_time_s=args.min_time)
                memcpy.append({"size": n, "device": device.type, "threads": t, "gbps": mc[t]})
            for case in cases:
                state = case.build(n, device)
                with harness.threads(max(thread_counts) if device.type == "cpu" else None):
                    ok, msg = state.agree()
                checks.append({"op": case.op, "config": case.config, "size": n,
                               "device": device.type, "kind": "agreement", "ok": ok,
                               "detail": msg})
                print(f"check {'ok  ' if ok else 'FAIL'} {case.op} {case.config} n={n}: {msg}")
                if not ok:
                    harness.stop_before_timing(
                        f"{case.op} {case.config} at n={n} against the PyTorch baseline", msg)
                for t in tcounts:
                    with harness.threads(t):
                        # (backend, cpu isa, form, timing)
                        entries = [("torch", "-", "-", harness.measure(
                            state.torch_baseline, device=device,
                            min_time_s=args.torch_min_time))]
                        for backend in backends_for(device, n, info):
                            slow = backend == "reference"
                            forms = [("alloc" if state.run_out else "-", state.run)]
                            if state.run_out is not None and not slow:
                                forms.append(("out=", state.run_out))
                            for isa in isas if backend == "cpu" else ["-"]:
                                with cpu_isa(isa):
                                    for form, run in forms:
                                        entries.append((backend, isa, form, harness.measure(
                                            lambda b=backend, run=run: run(_api_backend(b)),
                                            device=device,
                                            min_time_s=args.torch_min_time if slow
                                            else args.min_time)))
                        for peer, fn in state.peers.items():
                            entries.append((peer, "-", "-", harness.measure(
                                fn, device=device, min_time_s=args.min_time)))
                    base_ms = entries[0][3].median_ms
                    for backend, isa, form, tm in entries:
                        gbps = tm.gbps(state.logical_bytes)
                        rows.append(Row(
                            size=n, op=case.op, config=case.config,
                            backend=backend if device.type == "cpu" else f"{backend}:gpu",
                            threads=str(t) if t is not None else "-",
                            median_ms=tm.median_ms, gbps=gbps, pct_memcpy=100 * gbps / mc[t],
                            speedup_vs_torch=base_ms / tm.median_ms,
                            samples_ms=tm.samples_ms, calls_per_sample=tm.calls_per_sample,
                            cpu_isa=isa, form=form))
                state = None  # free this case's tensors before the next one

    # ---- 3. report --------------------------------------------------------------------
    print()
    hdr = (f"{'size':>6} {'op':<22} {'config':<34} {'backend':<13} {'isa':<7} {'form':<5} "
           f"{'thr':>3} {'median ms':>10} {'GB/s':>7} {'%memcpy':>8} {'vs torch':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        sp = f"{r.speedup_vs_torch:.1f}x" if r.backend.split(":")[0] != "torch" else "1.0x"
        print(f"{_size_name(r.size):>6} {r.op:<22} {r.config:<34} {r.backend:<13} "
              f"{r.cpu_isa:<7} {r.form:<5} {r.threads:>3} {r.median_ms:>10.2f} {r.gbps:>7.2f} "
              f"{r.pct_memcpy:>7.0f}% {sp:>9}")
    for m in memcpy:
        print(f"memcpy {m['device']} n={m['size']} threads={m['threads']}: {m['gbps']:.2f} GB/s "
              "(read + write)")
    for s in skipped:
        print(f"skipped: {s}")
    elapsed = time.perf_counter() - t_start
    print(f"{len(checks)}/{len(checks)} correctness checks passed; {elapsed:.0f} s")

    result = {
        "machine": machine,
        "torch": torch.__version__,
        "build_info": info,
        "timer": {"cpu": "torch.utils.benchmark.Timer.blocked_autorange",
                  "cuda": "triton.testing.do_bench"},
        "peer": bnb_status,
        "args": vars(args),
        "memcpy": memcpy,
        "checks": checks,
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
        "elapsed_s": elapsed,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
