"""Emulated network link for collective benchmarks, and the launcher that runs ranks in it.

A slow link is emulated on one machine with a private network namespace whose loopback
device carries a token-bucket (``tc ... tbf``) rate limit; every rank runs inside that
namespace and talks to 127.0.0.1 only, so no packet ever leaves the machine and the
benchmark's traffic is isolated from (and counted separately from) everything else.

What the emulation models: ``lo`` is ONE device, so the token bucket limits the SUM of
what all ranks send, like W hosts on one shared medium of the given rate (a hub), not W
hosts each with its own full-duplex NIC on a switch. Every byte any rank sends passes the
bucket once, so a collective that moves ``b`` bytes per rank takes about ``W * b / rate``
on this link. Ratios between methods (which is what speed-ups are) follow the ratios of
the bytes they send either way; absolute times are W times those of a switched network
of the same per-port rate. A spec ``"1gbit/rank"`` emulates the switched case instead:
the shared bucket runs at W x 1 Gbit/s, so in the symmetric collectives benchmarked here
each rank gets 1 Gbit/s (:func:`parse_link`).

Namespaces and qdiscs need root (CAP_NET_ADMIN and CAP_SYS_ADMIN). Without root the
launcher says so and runs the ranks on the host's loopback unshaped (``--link none``).
Every namespace this module creates is removed on normal exit, on an exception
(``try/finally``), at interpreter exit (``atexit``) and on SIGINT/SIGTERM/SIGHUP; one left
behind by a process that was SIGKILLed is removed by the next run (it is named
``gz-<pid>`` and its pid is no longer alive).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing.Self is 3.11+; the package supports 3.10
    from typing_extensions import Self

PREFIX = "gz-"
LINK_PRESETS = {"none": None, "100mbit": 100e6, "1gbit": 1e9, "2.5gbit": 2.5e9,
                "5gbit": 5e9, "10gbit": 10e9, "25gbit": 25e9, "40gbit": 40e9}
_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def parse_rate(spec: str) -> float | None:
    """Link spec -> bits per second; ``"none"`` -> ``None`` (unshaped).

    Accepts the presets (``1gbit``, ``10gbit``, ...) and ``<number><k|m|g|t>bit``.
    """
    s = spec.strip().lower()
    if s in LINK_PRESETS:
        return LINK_PRESETS[s]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)bit", s)
    if not m:
        raise ValueError(f"link must be 'none' or a rate like '1gbit', '500mbit', got {spec!r}")
    rate = float(m.group(1)) * _UNITS[m.group(2)]
    if rate <= 0:
        raise ValueError(f"link rate must be positive, got {spec!r}")
    return rate


def _default_run(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True)


def root_problem() -> str | None:
    """Why a namespace cannot be made here, or ``None`` when it can."""
    if os.geteuid() != 0:
        return ("network-namespace link emulation needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); "
                f"running as uid {os.geteuid()}")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network-namespace link emulation needs iproute2's `{tool}` on PATH"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_namespaces(names: Sequence[str]) -> list[str]:
    """Our namespaces (``gz-<pid>[-n]``) whose creating process no longer exists."""
    stale = []
    for name in names:
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)(?:-\d+)?(?:-n\d+)?", name)
        if m and not _pid_alive(int(m.group(1))):
            stale.append(name)
    return stale


def list_namespaces(run: Runner = _default_run) -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    # Lines look like "gz-123" or "gz-123 (id: 4)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class _Namespaces:
    """Lifecycle shared by the emulations: run ``setup_commands()`` (removing everything
    again if one fails), ``teardown_commands()`` on every way out, register for cleanup."""

    name: str
    run: Runner
    active: bool

    def setup_commands(self) -> list[list[str]]:
        raise NotImplementedError

    def teardown_commands(self) -> list[list[str]]:
        raise NotImplementedError

    def create(self) -> None:
        _install_cleanup_handlers()
        _LIVE[self.name] = self
        self.active = True
        try:
            for cmd in self.setup_commands():
                self.run(cmd)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove the namespace(s); safe to call twice and from a signal handler."""
        if not self.active:
            return
        self.active = False
        _LIVE.pop(self.name, None)
        for cmd in self.teardown_commands():
            try:
                self.run(cmd)
            except (subprocess.CalledProcessError, OSError) as e:
                err = getattr(e, "stderr", "") or str(e)
                # Deleting a namespace that was never made is not an error worth a message.
                if "No such file" not in err:
                    print(f"[netlink] warning: could not remove netns {cmd[-1]}: {err}",
                          file=sys.stderr)

    def __enter__(self) -> Self:
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class EmulatedLink(_Namespaces):
    """A private network namespace whose loopback is rate-limited (or not, ``rate=None``).

    Use as a context manager; the namespace exists between ``__enter__`` and ``__exit__``
    and is removed on every way out. ``burst`` is the token bucket depth: it must hold at
    least one maximal loopback segment (64 KiB with GSO) or tbf drops it, and it bounds
    how far above ``rate`` a short transfer can go. ``limit`` is the queue in bytes: large
    enough that TCP on loopback never sees a tail drop (a drop costs a 200 ms minimum RTO
    on lo and would measure TCP recovery, not the link).
    """

    rate_bps: float | None
    burst_bytes: int | None = None
    limit_bytes: int = 64 << 20
    name: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    run: Runner = _default_run
    active: bool = False

    def __post_init__(self) -> None:
        if self.rate_bps is not None and self.burst_bytes is None:
            # 1 ms of traffic at the line rate, and never below two 64 KiB segments.
            self.burst_bytes = max(int(self.rate_bps / 8 / 1000), 128 << 10)

    # -- the commands (kept separate from running them so tests can check them) -------

    def setup_commands(self) -> list[list[str]]:
        cmds = [["ip", "netns", "add", self.name],
                ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"]]
        if self.rate_bps is not None:
            cmds.append(["ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", "lo",
                         "root", "tbf", "rate", f"{int(self.rate_bps)}bit",
                         "burst", str(self.burst_bytes), "limit", str(self.limit_bytes)])
        return cmds

    def teardown_commands(self) -> list[list[str]]:
        return [["ip", "netns", "del", self.name]]

    def exec_prefix(self) -> list[str]:
        """Argv prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def qdisc(self) -> str:
        return self.run(self.exec_prefix() + ["tc", "qdisc", "show", "dev", "lo"]).stdout.strip()


@dataclass
class EmulatedNodes(_Namespaces):
    """Two emulated hosts ("nodes") on one machine, joined by a rate-limited link.

    Each node is a private network namespace; a veth pair joins them, its ends carrying
    ``127.1.0.1/16`` (node 0) and ``127.1.0.2/16`` (node 1), with ``route_localnet`` on
    so that loopback-range addresses may live on a veth, and a token bucket (``tc ...
    tbf``) on each end. Ranks of a node bind Gloo to their node's veth address
    (``GLOO_SOCKET_IFNAME``): traffic between two ranks of one node goes to a local
    address and stays on the node's loopback path, unshaped (like NVLink or shared memory
    inside a host); traffic between nodes crosses the veth and is limited to ``rate_bps``
    in each direction (a full-duplex link). Only 127.0.0.0/8 addresses, only inside
    namespaces this object creates and removes.
    """

    rate_bps: float | None
    burst_bytes: int | None = None
    limit_bytes: int = 64 << 20
    base: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{_next_id()}")
    run: Runner = _default_run
    active: bool = False
    count: int = 2

    def __post_init__(self) -> None:
        if self.count != 2:
            raise ValueError("EmulatedNodes joins exactly two nodes (one veth pair)")
        if self.rate_bps is not None and self.burst_bytes is None:
            self.burst_bytes = max(int(self.rate_bps / 8 / 1000), 128 << 10)

    @property
    def name(self) -> str:  # for the cleanup registry
        return self.base

    def namespace(self, node: int) -> str:
        return f"{self.base}-n{node}"

    @staticmethod
    def device(node: int) -> str:
        return f"gzv{node}"

    @staticmethod
    def address(node: int) -> str:
        return f"127.1.0.{node + 1}"

    def setup_commands(self) -> list[list[str]]:
        a, b = self.namespace(0), self.namespace(1)
        cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
                ["ip", "-n", a, "link", "set", "lo", "up"],
                ["ip", "-n", b, "link", "set", "lo", "up"],
                ["ip", "link", "add", self.device(0), "netns", a, "type", "veth", "peer",
                 "name", self.device(1), "netns", b]]
        for node, ns in enumerate((a, b)):
            dev = self.device(node)
            cmds += [["ip", "netns", "exec", ns, "sysctl", "-qw",
                      "net.ipv4.conf.all.route_localnet=1",
                      f"net.ipv4.conf.{dev}.route_localnet=1"],
                     ["ip", "-n", ns, "addr", "add", f"{self.address(node)}/16", "dev", dev],
                     ["ip", "-n", ns, "link", "set", dev, "up"]]
            if self.rate_bps is not None:
                cmds.append(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev,
                             "root", "tbf", "rate", f"{int(self.rate_bps)}bit", "burst",
                             str(self.burst_bytes), "limit", str(self.limit_bytes)])
        return cmds

    def teardown_commands(self) -> list[list[str]]:
        # Deleting a namespace deletes the veth end in it, and with it the pair.
        return [["ip", "netns", "del", self.namespace(n)] for n in range(self.count)]

    def exec_prefix(self, node: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(node)]


def launch_nodes(argv: Sequence[str], nodes: EmulatedNodes, nproc_per_node: int, *,
                 threads: int = 1, timeout: float | None = None, port: int = 29400) -> None:
    """Run ``argv`` under ``torchrun --nnodes 2 --nproc-per-node N``, one launch inside each
    node's namespace, with c10d rendezvous on node 0's address: the real multi-node
    start-up. Ranks of one node get consecutive global ranks (torchrun: RANK = node rank *
    N + LOCAL_RANK). Raises :class:`RankFailed` (rank = the node) if a launch fails."""
    _install_cleanup_handlers()
    procs: list[subprocess.Popen] = []
    try:
        for node in range(nodes.count):
            env = dict(os.environ)
            env.update(GLOO_SOCKET_IFNAME=nodes.device(node), OMP_NUM_THREADS=str(threads),
                       PYTHONUNBUFFERED="1")
            for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
                env.pop(var, None)
            cmd = nodes.exec_prefix(node) + [
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes", str(nodes.count), "--nproc-per-node", str(nproc_per_node),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{nodes.address(0)}:{port}",
                "--rdzv-id", nodes.base,
                # node 0 hosts the rendezvous store; every 127.x address looks local to
                # torchrun, so say which node is the host instead of letting it guess
                "--rdzv-conf", f"is_host={1 if node == 0 else 0}",
                "--max-restarts", "0", "--local-addr", nodes.address(node), *argv]
            p = subprocess.Popen(cmd, env=env)
            _CHILDREN[p.pid] = p
            procs.append(p)
        _wait_all(procs, argv, timeout, "nodes")
    finally:
        for p in procs:
            _stop(p)
            _CHILDREN.pop(p.pid, None)


# -- cleanup on every way out ---------------------------------------------------------------

_LIVE: dict[str, _Namespaces] = {}
_CHILDREN: dict[int, subprocess.Popen] = {}
_HANDLERS_INSTALLED = False


def _cleanup_all() -> None:
    for proc in list(_CHILDREN.values()):
        _stop(proc)
    _CHILDREN.clear()
    for link in list(_LIVE.values()):
        link.remove()


_PREVIOUS: dict[int, object] = {}


def _on_signal(signum, frame) -> None:
    _cleanup_all()
    prev = _PREVIOUS.get(signum)
    if callable(prev):
        # e.g. Python's SIGINT handler, which raises KeyboardInterrupt in the main thread.
        prev(signum, frame)
        return
    if prev == signal.SIG_IGN:
        return
    # The default action would end the process on the spot; exiting by exception instead
    # lets every ``finally`` and context manager run (temporary files, output), with the
    # shell's status for death by that signal.
    raise SystemExit(128 + signum)


def _install_cleanup_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    atexit.register(_cleanup_all)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            _PREVIOUS[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread: atexit and finally still cover us
            pass
    _HANDLERS_INSTALLED = True


def remove_stale(run: Runner = _default_run) -> list[str]:
    """Delete namespaces left behind by killed runs of this module; returns their names."""
    removed = []
    try:
        names = list_namespaces(run)
    except (subprocess.CalledProcessError, OSError):
        return removed
    for name in stale_namespaces(names):
        try:
            run(["ip", "netns", "del", name])
            removed.append(name)
        except (subprocess.CalledProcessError, OSError):
            pass
    return removed


# -- counters --------------------------------------------------------------------------------


def lo_bytes() -> tuple[int, int]:
    """(rx, tx) byte counters of ``lo`` in the CALLING process's network namespace."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                fields = rest.split()
                return int(fields[0]), int(fields[8])
    raise RuntimeError("no 'lo' in /proc/net/dev")


