"""bench/netlink.py (namespace link emulation, launcher) and smoke runs of the bench scripts."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import netlink  # bench/ is not a package: imported from its path
from bench_env import bench_env

needs_root = pytest.mark.skipif(netlink.root_problem() is not None,
                                reason=f"{netlink.root_problem()}")


class Recorder:
    """Stands in for subprocess.run: records argv lists, optionally fails one command."""

    def __init__(self, fail_on: str | None = None, listing: str = ""):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on
        self.listing = listing

    def __call__(self, argv):
        argv = list(argv)
        self.calls.append(argv)
        if self.fail_on is not None and self.fail_on in argv:
            raise subprocess.CalledProcessError(2, argv, "", "RTNETLINK answers: bad")
        out = self.listing if argv[:3] == ["ip", "netns", "list"] else ""
        return subprocess.CompletedProcess(argv, 0, out, "")


def _netns_names() -> list[str]:
    return netlink.list_namespaces()


# -- parsing and command construction ------------------------------------------------------


def test_parse_rate():
    assert netlink.parse_rate("none") is None
    assert netlink.parse_rate("1gbit") == 1e9
    assert netlink.parse_rate("10GBIT") == 10e9
    assert netlink.parse_rate("500mbit") == 500e6
    assert netlink.parse_rate("2.5gbit") == 2.5e9
    for bad in ("1gb", "fast", "0gbit", "-1gbit", ""):
        with pytest.raises(ValueError, match="link"):
            netlink.parse_rate(bad)


def test_parse_link_shared_and_per_rank():
    assert netlink.parse_link("none", 4) is None
    assert netlink.parse_link("1gbit", 4) == 1e9
    assert netlink.parse_link("1gbit/rank", 4) == 4e9
    assert netlink.parse_link("10gbit/rank", 3) == 30e9
    assert netlink.per_rank_rate("1gbit", 4) == 250e6
    assert netlink.per_rank_rate("1gbit/rank", 4) == 1e9
    with pytest.raises(ValueError, match="none"):
        netlink.parse_link("none/rank", 4)


def test_setup_commands_shaped():
    link = netlink.EmulatedLink(1e9, name="gz-test")
    # 1 ms at 1 Gbit/s is 125000 bytes, below the 128 KiB floor (two 64 KiB lo segments).
    assert link.burst_bytes == 128 << 10
    assert link.setup_commands() == [
        ["ip", "netns", "add", "gz-test"],
        ["ip", "netns", "exec", "gz-test", "ip", "link", "set", "lo", "up"],
        ["ip", "netns", "exec", "gz-test", "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
         "rate", "1000000000bit", "burst", "131072", "limit", str(64 << 20)],
    ]
    assert link.teardown_commands() == [["ip", "netns", "del", "gz-test"]]
    assert link.exec_prefix() == ["ip", "netns", "exec", "gz-test"]
    # At 10 Gbit/s one millisecond of traffic (1.25 MB) is the larger bound.
    assert netlink.EmulatedLink(10e9, name="x").burst_bytes == 1_250_000


def test_setup_commands_unshaped_has_no_qdisc():
    cmds = netlink.EmulatedLink(None, name="gz-u").setup_commands()
    assert cmds == [["ip", "netns", "add", "gz-u"],
                    ["ip", "netns", "exec", "gz-u", "ip", "link", "set", "lo", "up"]]


# -- cleanup on every way out ----------------------------------------------------------------


def test_context_removes_namespace_on_exception():
    rec = Recorder()
    with pytest.raises(KeyError), netlink.EmulatedLink(1e9, name="gz-exc", run=rec):
        raise KeyError("boom")
    assert rec.calls[-1] == ["ip", "netns", "del", "gz-exc"]
    assert "gz-exc" not in netlink._LIVE


def test_failed_setup_removes_namespace():
    rec = Recorder(fail_on="tbf")
    link = netlink.EmulatedLink(1e9, name="gz-half", run=rec)
    with pytest.raises(subprocess.CalledProcessError):
        link.create()
    assert rec.calls[0][:3] == ["ip", "netns", "add"]
    assert rec.calls[-1] == ["ip", "netns", "del", "gz-half"]
    assert not link.active


def test_remove_is_idempotent():
    rec = Recorder()
    link = netlink.EmulatedLink(None, name="gz-twice", run=rec)
    link.create()
    link.remove()
    link.remove()
    assert rec.calls.count(["ip", "netns", "del", "gz-twice"]) == 1


def test_stale_namespaces_only_dead_pids():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead, live = p.pid, os.getpid()
    names = [f"gz-{dead}", f"gz-{dead}-3", f"gz-{live}", f"gz-{live}-1", "other-ns", "gz-x"]
    assert netlink.stale_namespaces(names) == [f"gz-{dead}", f"gz-{dead}-3"]
    rec = Recorder(listing="\n".join(f"{n} (id: {i})" for i, n in enumerate(names)))
    assert netlink.remove_stale(rec) == [f"gz-{dead}", f"gz-{dead}-3"]
    assert ["ip", "netns", "del", f"gz-{live}"] not in rec.calls


_SIGNAL_CHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    sys.path.insert(0, {bench!r})
    import netlink
    log = open({log!r}, "a")
    def run(argv):
        log.write(" ".join(argv) + "\\n"); log.flush()
        return subprocess.CompletedProcess(argv, 0, "", "")
    link = netlink.EmulatedLink(1e9, name="gz-sig", run=run)
    link.create()
    os.kill(os.getpid(), signal.{sig})
    time.sleep(30)
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_removes_namespace(tmp_path, sig):
    log = tmp_path / "cmds.txt"
    code = _SIGNAL_CHILD.format(bench=str(BENCH), log=str(log), sig=sig)
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, check=False)
    # The handler cleans up, then exits by exception (finally blocks run) with the status
    # of death by that signal; SIGINT goes to Python's own handler (KeyboardInterrupt).
    if sig == "SIGINT":
        assert proc.returncode == -signal.SIGINT
    else:
        assert proc.returncode == 128 + getattr(signal, sig)
    lines = log.read_text().splitlines()
    assert lines[0] == "ip netns add gz-sig"
    assert lines[-1] == "ip netns del gz-sig"


# -- real namespaces (root) --------------------------------------------------------------


@needs_root
def test_real_namespace_shaped_and_removed():
    with netlink.EmulatedLink(1e9, name=f"gz-{os.getpid()}-t1") as link:
        assert link.name in _netns_names()
        q = link.qdisc()
        assert "tbf" in q and "rate 1Gbit" in q
        lo = subprocess.run(link.exec_prefix() + ["ip", "-o", "link", "show", "lo"],
                            capture_output=True, text=True, check=True).stdout
        assert "UP" in lo
    assert link.name not in _netns_names()


@needs_root
def test_real_namespace_removed_when_process_is_killed_by_signal():
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(BENCH)!r})
        import netlink
        link, eff = netlink.open_link("1gbit", world=4)
        print(link.name, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    name = proc.stdout.split()[0]
    assert name.startswith("gz-")
    assert proc.returncode == 128 + signal.SIGTERM
    assert name not in _netns_names()


@needs_root
def test_launch_ranks_in_namespace(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, socket
        with socket.socket() as s:       # binds only inside the private namespace
            s.bind(("127.0.0.1", 0))
        ns = os.readlink("/proc/self/ns/net")
        json.dump({{k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                   "MASTER_PORT", "OMP_NUM_THREADS")}} | {{"ns": ns}},
                  open({str(tmp_path)!r} + f"/r{{os.environ['RANK']}}.json", "w"))
    """))
    with netlink.EmulatedLink(None, name=f"gz-{os.getpid()}-t2") as link:
        netlink.launch([sys.executable, str(script)], 3, link, threads=1, timeout=120)
    got = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(3)]
    assert [g["RANK"] for g in got] == ["0", "1", "2"]
    assert {g["WORLD_SIZE"] for g in got} == {"3"}
    assert {g["MASTER_ADDR"] for g in got} == {"127.0.0.1"}
    assert {g["OMP_NUM_THREADS"] for g in got} == {"1"}
    # Every rank is in the same namespace, and it is not ours.
    assert len({g["ns"] for g in got}) == 1
    assert got[0]["ns"] != os.readlink("/proc/self/ns/net")


