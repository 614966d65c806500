"""bench/harness.py (the benchmarks' shared harness) and the correctness gate of the bench
scripts: a failed check stops a benchmark before it times anything, with exit status 3."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import harness  # bench/ is not a package: imported from its path
import netlink
from bench_env import bench_env


def _env() -> dict[str, str]:
    return bench_env()


# -- command lines --------------------------------------------------------------------------


def test_parse_size():
    assert harness.parse_size("4096") == 4096
    assert harness.parse_size("2^24") == 1 << 24
    assert harness.parse_size("64MiB") == 64 << 20
    assert harness.parse_size("512K") == 512 << 10
    assert harness.parse_size(" 1gib ") == 1 << 30
    assert harness.parse_size("256KiB", multiple_of=4) == 256 << 10
    assert harness.parse_sizes("2^10, 16KiB,,") == [1024, 16384]
    for bad in ("", "0", "-4", "4 parsecs", "2^x", "MiB", "1.5MiB"):
        with pytest.raises(ValueError, match="size"):
            harness.parse_size(bad)
    with pytest.raises(ValueError, match="multiple of 4"):
        harness.parse_size("6", multiple_of=4)


def test_split_specs_and_lists():
    assert harness.split_specs("int8,topk:0.01,exact=false,sign") == [
        "int8", "topk:0.01,exact=false", "sign"]
    assert harness.split_specs("") == []
    assert harness.split_list(" a, b,,c ") == ["a", "b", "c"]


def test_fmt_bytes():
    assert harness.fmt_bytes(None) == "-"
    assert harness.fmt_bytes(512) == "512 B"
    assert harness.fmt_bytes(64 << 20) == "64.00 MiB"
    assert harness.fmt_bytes(3 << 29) == "1.50 GiB"


# -- timing ---------------------------------------------------------------------------------


def test_measure_cpu_uses_torch_benchmark_with_the_callers_threads():
    seen = []

    def fn():
        seen.append(torch.get_num_threads())

    with harness.threads(1):
        t = harness.measure(fn, min_time_s=0.01)
    # torch.utils.benchmark.Timer's own default is 1 thread; the harness passes the caller's.
    assert set(seen) == {1}
    assert t.timer.startswith("torch.utils.benchmark")
    assert t.samples_ms and t.median_ms > 0 and t.calls_per_sample >= 1
    if torch.get_num_threads() > 1 or os.cpu_count() > 1:
        with harness.threads(2):
            harness.measure(fn, min_time_s=0)
        assert seen[-1] == 2


def test_measure_slow_call_is_warmed_up_then_timed_once():
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)

    t = harness.measure(slow, min_time_s=0)
    assert len(calls) == 2  # one warm-up call, one timed call
    assert t.calls_per_sample == 1 and len(t.samples_ms) == 1
    assert t.median_ms >= 50


def test_memcpy_gbps_positive():
    assert harness.memcpy_gbps(1 << 20, min_time_s=0.01) > 0


def test_machine_info_names_the_isa_path_and_build():
    import gradzip

    info = harness.machine_info()
    assert info["cpu_isa"] == gradzip.build_info()["cpu_isa"]
    assert info["gradzip_build"]["version"] == gradzip.build_info()["version"]
    assert info["collect_env"]["torch_version"] == torch.__version__
    assert info["cpus"] == os.cpu_count()
    json.dumps(info)  # goes into the result files as it is
    assert info["cpu_isa"] in harness.machine_line(info)


# -- correctness gate: collectives ---------------------------------------------------------


_CHECK_RANK = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {bench!r})
    import harness, netlink
    import torch
    import gradzip

    rank, world = netlink.join_group(1, 120)
    x = torch.randn(1 << 15, generator=torch.Generator().manual_seed(rank))
    exact = x.clone()
    torch.distributed.all_reduce(exact)
    exact /= world
    out = {{}}
    good = exact.clone()
    out["same"] = harness.check_all_reduce(good, exact, tolerance=1e-6).__dict__
    flipped = exact.clone()
    if rank == 1:
        flipped.view(torch.int32)[5] ^= 1
    out["flipped"] = harness.check_all_reduce(flipped, exact).__dict__
    nan = exact.clone()
    if rank == 0:
        nan[3] = float("nan")
    out["nan"] = harness.check_all_reduce(nan, exact).__dict__
    codec = gradzip.Codec("int8")
    for algo in ("allgather", "alltoall"):
        y = x.clone()
        gradzip.all_reduce(y, codec, state=gradzip.ErrorFeedback(), algorithm=algo)
        tol = harness.all_reduce_tolerance(codec, x, exact, algo)
        out[algo] = harness.check_all_reduce(y, exact, tolerance=tol).__dict__
        out[algo]["tolerance"] = tol
    # A result that lost the other rank's contribution is far outside the bound.
    y = x.clone()
    gradzip.all_reduce(y, codec, algorithm="allgather")
    tol = harness.all_reduce_tolerance(codec, x, exact, "allgather")
    alone = harness.check_all_reduce(y * 0 + x, exact, tolerance=tol)
    out["alone"] = alone.__dict__
    json.dump(out, open({out!r} + f"/r{{rank}}.json", "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


@pytest.mark.distributed
def test_check_all_reduce_verdicts_agree_on_every_rank(tmp_path):
    code = _CHECK_RANK.format(bench=str(BENCH), out=str(tmp_path))
    netlink.launch([sys.executable, "-c", code], 2, None, timeout=300)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 or all(r0[k]["problem"] == r1[k]["problem"] for k in r0)
    assert r0["same"] == {"identical": True, "finite": True, "rel_err": 0.0, "problem": None}
    assert not r0["flipped"]["identical"]
    assert "rank 1: differs from rank 0's" in r0["flipped"]["problem"]
    assert "[5]" in r0["flipped"]["problem"]
    assert r0["nan"]["finite"] is False and "rank 0: holds NaN" in r0["nan"]["problem"]
    for algo in ("allgather", "alltoall"):
        got = r0[algo]
        assert got["problem"] is None, got
        # int8 on Gaussian data: well inside the bound, and the bound is not vacuous.
        assert 0 < got["rel_err"] < got["tolerance"] < 0.1
    assert "exceeds" in r0["alone"]["problem"]


def test_stop_before_timing_exits_with_check_failed(capsys):
    with pytest.raises(SystemExit) as e:
        harness.stop_before_timing("int8 at 64 MiB", "rank 1: differs")
    assert e.value.code == harness.CHECK_FAILED
    assert "correctness check FAILED" in capsys.readouterr().err


_BAD_ALLREDUCE_RANK = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {bench!r})
    import allreduce
    import gradzip
    import torch.distributed as dist

    real = gradzip.all_reduce
    def wrong_on_rank_1(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        if dist.get_rank() == 1:
            t.view(-1)[7] += 1.0
        return out
    gradzip.all_reduce = wrong_on_rank_1
    allreduce.worker({cfg!r})
""")


