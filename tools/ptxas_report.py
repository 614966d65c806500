"""Compile gradzip's CUDA sources with ptxas verbose output and report every kernel's resources.

    python tools/ptxas_report.py [--json PATH] [--archs 80,90] [--jobs N] [FILE.cu ...]

Each ``csrc/cuda/*.cu`` is compiled by the machine's ``nvcc`` with the flags and include
directories of the extension build (read from ``setup.py`` itself, so the two cannot drift),
for every target architecture (``TORCH_CUDA_ARCH_LIST`` or setup.py's default), device code
only (``--fatbin``) plus ``-Xptxas -v``. The ptxas lines are parsed into registers, shared
memory, stack frame and spill stores/loads per kernel and architecture, printed as a table
and optionally written as JSON.

Exit status: 0 all compiled without spills; 1 some kernel spills; 2 a compile failed;
3 no CUDA toolchain was found.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "setup.py")

# setup.py's helpers reused verbatim (executed from its source, not copied).
_SETUP_FUNCTIONS = ("_log", "_nvcc_toolkit_root", "_find_cuda_home", "_wheel_cuda_includes")


@dataclass
class BuildConfig:
    """What the extension build passes to nvcc, as read from setup.py."""

    default_archs: str
    nvcc_flags: list[str]
    helpers: dict = field(repr=False)


def read_setup(path: str = SETUP) -> BuildConfig:
    """Extract DEFAULT_ARCHS, the nvcc flag list (and its appends) and the toolkit-finding
    helpers from setup.py without running its setup() call."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    default_archs = None
    namespace: dict = {}
    # setup.py's own helper definitions are run (never its setup() call), so that toolkit
    # discovery here is the build's, not a copy of it.
    exec("import glob, os, re, shutil, subprocess, sys, sysconfig", namespace)  # noqa: S102
    flags: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "DEFAULT_ARCHS" for t in node.targets):
            default_archs = ast.literal_eval(node.value)
        if isinstance(node, ast.FunctionDef) and node.name in _SETUP_FUNCTIONS:
            code = compile(ast.Module(body=[node], type_ignores=[]), path, "exec")
            exec(code, namespace)  # noqa: S102
        if isinstance(node, ast.FunctionDef) and node.name == "_extensions":
            for sub in ast.walk(node):
                if (isinstance(sub, ast.Assign) and len(sub.targets) == 1
                        and isinstance(sub.targets[0], ast.Name) and sub.targets[0].id == "nvcc"):
                    flags = list(ast.literal_eval(sub.value))
            for sub in ast.walk(node):  # nvcc.append("...") in the CUDA branch
                if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
                        and sub.func.attr == "append" and isinstance(sub.func.value, ast.Name)
                        and sub.func.value.id == "nvcc" and len(sub.args) == 1
                        and isinstance(sub.args[0], ast.Constant)):
                    flags.append(sub.args[0].value)
    if default_archs is None or not flags:
        raise RuntimeError(f"could not read DEFAULT_ARCHS and the nvcc flags from {path}")
    return BuildConfig(default_archs, flags, namespace)


def parse_archs(spec: str) -> list[int]:
    """'8.0;8.6 9.0+PTX' -> [80, 86, 90] (ptxas compiles SASS for each; +PTX adds no SASS)."""
    out = []
    for item in re.split(r"[;\s,]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", item)
        if not m:
            raise ValueError(f"cannot parse architecture {item!r}")
        out.append(int(m.group(1)) * 10 + int(m.group(2)))
    return sorted(set(out))


