"""Check every backend on this machine against the reference: ``python -m gradzip.selftest``.

Runs the C++ CPU kernels, the CUDA kernels (when built and a GPU is present) and the
Triton kernels (on a GPU, or on CPU under the Triton interpreter) over a battery of cases —
bits, blocks, dtypes, odd sizes, error feedback, stochastic rounding, non-finite input,
top-k modes and value formats, dense and sparse accumulation — and compares payload bytes
and residual bits exactly with :mod:`gradzip.reference` (through :mod:`gradzip.testing`).
Prints the build information, a pass/fail table, each backend it could not check here and
why, and a summary of the warnings raised while the cases ran; exits 1 on any mismatch.

Options: ``--backends cpu,cuda``, ``--quick`` (fewer cases), ``--verbose`` (each failure,
not only the first per backend and op).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback
import warnings
from collections import Counter

import torch

if not torch.cuda.is_available():
    # The Triton kernels can only run on CPU under the interpreter, which must be chosen
    # before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gradzip
from gradzip import reference
from gradzip.testing import assert_bits_equal, assert_payload_equal

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHECKED_BACKENDS = ("cpu", "cuda", "triton")  # compared with the reference, which is "torch"


def plan_backends(info: dict, cuda_device: bool, cpu_kernels: bool, interpreter: bool,
                  ) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(the (backend, device) pairs that can run here, {backend: why it cannot}).

    ``info`` is :func:`gradzip.build_info`; ``cuda_device``: a CUDA GPU is present;
    ``cpu_kernels``: the C++ CPU kernels are registered; ``interpreter``: the Triton
    kernels were decorated under ``TRITON_INTERPRET=1`` (so they run on CPU tensors).
    """
    run: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    if cpu_kernels:
        run.append(("cpu", "cpu"))
    else:
        skipped["cpu"] = "not compiled: gradzip._C has no CPU kernels registered"
    if not info["cuda_kernels_registered"]:
        reason = info.get("cuda_reason") or (
            "compiled, but no CUDA kernel is registered" if info.get("cuda")
            else "not in this build")
        skipped["cuda"] = f"not compiled: {reason}"
    elif not cuda_device:
        skipped["cuda"] = "compiled, not run: no GPU"
    else:
        run.append(("cuda", "cuda"))
    if not info["triton"]:
        skipped["triton"] = "not installed"
    elif cuda_device:
        run.append(("triton", "cuda"))
    elif interpreter:
        run.append(("triton", "cpu"))
    else:
        skipped["triton"] = "no GPU; run with TRITON_INTERPRET=1 to check it on CPU"
    return run, skipped


def _interpreter_on() -> bool:
    """Whether the Triton kernels run under the interpreter (fixed when they were defined)."""
    if "gradzip.triton" in sys.modules:
        return bool(sys.modules["gradzip.triton"].INTERPRET)
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends_here() -> tuple[list[tuple[str, str]], dict[str, str]]:
    """:func:`plan_backends` for this machine and this build."""
    cpu_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("gradzip::quantize_pack", "CPU")
    return plan_backends(gradzip.build_info(), torch.cuda.is_available(), cpu_kernels,
                         _interpreter_on())