def test_launch_failure_names_rank_and_stops_the_others(tmp_path):
    script = tmp_path / "rank.py"
    marker = tmp_path / "survived"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(3)
        time.sleep(20)
        open({str(marker)!r}, "w").write("still running")
    """))
    with pytest.raises(RuntimeError, match="rank 1 exited with status 3") as e:
        netlink.launch([sys.executable, str(script)], 2, None, timeout=60)
    assert isinstance(e.value, netlink.RankFailed)
    assert (e.value.rank, e.value.returncode) == (1, 3)
    assert not marker.exists()
    assert not netlink._CHILDREN


# -- smoke runs of the scripts --------------------------------------------------------------


def _env() -> dict[str, str]:
    return bench_env()


@pytest.mark.slow
def test_allreduce_script_smoke(tmp_path):
    out = tmp_path / "ar.json"
    cmd = [sys.executable, str(BENCH / "allreduce.py"), "--link", "none", "--world", "2",
           "--sizes", "256KiB", "--reps", "2", "--warmup", "2", "--min-time", "0",
           "--split", "--baselines", "fp32,fp16_hook,powersgd_r1",
           "--codecs", "int8,topk:0.01", "--algorithms", "allgather,alltoall,auto",
           "--out", str(out)]
    proc = subprocess.run(cmd, check=True, env=_env(), timeout=600, cwd=ROOT,
                          capture_output=True, text=True)
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    res = {r["method"]: r for r in doc["results"]}
    assert set(res) == {"fp32", "fp16_hook", "powersgd_r1", "gz:int8:allgather",
                        "gz:int8:alltoall", "gz:int8:auto", "gz:topk:0.01:allgather",
                        "gz:topk:0.01:alltoall", "gz:topk:0.01:auto"}
    for r in res.values():
        assert "error" not in r, r
        assert r["identical_across_ranks"] and r["finite"], r
        assert r["median_s"] > 0 and r["speedup_vs_fp32"] > 0
        assert r["rel_err"] <= r["rel_err_limit"]
    # Wire bytes come from gradzip's own plan; the limit is fp32's ring bytes over them.
    import torch
    from gradzip import comm

    numel = 256 * 1024 // 4
    ring = comm.plan("int8", numel, torch.float32, 2, "plain").bytes_sent
    assert res["fp32"]["bytes_per_rank_theory"] == ring
    for m, r in res.items():
        if m.startswith("gz:"):
            sent = comm.plan(r["codec"], numel, torch.float32, 2, r["algorithm_used"]).bytes_sent
            assert r["bytes_per_rank_theory"] == sent
            assert r["wire_limit"] == pytest.approx(ring / sent)
            assert r["of_limit"] == pytest.approx(r["speedup_vs_fp32"] / r["wire_limit"])
            assert set(r["phases_slowest_s"]) == {"verify", "compress", "communicate",
                                                  "decompress"}
    assert 3.5 < res["gz:int8:allgather"]["wire_limit"] < 4
    # --split: where the time goes, per gradzip method; the main table has the limit.
    assert "communic." in proc.stdout and "of lim" in proc.stdout
    assert "gz:int8:alltoall" in doc["phase_table"]
    # fp32's result IS the exact mean (same collective); fp16 rounds each element once to
    # 11 significant bits (relative error <= 2^-11 ~ 4.9e-4 per element).
    assert res["fp32"]["rel_err"] == 0
    assert 0 < res["fp16_hook"]["rel_err"] < 4.9e-4
    # int8 with 127 levels per block: well under 2% relative error on Gaussian data;
    # top-k 1% keeps only the largest 1% of |v| and drops most of the energy.
    assert 0 < res["gz:int8:allgather"]["rel_err"] < 0.02
    assert 0.5 < res["gz:topk:0.01:allgather"]["rel_err"] <= 1.0
    assert "split" in res["gz:int8:allgather"]
    report = subprocess.run([sys.executable, str(BENCH / "allreduce.py"), "--report", str(out)],
                            check=True, env=_env(), timeout=120, cwd=ROOT, capture_output=True,
                            text=True).stdout
    assert "| wire-bytes limit | of limit |" in report
    if doc["links"][0]["namespace"]:
        # Counted on the private loopback: fp32 ring all-reduce sends 2(W-1)/W of the tensor
        # per rank; TCP/IP headers and acks add a little.
        m, t = res["fp32"]["bytes_per_rank_measured"], res["fp32"]["bytes_per_rank_theory"]
        assert t == 256 * 1024 and t <= m < 1.1 * t
        assert not [n for n in _netns_names() if n.startswith(f"gz-{os.getpid()}")]


@pytest.mark.slow
def test_train_script_smoke(tmp_path):
    out = tmp_path / "tr.json"
    cmd = [sys.executable, str(BENCH / "train.py"), "--quick", "--link", "none", "--world", "2",
           "--steps", "6", "--eval-every", "3", "--compress-warmup", "2", "--extend", "1",
           "--methods", "fp32,powersgd_r4,gz:int8,gz:sign:noef", "--no-progress",
           "--out", str(out)]
    subprocess.run(cmd, check=True, env=_env(), timeout=900, cwd=ROOT)
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert {(r["task"], r["method"]) for r in doc["runs"]} == {
        (t, m) for t in ("digits", "chargpt", "autoenc")  # bench/train.py's default tasks
        for m in ("fp32", "powersgd_r4", "gz:int8", "gz:sign:noef")}
    for r in doc["runs"]:
        assert "error" not in r, r
        assert r["params_identical_across_ranks"]
        steps = [e["step"] for e in r["evals"]]
        # accuracy for the classifiers, held-out R^2 (at most 1, negative early) for autoenc
        low = -math.inf if r["task"] == "autoenc" else 0
        assert all(e["loss"] == e["loss"] and low <= e["acc"] <= 1 for e in r["evals"])
        assert r["final_loss"] == r["evals"][2]["loss"]  # the loss after --steps
        if r["method"] == "fp32":
            assert steps == [0, 3, 6] and r["target_loss"] is None
            continue
        # Others go on (up to --extend x steps more) only until they reach fp32's loss.
        target = next(x["final_loss"] for x in doc["runs"]
                      if x["task"] == r["task"] and x["method"] == "fp32")
        assert r["target_loss"] == target
        assert steps == list(range(0, r["steps_run"] + 1, 3)) and 6 <= r["steps_run"] <= 12
        reached = [e["loss"] <= target for e in r["evals"][2:]]
        assert reached[-1] or r["steps_run"] == 12
        assert not any(reached[:-1])
    # Same seeds and weights: every method starts from the same evaluated loss.
    for task in ("digits", "chargpt", "autoenc"):
        first = {r["evals"][0]["loss"] for r in doc["runs"] if r["task"] == task}
        assert len(first) == 1


def test_train_script_optimizer_smoke(tmp_path):
    """gz-opt methods (CompressedAdamW) on the Adam task, with and without local steps:
    after the run every rank holds the same parameters, and the local-steps run sends
    fewer bytes than the warm-up's plain all-reduce."""
    out = tmp_path / "opt.json"
    cmd = [sys.executable, str(BENCH / "train.py"), "--quick", "--link", "none", "--world", "2",
           "--steps", "8", "--eval-every", "3", "--compress-warmup", "2", "--opt-warmup", "2",
           "--extend", "0", "--tasks", "autoenc", "--no-progress",
           "--methods", "fp32,gz-opt:sign,gz-opt:int4+local4", "--out", str(out)]
    subprocess.run(cmd, check=True, env=_env(), timeout=900, cwd=ROOT)
    doc = json.loads(out.read_text())
    runs = {r["method"]: r for r in doc["runs"]}
    assert set(runs) == {"fp32", "gz-opt:sign", "gz-opt:int4+local4"}
    for r in runs.values():
        assert "error" not in r, r
        assert r["params_identical_across_ranks"], r["method"]
        assert [e["step"] for e in r["evals"]] == [0, 3, 6, 8]
        assert r["final_loss"] == r["evals"][-1]["loss"]
    for m in ("gz-opt:sign", "gz-opt:int4+local4"):
        b = runs[m]["bytes_per_step"]
        assert 0 < b["after"] < b["warmup"] and b["warmup"] == runs["fp32"]["bytes_per_step"][
            "warmup"]
    bad = subprocess.run(cmd[:-4] + ["--methods", "gz-opt:int4+localx", "--out",
                                     str(tmp_path / "bad.json")],
                         env=_env(), timeout=900, cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert bad.returncode != 0 and "local<N>" in bad.stderr


@pytest.mark.slow
def test_auto_overhead_script_smoke(tmp_path):
    out = tmp_path / "ao.json"
    cmd = [sys.executable, str(BENCH / "auto_overhead.py"), "--world", "2", "--sizes",
           "64KiB", "--codecs", "int8,topk:0.01", "--rounds", "3", "--max-rounds", "4",
           "--verify", "once", "--out", str(out)]
    subprocess.run(cmd, check=True, env=_env(), timeout=600, cwd=ROOT)
    doc = json.loads(out.read_text())
    assert doc["verify"] == "once" and doc["world"] == 2
    assert [(r["codec"], r["size_bytes"]) for r in doc["results"]] == [
        ("int8", 65536), ("topk:0.01", 65536)]
    for r in doc["results"]:
        # "auto" settled (at its first or last look) on one of the three algorithms
        assert r["choice"] in ("plain", "allgather", "alltoall"), r
        from gradzip import comm

        # two kinds timed on 2 ranks (one compressed candidate and plain): comm.autotune
        assert r["settle_calls"] in (2 * comm.AUTO_FIRST_LOOK_ROUNDS + 1,
                                     2 * comm.AUTO_PROBES + 1), r
        assert 3 <= r["rounds"] <= 4 and len(r["auto_times_s"]) == r["rounds"]
        assert r["auto_vs_fp32"] == pytest.approx(r["auto_s"] / r["fp32_s"])
        assert r["fp32_s"] > 0 and r["fp32_again_s"] > 0


def test_latency_script_smoke(tmp_path):
    out = tmp_path / "lat.json"
    cmd = [sys.executable, str(BENCH / "latency.py"), "--world", "2", "--sizes", "64B,16KiB",
           "--rounds", "3", "--burst", "5", "--no-netns", "--out", str(out)]
    subprocess.run(cmd, check=True, env=_env(), timeout=600, cwd=ROOT)
    doc = json.loads(out.read_text())
    assert doc["world"] == 2 and doc["link"] == "none"
    assert [r["size_bytes"] for r in doc["rows"]] == [64, 16384]
    ops = ["all_reduce", "agreement", "agreement+all_reduce", "all_gather", "broadcast"]
    for r in doc["rows"]:
        assert list(r["median_s"]) == ops and all(len(r["times_s"][k]) == 3 for k in ops)
        assert all(v > 0 for v in r["median_s"].values())
        assert r["check_cost"] == pytest.approx(r["median_s"]["agreement+all_reduce"]
                                                / r["median_s"]["all_reduce"])
    assert [b["rank"] for b in doc["burst"]] == [0, 1]
    for b in doc["burst"]:
        assert b["s_per_call"] > 0 and b["cpu_share"] >= 0
        assert b["voluntary_switches_per_call"] >= 0


# -- two emulated nodes -------------------------------------------------------------------


def test_two_node_commands_only_loopback_range():
    run = Recorder()
    nodes = netlink.EmulatedNodes(1e9, base="gz-7-1", run=run)
    with nodes:
        pass
    cmds = [" ".join(c) for c in run.calls]
    assert cmds[0] == "ip netns add gz-7-1-n0" and cmds[1] == "ip netns add gz-7-1-n1"
    assert any("type veth peer name gzv1 netns gz-7-1-n1" in c for c in cmds)
    addrs = [c.split()[c.split().index("add") + 1] for c in cmds if " addr add " in c]
    assert addrs == ["127.1.0.1/16", "127.1.0.2/16"]  # 127.0.0.0/8 only
    assert sum("tbf rate 1000000000bit" in c for c in cmds) == 2  # both veth ends
    assert cmds[-2:] == ["ip netns del gz-7-1-n0", "ip netns del gz-7-1-n1"]
    assert netlink.stale_namespaces(["gz-999999999-1-n0"]) == ["gz-999999999-1-n0"]


@needs_root
def test_two_nodes_shape_only_the_inter_node_link(tmp_path):
    """4 ranks under torchrun on two emulated nodes: the launch is the real multi-node one
    (c10d rendezvous, ranks of a node consecutive), an all-reduce inside a node is fast and
    one across the 100 Mbit/s link takes about as long as its bytes need."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, time, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        nproc = int(os.environ["LOCAL_WORLD_SIZE"])
        shards = [dist.new_group([n * nproc + i for i in range(nproc)]) for n in range(2)]
        reps = [dist.new_group([n * nproc + i for n in range(2)]) for i in range(nproc)]
        x = torch.ones(1 << 20)  # 4 MiB
        out = {{"rank": rank, "group_rank": os.environ["GROUP_RANK"],
               "addr": os.environ.get("GLOO_SOCKET_IFNAME")}}
        for name, g in (("intra", shards[rank // nproc]), ("cross", reps[rank % nproc])):
            dist.all_reduce(x, group=g)
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x, group=g)
            out[name] = time.perf_counter() - t
        y = torch.tensor([float(rank)])
        dist.all_reduce(y)
        out["sum"] = y.item()
        json.dump(out, open({str(tmp_path)!r} + f"/r{{rank}}.json", "w"))
        dist.destroy_process_group()
    """))
    with netlink.EmulatedNodes(100e6) as nodes:
        names = {nodes.namespace(0), nodes.namespace(1)}
        assert names <= set(_netns_names())
        netlink.launch_nodes([str(script)], nodes, 2, timeout=240)
    assert not names & set(_netns_names())
    got = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(4)]
    assert [g["sum"] for g in got] == [6.0] * 4
    assert [g["group_rank"] for g in got] == ["0", "0", "1", "1"]
    assert [g["addr"] for g in got] == ["gzv0", "gzv0", "gzv1", "gzv1"]
    # cross-node: a ring all-reduce of 4 MiB between 2 ranks sends 4 MiB each way, 0.34 s
    # at 100 Mbit/s even for a replica group that had the link to itself (the two groups
    # share it: together they need 0.67 s)
    for g in got:
        assert g["cross"] >= 0.3, g
        assert g["intra"] < g["cross"] / 4, g


