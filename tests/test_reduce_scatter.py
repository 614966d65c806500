"""gradzip.reduce_scatter on several Gloo processes (world sizes 2, 3 and 4).

As in test_comm.py: one process group per world size runs a battery (every codec, with and
without error feedback, averaging or not, odd shard sizes, half precision, a
non-contiguous output, async, the error cases) and returns what every rank ended with; the
parent compares it with a single-process simulation built from ``gradzip.reference``.
"""

from __future__ import annotations

import math
import re

import gradzip
import pytest
import torch
from dist_helpers import catch, run_ranks
from gradzip import Codec, comm, reference
from test_comm import CODECS, codec, make_input, ref_compress

pytestmark = pytest.mark.distributed

SHARD = 1001  # odd: blocks do not line up with shards
STEPS = 3
EF_SEED = 7
KEY = "shard-grads"
AUTO_SHARD = 4001


def shard_k(c: Codec, n: int, shard: int) -> int | None:
    """Top-k: a fraction per shard, a count split in proportion to the shard's length."""
    if not c.is_sparse:
        return None
    if isinstance(c.k, int):
        return max(1, min(shard, math.ceil(min(c.k, n) * shard / n)))
    return max(1, min(shard, round(c.k * shard)))


class Simulation:
    """Every rank of a compressed reduce-scatter in one process, residuals carried over."""

    def __init__(self, c: Codec, world: int, shard: int, ef: bool, average: bool,
                 base_seed: int = 0, key=None, storage: str = "fp32"):
        self.c, self.world, self.shard, self.ef, self.average = c, world, shard, ef, average
        self.storage = storage
        self.base, self.khash = base_seed, comm.key_hash(key) if key is not None else 0
        self.worker = [torch.zeros(world * shard) for _ in range(world)] if ef else None
        self.step = 0

    def __call__(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        W, S = self.world, self.shard
        k = shard_k(self.c, W * S, S)
        outs = []
        for i in range(W):
            rows = []
            for r in range(W):
                seed = comm.stochastic_seed(self.base, r, self.step if self.ef else 0,
                                            self.khash, 0, i)
                res = self.worker[r][i * S : (i + 1) * S] if self.ef else None
                rows.append(ref_compress(self.c, xs[r].reshape(-1)[i * S : (i + 1) * S], res,
                                         seed, k))
            out = torch.zeros(S, dtype=xs[0].dtype)
            reference.dequantize_accumulate(torch.stack(rows), out,
                                            1.0 / W if self.average else 1.0)
            outs.append(out)
        if self.ef:
            self.worker = [stored(w, self.storage) for w in self.worker]
        self.step += 1
        return outs


def stored(w: torch.Tensor, storage: str) -> torch.Tensor:
    """What compact residual storage keeps of a float32 residual: bfloat16 rounding, or
    gradzip's int8 codec (block 128, nearest) encoded and decoded."""
    if storage == "bf16":
        return w.to(torch.bfloat16).float()
    if storage == "int8":
        out = torch.zeros_like(w)
        reference.dequantize_accumulate(reference.quantize_pack(w, 8, 128, None, "nearest", 0)[None],
                                        out, 1.0)
        return out
    return w


def battery(rank: int, world: int) -> dict:
    out: dict = {}
    n = world * SHARD
    for spec in CODECS:
        for average in (True, False):
            st = gradzip.ErrorFeedback(seed=EF_SEED)
            steps = []
            for t in range(STEPS):
                x = make_input(n, rank, t, tag=21)
                before = x.clone()
                y = torch.empty(SHARD)
                r = gradzip.reduce_scatter(y, x, codec(spec), state=st, algorithm="alltoall",
                                           key=KEY, average=average)
                assert r is y
                assert torch.equal(x, before), "the input must not change"
                steps.append(y)
            out[("ef", spec, average)] = {"outs": steps, "pending": st.pending(KEY)}
        y = torch.empty(SHARD)
        gradzip.reduce_scatter(y, make_input(n, rank, 0, tag=22), codec(spec),
                               algorithm="alltoall", seed=3)
        out[("no-ef", spec)] = y
    # compact worker residuals
    for spec in ("int4", "sign", "topk:0.05"):
        for storage in ("bf16", "int8"):
            st = gradzip.ErrorFeedback(seed=EF_SEED, storage=storage)
            steps = []
            for t in range(STEPS):
                y = torch.empty(SHARD)
                gradzip.reduce_scatter(y, make_input(n, rank, t, tag=21), codec(spec), state=st,
                                       algorithm="alltoall", key=KEY, average=True)
                steps.append(y)
            out[("storage", spec, storage)] = {"outs": steps, "pending": st.pending(KEY),
                                               "bytes": st.memory_bytes()}
    # uncompressed, half precision, non-contiguous output, async, auto
    for average in (True, False):
        y = torch.empty(SHARD)
        gradzip.reduce_scatter(y, make_input(n, rank, 0, tag=23), codec("int8"),
                               algorithm="plain", average=average)
        out[("plain", average)] = y
    for dtype in (torch.float16, torch.bfloat16):
        y = torch.empty(SHARD, dtype=dtype)
        gradzip.reduce_scatter(y, make_input(n, rank, 0, tag=24, dtype=dtype), codec("int8"),
                               algorithm="alltoall", average=True)
        out[("half", str(dtype))] = y
    base = torch.zeros(13, 77)  # 1001 elements, written through a transposed view
    gradzip.reduce_scatter(base.t(), make_input(n, rank, 0, tag=25), codec("int4"),
                           algorithm="alltoall")
    out["noncontig"] = base.t().reshape(-1).clone()
    st = gradzip.ErrorFeedback(seed=EF_SEED)
    y = torch.empty(SHARD)
    fut = gradzip.reduce_scatter(y, make_input(n, rank, 0, tag=21), codec("int4"), state=st,
                                 algorithm="alltoall", key=KEY, average=True, async_op=True)
    assert fut.wait() is y
    out["async"] = y
    y = torch.empty(AUTO_SHARD)  # above the default min_numel
    gradzip.reduce_scatter(y, make_input(world * AUTO_SHARD, rank, 0, tag=26), codec("int8"))
    out["auto"] = (comm.reduce_scatter_plan(codec("int8"), world * AUTO_SHARD, torch.float32,
                                            world).algorithm, y)
    y = torch.empty(10)
    gradzip.reduce_scatter(y, make_input(10 * world, rank, 0, tag=27), codec("int8"))
    out["auto-small"] = y  # below min_numel: plain
    out["errors"] = error_battery(rank, world)
    return out


def error_battery(rank: int, world: int) -> dict:
    last = world - 1
    n = world * SHARD
    res = {}
    res["codec"] = catch(lambda: gradzip.reduce_scatter(
        torch.empty(SHARD), make_input(n, rank, 0), codec("int8" if rank == last else "int4"),
        algorithm="alltoall"))
    res["sizes"] = catch(lambda: gradzip.reduce_scatter(
        torch.empty(SHARD + (rank == last)), make_input(n, rank, 0), codec("int4"),
        algorithm="alltoall"))
    res["dtype"] = catch(lambda: gradzip.reduce_scatter(
        torch.empty(SHARD, dtype=torch.float16 if rank == last else torch.float32),
        make_input(n, rank, 0), codec("int4"), algorithm="alltoall"))
    res["algorithm"] = catch(lambda: gradzip.reduce_scatter(
        torch.empty(SHARD), make_input(n, rank, 0), codec("int4"),
        algorithm="plain" if rank == last else "alltoall"))
    x = make_input(n, rank, 0)
    res["aliased"] = catch(lambda: gradzip.reduce_scatter(
        x[:SHARD] if rank == last else torch.empty(SHARD), x, codec("int4"),
        algorithm="alltoall"))
    res["bad-algorithm"] = catch(lambda: gradzip.reduce_scatter(
        torch.empty(SHARD), make_input(n, rank, 0), codec("int4"), algorithm="allgather"))
    real = Codec.compress

    def corrupt(self, *a, **kw):
        p = real(self, *a, **kw)
        p[4] ^= 0x7F
        return p

    with pytest.MonkeyPatch.context() as mp:
        if rank == last:
            mp.setattr(Codec, "compress", corrupt)
        res["corrupt"] = catch(lambda: gradzip.reduce_scatter(
            torch.empty(SHARD), make_input(n, rank, 0), codec("int4"), algorithm="alltoall"))
    y = torch.empty(SHARD)
    gradzip.reduce_scatter(y, make_input(n, rank, 0, tag=28), codec("int8"),
                           algorithm="alltoall")
    res["still-works"] = y
    return res


@pytest.fixture(scope="module", params=[2, 3, 4])
def results(request):
    world = request.param
    return world, run_ranks(world, battery)


def _inputs(world, tag, step=0, dtype=torch.float32):
    return [make_input(world * SHARD, r, step, tag=tag, dtype=dtype) for r in range(world)]


@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.parametrize("average", [True, False])
def test_matches_reference_simulation_with_error_feedback(results, spec, average):
    world, res = results
    sim = Simulation(Codec(spec), world, SHARD, ef=True, average=average, base_seed=EF_SEED,
                     key=KEY)
    for t in range(STEPS):
        want = sim(_inputs(world, 21, t))
        for r in range(world):
            assert torch.equal(res[r][("ef", spec, average)]["outs"][t], want[r]), (spec, r, t)
    # what each rank still owes is exactly its simulated worker residual
    for r in range(world):
        assert torch.equal(res[r][("ef", spec, average)]["pending"], sim.worker[r])


@pytest.mark.parametrize("spec", ["int4", "sign", "topk:0.05"])
@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_compact_residual_storage(results, spec, storage):
    """bf16 / int8 worker residuals: the simulation with the residual rounded through the
    storage format after every step, bit for bit; and the memory it takes."""
    from gradzip import format as fmt

    world, res = results
    sim = Simulation(Codec(spec), world, SHARD, ef=True, average=True, base_seed=EF_SEED,
                     key=KEY, storage=storage)
    for t in range(STEPS):
        want = sim(_inputs(world, 21, t))
        for r in range(world):
            assert torch.equal(res[r][("storage", spec, storage)]["outs"][t], want[r]), (r, t)
    n = world * SHARD
    for r in range(world):
        got = res[r][("storage", spec, storage)]
        assert torch.equal(got["pending"], sim.worker[r])
        assert got["bytes"] == (2 * n if storage == "bf16" else fmt.dense_payload_bytes(n, 8, 128))


@pytest.mark.parametrize("spec", CODECS)
def test_error_feedback_tracks_the_exact_sum(results, spec):
    """Over the steps, each rank's shard of the exact sum = what was delivered + what all
    ranks still owe for that shard (float32 rounding of each step: 1e-5 relative)."""
    world, res = results
    exact = sum(torch.stack([x.double() for x in _inputs(world, 21, t)]).sum(0)
                for t in range(STEPS))
    owed = torch.stack([res[r][("ef", spec, False)]["pending"].double()
                        for r in range(world)]).sum(0)
    scale = torch.stack([x.double().abs() for t in range(STEPS)
                         for x in _inputs(world, 21, t)]).sum(0).max()
    for r in range(world):
        got = sum(o.double() for o in res[r][("ef", spec, False)]["outs"])
        shard = slice(r * SHARD, (r + 1) * SHARD)
        assert torch.allclose(got + owed[shard], exact[shard], rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("spec", CODECS)
def test_without_error_feedback(results, spec):
    world, res = results
    c = Codec(spec)
    xs = _inputs(world, 22)
    k = shard_k(c, world * SHARD, SHARD)
    for i in range(world):
        rows = torch.stack([ref_compress(c, xs[r][i * SHARD : (i + 1) * SHARD], None,
                                         comm.stochastic_seed(3, r, 0, 0, 0, i), k)
                            for r in range(world)])
        want = torch.zeros(SHARD)
        reference.dequantize_accumulate(rows, want, 1.0)
        assert torch.equal(res[i][("no-ef", spec)], want), (spec, i)


@pytest.mark.parametrize("average", [True, False])
def test_plain_is_the_float32_sum(results, average):
    """The uncompressed path: the float32 sum of the W shards, in rank order, times 1/W."""
    world, res = results
    xs = _inputs(world, 23)
    for i in range(world):
        want = torch.zeros(SHARD)
        for r in range(world):
            want += xs[r][i * SHARD : (i + 1) * SHARD]
        if average:
            want *= 1.0 / world
        assert torch.equal(res[i][("plain", average)], want), i


def test_half_precision_noncontiguous_async_auto(results):
    world, res = results
    for dtype in (torch.float16, torch.bfloat16):
        want = Simulation(Codec("int8"), world, SHARD, ef=False, average=True)(
            _inputs(world, 24, dtype=dtype))
        for r in range(world):
            assert torch.equal(res[r][("half", str(dtype))], want[r]), (dtype, r)
    want = Simulation(Codec("int4"), world, SHARD, ef=False, average=False)(_inputs(world, 25))
    for r in range(world):
        assert torch.equal(res[r]["noncontig"], want[r])
    want = Simulation(Codec("int4"), world, SHARD, ef=True, average=True, base_seed=EF_SEED,
                      key=KEY)(_inputs(world, 21))
    for r in range(world):
        assert torch.equal(res[r]["async"], want[r])
    # "auto" compresses int8 shards (fewer bytes than the plain all-to-all) and its first
    # call is the compressed probe
    algo, _ = res[0]["auto"]
    assert algo == "alltoall"
    want = Simulation(Codec("int8"), world, AUTO_SHARD, ef=False, average=False)(
        [make_input(world * AUTO_SHARD, r, 0, tag=26) for r in range(world)])
    for r in range(world):
        assert torch.equal(res[r]["auto"][1], want[r])
    xs = [make_input(10 * world, r, 0, tag=27) for r in range(world)]
    for i in range(world):
        want = sum(x[i * 10 : (i + 1) * 10] for x in xs)
        assert torch.equal(res[i]["auto-small"], want)


@pytest.mark.parametrize("case,match", [
    ("codec", "disagree on codec"), ("sizes", "ranks x output|refused their input"),
    ("dtype", "output is torch.float16 but input is torch.float32|refused"),
    ("algorithm", "disagree on algorithm"), ("aliased", "share memory|refused"),
    ("bad-algorithm", "algorithm must be one of"),
    ("corrupt", "do not match")])
def test_errors_reach_every_rank(results, case, match):
    world, res = results
    for r in range(world):
        err = res[r]["errors"][case]
        assert err is not None and err[0] in ("ValueError", "TypeError"), (case, r, err)
        assert re.search(match, err[1]), (case, r, err)
    # the rank whose sizes do not fit says why; the others that a peer refused
    if case == "sizes":
        assert "ranks x output" in res[world - 1]["errors"][case][1]
    want = Simulation(Codec("int8"), world, SHARD, ef=False, average=False)(_inputs(world, 28))
    for r in range(world):
        assert torch.equal(res[r]["errors"]["still-works"], want[r])


def test_reduce_scatter_plan():
    n, world = 4 * 3001, 4
    p = comm.reduce_scatter_plan(Codec("int4"), n, torch.float32, world, "alltoall")
    assert p.chunks == tuple((i * 3001, (i + 1) * 3001) for i in range(world))
    from gradzip import format as fmt
    assert p.payload_bytes == fmt.dense_payload_bytes(3001, 4, 128)
    assert p.bytes_sent == (world - 1) * p.payload_bytes
    plain = comm.reduce_scatter_plan(Codec("int4"), n, torch.float32, world, "plain")
    assert plain.bytes_sent == (world - 1) * n * 4 // world
    assert comm.reduce_scatter_plan(Codec("int4"), 40, torch.float32, world).algorithm == "plain"
    with pytest.raises(ValueError, match="algorithm"):
        comm.reduce_scatter_plan(Codec("int4"), n, torch.float32, world, "allgather")
