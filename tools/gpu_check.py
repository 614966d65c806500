#!/usr/bin/env python3
"""One prepared check of gradzip on a GPU machine, within a fixed time budget.

    tools/gpu_check.sh                       # = python tools/gpu_check.py
    python tools/gpu_check.py --json gpu_check.json --budget-s 600
    python tools/gpu_check.py --skip-build   # gradzip already built with CUDA kernels here

Steps, in order, each with its own time limit inside the overall budget (default 600 s):

1. ``machine``   the GPU (name, compute capability, memory, peak HBM bandwidth from the
                 memory clock and bus width), driver, torch and CUDA versions.
2. ``build``     ``pip install --no-build-isolation --no-deps -e .`` with
                 ``GRADZIP_CUDA=1`` and ``TORCH_CUDA_ARCH_LIST`` set to this GPU's
                 architecture only (one target instead of five: minutes, not tens of
                 minutes), then checks that the CUDA kernels are registered.
3. ``selftest``  ``python -m gradzip.selftest``: every backend (C++ CPU, CUDA, Triton)
                 against the reference, byte for byte.
4. ``graph_and_compile``  the CUDA-graph capture/replay and torch.compile tests
                 (``pytest -m gpu -k "graph or torch_compile"``).
5. ``microbench``  each kernel at 2^26 float32 elements on the CUDA and Triton backends,
                 first checked byte for byte against the C++ CPU kernels on the same
                 inputs, then timed (``triton.testing.do_bench``, median): GB/s of logical
                 bytes, as a fraction of the GPU's peak HBM bandwidth and of a device copy
                 timed in the same run. Targets: quantize_pack and dequantize_accumulate
                 >= 0.85 of peak.
6. ``gpu_tests`` the other GPU tests (``pytest -m gpu``).
7. ``gpu_op_tests``  with the time left: the op test files' CUDA and Triton targets
                 (the full byte-exact matrix of tests/test_quantize_pack.py and friends).

Results go to one JSON file (``--json``, default ``gpu_check.json``), rewritten after each
step so that a run cut short still leaves what it found. Exit status 0 when every step
that ran passed, 1 when one failed or timed out, 2 when there is no usable GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("machine", "build", "selftest", "graph_and_compile", "microbench", "gpu_tests",
         "gpu_op_tests")
# Each step's own limit in seconds (the budget left can shorten it).
STEP_LIMITS = {"machine": 60, "build": 300, "selftest": 120, "graph_and_compile": 120,
               "microbench": 120, "gpu_tests": 180, "gpu_op_tests": 600}
# Peak HBM bandwidth (GB/s) by device name, for drivers that report no memory clock.
KNOWN_PEAK_GBPS = {
    "H200": 4800.0, "H100 SXM": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0,
    "H100 80GB HBM3": 3350.0, "GH200": 4000.0, "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0, "A100 80GB PCIe": 1935.0, "A100-PCIE-40GB": 1555.0,
    "L40S": 864.0, "L4": 300.0, "A10G": 600.0, "A10": 600.0,
}
TARGET_FRACTION = 0.85  # quantize_pack and dequantize_accumulate, of peak HBM bandwidth


# ---------------------------------------------------------------------------------------
# steps as subprocesses, each within a deadline
# ---------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    command: str = ""
    returncode: int | None = None
    detail: str = ""
    output_tail: str = ""
    result: dict = field(default_factory=dict)


def tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def run_command(step: Step, cmd: list[str], timeout_s: float, env: dict | None = None,
                cwd: Path = ROOT) -> str:
    """Run ``cmd`` for ``step`` with a time limit; fills status, returncode, output_tail
    and seconds, and returns the whole output (stdout and stderr interleaved)."""
    step.command = shlex.join(cmd)
    t0 = time.monotonic()
    out = ""
    try:
        # Its own process group, so that a step cut short takes its children with it (pip's
        # compilers, pytest's worker processes), and none keeps the output pipe open.
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
    except OSError as e:
        step.status = "failed"
        step.detail = f"{type(e).__name__}: {e}"
    else:
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout_s))
            step.returncode = proc.returncode
            step.status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            step.returncode = proc.returncode
            step.status = "timeout"
            step.detail = f"stopped after {timeout_s:.0f} s"
    step.seconds = round(time.monotonic() - t0, 1)
    step.output_tail = tail(out or "")
    return out or ""


def python_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)  # real Triton on the GPU
    env.update(extra or {})
    return env


def junit_summary(path: Path) -> dict:
    """Counts and failing test names from a pytest ``--junitxml`` file."""
    if not path.exists():
        return {"parsed": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"parsed": True, "tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
           "failures": [], "skip_reasons": {}}
    for suite in suites:
        for case in suite.iter("testcase"):
            out["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None:
                out["failed"] += 1
                out["failures"].append(name)
            elif case.find("error") is not None:
                out["errors"] += 1
                out["failures"].append(name)
            elif case.find("skipped") is not None:
                out["skipped"] += 1
                reason = case.find("skipped").get("message", "")[:200]
                out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
            else:
                out["passed"] += 1
    return out


# ---------------------------------------------------------------------------------------
# the GPU and its peak bandwidth
# ---------------------------------------------------------------------------------------


def peak_gbps(name: str, memory_clock_khz: int | None, bus_width_bits: int | None) -> tuple[
        float | None, str]:
    """Peak DRAM bandwidth in GB/s and where it came from: 2 transfers per memory clock
    (HBM and GDDR report the clock that way) times the bus width, else a table by name."""
    if memory_clock_khz and bus_width_bits:
        return 2 * memory_clock_khz * 1e3 * bus_width_bits / 8 / 1e9, "memory clock x bus width"
    for key in sorted(KNOWN_PEAK_GBPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return KNOWN_PEAK_GBPS[key], f"table entry {key!r}"
    return None, "unknown (no memory clock reported and no table entry)"


_MACHINE_SCRIPT = r"""
import json, torch
info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1),
                memory_clock_khz=getattr(p, "memory_clock_rate", None),
                memory_bus_width_bits=getattr(p, "memory_bus_width", None),
                l2_bytes=getattr(p, "L2_cache_size", None), devices=torch.cuda.device_count())