@needs_root
def test_fsdp_script_smoke(tmp_path):
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, str(BENCH / "fsdp.py"), "--quick", "--steps", "4", "--eval-every",
           "2", "--compress-warmup", "1", "--methods", "hsdp,rep-plain,rep:int8,rs:int4/bf16",
           "--out", str(out)]
    subprocess.run(cmd, check=True, env=_env(), timeout=900, cwd=ROOT)
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    runs = doc["links"]["1gbit"]["runs"]
    assert [r["method"] for r in runs] == ["hsdp", "rep-plain", "rep:int8", "rs:int4/bf16"]
    for r in runs:
        assert len(r["steps"]) == 4 and [e["step"] for e in r["evals"]] == [2, 4]
        assert all(e["loss"] == e["loss"] for e in r["evals"])
    # every method starts from the same weights and sees the same batches: after 2 steps the
    # losses agree to within what compression changes
    first = [r["evals"][0]["loss"] for r in runs]
    assert max(first) - min(first) < 0.05 * min(first)
    assert runs[1]["steps"][-1]["replicas_s"] > 0  # the replica hop was timed
    assert runs[3]["memory_bytes"]["reduce_scatter"] > 0
    assert not [n for n in _netns_names() if n.startswith(f"gz-{os.getpid()}")]