# -- launching ranks -------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (used when the ranks share the host's loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def rank_env(rank: int, world: int, port: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
               WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo",
               PYTHONUNBUFFERED="1")
    return env


def join_group(threads: int, pg_timeout: float) -> tuple[int, int]:
    """In a rank started by :func:`launch`: set the torch thread count and join the Gloo
    process group (a hung collective fails after ``pg_timeout`` seconds); (rank, world)."""
    import datetime

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout))
    return rank, world


def _wait_all(procs: list[subprocess.Popen], argv: Sequence[str], timeout: float | None,
              what: str, on_poll: Callable[[], None] | None = None) -> None:
    """Wait for every process; :class:`RankFailed` for the first that fails (its index),
    ``TimeoutError`` past ``timeout``; ``on_poll`` about twice a second."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(range(len(procs)))
    last_poll = time.monotonic()
    while pending:
        for i in sorted(pending):
            rc = procs[i].poll()
            if rc is None:
                continue
            pending.discard(i)
            if rc != 0:
                raise RankFailed(i, rc, argv)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what} {sorted(pending)} still running after {timeout} s")
        time.sleep(0.05)
        if on_poll is not None and time.monotonic() - last_poll > 0.5:
            last_poll = time.monotonic()
            on_poll()


class RankFailed(RuntimeError):
    """A rank started by :func:`launch` exited with a non-zero status."""

    def __init__(self, rank: int, returncode: int, argv: Sequence[str]):
        super().__init__(f"rank {rank} exited with status {returncode}: {' '.join(argv)}")
        self.rank, self.returncode = rank, returncode


def launch(argv: Sequence[str], world: int, link: EmulatedLink | None, *,
           threads: int = 1, timeout: float | None = None, port: int | None = None,
           on_poll: Callable[[], None] | None = None) -> None:
    """Run ``argv`` as W ranks (env RANK/WORLD_SIZE/MASTER_ADDR=127.0.0.1/MASTER_PORT).

    Inside ``link``'s namespace when given, else on the host loopback. Waits for all of
    them; if one fails the others are stopped and :class:`RankFailed` (a ``RuntimeError``)
    names the rank and its exit status.
    ``on_poll`` is called about twice a second while they run (progress reports).
    """
    if port is None:
        # A fresh namespace has no other listeners, so any fixed port is free there.
        port = 29500 if link is not None else free_port()
    prefix = link.exec_prefix() if link is not None else []
    _install_cleanup_handlers()
    procs: list[subprocess.Popen] = []
    try:
        for r in range(world):
            p = subprocess.Popen(prefix + list(argv), env=rank_env(r, world, port, threads))
            _CHILDREN[p.pid] = p
            procs.append(p)
        _wait_all(procs, argv, timeout, "ranks", on_poll)
    finally:
        for p in procs:
            _stop(p)
            _CHILDREN.pop(p.pid, None)


def add_rank_arguments(p) -> None:
    """The options every benchmark that launches ranks with :func:`run_worker_script` takes
    (``p``: an ``argparse.ArgumentParser``)."""
    import argparse

    p.add_argument("--world", type=int, default=4)
    p.add_argument("--link", default="none", help="none, 1gbit, 10gbit, ... (see allreduce.py)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-netns", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--pg-timeout", type=float, default=600)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def run_worker_script(script: str | os.PathLike, cfg: dict, args, *, tag: str):
    """Run ``script --worker CFG`` as ``args.world`` ranks on the link ``args.link`` (made
    and removed here), ``args`` being the options :func:`add_rank_arguments` added, with
    ``cfg`` written to CFG plus ``cfg["threads"]``, ``cfg["pg_timeout"]`` and
    ``cfg["result"]``, a file the ranks write their result to (JSON). Returns ``(result,
    effective link spec, qdisc)``; a rank that fails raises :class:`RankFailed` (a
    benchmark's failed correctness check is its exit status)."""
    world, threads = args.world, args.threads
    with tempfile.TemporaryDirectory(prefix=f"gz-{tag}-") as tmp:
        cfg = {**cfg, "threads": threads, "pg_timeout": args.pg_timeout,
               "result": str(Path(tmp) / "result.json")}
        cfg_path = Path(tmp) / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        link, eff = open_link(args.link, world=world, netns=not args.no_netns)
        try:
            qdisc = link.qdisc() if link is not None else "host loopback"
            print(f"[{tag}] link {eff}: {qdisc}; {world} ranks", flush=True)
            launch([sys.executable, str(Path(script).resolve()), "--worker", str(cfg_path)],
                   world, link, threads=threads, timeout=args.timeout)
        finally:
            if link is not None:
                link.remove()
        return json.loads(Path(cfg["result"]).read_text()), eff, qdisc


def parse_link(spec: str, world: int) -> float | None:
    """Link spec -> the token bucket's rate in bits/s (``None``: unshaped).

    ``"1gbit"``: one bucket of that rate shared by all W ranks (the literal ``tc ... tbf
    rate 1gbit`` on ``lo``), which in a symmetric collective gives each rank rate/W.
    ``"1gbit/rank"``: each rank gets the rate, as with one NIC per host on a switch: the
    shared bucket runs at W times the rate (every rank sends the same amount at once in
    the collectives measured here, so each gets its share).
    """
    s = spec.strip().lower()
    per_rank = s.endswith("/rank")
    rate = parse_rate(s[: -len("/rank")] if per_rank else s)
    if rate is None:
        if per_rank:
            raise ValueError(f"'none' takes no '/rank': {spec!r}")
        return None
    return rate * world if per_rank else rate


def per_rank_rate(spec: str, world: int) -> float | None:
    """Bits/s each rank gets in a symmetric collective on the link ``spec``."""
    rate = parse_link(spec, world)
    return None if rate is None else rate / world


def open_link(spec: str, *, world: int, netns: bool = True, run: Runner = _default_run,
              log: Callable[[str], None] = print) -> tuple[EmulatedLink | None, str]:
    """Make the link for ``spec`` (see :func:`parse_link`); returns ``(link or None,
    effective spec)``.

    ``spec="none"`` still uses a private (unshaped) namespace when possible, so the byte
    counters see only the benchmark's traffic. Without root, a shaped spec falls back to
    ``none`` on the host loopback with a clear message.
    """
    rate = parse_link(spec, world)
    problem = root_problem() if netns else "namespaces disabled (--no-netns)"
    if problem is not None:
        if rate is not None:
            log(f"[netlink] cannot emulate a {spec} link: {problem}. "
                "Falling back to --link none (host loopback, unshaped).")
        return None, "none"
    remove_stale(run)
    link = EmulatedLink(rate, run=run, name=f"{PREFIX}{os.getpid()}-{_next_id()}")
    link.create()
    return link, spec.strip().lower()


_COUNTER = [0]


def _next_id() -> int:
    _COUNTER[0] += 1
    return _COUNTER[0]
