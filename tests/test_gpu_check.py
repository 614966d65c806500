"""tools/gpu_check.py, the prepared GPU check, as far as it can run without a GPU: its
command line, the step runner's time limits, the peak-bandwidth arithmetic, the pytest
report parsing, the JSON it writes when there is no GPU, and its microbenchmark code run
as a dry run on the C++ CPU kernels."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def test_command_line():
    args = gc.parse_args([])
    assert args.step_list == list(gc.STEPS)
    assert args.budget_s <= 600, "the whole check must fit in 10 minutes"
    assert "build" not in gc.parse_args(["--skip-build"]).step_list
    assert gc.parse_args(["--steps", "machine,microbench"]).step_list == ["machine",
                                                                          "microbench"]
    for bad in (["--steps", "machine,lint"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)


def test_every_step_has_a_limit_and_the_shell_wrapper_calls_the_tool():
    assert set(gc.STEP_LIMITS) == set(gc.STEPS)
    sh = (ROOT / "tools" / "gpu_check.sh").read_text()
    assert "tools/gpu_check.py" in sh and '"$@"' in sh


def test_peak_bandwidth():
    # H100 SXM: 2619 MHz HBM3 clock, 5120-bit bus -> 3.35 TB/s
    peak, source = gc.peak_gbps("NVIDIA H100 80GB HBM3", 2_619_000, 5120)
    assert peak == pytest.approx(3352.3, abs=0.1) and "bus width" in source
    peak, source = gc.peak_gbps("NVIDIA H200", 0, 0)
    assert peak == 4800.0 and "H200" in source
    peak, source = gc.peak_gbps("NVIDIA A100-SXM4-40GB", None, None)
    assert peak == 1555.0
    assert gc.peak_gbps("Some Future GPU", None, None)[0] is None
    assert gc.arch_of("9.0") == "9.0"
    with pytest.raises(ValueError):
        gc.arch_of("sm_90")


def test_step_runner_limits_and_failures():
    step = gc.Step("sleep")
    # a step whose child process outlives it would hold the output pipe open
    sleeper = ("import subprocess, sys, time; print('hi', flush=True); "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               "time.sleep(60)")
    out = gc.run_command(step, [sys.executable, "-c", sleeper], 1.5)
    assert step.status == "timeout" and step.seconds < 10 and "hi" in out
    step = gc.Step("fail")
    loud = "import sys; print('x' * 9000); sys.exit(3)"
    out = gc.run_command(step, [sys.executable, "-c", loud], 30)
    assert step.status == "failed" and step.returncode == 3
    assert len(out) > 9000 and len(step.output_tail) < 4100
    step = gc.Step("missing")
    gc.run_command(step, ["/nonexistent/binary"], 5)
    assert step.status == "failed" and "FileNotFoundError" in step.detail


def test_junit_summary(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda" name="test_a"/>
<testcase classname="tests.test_cuda" name="test_b"><failure message="boom"/></testcase>
<testcase classname="tests.test_cuda" name="test_c"><skipped message="needs X"/></testcase>
<testcase classname="tests.test_cuda" name="test_d"><error message="setup"/></testcase>
</testsuite></testsuites>""")
    s = gc.junit_summary(xml)
    assert (s["tests"], s["passed"], s["failed"], s["errors"], s["skipped"]) == (4, 1, 1, 1, 1)
    assert s["failures"] == ["tests.test_cuda::test_b", "tests.test_cuda::test_d"]
    assert s["skip_reasons"] == {"needs X": 1}
    assert gc.junit_summary(tmp_path / "absent.xml") == {"parsed": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU outcome")
def test_without_a_gpu_writes_json_and_exits_2(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--json", str(out)], check=False,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["ok"] is False and doc["machine"]["cuda_available"] is False
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == list(gc.STEPS)
    assert steps["machine"]["detail"] == "torch sees no CUDA device"
    assert all(s["status"] == "skipped" for n, s in steps.items() if n != "machine")


def test_microbench_dry_run_on_cpu():
    """The microbenchmark's own code (checks, rows, fractions) on the C++ CPU kernels."""
    res = gc.microbench(20_011, 100.0, 5, dev="cpu")
    assert res["problems"] == []
    ops = {(r["op"], r["config"], r["form"]) for r in res["rows"]}
    assert len([o for o in ops if o[0] == "quantize_pack"]) == 8  # 4 widths x 2 forms
    assert ("dequantize_accumulate", "W=8 int8 block=128 -> fp32", "-") in ops
    assert {o[1] for o in ops if o[0] == "topk_select"} == {"k=1% exact ef",
                                                            "k=1% approximate ef"}
    for r in res["rows"]:
        assert r["checked"] and r["median_ms"] > 0 and r["gbps"] > 0
        assert r["fraction_of_peak"] == pytest.approx(r["gbps"] / 100.0, abs=1e-3)
        if r["op"] != "topk_select":
            assert r["meets_target"] == (r["fraction_of_peak"] >= gc.TARGET_FRACTION)
    json.dumps(res)