@dataclass
class KernelReport:
    file: str
    arch: str
    kernel: str  # demangled
    registers: int = 0
    smem_bytes: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str, file: str) -> list[KernelReport]:
    """Turn ptxas -v output (one or several architectures) into one report per function."""
    reports: dict[tuple[str, str], KernelReport] = {}
    arch, entry, props = "?", None, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry, arch = m.group(1), m.group(2)
            reports.setdefault((arch, entry), KernelReport(file, arch, entry))
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _FRAME.search(line)) and props is not None:
            r = reports.setdefault((arch, props), KernelReport(file, arch, props))
            r.stack_bytes, r.spill_stores, r.spill_loads = map(int, m.groups())
            props = None
        elif (m := _USED.search(line)) and entry is not None:
            r = reports[(arch, entry)]
            r.registers = int(m.group(1))
            if s := _SMEM.search(line):
                r.smem_bytes = int(s.group(1))
    return list(reports.values())


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=False)
    out = res.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """'void gradzip::cuda::(anonymous namespace)::k<8, 0>(Args)' -> 'k<8, 0>'."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = re.sub(r"^void ", "", s)
    s = s.split("(", 1)[0]
    cut = s.find("<")
    head = s if cut < 0 else s[:cut]
    return s[head.rfind("::") + 2:] if "::" in head else s


def markdown_summary(kernels: list[KernelReport], archs: list[str]) -> str:
    """One row per kernel (template arguments folded): register range per architecture,
    static shared memory, and the largest spill."""
    groups: dict[tuple[str, str], list[KernelReport]] = {}
    for k in kernels:
        name = short_name(k.kernel).split("<", 1)[0]
        groups.setdefault((os.path.basename(k.file), name), []).append(k)
    head = "| file | kernel | " + " | ".join(f"regs {a}" for a in archs) + \
        " | static smem (B) | spills (B) |"
    lines = [head, "|" + "---|" * (len(archs) + 4)]
    for (file, name), ks in sorted(groups.items()):
        cells = []
        for a in archs:
            regs = sorted({k.registers for k in ks if k.arch == a})
            cells.append(f"{regs[0]}-{regs[-1]}" if len(regs) > 1 else (str(regs[0]) if regs else "-"))
        smem = sorted({k.smem_bytes for k in ks})
        spill = max(k.spill_stores + k.spill_loads for k in ks)
        lines.append(f"| {file} | `{name}` | " + " | ".join(cells) +
                     f" | {'/'.join(map(str, smem))} | {spill} |")
    return "\n".join(lines)


def nvcc_command(nvcc: str, source: str, archs: list[int], cfg: BuildConfig,
                 out_path: str) -> list[str]:
    os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
    # torch warns at import that no CUDA runtime (GPU) is present; irrelevant to compiling.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch
    from torch.utils import cpp_extension

    includes = [os.path.join(ROOT, "csrc")]
    includes += cpp_extension.include_paths(device_type="cuda")
    includes += cfg.helpers["_wheel_cuda_includes"]()
    includes.append(sysconfig.get_paths()["include"])
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [nvcc, "--fatbin", source, "-o", out_path, "-std=c++20",
           *cpp_extension.COMMON_NVCC_FLAGS, *cfg.nvcc_flags,
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xptxas", "-v"]
    for inc in includes:
        cmd += ["-I", inc]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cmd


def compile_one(nvcc: str, source: str, archs: list[int], cfg: BuildConfig):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = nvcc_command(nvcc, source, archs, cfg, os.path.join(tmp, "out.fatbin"))
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rel = os.path.relpath(source, ROOT)
    return rel, res.returncode, res.stdout + res.stderr, cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="sources (default: csrc/cuda/*.cu)")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--archs", help="e.g. 80,90 (default: TORCH_CUDA_ARCH_LIST or setup.py's)")
    ap.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: CPUs)")
    ap.add_argument("--verbose", action="store_true", help="print the nvcc commands")
    ap.add_argument("--markdown", action="store_true",
                    help="also print a per-kernel summary table (docs/kernels.md)")
    args = ap.parse_args(argv)

    cfg = read_setup()
    home = cfg.helpers["_find_cuda_home"]()
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if not nvcc or not os.path.exists(nvcc):
        print("ptxas_report: no CUDA toolkit found (nvcc on PATH, CUDA_HOME, CUDA_PATH)",
              file=sys.stderr)
        return 3
    if args.archs:
        archs = sorted({int(a) for a in args.archs.split(",")})
    else:
        archs = parse_archs(os.environ.get("TORCH_CUDA_ARCH_LIST") or cfg.default_archs)
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             check=False).stdout
    version = (re.findall(r"release [\d.]+, V[\d.]+", version) or ["?"])[0]
    print(f"nvcc {version} ({nvcc}); archs {', '.join(f'sm_{a}' for a in archs)}; "
          f"{len(files)} file(s)", flush=True)

    jobs = args.jobs or min(len(files), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda f: compile_one(nvcc, f, archs, cfg), files))

    kernels: list[KernelReport] = []
    failures = []
    for rel, rc, text, cmd in results:
        if args.verbose:
            print(" ".join(cmd))
        if rc != 0:
            failures.append({"file": rel, "returncode": rc, "output": text[-20000:]})
            print(f"\nCOMPILE FAILED: {rel} (exit {rc})\n{text[-6000:]}", file=sys.stderr)
            continue
        kernels += parse_ptxas(text, rel)
    names = demangle(sorted({k.kernel for k in kernels}))
    for k in kernels:
        k.kernel = names.get(k.kernel, k.kernel)
    kernels.sort(key=lambda k: (k.file, short_name(k.kernel), k.arch))

    header = f"{'file':28s} {'kernel':52s} {'arch':6s} {'regs':>4s} {'smem':>6s} " \
             f"{'stack':>5s} {'spill st':>8s} {'spill ld':>8s}"
    print(header)
    print("-" * len(header))
    for k in kernels:
        print(f"{os.path.basename(k.file):28s} {short_name(k.kernel)[:52]:52s} {k.arch:6s} "
              f"{k.registers:4d} {k.smem_bytes:6d} {k.stack_bytes:5d} {k.spill_stores:8d} "
              f"{k.spill_loads:8d}")
    if args.markdown:
        print()
        print(markdown_summary(kernels, [f"sm_{a}" for a in archs]))
    spills = [k for k in kernels if k.spill_stores or k.spill_loads]
    print(f"\n{len(kernels)} kernel builds, {len(spills)} with spills, "
          f"{len(failures)} failed compile(s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"nvcc": version, "archs": [f"sm_{a}" for a in archs],
                       "kernels": [asdict(k) for k in kernels], "failures": failures}, f,
                      indent=1)
    if failures:
        return 2
    if spills:
        for k in spills:
            print(f"SPILL: {short_name(k.kernel)} on {k.arch}: {k.spill_stores} bytes stored, "
                  f"{k.spill_loads} bytes loaded", file=sys.stderr)
        return 1
    if not kernels:
        print("no kernels found in the ptxas output", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
