"""Run a function on W Gloo ranks in fresh processes, with timeouts everywhere.

``run_ranks(world, fn, *args)`` starts ``world`` processes (torch.multiprocessing with the
forkserver start method, whose server imports torch and gradzip once, so that each rank
starts in a fraction of a second instead of re-importing torch; spawn where forkserver
is unavailable), joins them into one Gloo process group over 127.0.0.1 through a TCPStore
that the parent owns (so the port is picked by the OS with no race), calls
``fn(rank, world, *args)`` on each, and returns the per-rank return values. Any failure on
any rank raises ``RankError`` in the parent with that rank's traceback. Nothing can hang:
the process group has a timeout, and the parent kills ranks that outlive ``deadline``.

``fn`` must be importable by name (a module-level function) and its return value picklable
by ``torch.save``.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The kernels the tests run ("auto" = the C++ CPU kernels). "torch" runs the reference
# instead, for working on the communication layer before the kernels are built.
TEST_BACKEND = os.environ.get("GRADZIP_TEST_BACKEND", "auto")
PG_TIMEOUT_S = float(os.environ.get("GRADZIP_TEST_PG_TIMEOUT", "60"))
DEADLINE_S = float(os.environ.get("GRADZIP_TEST_DEADLINE", "240"))


def _context():
    if "forkserver" in mp.get_all_start_methods():
        mp.set_forkserver_preload(["torch", "torch.distributed", "gradzip", "dist_helpers"])
        return mp.get_context("forkserver")
    return mp.get_context("spawn")


class RankError(RuntimeError):
    """A rank raised, crashed or timed out; the message holds its traceback."""


def _worker(rank: int, world: int, port: int, pg_timeout: float, fn, args, results,
            deadline: float | None = None) -> None:
    if deadline:
        # A rank still running just before the parent gives up prints where it is stuck.
        import faulthandler

        faulthandler.dump_traceback_later(max(1.0, deadline - 3.0), exit=False)
    # Loopback only: Gloo would otherwise pick the interface of the host name.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        timeout = datetime.timedelta(seconds=pg_timeout)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timeout)
        try:
            value = fn(rank, world, *args)
        finally:
            # No barrier here: a rank that failed must not wait for the others.
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001  (report everything to the parent)
        results.put((rank, "error", traceback.format_exc()))


def catch(fn) -> tuple[str, str] | None:
    """(exception type name, message) of what ``fn()`` raises, or None: how a rank reports
    an expected error to the parent, which checks type and message."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the parent checks type and message)
        return type(e).__name__, str(e)
    return None


def assert_survivors_raise(world: int, fn, timeout: float = 20.0) -> None:
    """Run ``fn`` (which returns {"error": catch(...), "elapsed": seconds}) on ``world``
    ranks whose last rank exits midway: every other rank must raise torch.distributed's
    error, not hang, within the process group's ``timeout`` (plus 10 s of slack for the
    machine)."""
    res = run_ranks(world, fn, pg_timeout=timeout, deadline=90, allow_exit=(world - 1,))
    assert res[world - 1] is None  # it exited without reporting
    for r in range(world - 1):
        err, elapsed = res[r]["error"], res[r]["elapsed"]
        assert err is not None and err[0] in ("RuntimeError", "DistBackendError"), (r, err)
        assert elapsed < timeout + 10, (r, elapsed)


def run_ranks(world: int, fn, *args, pg_timeout: float = PG_TIMEOUT_S,
              deadline: float = DEADLINE_S, allow_exit: tuple[int, ...] = ()) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` Gloo ranks; return the results by rank.

    Ranks in ``allow_exit`` may exit without reporting (their result is None).
    """
    ctx = _context()
    results = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=pg_timeout))
    procs = [ctx.Process(target=_worker, args=(r, world, store.port, pg_timeout, fn, args,
                                                results, deadline), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, object]] = {}
    end = time.monotonic() + deadline
    try:
        while len(got) < world:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
                got[rank] = (status, payload)
            except queue.Empty:
                # A rank that died without reporting (e.g. os._exit) is noted once all
                # others are done.
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in got]
                if dead and all(r in allow_exit for r in dead) and \
                        len(got) + len(dead) == world:
                    break
                if any(r not in allow_exit for r in dead):
                    time.sleep(0.5)  # its message may still be in flight
                    while True:
                        try:
                            rank, status, payload = results.get_nowait()
                            got[rank] = (status, payload)
                        except queue.Empty:
                            break
                    dead = [r for r in dead if r not in got and r not in allow_exit]
                    if dead:
                        raise RankError(f"rank(s) {dead} died without reporting "
                                        f"(exit codes {[procs[r].exitcode for r in dead]})")
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, end - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    missing = [r for r in range(world) if r not in got and r not in allow_exit]
    if missing:
        raise RankError(f"rank(s) {missing} did not finish within {deadline} s")
    errors = [(r, got[r][1]) for r in sorted(got) if got[r][0] == "error"]
    if errors:
        raise RankError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors))
    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) if r in got else None
            for r in range(world)]
