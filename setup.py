"""Build gradzip._C: C++ CPU kernels always, CUDA kernels when a CUDA toolchain is found.

Switches (environment variables, all optional):

* ``GRADZIP_CUDA=1``  build the CUDA kernels, and fail loudly if that is impossible.
* ``GRADZIP_CUDA=0``  never build them.
* unset               build them when torch is a CUDA build and ``nvcc`` is found.
* ``TORCH_CUDA_ARCH_LIST``  overrides the default targets (sm_80, 86, 89, 90 + PTX).
* ``CUDA_HOME``       overrides where the toolkit is; otherwise found from ``nvcc`` itself.

Nothing is downloaded and no GPU is needed to build. The build prints what it builds and,
file by file, how far it has got (``[gradzip build] compiled 3/14 ...``); pip shows a
build's output only with ``pip install -v``. ``gradzip.build_info()`` reports at run time
what was built.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
VERSION = "0.1.0"


def _log(msg: str) -> None:
    print(f"[gradzip build] {msg}", file=sys.stderr, flush=True)


def _nvcc_toolkit_root() -> str | None:
    """The toolkit directory of the ``nvcc`` on PATH, even when that ``nvcc`` is a wrapper
    script: ``nvcc --dryrun`` prints the directory of the real binary as ``_HERE_``."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        res = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^#\$ _HERE_=(.+)$", res.stdout + res.stderr, re.M)
    here = m.group(1).strip() if m else os.path.dirname(os.path.realpath(nvcc))
    root = os.path.dirname(here)
    return root if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) else None


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    return _nvcc_toolkit_root()


def _wheel_cuda_includes() -> list[str]:
    """Headers that torch's CUDA headers include (cusparse.h, cublas_v2.h, ...) ship in
    the nvidia-* pip wheels next to torch, not necessarily in the toolkit. Looked for
    beside torch itself too: in a venv made with --system-site-packages torch and its
    wheels live outside the venv's own site-packages."""
    import torch

    sites = {sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(torch.__file__))}
    return sorted({d for site in sites for d in glob.glob(os.path.join(site, "nvidia", "*",
                                                                       "include"))
                   if os.path.isdir(d)})


def _cuda_decision() -> tuple[bool, str | None, str]:
    """(build CUDA?, CUDA_HOME, reason)."""
    want = os.environ.get("GRADZIP_CUDA", "").strip().lower()
    if want in ("0", "off", "false", "no"):
        return False, None, "GRADZIP_CUDA=0"
    import torch

    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    home = _find_cuda_home()
    if home is None:
        problems.append("no nvcc found (PATH, CUDA_HOME, CUDA_PATH)")
    if not problems:
        return True, home, f"torch CUDA {torch.version.cuda}, toolkit at {home}"
    reason = "; ".join(problems)
    if want in ("1", "on", "true", "yes"):
        raise RuntimeError(f"GRADZIP_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, None, reason


class _Progress:
    """Says which object files the build has finished, as they appear (ninja compiles them
    in parallel and, under pip, its output is hidden unless ``pip install -v``)."""

    def __init__(self, build_temp: str, total: int) -> None:
        self.build_temp, self.total = build_temp, total
        self.start = time.time()
        self.seen: set[str] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _new_objects(self) -> list[str]:
        found = []
        for path in glob.glob(os.path.join(self.build_temp, "**", "*.o"), recursive=True):
            try:
                fresh = os.path.getmtime(path) >= self.start - 1
            except OSError:
                continue
            if fresh and path not in self.seen:
                self.seen.add(path)
                found.append(path)
        return sorted(found)

    def _report(self) -> None:
        for path in self._new_objects():
            name = os.path.relpath(path, self.build_temp)
            _log(f"compiled {len(self.seen)}/{self.total}: {name} "
                 f"({time.time() - self.start:.0f} s)")

    def _watch(self) -> None:
        while not self.done.wait(2.0):
            self._report()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self._report()
        if exc[0] is None:
            _log(f"compiled {len(self.seen)} of {self.total} files in "
                 f"{time.time() - self.start:.0f} s (the others were up to date)"
                 if len(self.seen) < self.total else
                 f"compiled {self.total} files in {time.time() - self.start:.0f} s")


def _with_progress(base):
    """``base`` (torch's BuildExtension) announcing what it compiles and how far it is."""

    class BuildWithProgress(base):
        def build_extensions(self) -> None:
            sources = [s for ext in self.extensions for s in ext.sources]
            cuda = sum(s.endswith(".cu") for s in sources)
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
            jobs = os.environ.get("MAX_JOBS") or f"{os.cpu_count()} (MAX_JOBS to change)"
            _log(f"compiling {len(sources)} files ({len(sources) - cuda} C++"
                 + (f", {cuda} CUDA for {archs}" if cuda else "") + f") with {jobs} parallel "
                 "jobs; pip shows this output with `pip install -v`")
            if cuda:
                _log("the CUDA kernels take most of the time (about 10 minutes on 2 cores "
                     "for 4 architectures); GRADZIP_CUDA=0 skips them, TORCH_CUDA_ARCH_LIST "
                     "narrows them to your GPU")
            with _Progress(self.build_temp, len(sources)):
                super().build_extensions()

    return BuildWithProgress


def _write_build_info(info: dict) -> None:
    """csrc/generated/build_info.h: what this build compiled, read by gradzip.build_info()."""
    os.makedirs(os.path.join(ROOT, "csrc", "generated"), exist_ok=True)
    text = ("// Generated by setup.py; do not edit.\n#pragma once\n"
            f"#define GRADZIP_BUILD_INFO {json.dumps(json.dumps(info, sort_keys=True))}\n")
    path = os.path.join(ROOT, "csrc", "generated", "build_info.h")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # leave the file alone when unchanged, so ninja does not rebuild
        with open(path, "w") as f:
            f.write(text)


def _extensions():
    build_cuda, cuda_home, reason = _cuda_decision()
    if build_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    if build_cuda:
        cpp_extension.CUDA_HOME = cuda_home
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    info = {
        "version": VERSION,
        "torch": torch.__version__,
        "cpu": True,
        "cuda": bool(build_cuda and cuda_sources),
        "cuda_version": torch.version.cuda if build_cuda else None,
        "cuda_archs": archs if build_cuda else None,
        "cuda_reason": reason,
    }
    _write_build_info(info)
    # Bit-exactness: no fast-math, no contraction of a*b+c into an FMA (DESIGN.md).
    cxx = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fopenmp",
           "-Wall", "-Wno-unknown-pragmas"]
    nvcc = ["-O3", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(name="gradzip._C", include_dirs=include_dirs, extra_link_args=["-fopenmp"],
                  py_limited_api=False)
    if info["cuda"]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        include_dirs += _wheel_cuda_includes()
        cxx.append("-DGRADZIP_WITH_CUDA=1")
        nvcc.append("-DGRADZIP_WITH_CUDA=1")
        ext = cpp_extension.CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
        _log(f"building C++ CPU kernels + CUDA kernels ({reason}); archs {archs}")
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx},
                                         **kwargs)
        _log(f"building C++ CPU kernels only; CUDA kernels skipped: {reason}")
    return [ext], _with_progress(cpp_extension.BuildExtension.with_options(use_ninja=True))


ext_modules, build_ext = _extensions()

setup(
    name="gradzip",
    version=VERSION,
    description="Fused gradient compression kernels and compressed all-reduce for PyTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    zip_safe=False,
)
