"""Check every backend on this machine against the reference: ``python -m gradzip.selftest``.

Runs the C++ CPU kernels, the reference itself, the CUDA kernels (when built and a GPU is
present) and the Triton kernels (on a GPU, or on CPU under the Triton interpreter) over a
battery of cases — bits, blocks, dtypes, odd sizes, error feedback, stochastic rounding,
non-finite input, top-k modes and value formats, dense and sparse accumulation — and
compares payload bytes and residual bits exactly with :mod:`gradzip.reference`. Prints the
build information and a pass/fail table; exits 1 on any mismatch.

Options: ``--backends cpu,cuda``, ``--quick`` (fewer cases), ``--verbose`` (each failure).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback

import torch

if not torch.cuda.is_available():
    # The Triton kernels can only run on CPU under the interpreter, which must be chosen
    # before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gradzip
from gradzip import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs that can run here."""
    out = [("cpu", "cpu"), ("torch", "cpu")]
    info = gradzip.build_info()
    if torch.cuda.is_available():
        if info["cuda_kernels_registered"]:
            out.append(("cuda", "cuda"))
        if info["triton"]:
            out.append(("triton", "cuda"))
    elif info["triton"] and os.environ.get("TRITON_INTERPRET") == "1":
        out.append(("triton", "cpu"))
    return out


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return a.shape == b.shape and torch.equal(a, b)


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
    assert _bits_equal(got, want), "payload bytes differ from the reference"
    assert _bits_equal(r, r_ref), "residual bits differ from the reference"


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
    assert _bits_equal(got, want), "payload bytes differ from the reference"
    assert _bits_equal(r, r_ref), "residual bits differ from the reference"


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
    assert _bits_equal(got, want), "accumulated output differs from the reference"


OPS = {
    "quantize_pack": (quantize_cases, run_quantize),
    "topk_select": (topk_cases, run_topk),
    "dequantize_accumulate": (accumulate_cases, run_accumulate),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", help="comma-separated subset of the available backends")
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--verbose", action="store_true", help="print every failure")
    args = ap.parse_args(argv)

    info = gradzip.build_info()
    print("gradzip", gradzip.__version__, "selftest")
    for key in sorted(info):
        print(f"  {key:26s} {info[key]}")
    print(f"  {'torch.cuda.is_available()':26s} {torch.cuda.is_available()}")
    pairs = available_backends()
    if args.backends:
        wanted = set(args.backends.split(","))
        pairs = [p for p in pairs if p[0] in wanted]
        missing = wanted - {p[0] for p in pairs}
        if missing:
            print(f"requested backends not available here: {sorted(missing)}")
            return 1
    print()
    header = f"{'backend':8s} {'device':7s} " + " ".join(f"{op:>22s}" for op in OPS)
    print(header)
    print("-" * len(header))
    failures = 0
    for backend, device in pairs:
        # The interpreter runs Triton kernels element by element in Python: small cases.
        limit = 5000 if (backend, device) == ("triton", "cpu") else 70000
        quick = args.quick or (backend, device) == ("triton", "cpu")
        cells = []
        for op, (cases, run) in OPS.items():
            passed = total = 0
            for c in cases(quick, limit):
                total += 1
                try:
                    run(backend, device, c)
                    passed += 1
                except Exception as e:  # noqa: BLE001  (a mismatch or any error is a failure)
                    failures += 1
                    if args.verbose:
                        print(f"FAIL {backend}/{device} {op} {c}: {e}")
                        if not isinstance(e, AssertionError):
                            traceback.print_exc()
            mark = "ok" if passed == total else "FAIL"
            cells.append(f"{passed:>6d}/{total:<6d} {mark:>4s}")
        print(f"{backend:8s} {device:7s} " + " ".join(f"{c:>22s}" for c in cells))
    print()
    if failures:
        print(f"selftest FAILED: {failures} case(s) differ from the reference "
              "(rerun with --verbose)")
        return 1
    print("selftest passed: every backend matches the reference bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
