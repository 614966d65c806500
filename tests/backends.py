"""Which (backend, device) pairs the op tests run on.

One place decides it, so every test file covers the same matrix:

* ``cpu/cpu``       always: the C++ kernels of ``gradzip._C``.
* ``torch/cpu``     the reference itself, for property tests (invariants, unbiasedness,
                    bounds) where running the specification is meaningful; never in the
                    "matches the reference" tests, which would compare it with itself.
* ``cuda/cuda``     when a CUDA device is present.
* ``triton/cuda``   when a CUDA device is present.
* ``triton/cpu``    under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU).
                    The interpreter is slow, so this target is *light*: sizes are capped at
                    ``INTERPRETER_MAX_NUMEL`` elements (odd sizes and tails kept) and the
                    big parameter products are thinned; tests/test_triton.py covers Triton
                    in depth.

A target whose kernel is not registered (the C++ CPU or CUDA kernels missing from this
build, ``gradzip.triton`` not importable) is still listed, and its tests are *skipped with
the reason*, so a missing kernel is visible in the summary rather than silently absent.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import gradzip  # loads gradzip._C, which registers torch.ops.gradzip.*
import pytest
import torch

OPS = ("quantize_pack", "topk_select", "dequantize_accumulate")

# The Triton interpreter runs every program instance in Python/numpy: a few thousand
# elements per call keep a test in the millisecond-to-second range.
INTERPRETER_MAX_NUMEL = 5000


@dataclass(frozen=True)
class Target:
    """One backend on one device."""

    backend: str
    device: str

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device}"

    @property
    def light(self) -> bool:
        """True for the Triton interpreter: small sizes and a thinned matrix only."""
        return self.backend == "triton" and self.device == "cpu"

    @property
    def max_numel(self) -> int | None:
        return INTERPRETER_MAX_NUMEL if self.light else None

    def fits(self, numel: int) -> bool:
        return self.max_numel is None or numel <= self.max_numel

    def __str__(self) -> str:  # shows up in assertion messages
        return self.id


def cuda_device_present() -> bool:
    return torch.cuda.is_available()


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_registered(op: str, dispatch_key: str) -> bool:
    """Whether ``gradzip::op`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gradzip::{op}", dispatch_key)


@functools.cache
def _triton_module_problem(op: str) -> str | None:
    try:
        mod = importlib.import_module("gradzip.triton")
    except Exception as e:  # noqa: BLE001  (any import failure means "not available")
        return f"gradzip.triton cannot be imported ({type(e).__name__}: {e})"
    if not callable(getattr(mod, op, None)):
        return f"gradzip.triton has no {op}()"
    return None


def unavailable(target: Target, op: str) -> str | None:
    """None when ``op`` can run on ``target``, else the reason it cannot."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    b, d = target.backend, target.device
    if b == "torch":
        return None
    if d == "cuda" and not cuda_device_present():
        return "no CUDA device"
    if b == "cpu":
        if not kernel_registered(op, "CPU"):
            return f"gradzip::{op} has no CPU kernel registered in this gradzip._C build"
        return None
    if b == "cuda":
        if not kernel_registered(op, "CUDA"):
            return (f"gradzip::{op} has no CUDA kernel registered (gradzip._C built without "
                    f"CUDA kernels: {gradzip.build_info().get('cuda_reason', 'unknown')})")
        return None
    if b == "triton":
        if d == "cpu" and not interpreter_on():
            return "Triton on CPU tensors needs TRITON_INTERPRET=1"
        return _triton_module_problem(op)
    raise ValueError(f"unknown backend {b!r}")


def candidate_targets(reference: bool = False, light: bool = True) -> list[Target]:
    """The pairs this machine could run, before asking whether kernels are registered.

    ``reference`` adds torch/cpu; ``light=False`` leaves out the Triton interpreter (for
    tests that need sizes far beyond its cap, e.g. statistical ones).
    """
    out = [Target("cpu", "cpu")]
    if reference:
        out.append(Target("torch", "cpu"))
    if cuda_device_present():
        out += [Target("cuda", "cuda"), Target("triton", "cuda")]
    elif light and interpreter_on():
        out.append(Target("triton", "cpu"))
    return out


def _param(target: Target, op: str | Sequence[str], values: tuple, id_: str):
    ops = [op] if isinstance(op, str) else list(op)
    reasons = [r for r in (unavailable(target, o) for o in ops) if r]
    marks = [pytest.mark.skip(reason=f"{target.id}: {reasons[0]}")] if reasons else []
    return pytest.param(target, *values, id=id_, marks=marks)


def targets(op: str | Sequence[str], *, reference: bool = False, light: bool = True) -> list:
    """``pytest.param(Target)`` for each candidate, skipped with a reason if ``op`` (or
    any of several ops) has no kernel there. Use with ``parametrize("target", ...)``."""
    return [_param(t, op, (), t.id) for t in candidate_targets(reference, light)]


def _fmt(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, bool):
        return "T" if v else "F"
    return str(v)


def product(
    op: str | Sequence[str],
    axes: Sequence[Iterable],
    *,
    reference: bool = False,
    light: bool = True,
    keep: Callable[..., bool] | None = None,
    keep_light: Callable[..., bool] | None = None,
    numel: Callable[..., int] | None = None,
) -> list:
    """``pytest.param(target, *combo)`` for every target and every combination of ``axes``.

    ``keep(*combo)`` drops combinations that are not defined (e.g. 1-bit stochastic).
    On the light (interpreter) target only combinations with ``keep_light(*combo)`` and
    ``numel(*combo) <= INTERPRETER_MAX_NUMEL`` are generated.
    """
    params = []
    axes = [list(a) for a in axes]
    for t in candidate_targets(reference, light):
        for combo in itertools.product(*axes):
            if keep is not None and not keep(*combo):
                continue
            if t.light:
                if keep_light is not None and not keep_light(*combo):
                    continue
                if numel is not None and not t.fits(numel(*combo)):
                    continue
            id_ = "-".join([t.id] + [_fmt(v) for v in combo])
            params.append(_param(t, op, combo, id_))
    return params


def describe_matrix() -> list[str]:
    """Lines for pytest's report header."""
    lines = []
    for t in candidate_targets(reference=True):
        problems = {op: unavailable(t, op) for op in OPS}
        missing = {op: r for op, r in problems.items() if r}
        state = "all ops run" if not missing else "; ".join(
            f"{op}: SKIPPED ({r})" for op, r in missing.items())
        extra = f" [interpreter, numel <= {INTERPRETER_MAX_NUMEL}]" if t.light else ""
        lines.append(f"gradzip target {t.id}{extra}: {state}")
    if not cuda_device_present():
        lines.append("gradzip targets cuda-cuda, triton-cuda: not in the matrix (no CUDA device)")
    return lines