print("GPUCHECK_JSON " + json.dumps(info))
"""


def machine_step(step: Step, timeout_s: float) -> dict:
    out = run_command(step, [sys.executable, "-c", _MACHINE_SCRIPT], timeout_s, python_env())
    m = re.search(r"^GPUCHECK_JSON (.*)$", out, re.MULTILINE)
    info = json.loads(m.group(1)) if m else {}
    info.update(host=platform.node(), python=platform.python_version())
    try:
        query = "--query-gpu=name,driver_version,clocks.max.memory,memory.total"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"unavailable: {type(e).__name__}"
    if info.get("cuda_available"):
        peak, source = peak_gbps(info.get("name", ""), info.get("memory_clock_khz"),
                                 info.get("memory_bus_width_bits"))
        info["peak_gbps"], info["peak_source"] = peak, source
    elif step.status == "ok":
        step.status = "failed"
        step.detail = "torch sees no CUDA device"
    step.result = info
    return info


def arch_of(capability: str) -> str:
    """TORCH_CUDA_ARCH_LIST for one GPU: '9.0' -> '9.0' (sm_90); '12.0' stays."""
    if not re.fullmatch(r"\d+\.\d+", capability or ""):
        raise ValueError(f"not a compute capability: {capability!r}")
    return capability


# ---------------------------------------------------------------------------------------
# microbenchmark (runs in a child process: python tools/gpu_check.py --microbench-child)
# ---------------------------------------------------------------------------------------


def microbench(n: int, peak: float | None, rep_ms: int, dev: str = "cuda") -> dict:
    """Each kernel at n float32 elements on every GPU backend: checked against the C++ CPU
    kernels, then timed; GB/s of logical bytes, fraction of peak and of a device copy.
    (``dev="cpu"`` times the C++ CPU kernels against themselves with a plain clock: only a
    dry run of this function's own code on a machine without a GPU.)"""
    import gradzip
    import torch
    from gradzip import format as fmt
    from gradzip import testing

    info = gradzip.build_info()
    if dev == "cuda":
        import triton.testing

        backends = (["cuda"] if info["cuda_kernels_registered"] else []) + \
            (["triton"] if info["triton"] else [])

        def bench(fn) -> float:
            return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms,
                                                 return_mode="median"))
    else:
        backends = ["cpu"]

        def bench(fn) -> float:
            fn()
            times = []
            t_end = time.perf_counter() + rep_ms / 1e3
            while not times or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return sorted(times)[len(times) // 2]

    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(n, generator=g)
    r_cpu = torch.randn(n, generator=g) * 0.01
    x, r0 = x_cpu.to(dev), r_cpu.to(dev)

    src = torch.empty(n, device=dev).normal_()
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    copy_gbps = 8 * n / copy_ms / 1e6
    rows, problems = [], []

    def add(op, config, backend, form, ms, logical, checked):
        gbps = logical / ms / 1e6
        row = {"op": op, "config": config, "backend": backend, "form": form,
               "median_ms": round(ms, 4), "gbps": round(gbps, 3),
               "fraction_of_peak": round(gbps / peak, 3) if peak else None,
               "fraction_of_copy": round(gbps / copy_gbps, 3), "checked": checked}
        if op in ("quantize_pack", "dequantize_accumulate") and peak:
            row["target"] = TARGET_FRACTION
            row["meets_target"] = gbps / peak >= TARGET_FRACTION
        rows.append(row)
        print(f"{op:22s} {config:28s} {backend:7s} {form:5s} {ms:8.3f} ms {gbps:8.1f} GB/s "
              f"{row['fraction_of_peak']} of peak, {row['fraction_of_copy']} of copy",
              flush=True)

    for bits in (8, 4, 2, 1):
        size = fmt.dense_payload_bytes(n, bits, 128)
        logical = 12 * n + size  # read x and the residual, write the residual and payload
        r_want = r_cpu.clone()
        want = gradzip.quantize_pack(x_cpu, bits, 128, r_want, backend="cpu")
        for be in backends:
            r = r0.clone()
            got = gradzip.quantize_pack(x, bits, 128, r, backend=be)
            problem = testing.payload_mismatch(got, want) or testing.bits_mismatch(r, r_want)
            if problem:
                problems.append(f"quantize_pack bits={bits} [{be}]: {problem}")
                continue
            buf = torch.empty(size, dtype=torch.uint8, device=dev)
            for form, out in (("alloc", None), ("out=", buf)):
                ms = bench(lambda be=be, bits=bits, r=r, out=out: gradzip.quantize_pack(
                    x, bits, 128, r, backend=be, out=out))
                add("quantize_pack", f"bits={bits} block=128 ef", be, form, ms, logical, True)
    rows_w = torch.stack([gradzip.quantize_pack(x_cpu.roll(7919 * w), 8, 128, backend="cpu")
                          for w in range(8)])
    out0 = torch.randn(n, generator=g)
    want = out0.clone()
    gradzip.dequantize_accumulate(rows_w, want, 0.125, backend="cpu")
    rows_d = rows_w.to(dev)
    for be in backends:
        out = out0.to(dev)
        gradzip.dequantize_accumulate(rows_d, out, 0.125, backend=be)
        problem = testing.bits_mismatch(out, want)
        if problem:
            problems.append(f"dequantize_accumulate [{be}]: {problem}")
            continue
        ms = bench(lambda be=be, out=out: gradzip.dequantize_accumulate(rows_d, out, 0.125,
                                                                         backend=be))
        add("dequantize_accumulate", "W=8 int8 block=128 -> fp32", be, "-", ms,
            rows_d.numel() + 8 * n, True)
    k = n // 100
    for exact in (True, False):
        r_want = r_cpu.clone()
        want = gradzip.topk_select(x_cpu, k, r_want, exact, backend="cpu")
        for be in backends:
            r = r0.clone()
            got = gradzip.topk_select(x, k, r, exact, backend=be)
            problem = testing.payload_mismatch(got, want) or testing.bits_mismatch(r, r_want)
            if problem:
                problems.append(f"topk_select exact={exact} [{be}]: {problem}")
                continue
            buf = torch.empty(want.numel(), dtype=torch.uint8, device=dev)
            ms = bench(lambda be=be, buf=buf, r=r, exact=exact: gradzip.topk_select(
                x, k, r, exact, backend=be, out=buf))
            add("topk_select", f"k=1% {'exact' if exact else 'approximate'} ef", be, "out=", ms,
                12 * n + want.numel(), True)
    return {"n": n, "device": dev, "copy_gbps": round(copy_gbps, 1), "peak_gbps": peak,
            "copy_fraction_of_peak": round(copy_gbps / peak, 3) if peak else None,
            "backends": backends, "rows": rows, "problems": problems}


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------


@dataclass
class Report:
    json_path: Path
    budget_s: float
    started: float = field(default_factory=time.time)
    steps: list[Step] = field(default_factory=list)
    machine: dict = field(default_factory=dict)

    def remaining(self) -> float:
        return self.budget_s - (time.time() - self.started)

    def write(self) -> None:
        doc = {"tool": "gradzip tools/gpu_check.py", "started": time.strftime(
                   "%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
               "elapsed_s": round(time.time() - self.started, 1), "budget_s": self.budget_s,
               "root": str(ROOT), "machine": self.machine,
               "steps": [asdict(s) for s in self.steps],
               "ok": all(s.status in ("ok", "skipped") for s in self.steps)}
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.json_path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="gpu_check.json", help="where to write the results")
    ap.add_argument("--budget-s", type=float, default=570.0,
                    help="overall time limit in seconds (each step also has its own)")
    ap.add_argument("--skip-build", action="store_true",
                    help="use the gradzip already built here (must have CUDA kernels)")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4,
                    help="parallel compile jobs for the build (MAX_JOBS)")
    ap.add_argument("--bench-numel", type=int, default=1 << 26,
                    help="elements per microbenchmark tensor")
    ap.add_argument("--bench-rep-ms", type=int, default=200,
                    help="milliseconds of timed calls per microbenchmark row")
    ap.add_argument("--microbench-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peak-gbps", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bench-device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    if args.budget_s <= 0:
        ap.error("--budget-s must be positive")
    if args.skip_build and "build" in steps:
        steps.remove("build")
    args.step_list = steps
    return args


def _pytest(step: Step, report: Report, args, name: str, extra: list[str]) -> None:
    xml = report.json_path.with_name(report.json_path.stem + f".{name}.xml")
    limit = min(STEP_LIMITS[name], report.remaining() - 5)
    run_command(step, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       f"--junitxml={xml}", *extra], limit, python_env())
    step.result = junit_summary(xml)
    if step.status == "ok" and step.result.get("parsed") and step.result["tests"] == 0:
        step.status = "failed"
        step.detail = "no test ran"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.microbench_child:
        res = microbench(args.bench_numel, args.peak_gbps, args.bench_rep_ms,
                         args.bench_device)
        print("GPUCHECK_JSON " + json.dumps(res))
        return 1 if res["problems"] else 0

    report = Report(Path(args.json).resolve(), args.budget_s)
    report.json_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: steps {', '.join(args.step_list)}; budget {args.budget_s:.0f} s; "
          f"results -> {report.json_path}", flush=True)

    def begin(name: str) -> Step:
        step = Step(name)
        report.steps.append(step)
        return step

    def done(step: Step) -> None:
        msg = f" ({step.detail})" if step.detail else ""
        print(f"gpu_check: {step.name}: {step.status} in {step.seconds:.0f} s{msg}", flush=True)
        report.write()

    # 1. machine (always: everything else needs to know there is a GPU)
    step = begin("machine")
    machine = machine_step(step, min(STEP_LIMITS["machine"], report.remaining()))
    report.machine = machine
    done(step)
    if not machine.get("cuda_available"):
        for name in args.step_list:
            if name != "machine":
                s = begin(name)
                s.status, s.detail = "skipped", "no CUDA device"
        report.write()
        print("gpu_check: no CUDA device: nothing else to check", flush=True)
        return 2

    for name in args.step_list:
        if name == "machine":
            continue
        step = begin(name)
        left = report.remaining()
        if left < 20:
            step.status, step.detail = "skipped", f"budget spent ({left:.0f} s left)"
            done(step)
            continue
        if name == "build":
            arch = arch_of(machine["capability"])
            env = python_env({"GRADZIP_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch,
                              "MAX_JOBS": str(args.jobs)})
            run_command(step, [sys.executable, "-m", "pip", "install", "--no-build-isolation",
                               "--no-deps", "-e", "."], min(STEP_LIMITS[name], left - 5), env)
            step.result = {"TORCH_CUDA_ARCH_LIST": arch}
            if step.status == "ok":
                probe = Step("build probe")
                code = ("import gradzip, json; "
                        "print('GPUCHECK_JSON ' + json.dumps(gradzip.build_info()))")
                out = run_command(probe, [sys.executable, "-c", code], 60, python_env(),
                                  cwd=Path("/"))
                m = re.search(r"^GPUCHECK_JSON (.*)$", out, re.MULTILINE)
                info = json.loads(m.group(1)) if m else {}
                step.result["build_info"] = info
                if not info.get("cuda_kernels_registered"):
                    step.status = "failed"
                    step.detail = "built, but the CUDA kernels are not registered"
        elif name == "selftest":
            run_command(step, [sys.executable, "-m", "gradzip.selftest"],
                        min(STEP_LIMITS[name], left - 5), python_env(), cwd=Path("/"))
        elif name == "graph_and_compile":
            _pytest(step, report, args, name, ["-m", "gpu", "-k", "graph or torch_compile",
                                               "tests/test_cuda.py", "tests/test_triton.py"])
        elif name == "gpu_tests":
            _pytest(step, report, args, name, ["-m", "gpu", "-k",
                                               "not (graph or torch_compile)"])
        elif name == "microbench":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--microbench-child",
                   "--bench-numel", str(args.bench_numel), "--bench-rep-ms",
                   str(args.bench_rep_ms)]
            if machine.get("peak_gbps"):
                cmd += ["--peak-gbps", str(machine["peak_gbps"])]
            out = run_command(step, cmd, min(STEP_LIMITS[name], left - 5), python_env())
            m = re.search(r"^GPUCHECK_JSON (.*)$", out, re.MULTILINE)
            step.result = json.loads(m.group(1)) if m else {}
            missed = [f"{r['op']} {r['config']} [{r['backend']} {r['form']}]: "
                      f"{r['fraction_of_peak']}" for r in step.result.get("rows", [])
                      if r.get("meets_target") is False]
            step.result["missed_targets"] = missed
        elif name == "gpu_op_tests":
            if left < 60:
                step.status, step.detail = "skipped", f"only {left:.0f} s left"
            else:
                _pytest(step, report, args, name, [
                    "-k", "cuda", "tests/test_quantize_pack.py", "tests/test_topk_select.py",
                    "tests/test_dequantize_accumulate.py", "tests/test_payload_out.py"])
        done(step)

    report.write()
    bad = [s.name for s in report.steps if s.status not in ("ok", "skipped")]
    print(f"gpu_check: {'all steps passed' if not bad else 'FAILED: ' + ', '.join(bad)}; "
          f"{time.time() - report.started:.0f} s; {report.json_path}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
