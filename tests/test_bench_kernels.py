"""bench/kernels.py's ISA paths and payload forms: every CPU row names the vector ISA path
that ran, --isas times each path in turn (each checked byte for byte first), and
quantize_pack / topk_select are timed both allocating and into a reused out= buffer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from bench_env import bench_env

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _env() -> dict[str, str]:
    return bench_env()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "kernels.py"), *args], check=False,
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)


def test_isas_and_forms(tmp_path):
    best = torch.ops.gradzip._cpu_isa()
    isas = ["scalar"] + ([best] if best != "scalar" else [])
    out = tmp_path / "k.json"
    proc = _run("--sizes", "2^12", "--threads", "1", "--ops", "quantize,topk,accumulate",
                "--min-time", "0.01", "--isas", ",".join(isas), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    exact = [c for c in doc["checks"] if c["kind"] == "byte-exact"]
    assert all(c["ok"] for c in doc["checks"])
    assert {c["cpu_isa"] for c in exact} == set(isas), "each ISA path checked before timing"
    assert all("out=" in c["detail"] for c in exact if c["op"] != "dequantize_accumulate")
    cpu = [r for r in doc["rows"] if r["backend"] == "cpu"]
    assert {r["cpu_isa"] for r in cpu} == set(isas)
    for op in ("quantize_pack", "topk_select"):
        for isa in isas:
            forms = {r["form"] for r in cpu if r["op"] == op and r["cpu_isa"] == isa}
            assert forms == {"alloc", "out="}, (op, isa, forms)
    assert {r["form"] for r in cpu if r["op"] == "dequantize_accumulate"} == {"-"}
    assert all(r["cpu_isa"] == "-" for r in doc["rows"] if r["backend"] != "cpu")
    assert torch.ops.gradzip._cpu_isa() == best  # the parent process is untouched


def test_unknown_isa_is_refused():
    proc = _run("--sizes", "2^12", "--isas", "sse9")
    assert proc.returncode == 2
    assert "--isas" in proc.stderr and "cpu isa must be" in proc.stderr