@pytest.mark.distributed
def test_allreduce_worker_stops_before_timing_when_ranks_disagree(tmp_path):
    result = tmp_path / "result.json"
    cfg = {"sizes": [64 << 10], "baselines": [], "gz_methods": ["gz:int8:allgather"],
           "reps": 2, "warmup": 1, "min_time": 0, "max_reps": 2, "threads": 1, "seed": 0,
           "pg_timeout": 120, "gz_verify": None, "gz_min_numel": None,
           "result_path": str(result)}
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    code = _BAD_ALLREDUCE_RANK.format(bench=str(BENCH), cfg=str(cfg_path))
    proc_err = tmp_path / "err.txt"
    with open(proc_err, "w") as err, pytest.raises(netlink.RankFailed) as e:
        _launch_capturing_stderr(code, err)
    assert e.value.returncode == harness.CHECK_FAILED
    assert not result.exists()
    text = proc_err.read_text()
    assert "correctness check FAILED, stopping before timing: gz:int8:allgather" in text
    assert "rank 1: differs from rank 0's" in text


def _launch_capturing_stderr(code: str, err) -> None:
    """netlink.launch with the ranks' stderr in ``err`` (the launcher inherits ours)."""
    saved = os.dup(2)
    try:
        os.dup2(err.fileno(), 2)
        netlink.launch([sys.executable, "-c", code], 2, None, timeout=300)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@pytest.mark.parametrize("script", ["allreduce", "auto_overhead", "latency", "train"])
def test_parent_stops_when_a_rank_reports_a_failed_check(monkeypatch, tmp_path, capsys,
                                                         script):
    mod = __import__(script)

    def failing_launch(argv, world, link, **kwargs):
        raise netlink.RankFailed(0, harness.CHECK_FAILED, argv)

    monkeypatch.setattr(netlink, "launch", failing_launch)
    out = tmp_path / "out.json"
    args = {"allreduce": ["--codecs", "int8", "--algorithms", "allgather"],
            "auto_overhead": ["--sizes", "64KiB", "--codecs", "int8"],
            "latency": ["--sizes", "64B"],
            "train": ["--quick", "--tasks", "digits", "--methods", "fp32", "--no-progress"]}
    rc = mod.main(["--world", "2", "--link", "none", "--no-netns", "--out", str(out),
                   *args[script]])
    assert rc == harness.CHECK_FAILED
    assert not out.exists()
    assert "stopped: a correctness check failed" in capsys.readouterr().err


# -- correctness gate: kernels --------------------------------------------------------------


_BAD_KERNEL = textwrap.dedent("""
    import sys
    sys.path.insert(0, {bench!r})
    import harness
    import kernels

    real = kernels.gradzip.quantize_pack
    def one_byte_off(*args, **kwargs):
        p = real(*args, **kwargs)
        p[p.numel() // 2] ^= 1
        return p
    kernels.gradzip.quantize_pack = one_byte_off
    def never(*args, **kwargs):
        raise AssertionError("timed after a failed check")
    harness.measure = harness.memcpy_gbps = never
    sys.exit(kernels.main(["--sizes", "2^12", "--threads", "1", "--ops", "quantize",
                           "--json", {json!r}]))
""")


def test_kernels_stops_before_timing_when_a_payload_differs(tmp_path):
    out = tmp_path / "k.json"
    code = _BAD_KERNEL.format(bench=str(BENCH), json=str(out))
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == harness.CHECK_FAILED, proc.stderr
    assert "check FAIL quantize_pack bits=8" in proc.stdout
    assert "payload bytes differ" in proc.stdout
    assert "correctness check FAILED, stopping before timing" in proc.stderr
    assert not out.exists()


def test_kernels_smoke(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, str(BENCH / "kernels.py"), "--sizes", "2^12",
                           "--threads", "1", "--ops", "quantize,topk,accumulate",
                           "--min-time", "0.01", "--json", str(out)],
                          check=False, capture_output=True, text=True, env=_env(),
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["checks"] and all(c["ok"] for c in doc["checks"])
    import gradzip

    isa = gradzip.build_info()["cpu_isa"]
    assert doc["machine"]["cpu_isa"] == isa
    rows = doc["rows"]
    assert {r["backend"] for r in rows} == {"torch", "cpu", "reference"}
    for r in rows:
        assert r["cpu_isa"] == (isa if r["backend"] == "cpu" else "-")
        assert r["median_ms"] > 0 and r["samples_ms"] and r["calls_per_sample"] >= 1
        assert math.isfinite(r["speedup_vs_torch"])
    assert f" {isa} " in proc.stdout