def _input(n: int, dtype: torch.dtype, seed: int, special: str = "") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    if special == "nonfinite" and n > 3:
        x[1], x[n // 2], x[-1] = float("inf"), float("nan"), -float("inf")
    if special == "zeros":
        x.zero_()
    return x.to(dtype)


def _sizes(limit: int) -> list[int]:
    return [n for n in (1, 31, 33, 127, 1000, 4097, 65537) if n <= limit]


def quantize_cases(quick: bool, limit: int):
    blocks = (32, 128) if quick else (32, 128, 4096)
    for bits, block, dtype in itertools.product((8, 4, 2, 1), blocks, DTYPES):
        for rounding in ("nearest", "stochastic") if bits > 1 else ("nearest",):
            for n in _sizes(limit)[:: 2 if quick else 1]:
                yield {"n": n, "bits": bits, "block": block, "dtype": dtype, "rounding": rounding,
                           "special": "", "strided": False}
    for bits in (8, 4, 2, 1):
        for special in ("nonfinite", "zeros"):
            yield {"n": min(limit, 1000), "bits": bits, "block": 32, "dtype": torch.float32,
                       "rounding": "nearest", "special": special, "strided": False}
        yield {"n": min(limit, 999), "bits": bits, "block": 64, "dtype": torch.float16,
                   "rounding": "nearest", "special": "", "strided": True}


def run_quantize(backend: str, device: str, c: dict) -> None:
    x = _input(2 * c["n"] if c["strided"] else c["n"], c["dtype"], c["n"] + c["bits"],
               c["special"])
    if c["strided"]:
        x = x[::2]
    r0 = _input(c["n"], torch.float32, 7) * 0.01
    r_ref = r0.clone()
    want = reference.quantize_pack(x, c["bits"], c["block"], r_ref, c["rounding"], seed=11)
    r = r0.clone().to(device)
    got = gradzip.quantize_pack(x.to(device), c["bits"], c["block"], r, c["rounding"], 11,
                                backend=backend)
    assert_payload_equal(got, want, "payload")
    assert_bits_equal(r, r_ref, "residual")


def topk_cases(quick: bool, limit: int):
    for n in _sizes(limit)[:: 2 if quick else 1]:
        for frac, exact, values in itertools.product(
                (0.01, 0.3), (True, False), ("fp32", "bf16", "int8")):
            yield {"n": n, "k": max(1, int(n * frac)), "exact": exact, "values": values,
                       "dtype": torch.float32, "special": ""}
    yield {"n": min(limit, 1000), "k": 10, "exact": True, "values": "fp32", "dtype": torch.bfloat16,
               "special": ""}
    yield {"n": min(limit, 1000), "k": 10, "exact": False, "values": "int8", "dtype": torch.float32,
               "special": "nonfinite"}


def run_topk(backend: str, device: str, c: dict) -> None:
    x = _input(c["n"], c["dtype"], c["n"] + c["k"], c["special"])
    r0 = _input(c["n"], torch.float32, 5) * 0.01
    r_ref = r0.clone()
    want = reference.topk_select(x, c["k"], r_ref, c["exact"], c["values"], seed=3)
    r = r0.clone().to(device)
    got = gradzip.topk_select(x.to(device), c["k"], r, c["exact"], c["values"], 3,
                              backend=backend)
    assert_payload_equal(got, want, "payload")
    assert_bits_equal(r, r_ref, "residual")


def accumulate_cases(quick: bool, limit: int):
    n = min(limit, 4097)
    for codec, w, out_dtype in itertools.product(
            ("int8", "int4", "int2", "sign", "topk", "topk_int8"), (1, 3), DTYPES):
        if quick and out_dtype == torch.float16:
            continue
        yield {"n": n, "codec": codec, "w": w, "out_dtype": out_dtype}


def _payload(codec: str, x: torch.Tensor) -> torch.Tensor:
    bits = {"int8": 8, "int4": 4, "int2": 2, "sign": 1}.get(codec)
    if bits is not None:
        return reference.quantize_pack(x, bits, 64)
    k = max(1, x.numel() // 20)
    return reference.topk_select(x, k, values="int8" if codec == "topk_int8" else "fp32")


def run_accumulate(backend: str, device: str, c: dict) -> None:
    rows = torch.stack([_payload(c["codec"], _input(c["n"], torch.float32, 100 + w))
                        for w in range(c["w"])])
    out0 = _input(c["n"], torch.float32, 9).to(c["out_dtype"])
    want = reference.dequantize_accumulate(rows, out0.clone(), alpha=0.25)
    got = gradzip.dequantize_accumulate(rows.to(device), out0.clone().to(device), 0.25,
                                        backend=backend)
    # IEEE 754 leaves open which NaN an operation returns; out is computed, not a payload.
    assert_bits_equal(got, want, "out", nan_equal=True)


OPS = {
    "quantize_pack": (quantize_cases, run_quantize),
    "topk_select": (topk_cases, run_topk),
    "dequantize_accumulate": (accumulate_cases, run_accumulate),
}


def _where(w: warnings.WarningMessage) -> str:
    parts = os.path.normpath(w.filename).split(os.sep)
    return f"{'/'.join(parts[-3:])}:{w.lineno}"


def _run_row(backend: str, device: str, quick: bool, limit: int
             ) -> tuple[list[tuple[int, int]], list[tuple[str, dict, str]]]:
    """Every case of every op on one backend: ([(passed, total)] per op, failures)."""
    counts, failures = [], []
    for op, (cases, run) in OPS.items():
        passed = total = 0
        for c in cases(quick, limit):
            total += 1
            try:
                run(backend, device, c)
                passed += 1
            except AssertionError as e:  # a mismatch, located by gradzip.testing
                failures.append((op, c, str(e)))
            except Exception:  # noqa: BLE001  (an error is a failure too)
                failures.append((op, c, traceback.format_exc().rstrip()))
        counts.append((passed, total))
    return counts, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", help=f"comma-separated subset of {','.join(CHECKED_BACKENDS)}")
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--verbose", action="store_true",
                    help="print every failure (default: the first per backend and op)")
    args = ap.parse_args(argv)

    info = gradzip.build_info()
    print("gradzip", gradzip.__version__, "selftest")
    for key in sorted(info):
        print(f"  {key:26s} {info[key]}")
    print(f"  {'torch.cuda.is_available()':26s} {torch.cuda.is_available()}")
    pairs, skipped = backends_here()
    if args.backends:
        wanted = args.backends.split(",")
        unknown = [b for b in wanted if b not in CHECKED_BACKENDS]
        if unknown:
            print(f"unknown backend(s) {unknown}: choose from {list(CHECKED_BACKENDS)} (the "
                  "reference is what each of them is compared with)")
            return 1
        missing = [b for b in wanted if b in skipped]
        if missing:
            for b in missing:
                print(f"requested backend cannot be checked here: {b}: {skipped[b]}")
            return 1
        pairs = [p for p in pairs if p[0] in wanted]
        skipped = {}
    print()
    header = f"{'backend':8s} {'device':17s} " + " ".join(f"{op:>22s}" for op in OPS)
    print(header)
    print("-" * len(header))
    sys.stdout.flush()
    failures: list[tuple[str, str, str, dict, str]] = []
    caught: Counter = Counter()
    for backend, device in pairs:
        interpreted = (backend, device) == ("triton", "cpu")
        # The interpreter runs Triton kernels element by element in Python: small cases.
        limit = 5000 if interpreted else 70000
        quick = args.quick or interpreted
        # Warnings (numpy's, under the interpreter) would land in the middle of the table:
        # record them, summarise them after it.
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            counts, row_failures = _run_row(backend, device, quick, limit)
        for w in raised:
            caught[(backend, device, w.category.__name__, str(w.message), _where(w))] += 1
        failures += [(backend, device, op, c, msg) for op, c, msg in row_failures]
        cells = [f"{passed:>6d}/{total:<6d} {'ok' if passed == total else 'FAIL':>4s}"
                 for passed, total in counts]
        label = "cpu (interpreter)" if interpreted else device
        print(f"{backend:8s} {label:17s} " + " ".join(f"{c:>22s}" for c in cells))
        sys.stdout.flush()
    print()
    if skipped:
        print("not checked here:")
        for backend, why in skipped.items():
            print(f"  {backend}: {why}")
        print()
    if caught:
        print("warnings raised while the cases ran:")
        for (backend, device, category, message, where), n in sorted(caught.items()):
            print(f"  {backend}/{device}: {n} x {category}: {message} ({where})")
        if any(key[:3] == ("triton", "cpu", "RuntimeWarning") for key in caught):
            print("  (the Triton interpreter computes with numpy, which warns on the inf and "
                  "NaN\n   arithmetic the non-finite and tiny-scale cases exercise on purpose; "
                  "the table\n   compares those results with the reference)")
        print()
    if failures:
        shown = set()
        for backend, device, op, c, msg in failures:
            if not args.verbose and (backend, device, op) in shown:
                continue
            shown.add((backend, device, op))
            print(f"FAIL {backend}/{device} {op} {c}:\n  {msg}")
        print()
        more = "" if args.verbose else " (first failure per backend and op above; " \
            "--verbose prints every one)"
        print(f"selftest FAILED: {len(failures)} case(s) differ from the reference{more}")
        sys.stdout.flush()
        return 1
    checked = ", ".join(f"{b}/{d}" for b, d in pairs)
    print(f"selftest passed: {checked} match the reference bit for bit"
          + (f"; not checked: {', '.join(skipped)}" if skipped else ""))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
