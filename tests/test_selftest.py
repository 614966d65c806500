"""python -m gradzip.selftest: which backends it checks, what it says about the others, and
that a mismatch, an error or a warning reaches the user in readable form."""

from __future__ import annotations

import warnings

import gradzip
import pytest
import torch
from gradzip import selftest

CPU_ONLY = {"cuda": False, "cuda_reason": "GRADZIP_CUDA=0", "cuda_kernels_registered": False,
            "triton": True}
CUDA_BUILD = {"cuda": True, "cuda_reason": None, "cuda_kernels_registered": True,
              "triton": True}


@pytest.mark.parametrize("info,gpu,cpu_kernels,interp,run,skipped", [
    # this project's machines: CPU-only build, no GPU, Triton under the interpreter
    (CPU_ONLY, False, True, True, [("cpu", "cpu"), ("triton", "cpu")],
     {"cuda": "not compiled: GRADZIP_CUDA=0"}),
    # a CUDA build on a machine without a GPU
    (CUDA_BUILD, False, True, True, [("cpu", "cpu"), ("triton", "cpu")],
     {"cuda": "compiled, not run: no GPU"}),
    (CUDA_BUILD, False, True, False, [("cpu", "cpu")],
     {"cuda": "compiled, not run: no GPU",
      "triton": "no GPU; run with TRITON_INTERPRET=1 to check it on CPU"}),
    # a GPU machine: everything runs
    (CUDA_BUILD, True, True, False, [("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda")], {}),
    (dict(CUDA_BUILD, triton=False), True, True, False, [("cpu", "cpu"), ("cuda", "cuda")],
     {"triton": "not installed"}),
    (dict(CPU_ONLY, cuda_reason="nvcc not found"), True, True, False,
     [("cpu", "cpu"), ("triton", "cuda")], {"cuda": "not compiled: nvcc not found"}),
    (dict(CPU_ONLY, cuda_reason=None), False, False, False, [],
     {"cpu": "not compiled: gradzip._C has no CPU kernels registered",
      "cuda": "not compiled: not in this build",
      "triton": "no GPU; run with TRITON_INTERPRET=1 to check it on CPU"}),
])
def test_plan_says_what_runs_and_why_not(info, gpu, cpu_kernels, interp, run, skipped):
    assert selftest.plan_backends(info, gpu, cpu_kernels, interp) == (run, skipped)


def test_plan_never_compares_the_reference_with_itself():
    for gpu in (False, True):
        run, skipped = selftest.plan_backends(CUDA_BUILD, gpu, True, True)
        assert "torch" not in {b for b, _ in run} | set(skipped)


def test_plan_here_matches_the_build():
    run, skipped = selftest.backends_here()
    info = gradzip.build_info()
    if not info["cuda_kernels_registered"]:
        assert skipped["cuda"] == f"not compiled: {info['cuda_reason']}"
    elif not torch.cuda.is_available():
        assert skipped["cuda"] == "compiled, not run: no GPU"
    assert set(skipped) | {b for b, _ in run} == {"cpu", "cuda", "triton"}


CASE = {"n": 1000, "bits": 4, "block": 32, "dtype": torch.float32, "rounding": "nearest",
        "special": "", "strided": False}


@pytest.fixture
def one_case(monkeypatch):
    """The selftest with one quantize_pack case, on the C++ CPU kernels only, on a machine
    where CUDA is compiled but there is no GPU."""
    monkeypatch.setattr(selftest, "OPS", {"quantize_pack": (lambda quick, limit: [CASE],
                                                            selftest.run_quantize)})
    monkeypatch.setattr(selftest, "backends_here",
                        lambda: ([("cpu", "cpu")], {"cuda": "compiled, not run: no GPU"}))


def test_passing_run_prints_the_table_and_what_it_did_not_check(one_case, capsys):
    assert selftest.main([]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("cpu ", "torch "))]
    assert rows == [["cpu", "cpu", "1/1", "ok"]]
    assert "not checked here:\n  cuda: compiled, not run: no GPU\n" in out
    assert out.rstrip().endswith("selftest passed: cpu/cpu match the reference bit for bit; "
                                 "not checked: cuda")


def test_mismatch_is_located_and_fails(one_case, monkeypatch, capsys):
    real = gradzip.quantize_pack

    def corrupt(*args, **kwargs):
        p = real(*args, **kwargs)
        p[64 + 4 * 3] ^= 1  # the scale of block 3 (1000 elements: 32 scales, 500 code bytes)
        return p

    monkeypatch.setattr(gradzip, "quantize_pack", corrupt)
    assert selftest.main([]) == 1
    out = capsys.readouterr().out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("cpu ")] == ["FAIL"]
    assert "FAIL cpu/cpu quantize_pack" in out
    assert "payload: 1 of 704 payload bytes differ; first at byte 76 (scales[block 3])" in out
    assert "selftest FAILED: 1 case(s) differ from the reference" in out


def test_error_is_a_failure_with_its_traceback(one_case, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gradzip, "quantize_pack", broken)
    assert selftest.main([]) == 1
    out = capsys.readouterr().out
    assert "Traceback" in out and "RuntimeError: kernel exploded" in out


def test_warnings_are_summarised_after_the_table(one_case, monkeypatch, capsys):
    def noisy(backend, device, c):
        for _ in range(3):
            warnings.warn("something odd", RuntimeWarning, stacklevel=1)
        selftest.run_quantize(backend, device, c)

    monkeypatch.setattr(selftest, "OPS", {"quantize_pack": (lambda quick, limit: [CASE], noisy)})
    assert selftest.main([]) == 0
    captured = capsys.readouterr()
    assert "something odd" not in captured.err
    lines = captured.out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("cpu "))
    warned = [i for i, line in enumerate(lines) if "something odd" in line]
    assert len(warned) == 1 and warned[0] > row
    assert lines[warned[0]].startswith("  cpu/cpu: 3 x RuntimeWarning: something odd (")
    assert "test_selftest.py:" in lines[warned[0]]


def test_requested_backends(one_case, capsys):
    assert selftest.main(["--backends", "cuda"]) == 1
    assert "cannot be checked here: cuda: compiled, not run: no GPU" in capsys.readouterr().out
    assert selftest.main(["--backends", "torch"]) == 1
    assert "unknown backend(s) ['torch']" in capsys.readouterr().out
    assert selftest.main(["--backends", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "not checked" not in out  # the user chose the subset
