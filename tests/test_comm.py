"""gradzip.all_reduce on several Gloo processes (world sizes 2, 3 and 4).

One process group per world size runs a battery of reductions (every codec x algorithm,
with and without error feedback, odd sizes, non-contiguous and half-precision tensors,
async, and the error cases) and returns what every rank ended with; the assertions run
here, in the parent, against a single-process simulation of the same algorithm built from
``gradzip.reference`` alone.
"""

from __future__ import annotations

import math
import os
import time

import gradzip
import pytest
import torch
from dist_helpers import TEST_BACKEND, RankError, assert_survivors_raise, catch, run_ranks
from gradzip import Codec, comm, reference
from gradzip import format as fmt

pytestmark = pytest.mark.distributed

CODECS = ["int8", "int4", "int2", "sign", "int4,block=64,rounding=stochastic", "topk:0.05",
          "topk:40,values=bf16", "topk:0.03,values=int8,exact=false"]
ALGORITHMS = ["allgather", "alltoall"]
N = 3001  # several blocks, uneven chunks for every world size
STEPS = 3
EF_SEED = 5
KEY = "grad"
INF_AT = 1234
SMALL = 77  # less than one block: some alltoall chunks are empty
AUTO_N = 10_000


def codec(spec: str) -> Codec:
    return Codec(spec, backend=TEST_BACKEND)


def make_input(n: int, rank: int, step: int, tag: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic per (n, rank, step, tag): Gaussian values whose magnitude varies by
    orders of magnitude from one stretch of 50 elements to the next (so block scales
    differ), recomputable in the parent."""
    g = torch.Generator().manual_seed(1_000_003 * tag + 7919 * rank + 104_729 * step + n)
    x = torch.randn(n, generator=g)
    spread = torch.exp(2 * torch.randn(-(-n // 50), generator=g)).repeat_interleave(50)[:n]
    return (x * spread).to(dtype)


# ---------------------------------------------------------------------------------------
# what runs on every rank
# ---------------------------------------------------------------------------------------


def _group_still_works(rank: int, world: int) -> torch.Tensor:
    x = make_input(500, rank, 0, tag=99)
    gradzip.all_reduce(x, codec("int8"), algorithm="allgather")
    return x


def battery(rank: int, world: int) -> dict:
    out: dict = {}
    # error feedback over STEPS steps, every codec x algorithm
    for spec in CODECS:
        for algo in ALGORITHMS:
            st = gradzip.ErrorFeedback(seed=EF_SEED)
            steps = []
            for t in range(STEPS):
                x = make_input(N, rank, t)
                r = gradzip.all_reduce(x, codec(spec), state=st, algorithm=algo, key=KEY)
                assert r is x
                steps.append(x)
            out[("ef", spec, algo)] = {"outs": steps, "pending": st.pending(KEY)}
            # without state: one step, no residual
            x = make_input(N, rank, 0)
            gradzip.all_reduce(x, codec(spec), algorithm=algo, seed=11)
            out[("plain-ef-off", spec, algo)] = x
    # one rank's tensor holds inf: every rank must see it, and the residuals must not keep it
    for spec in CODECS:
        for algo in ALGORITHMS:
            st = gradzip.ErrorFeedback(seed=EF_SEED)
            x = make_input(N, rank, 0, tag=8)
            if rank == world - 1:
                x[INF_AT] = float("inf")
            gradzip.all_reduce(x, codec(spec), state=st, algorithm=algo, key=KEY)
            y = make_input(N, rank, 1, tag=8)
            gradzip.all_reduce(y, codec(spec), state=st, algorithm=algo, key=KEY)
            out[("inf", spec, algo)] = (x, y, st.pending(KEY))
    # odd inputs
    for algo in ALGORITHMS:
        for spec in ("int4", "sign", "topk:0.05"):
            x = make_input(SMALL, rank, 0, tag=1)
            gradzip.all_reduce(x, codec(spec), algorithm=algo)
            out[("small", spec, algo)] = x
        x = make_input(1, rank, 0, tag=2)
        gradzip.all_reduce(x, codec("int8"), algorithm=algo)
        out[("one", algo)] = x
        base = make_input(60 * 50, rank, 0, tag=3).view(60, 50)
        xt = base.t()  # non-contiguous
        gradzip.all_reduce(xt, codec("int8"), algorithm=algo)
        out[("noncontig", algo)] = (xt.clone(), base.clone())
        for dtype in (torch.float16, torch.bfloat16):
            for spec in ("int8", "topk:0.05"):
                x = make_input(N, rank, 0, tag=4, dtype=dtype)
                gradzip.all_reduce(x, codec(spec), algorithm=algo)
                out[("half", str(dtype), spec, algo)] = x
        x = make_input(N, rank, 0, tag=5)
        gradzip.all_reduce(x, codec("int8"), algorithm=algo, average=False)
        out[("sum", algo)] = x
        # async: the future holds the tensor, reduced exactly as the synchronous call
        st = gradzip.ErrorFeedback(seed=EF_SEED)
        x = make_input(N, rank, 0)
        fut = gradzip.all_reduce(x, codec("int4"), state=st, algorithm=algo, key=KEY,
                                 async_op=True)
        assert isinstance(fut, torch._C.Future)  # what Work.get_future().then() returns
        assert fut.wait() is x
        out[("async", algo)] = x
    e = torch.empty(0)
    assert gradzip.all_reduce(e, codec("int4")) is e
    # "auto": plan and result
    for spec, dtype in (("int8", torch.float32), ("int4", torch.float32),
                        ("int8", torch.float16), ("topk:0.3", torch.float32),
                        ("sign", torch.float32)):
        x = make_input(AUTO_N, rank, 0, tag=6, dtype=dtype)
        gradzip.all_reduce(x, codec(spec), algorithm="auto")
        p = comm.plan(codec(spec), AUTO_N, dtype, world, "auto")
        out[("auto", spec, str(dtype))] = (p.algorithm, x)
    x = make_input(100, rank, 0, tag=7)
    gradzip.all_reduce(x, codec("int4"))  # below min_numel: plain all-reduce
    out[("auto-small",)] = x
    x = make_input(N, rank, 0)
    for _ in range(2):  # second call skips the fingerprint
        y = x.clone()
        gradzip.all_reduce(y, codec("int8"), algorithm="allgather", verify="once")
    out[("verify-once",)] = y
    out["key_hash"] = comm.key_hash(("grad", "layer.weight", 3))
    out["errors"] = error_battery(rank, world)
    return out


def error_battery(rank: int, world: int) -> dict:
    """Disagreements and corrupt payloads: every rank must raise, and the group must still
    work afterwards (the fingerprint exchange completes before anyone raises)."""
    last = world - 1
    res = {}
    res["codec"] = catch(lambda: gradzip.all_reduce(
        make_input(N, rank, 0), codec("int8" if rank == last else "int4"),
        algorithm="allgather"))
    res["codec-options"] = catch(lambda: gradzip.all_reduce(
        make_input(N, rank, 0), codec("int4,block=64" if rank == 0 else "int4"),
        algorithm="alltoall"))
    res["numel"] = catch(lambda: gradzip.all_reduce(
        make_input(N + (rank == last), rank, 0), codec("int4"), algorithm="alltoall"))
    res["dtype"] = catch(lambda: gradzip.all_reduce(
        make_input(N, rank, 0, dtype=torch.float16 if rank == last else torch.float32),
        codec("int8"), algorithm="allgather"))
    res["algorithm"] = catch(lambda: gradzip.all_reduce(
        make_input(N, rank, 0), codec("int8"),
        algorithm="alltoall" if rank == 0 else "allgather"))
    res["auto-threshold"] = catch(lambda: gradzip.all_reduce(
        make_input(N, rank, 0), codec("int8"), min_numel=10**6 if rank == 0 else 0))
    # "auto" probes alternate with the plain all-reduce: not the same as its algorithm fixed
    fixed = comm.plan(codec("int8"), N, torch.float32, world, "auto", 0).algorithm
    res["auto-vs-fixed"] = catch(lambda: gradzip.all_reduce(
        make_input(N, rank, 0), codec("int8"), min_numel=0,
        algorithm="auto" if rank == 0 else fixed))
    res["pipeline"] = catch(lambda: gradzip.all_reduce(
        make_input(N, rank, 0), codec("int8"), algorithm="allgather",
        pipeline=comm.Pipeline(min_numel=1024) if rank == last else comm.DEFAULT_PIPELINE))
    res["refused"] = catch(lambda: gradzip.all_reduce(
        make_input(N, rank, 0).double() if rank == last else make_input(N, rank, 0),
        codec("int8")))
    st = gradzip.ErrorFeedback()
    if rank == last:  # this rank's state was used for another tensor under the same key
        st.set_residual(KEY, torch.zeros(N + 5))
    res["residual-size"] = catch(lambda: gradzip.all_reduce(
        make_input(N, rank, 0), codec("int4"), state=st, key=KEY, algorithm="allgather"))
    with pytest.MonkeyPatch.context() as mp:
        if rank == last:  # this rank speaks another format version
            mp.setattr(gradzip.format, "VERSION", gradzip.format.VERSION + 1)
        res["version"] = catch(lambda: gradzip.all_reduce(
            make_input(N, rank, 0), codec("int4"), algorithm="allgather"))
    # A corrupt header (the version byte) in what one rank sends: caught by the header
    # check on every rank. For alltoall only the payload of chunk 0 is corrupted, so only
    # rank 0 sees it in phase 1 and must pass the news on in phase 2.
    real = Codec.compress
    for algo in ALGORITHMS:
        calls: list[int] = []

        def corrupt(self, *a, calls=calls, **kw):
            p = real(self, *a, **kw)
            calls.append(1)
            if len(calls) == 1:
                p[4] ^= 0x7F
            return p

        with pytest.MonkeyPatch.context() as mp:
            if rank == last:
                mp.setattr(Codec, "compress", corrupt)
            res[f"corrupt-{algo}"] = catch(lambda algo=algo: gradzip.all_reduce(
                make_input(N, rank, 0), codec("int4"), algorithm=algo))
    res["still-works"] = _group_still_works(rank, world)
    return res


def die_midway(rank: int, world: int) -> dict:
    """The last rank exits inside the all-reduce, after the fingerprint exchange; the
    others must raise (not hang) within the process group's timeout."""
    if rank == world - 1:
        def die(self, *a, **kw):
            os._exit(3)

        # this process ends inside the call: nothing to restore
        pytest.MonkeyPatch().setattr(Codec, "compress", die)
    t0 = time.monotonic()
    err = catch(lambda: gradzip.all_reduce(make_input(N, rank, 0), codec("int4"),
                                            algorithm="alltoall"))
    return {"error": err, "elapsed": time.monotonic() - t0}


# ---------------------------------------------------------------------------------------
# the single-process simulation, from gradzip.reference only
# ---------------------------------------------------------------------------------------


def ref_compress(c: Codec, x, residual, seed, k=None):
    if c.is_sparse:
        return reference.topk_select(x, k if k is not None else c.k_for(x.numel()), residual,
                                     c.exact, c.values, seed)
    return reference.quantize_pack(x, c.bits, c.block, residual, c.rounding, seed)


def chunk_layout(c: Codec, n: int, world: int):
    """Chunks at multiples of the block (dense) or of 1 (top-k), the last ones short or
    empty; top-k splits k over the chunks (a fraction per chunk, a count in proportion)."""
    align = c.block if not c.is_sparse else 1
    size = align * math.ceil(math.ceil(n / align) / world)
    chunks = [(min(i * size, n), min((i + 1) * size, n)) for i in range(world)]
    ks = []
    for a, b in chunks:
        length = b - a
        if not c.is_sparse or length == 0:
            ks.append(None)
        elif isinstance(c.k, int):
            ks.append(max(1, min(length, math.ceil(min(c.k, n) * length / n))))
        else:
            ks.append(max(1, min(length, round(c.k * length))))
    return chunks, ks


class Simulation:
    """All ranks of one all-reduce in one process, with residuals carried across steps."""

    def __init__(self, c: Codec, algo: str, world: int, n: int, ef: bool,
                 average: bool = True, base_seed: int = 0, key=None):
        self.c, self.algo, self.world, self.n = c, algo, world, n
        self.average = average
        self.base, self.khash = base_seed, comm.key_hash(key) if key is not None else 0
        self.ef = ef
        self.worker = [torch.zeros(n) for _ in range(world)] if ef else None
        self.chunks, self.ks = chunk_layout(c, n, world)
        self.server = [torch.zeros(b - a) for a, b in self.chunks] if ef else None
        self.step = 0

    def seed(self, rank, phase, chunk):
        return comm.stochastic_seed(self.base, rank, self.step if self.ef else 0, self.khash,
                                    phase, chunk)

    def __call__(self, xs: list[torch.Tensor]) -> torch.Tensor:
        W, n = self.world, self.n
        alpha = 1.0 / W if self.average else 1.0
        flat = [x.reshape(-1) for x in xs]
        out = torch.zeros(n, dtype=xs[0].dtype)
        if self.algo == "allgather":
            rows = torch.stack([ref_compress(self.c, flat[r],
                                             self.worker[r] if self.ef else None,
                                             self.seed(r, 0, 0)) for r in range(W)])
            reference.dequantize_accumulate(rows, out, alpha)
        else:
            for i, ((a, b), k) in enumerate(zip(self.chunks, self.ks)):
                if b == a:
                    continue
                rows = torch.stack([ref_compress(self.c, flat[r][a:b],
                                                 self.worker[r][a:b] if self.ef else None,
                                                 self.seed(r, 0, i), k) for r in range(W)])
                acc = torch.zeros(b - a)
                reference.dequantize_accumulate(rows, acc, alpha)
                q = ref_compress(self.c, acc, self.server[i] if self.ef else None,
                                 self.seed(i, 1, i), k)
                part = torch.zeros(b - a, dtype=out.dtype)
                reference.dequantize_accumulate(q[None], part, 1.0)
                out[a:b] = part
        self.step += 1
        return out

    def pending(self, rank: int) -> torch.Tensor:
        p = self.worker[rank].clone()
        if self.algo == "alltoall":
            a, b = self.chunks[rank]
            p[a:b].add_(self.server[rank], alpha=float(self.world) if self.average else 1.0)
        return p


# ---------------------------------------------------------------------------------------
# error bounds, derived from the inputs
# ---------------------------------------------------------------------------------------


def error_bound(c: Codec, algo: str, xs: list[torch.Tensor]) -> torch.Tensor:
    """Per-element bound on |result - exact mean| for one step from zero residuals.

    Dense 8/4/2 bits, absmax: an element's error is at most half a step, scale/2 with
    scale = amax_block/qmax (a whole step for stochastic rounding), and a decoded value is
    at most amax_block in magnitude. Averaging W ranks averages the bounds. The two-phase
    algorithm quantizes the chunk mean once more, whose block amax is at most the mean of
    the ranks' amax: a second term of the same size.
    Sign: |decoded - v| <= |v| + scale with scale = mean |v| of the block; decoded values
    have magnitude scale, so the second phase adds at most 2x the mean of the scales.
    Top-k: an entry that is dropped is off by |v|, at most the k-th largest |v| when the
    selection is exact; a kept one by its value rounding (bf16: |v| 2^-8; int8: max|v|/254).
    The second phase of alltoall drops or rounds entries of the mean of decoded values,
    each at most |v| + its value rounding.
    """
    W = len(xs)
    v = torch.stack([x.reshape(-1).double() for x in xs])  # [W, n]
    n = v.shape[1]
    if not c.is_sparse:
        nb = -(-n // c.block)
        pad = torch.zeros(W, nb * c.block, dtype=torch.float64)
        pad[:, :n] = v.abs()
        blocks = pad.view(W, nb, c.block)
        if c.bits == 1:
            lengths = torch.full((nb,), float(c.block), dtype=torch.float64)
            lengths[-1] = n - (nb - 1) * c.block
            scale = (blocks.sum(-1) / lengths).repeat_interleave(c.block, dim=1)[:, :n]
            first = (v.abs() + scale).mean(0)
            second = 2 * scale.mean(0)
        else:
            qmax = 2 ** (c.bits - 1) - 1
            amax = blocks.amax(-1).repeat_interleave(c.block, dim=1)[:, :n]
            steps = 1.0 if c.rounding == "stochastic" else 0.5
            first = steps * (amax / qmax).mean(0)
            second = steps * amax.mean(0) / qmax
    else:
        k = c.k_for(n)
        mags = v.abs()
        kth = mags.topk(k, dim=1).values[:, -1:] if c.exact else torch.full((W, 1), math.inf)
        verr = {"fp32": torch.zeros_like(mags), "bf16": mags * 2.0**-8,
                "int8": mags.amax(1, keepdim=True).expand_as(mags) / 254}[c.values]
        first = torch.maximum(torch.minimum(mags, kth), verr).mean(0)
        second = (mags + verr).mean(0)
    bound = first + (second if algo == "alltoall" else 0)
    # float32 arithmetic on the way (scale division, products, a W-term sum, the 1/W
    # multiply, the second phase): a few roundings, each at most one ulp of a value no
    # larger than max|x|.
    slack = 4 * (W + 4) * 2.0**-24 * v.abs().max()
    return bound + slack


def exact_mean(xs):
    return torch.stack([x.reshape(-1).double() for x in xs]).mean(0)


def assert_plain_mean(got, xs):
    """An uncompressed all-reduce in Gloo's own summation order: each x/W and each of the
    W-1 additions rounds once, by at most 2^-24 of a partial sum no larger than
    sum_r |x_r| / W, so the error is below W 2^-24 mean_r |x_r| (twice that for margin)."""
    W = len(xs)
    mags = torch.stack([x.reshape(-1).double().abs() for x in xs]).mean(0)
    err = (got.reshape(-1).double() - exact_mean(xs)).abs()
    assert bool((err <= 2 * W * 2.0**-24 * mags).all()), float(err.max())


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"world{w}")
def results(request):
    world = request.param
    return world, run_ranks(world, battery)


def _all_equal(values):
    return all(torch.equal(values[0], v) for v in values[1:])


def test_bit_identical_on_every_rank(results):
    _, res = results
    for case in res[0]:
        if case in ("errors", "key_hash"):
            continue
        if case[0] == "inf":
            assert all(_same_with_nonfinite(res[0][case][0], r[case][0]) and
                       torch.equal(res[0][case][1], r[case][1]) for r in res), case
            continue
        per_rank = [r[case] for r in res]
        if case[0] == "ef":
            for t in range(STEPS):
                assert _all_equal([p["outs"][t] for p in per_rank]), (case, t)
        elif case[0] == "noncontig":
            assert _all_equal([p[0] for p in per_rank]), case
        elif case[0] == "auto":
            assert _all_equal([p[1] for p in per_rank]), case
        else:
            assert _all_equal(per_rank), case


@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_matches_reference_simulation_with_error_feedback(results, spec, algo):
    world, res = results
    c = Codec(spec)
    sim = Simulation(c, algo, world, N, ef=True, base_seed=EF_SEED, key=KEY)
    for t in range(STEPS):
        want = sim([make_input(N, r, t) for r in range(world)])
        for r in range(world):
            assert torch.equal(res[r][("ef", spec, algo)]["outs"][t], want), (r, t)
    for r in range(world):
        assert torch.equal(res[r][("ef", spec, algo)]["pending"], sim.pending(r)), r


@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_without_state_matches_simulation_and_bound(results, spec, algo):
    world, res = results
    c = Codec(spec)
    xs = [make_input(N, r, 0) for r in range(world)]
    sim = Simulation(c, algo, world, N, ef=False, base_seed=11)
    got = res[0][("plain-ef-off", spec, algo)]
    assert torch.equal(got, sim(xs))
    err = (got.double() - exact_mean(xs)).abs()
    bound = error_bound(c, algo, xs)
    assert bool((err <= bound).all()), float((err - bound).max())
    # The bound is not vacuous: the codec does lose something.
    assert float(err.max()) > 0


@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_error_feedback_tracks_the_exact_sum(results, spec, algo):
    """sum_t result_t = sum_t exact_t - mean_r pending_r: what compression held back is
    exactly what the residuals still hold, so the running sum is within one residual's
    worth of the exact running sum."""
    world, res = results
    got = sum(res[0][("ef", spec, algo)]["outs"][t].double() for t in range(STEPS))
    exact = sum(exact_mean([make_input(N, r, t) for r in range(world)]) for t in range(STEPS))
    owed = torch.stack([res[r][("ef", spec, algo)]["pending"].double()
                        for r in range(world)]).mean(0)
    # Each step rounds in float32 a bounded number of times (v = x + r, r = v - decode,
    # the W-term decode sum, the 1/W multiply, the second phase): at most (W + 6) ulps of
    # the largest magnitude involved per step.
    mag = max(float(make_input(N, r, t).abs().max()) for r in range(world)
              for t in range(STEPS)) + float(owed.abs().max())
    tol = STEPS * (world + 6) * 2.0**-24 * mag
    assert float((got - exact + owed).abs().max()) <= tol
    assert bool(((got - exact).abs() <= owed.abs() + tol).all())


def _same_with_nonfinite(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits where finite, non-finite at the same places (NaN payloads aside)."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    return torch.equal(fa, fb) and torch.equal(a[fa], b[fb]) and \
        torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a[torch.isinf(a)],
                                                                    b[torch.isinf(b)])


@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_overflow_reaches_every_rank_and_does_not_stick(results, spec, algo):
    """The last rank's tensor holds inf at one element: every rank's result is non-finite
    there (so GradScaler skips the step everywhere), the rest matches the reference, and
    the next step is finite with finite residuals."""
    world, res = results
    sim = Simulation(Codec(spec), algo, world, N, ef=True, base_seed=EF_SEED, key=KEY)
    xs = [make_input(N, r, 0, tag=8) for r in range(world)]
    xs[-1][INF_AT] = float("inf")
    want_x = sim(xs)
    want_y = sim([make_input(N, r, 1, tag=8) for r in range(world)])
    for r in range(world):
        x, y, pending = res[r][("inf", spec, algo)]
        assert not bool(torch.isfinite(x[INF_AT])), r
        assert _same_with_nonfinite(x, want_x), r
        assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(pending).all()), r
        assert torch.equal(y, want_y) and torch.equal(pending, sim.pending(r)), r


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_odd_inputs(results, algo):
    world, res = results
    for spec in ("int4", "sign", "topk:0.05"):
        xs = [make_input(SMALL, r, 0, tag=1) for r in range(world)]
        want = Simulation(Codec(spec), algo, world, SMALL, ef=False)(xs)
        assert torch.equal(res[0][("small", spec, algo)], want), spec
    xs = [make_input(1, r, 0, tag=2) for r in range(world)]
    assert torch.equal(res[0][("one", algo)], Simulation(Codec("int8"), algo, world, 1,
                                                         ef=False)(xs))
    # non-contiguous: reduced in its own (row-major) element order, written back in place
    xs = [make_input(3000, r, 0, tag=3).view(60, 50).t() for r in range(world)]
    want = Simulation(Codec("int8"), algo, world, 3000, ef=False)(xs).view(50, 60)
    got, base = res[0][("noncontig", algo)]
    assert torch.equal(got, want)
    assert torch.equal(base.t(), want)  # the caller's storage holds the result
    xs = [make_input(N, r, 0, tag=5) for r in range(world)]
    assert torch.equal(res[0][("sum", algo)],
                       Simulation(Codec("int8"), algo, world, N, ef=False, average=False)(xs))


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("spec", ["int8", "topk:0.05"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(results, algo, spec, dtype):
    """fp16/bf16 tensors: compressed from their own dtype, accumulated in float32, written
    back in their dtype. Their few mantissa bits make exact .5 ties in v * (qmax / amax)
    common, so this also checks that the division is the correctly rounded one."""
    world, res = results
    xs = [make_input(N, r, 0, tag=4, dtype=dtype) for r in range(world)]
    got = res[0][("half", str(dtype), spec, algo)]
    assert got.dtype == dtype
    assert torch.equal(got, Simulation(Codec(spec), algo, world, N, ef=False)(xs))


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_async_equals_sync(results, algo):
    _, res = results
    assert torch.equal(res[0][("async", algo)], res[0][("ef", "int4", algo)]["outs"][0])


AUTO_CHOICE = {  # world size -> algorithm, from the volume model in gradzip.comm
    ("int8", "torch.float32"): {2: "allgather", 3: "alltoall", 4: "alltoall"},
    ("int4", "torch.float32"): {2: "allgather", 3: "alltoall", 4: "alltoall"},
    # 1-bit sign: never re-compressed by "auto" (all-gather while it moves fewer bytes
    # than the ring all-reduce: (W-1) n/32 vs 2(W-1)/W 4n bytes)
    ("sign", "torch.float32"): {2: "allgather", 3: "allgather", 4: "allgather"},
    # 8-bit of a 16-bit tensor: all-gathering 3 payloads of ~n bytes costs more than a
    # ring all-reduce of 2 * 3/4 * 2n bytes; the two-phase algorithm still pays.
    ("int8", "torch.float16"): {2: "allgather", 3: "alltoall", 4: "alltoall"},
    # 30% top-k: 8 bytes per kept entry, (W-1) * 2.4n bytes vs 2(W-1)/W * 4n bytes.
    ("topk:0.3", "torch.float32"): {2: "allgather", 3: "allgather", 4: "plain"},
}


def test_auto(results):
    world, res = results
    for (spec, dtype), choice in AUTO_CHOICE.items():
        algo, got = res[0][("auto", spec, dtype)]
        assert algo == choice[world], (spec, dtype)
        xs = [make_input(AUTO_N, r, 0, tag=6, dtype=getattr(torch, dtype[6:]))
              for r in range(world)]
        if algo == "plain":
            assert_plain_mean(got, xs)
        else:
            assert torch.equal(got, Simulation(Codec(spec), algo, world, AUTO_N,
                                               ef=False)(xs)), (spec, dtype)
    xs = [make_input(100, r, 0, tag=7) for r in range(world)]
    assert_plain_mean(res[0][("auto-small",)], xs)  # small tensors are not compressed
    xs = [make_input(N, r, 0) for r in range(world)]
    assert torch.equal(res[0][("verify-once",)],
                       Simulation(Codec("int8"), "allgather", world, N, ef=False)(xs))


ERROR_EXPECT = {
    "codec": ("ValueError", "ranks disagree on codec"),
    "codec-options": ("ValueError", "ranks disagree on block"),
    "numel": ("ValueError", "ranks disagree on numel"),
    "dtype": ("ValueError", "ranks disagree on dtype"),
    "algorithm": ("ValueError", "ranks disagree on algorithm"),
    "auto-threshold": ("ValueError", "ranks disagree on algorithm"),
    "auto-vs-fixed": ("ValueError", "ranks disagree on auto"),
    "pipeline": ("ValueError", "ranks disagree on segments"),
    "version": ("ValueError", "ranks disagree on format version"),
    "corrupt-allgather": ("ValueError", "unsupported gradzip payload format version"),
    "corrupt-alltoall": ("ValueError", "unsupported gradzip payload format version|phase-2"),
}


def test_disagreements_raise_on_every_rank(results):
    import re

    world, res = results
    last = world - 1
    for case, (etype, pattern) in ERROR_EXPECT.items():
        for r in range(world):
            got = res[r]["errors"][case]
            assert got is not None, (case, r, "did not raise")
            assert got[0] == etype, (case, r, got)
            assert re.search(pattern, got[1]), (case, r, got[1])
    # the rank with the float64 tensor says why; the others that it refused
    for r in range(world):
        etype, msg = res[r]["errors"]["refused"]
        if r == last:
            assert etype == "TypeError" and "float64" in msg
        else:
            assert etype == "ValueError" and f"rank(s) [{last}] refused" in msg
    for r in range(world):
        etype, msg = res[r]["errors"]["residual-size"]
        if r == last:
            assert etype == "ValueError" and f"holds a residual of {N + 5}" in msg
        else:
            assert etype == "ValueError" and f"rank(s) [{last}] refused" in msg
    # messages name every rank's view
    assert f"rank {last}: format v1, codec int8" in res[0]["errors"]["codec"][1]
    # the group survived all of it
    assert _all_equal([r["errors"]["still-works"] for r in res])


def test_dead_rank_raises_within_timeout():
    assert_survivors_raise(3, die_midway)


def test_single_process_checks():
    """Argument errors that need no peers."""
    with pytest.raises(RuntimeError, match="init_process_group"):
        gradzip.all_reduce(torch.zeros(10), "int4")
    with pytest.raises(TypeError):
        gradzip.all_reduce([1.0], "int4")


def test_seeds_differ_and_repeat():
    seeds = {comm.stochastic_seed(0, r, s, comm.key_hash("a"), ph, ch)
             for r in range(4) for s in range(50) for ph in range(2) for ch in range(4)}
    assert len(seeds) == 4 * 50 * 2 * 4  # all distinct
    assert comm.stochastic_seed(3, 1, 2, 4, 0, 1) == comm.stochastic_seed(3, 1, 2, 4, 0, 1)
    assert comm.stochastic_seed(3, 1, 2, 4, 0, 1) != comm.stochastic_seed(4, 1, 2, 4, 0, 1)
    assert all(0 <= s < 2**32 for s in seeds)


def test_key_hash_is_the_same_in_every_process(results):
    """Seeds must not depend on the process: Python's str hash does (PYTHONHASHSEED)."""
    world, res = results
    for r in range(world):
        assert res[r]["key_hash"] == comm.key_hash(("grad", "layer.weight", 3))


def test_plan_layout():
    c = Codec("int4")
    p = comm.plan(c, 1000, torch.float32, 3, "alltoall")
    assert p.chunks == ((0, 384), (384, 768), (768, 1000))
    assert p.sizes[2] < p.sizes[0] == p.payload_bytes
    p = comm.plan(c, 100, torch.float32, 4, "alltoall")
    assert p.chunks == ((0, 100), (100, 100), (100, 100), (100, 100))
    assert comm.plan(c, 0, torch.float32, 4, "auto").algorithm == "plain"
    # "auto" re-compresses 2-bit and wider codecs in two phases, never 1-bit sign
    assert comm.plan(Codec("int2"), 10**6, torch.float32, 8, "auto").algorithm == "alltoall"
    assert comm.plan(Codec("sign"), 10**6, torch.float32, 8, "auto").algorithm == "allgather"
    assert comm.plan(Codec("sign"), 10**6, torch.float32, 8, "alltoall").algorithm == "alltoall"
    with pytest.raises(ValueError, match="algorithm"):
        comm.plan(c, 10, torch.float32, 2, "ring")


def test_error_feedback_state_dict_roundtrip():
    ef = gradzip.ErrorFeedback(seed=9)
    cpu = torch.device("cpu")
    ef.set_residual("a", torch.arange(10.0), step=5)
    # this rank's chunk of two segments, in a group of 2, averaging (scale 2)
    layout = comm.ServerLayout(2, ((3, 7), (8, 10)), 2.0)
    ef.server_residual_for("a", layout, cpu).copy_(torch.ones(6))
    sd = ef.state_dict()
    ef2 = gradzip.ErrorFeedback()
    ef2.load_state_dict(sd)
    assert ef2.seed == 9 and torch.equal(ef2.pending("a"), ef.pending("a"))
    assert ef2.step("a") == 5
    assert torch.equal(ef2.server_residual("a"), ef.server_residual("a"))
    want = torch.arange(10.0)
    want[3:7] += 2.0
    want[8:10] += 2.0
    assert torch.equal(ef.pending("a"), want)
    # another layout folds the old server residual into the worker residual: nothing lost
    ef2.server_residual_for("a", comm.ServerLayout(2, ((0, 5),), 2.0), cpu)
    assert torch.equal(ef2.pending("a"), want)
    assert torch.equal(ef2.residual("a"), want)
    with pytest.raises(ValueError, match="holds a residual of 10"):
        ef.worker_residual("a", 11, cpu)
    with pytest.raises(ValueError):
        ef2.load_state_dict({"nope": 1})
    with pytest.raises(ValueError):
        gradzip.ErrorFeedback(seed=-1)


def test_plan_bytes_sent():
    """Bytes one rank sends, from the payload sizes of gradzip.format (headers, scales and
    padding included) and the chunk layout restated in this file."""

    n, world = 1_000_003, 4
    assert comm.plan(Codec("int8"), n, torch.float32, world, "plain").bytes_sent == \
        2 * (world - 1) * n * 4 // world
    assert comm.plan(Codec("int8"), n, torch.float16, world, "plain").bytes_sent == \
        2 * (world - 1) * n * 2 // world
    assert comm.plan(Codec("int4"), n, torch.float32, world, "allgather").bytes_sent == \
        (world - 1) * fmt.dense_payload_bytes(n, 4, 128)
    assert comm.plan(Codec("topk:0.01"), n, torch.float32, world, "allgather").bytes_sent == \
        (world - 1) * fmt.topk_payload_bytes(n, round(0.01 * n))
    chunks, _ = chunk_layout(Codec("int8"), n, world)
    one_segment = comm.Pipeline(min_numel=1 << 30)
    p = comm.plan(Codec("int8"), n, torch.float32, world, "alltoall", pipeline=one_segment)
    assert p.bytes_sent == 2 * (world - 1) * max(fmt.dense_payload_bytes(b - a, 8, 128)
                                                 for a, b in chunks)
    assert comm.plan(Codec("int8"), n, torch.float32, 1, "plain").bytes_sent == 0


def fresh_group_battery(rank: int, world: int) -> dict:
    """"auto" settles on one group; a group made after that one is destroyed starts fresh,
    whatever id() Python gives it."""
    import gc
    import weakref

    import torch.distributed as dist

    g1 = dist.new_group(list(range(world)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comm.autotune.Clock, "seconds",
                   lambda self: 0.01 if self.kind == "plain" else 0.05)
        for step in range(3 * comm.AUTO_FIRST_LOOK_ROUNDS + 1):  # past the first look
            gradzip.all_reduce(make_input(AUTO_TUNE_N, rank, step), codec("int8"), group=g1)
    out = {"settled": comm.auto_choice(AUTO_TUNE_N, codec("int8"), group=g1),
           "default": comm.auto_choice(AUTO_TUNE_N, codec("int8"))}
    alive = weakref.ref(g1)
    dist.destroy_process_group(g1)
    del g1
    gc.collect()
    out["collected"] = alive() is None
    g2 = dist.new_group(list(range(world)))
    out["fresh"] = comm.auto_choice(AUTO_TUNE_N, codec("int8"), group=g2)
    x = make_input(AUTO_TUNE_N, rank, 0)
    gradzip.all_reduce(x, codec("int8"), group=g2)  # the first call of a new signature: a probe
    out["after_one_call"] = comm.auto_choice(AUTO_TUNE_N, codec("int8"), group=g2)
    return out


def test_auto_state_belongs_to_the_group_object():
    world = 2
    res = run_ranks(world, fresh_group_battery)
    for r in range(world):
        assert res[r]["settled"]["algorithm"] == "plain", res[r]
        assert res[r]["default"] is None  # the default group never saw this signature
        assert res[r]["fresh"] is None and res[r]["after_one_call"] is None, res[r]


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_compact_storage_state_dict_and_memory(storage):
    ef = gradzip.ErrorFeedback(seed=1, storage=storage)
    w = make_input(1000, 0, 0)
    ef.set_residual("a", w.clone(), step=3)
    kept = ef.residual("a")
    # what the format keeps: bf16 rounding, or int8 within half a step of its block's scale
    if storage == "bf16":
        assert torch.equal(kept, w.to(torch.bfloat16).float())
        assert ef.memory_bytes() == 2 * 1000
    else:
        scales = w.view(-1)[: 896].view(7, 128).abs().amax(1) / 127
        assert torch.all((kept[:896] - w[:896]).view(7, 128).abs()
                         <= scales[:, None] / 2 * (1 + 1e-6))
        assert ef.memory_bytes() == gradzip.format.dense_payload_bytes(1000, 8, 128)
    sd = ef.state_dict()
    ef2 = gradzip.ErrorFeedback(storage=storage)
    ef2.load_state_dict(sd)
    assert torch.equal(ef2.residual("a"), kept) and ef2.step("a") == 3
    with pytest.raises(ValueError, match="holds .* residuals"):
        gradzip.ErrorFeedback(storage="fp32").load_state_dict(sd)
    with pytest.raises(ValueError, match="storage"):
        gradzip.ErrorFeedback(storage="fp16")


def test_rank_errors_are_reported():
    with pytest.raises(RankError, match="ZeroDivisionError"):
        run_ranks(2, _fail_on_rank_one, deadline=60)


def _fail_on_rank_one(rank, world):
    if rank == 1:
        return 1 // 0
    return rank


LARGE_N = 2**20 + 3


def large_battery(rank: int, world: int) -> dict:
    out = {}
    for spec in CODECS:
        for algo in ALGORITHMS:
            st = gradzip.ErrorFeedback(seed=EF_SEED)
            steps = []
            for t in range(2):
                x = make_input(LARGE_N, rank, t, tag=9)
                gradzip.all_reduce(x, codec(spec), state=st, algorithm=algo, key=KEY)
                steps.append(x)
            out[(spec, algo)] = steps
    return out


@pytest.mark.slow
def test_large_tensor_matches_simulation():
    """2^20 + 3 elements on 4 ranks, two steps with error feedback, every codec x algorithm:
    bit-identical on every rank and equal to the reference simulation."""
    world = 4
    res = run_ranks(world, large_battery, deadline=600)
    for spec in CODECS:
        for algo in ALGORITHMS:
            sim = Simulation(Codec(spec), algo, world, LARGE_N, ef=True, base_seed=EF_SEED,
                             key=KEY)
            for t in range(2):
                want = sim([make_input(LARGE_N, r, t, tag=9) for r in range(world)])
                for r in range(world):
                    assert torch.equal(res[r][(spec, algo)][t], want), (spec, algo, r, t)


# ---------------------------------------------------------------------------------------
# "auto": measured choice between the compressed plan and the plain all-reduce
# ---------------------------------------------------------------------------------------

AUTO_TUNE_N = 20_000
AUTO_TUNE_CALLS = 3 * comm.AUTO_PROBES + 4  # past the last look of three kinds


def auto_tune_battery(rank: int, world: int, fake: dict) -> dict:
    """Each timed call reports the seconds ``fake[rank][kind]`` instead of its wall time
    (kind: the call's algorithm), so the decision is known in advance; everything else,
    collectives included, is real."""
    mp = pytest.MonkeyPatch()  # undone below, before the process returns its results
    mp.setattr(comm.autotune.Clock, "seconds", lambda self: fake[rank][self.kind])
    out = {}
    st = gradzip.ErrorFeedback(seed=EF_SEED)
    outs, choices = [], []
    for step in range(AUTO_TUNE_CALLS):
        x = make_input(AUTO_TUNE_N, rank, step, tag=11)
        gradzip.all_reduce(x, codec("int8"), state=st, algorithm="auto", key=KEY)
        outs.append(x)
        choices.append(comm.auto_choice(x, codec("int8")))
    out["outs"] = outs
    out["choices"] = choices
    out["pending"] = st.pending(KEY)
    comm.reset_auto()
    out["after_reset"] = comm.auto_choice(AUTO_TUNE_N, codec("int8"))
    mp.undo()
    return out


def _settled_at(choices) -> int | None:
    return next((i for i, c in enumerate(choices) if c is not None), None)


@pytest.mark.parametrize("case", ["plain-clearly", "alltoall-clearly", "allgather-clearly",
                                  "alltoall-narrowly", "ranks-differ", "compressed-tie",
                                  "within-margin"])
def test_auto_measures_and_settles(case):
    world = 3
    # int8 on 3 ranks: "auto" plans the two-phase algorithm and times the all-gather too
    assert [c.algorithm for c in comm.auto_candidates(
        Codec("int8"), AUTO_TUNE_N, torch.float32, world)] == ["alltoall", "allgather"]

    def same(plain, alltoall, allgather):
        return [{"plain": plain, "alltoall": alltoall, "allgather": allgather}] * world

    fake = {"plain-clearly": same(0.01, 0.05, 0.04),
            "alltoall-clearly": same(0.05, 0.01, 0.03),
            "allgather-clearly": same(0.05, 0.03, 0.01),
            "alltoall-narrowly": same(0.012, 0.010, 0.011),
            # rank 0 alone finds plain much faster; the rank-average decides for all
            "ranks-differ": [same(0.010, 0.020, 0.030)[0]] + same(0.030, 0.010, 0.020)[1:],
            # equal compressed times: the all-gather (one compression), at the last look
            "compressed-tie": same(0.012, 0.010, 0.010),
            # faster than plain, but by less than AUTO_MARGIN: the exact plain sum
            "within-margin": same(0.0104, 0.0100, 0.0101)}[case]
    assert 0.0104 / 0.0100 < comm.AUTO_MARGIN < 0.012 / 0.010
    want_algo = {"plain-clearly": "plain", "allgather-clearly": "allgather",
                 "compressed-tie": "allgather", "within-margin": "plain"}.get(case, "alltoall")
    # settled at the first look (after 4 calls of each of the 3 kinds) when one kind is >=
    # AUTO_CLEAR faster than both others, else at the last probe; the same on every rank
    first, last = 3 * comm.AUTO_FIRST_LOOK_ROUNDS, 3 * comm.AUTO_PROBES
    want_at = last if case in ("alltoall-narrowly", "compressed-tie", "within-margin") \
        else first
    res = run_ranks(world, auto_tune_battery, fake)
    for r in range(world):
        ch = res[r]["choices"]
        assert _settled_at(ch) == want_at, (r, ch)
        assert all(c["algorithm"] == want_algo for c in ch[want_at:]), (r, ch[want_at:])
        t = ch[-1]
        for kind in ("plain", "alltoall", "allgather"):
            assert t["times_s"][kind] == pytest.approx(sum(f[kind] for f in fake) / world)
        fastest = min(("alltoall", "allgather"), key=lambda k: (t["times_s"][k], k))
        assert t["compressed_algorithm"] == fastest
        assert t["plain_s"] == t["times_s"]["plain"]
        assert res[r]["after_reset"] is None
    for step in range(AUTO_TUNE_CALLS):
        assert _all_equal([res[r]["outs"][step] for r in range(world)]), step
    xs = [[make_input(AUTO_TUNE_N, r, s, tag=11) for r in range(world)]
          for s in range(AUTO_TUNE_CALLS)]
    # after settling, a plain call is the exact mean (float32 sum order of Gloo: 1e-6 rel)
    # and a compressed one is the simulated algorithm
    last = res[0]["outs"][-1]
    if want_algo == "plain":
        assert_plain_mean(last, xs[-1])
    # error feedback across probes, plain calls and the switch: what the outputs lack is
    # exactly what is still pending (nothing when settled on plain: it was handed over)
    got = torch.stack([o.double() for o in res[0]["outs"]]).sum(0)
    exact = sum(torch.stack([x.double() for x in xs_t]).mean(0) for xs_t in xs)
    pending = torch.stack([res[r]["pending"].double() if res[r]["pending"] is not None
                           else torch.zeros(AUTO_TUNE_N, dtype=torch.float64)
                           for r in range(world)]).mean(0)
    if want_algo == "plain":
        assert all(res[r]["pending"] is None for r in range(world))
    # float32 outputs and residual updates: each of the 20 calls rounds at ~6e-8 relative
    # to the magnitude of the values involved
    scale = torch.stack([x.double().abs() for xs_t in xs for x in xs_t]).max(0).values
    assert torch.all((got + pending - exact).abs() <= 1e-5 * scale + 1e-30)


# ---------------------------------------------------------------------------------------
# pipelines (two-phase and all-gather): segments change the timing, never the numbers
# (dense codecs, nearest rounding)
# ---------------------------------------------------------------------------------------

SEG_N = 12_345
SEG_STEPS = 3


def segmented_battery(rank: int, world: int) -> dict:
    """The same EF steps with the pipeline off (one segment) and on (small segments)."""
    out = {}
    for label, min_numel in (("one", 1 << 30), ("many", 2_000)):
        pipe = comm.Pipeline(min_numel=min_numel)
        for algo in ("alltoall", "allgather"):
            for spec in ("int8", "int4,block=64", "sign"):
                st = gradzip.ErrorFeedback(seed=EF_SEED)
                steps = []
                for t in range(SEG_STEPS):
                    x = make_input(SEG_N, rank, t, tag=12)
                    if t == SEG_STEPS - 1:  # the last step through the future
                        assert gradzip.all_reduce(x, codec(spec), state=st, algorithm=algo,
                                                  key=KEY, async_op=True,
                                                  pipeline=pipe).wait() is x
                    else:
                        gradzip.all_reduce(x, codec(spec), state=st, algorithm=algo,
                                           key=KEY, pipeline=pipe)
                    steps.append(x)
                # the server residual spread out over the tensor (0 where others own it)
                server = st.server_residual(KEY)
                if server is None:
                    server = torch.zeros(SEG_N)
                out[(label, algo, spec)] = (steps, st.residual(KEY).clone(), server)
            out[(label, algo, "plan")] = comm.plan(codec("int8"), SEG_N, torch.float32,
                                                   world, algo, pipeline=pipe)
    # a corrupt payload in a later segment still reaches every rank as an error: two-phase
    # (W compressions per segment: call W+1 is the second segment's first chunk) and
    # all-gather (one per segment: call 2 is the second segment's)
    real = Codec.compress
    calls: list[int] = []
    target = [world + 1]

    def corrupt(self, *a, **kw):
        p = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == target[0]:
            p[4] ^= 0x7F
        return p

    with pytest.MonkeyPatch.context() as mp:
        if rank == world - 1:
            mp.setattr(Codec, "compress", corrupt)
        out["corrupt"] = catch(lambda: gradzip.all_reduce(
            make_input(SEG_N, rank, 0), codec("int4"), algorithm="alltoall",
            pipeline=comm.Pipeline(min_numel=2_000)))
        calls.clear()
        target[0] = 2
        out["corrupt-allgather"] = catch(lambda: gradzip.all_reduce(
            make_input(SEG_N, rank, 0), codec("int4"), algorithm="allgather",
            pipeline=comm.Pipeline(min_numel=2_000)))
    out["still-works"] = _group_still_works(rank, world)
    return out


TOPK_SEG_CODECS = ("topk:0.05", "topk:40,values=bf16", "topk:0.03,values=int8,exact=false")


def topk_segments_battery(rank: int, world: int) -> dict:
    """Top-k through the all-gather with small pipeline segments, with error feedback."""
    out = {}
    pipe = comm.Pipeline(min_numel=2_000)
    for spec in TOPK_SEG_CODECS:
        st = gradzip.ErrorFeedback(seed=EF_SEED)
        steps = []
        for t in range(SEG_STEPS):
            x = make_input(SEG_N, rank, t, tag=13)
            gradzip.all_reduce(x, codec(spec), state=st, algorithm="allgather", key=KEY,
                               pipeline=pipe, async_op=t == 1)
            steps.append(x)
        out[spec] = (steps, st.residual(KEY).clone())
        out[(spec, "plan")] = comm.plan(codec(spec), SEG_N, torch.float32, world,
                                        "allgather", pipeline=pipe)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_topk_allgather_selects_per_segment(world):
    """Segment j of rank r: reference.topk_select of its slice with its share of k (split as
    over the two-phase chunks) and seed (r, phase 0, chunk j); every segment decoded into its
    slice; the residuals carry what each segment dropped."""
    res = run_ranks(world, topk_segments_battery)
    segs = comm.pipeline_segments(SEG_N, 1, comm.Pipeline(min_numel=2_000))
    # 12 345 // 2 000 = 6 segments, at most 4; the first and last cut in three (the ramp)
    assert len(segs) == 8
    for spec in TOPK_SEG_CODECS:
        c = Codec(spec)
        p = res[0][(spec, "plan")]
        assert [s.chunks[0] for s in p.segments] == segs
        ks = [s.ks[0] for s in p.segments]
        if isinstance(c.k, int):  # a count, split in proportion (rounded up)
            assert ks == [max(1, math.ceil(40 * (b - a) / SEG_N)) for a, b in segs]
        else:
            assert ks == [max(1, round(c.k * (b - a))) for a, b in segs]
        worker = [torch.zeros(SEG_N) for _ in range(world)]
        for t in range(SEG_STEPS):
            xs = [make_input(SEG_N, r, t, tag=13) for r in range(world)]
            want = torch.zeros(SEG_N)
            for j, ((a, b), k) in enumerate(zip(segs, ks)):
                seeds = [comm.stochastic_seed(EF_SEED, r, t, comm.key_hash(KEY), 0, j)
                         for r in range(world)]
                rows = torch.stack([ref_compress(c, xs[r][a:b], worker[r][a:b], seeds[r], k)
                                    for r in range(world)])
                part = torch.zeros(b - a)
                reference.dequantize_accumulate(rows, part, 1.0 / world)
                want[a:b] = part
            for r in range(world):
                assert torch.equal(res[r][spec][0][t], want), (spec, t, r)
        for r in range(world):
            assert torch.equal(res[r][spec][1], worker[r]), (spec, r)


def test_pipeline_segments_layout():
    assert comm.pipeline_segments(100, 8) == [(0, 100)]
    flat = comm.Pipeline(min_numel=30, ramp=False)
    assert comm.pipeline_segments(100, 8, flat) == [(0, 40), (40, 80), (80, 100)]  # 100 // 30
    assert comm.pipeline_segments(70, 8, flat) == [(0, 40), (40, 70)]  # 2 segments of 30+
    assert comm.pipeline_segments(1000, 128, flat) == [(0, 256), (256, 512), (512, 768),
                                                       (768, 1000)]  # at most 4
    # The ramp: the first segment sent as 1/4, 1/4, 1/2 of its aligned units, the last as
    # 1/2, 1/4, 1/4 (rounded down; empty pieces dropped), the middle ones as they were.
    pipe = comm.Pipeline(min_numel=30)
    # (0, 40): 5 units -> cuts after 1 and 2 units; (80, 100): 3 units -> after 1 and 2
    assert comm.pipeline_segments(100, 8, pipe) == [(0, 8), (8, 16), (16, 40), (40, 80),
                                                    (80, 88), (88, 96), (96, 100)]
    # (40, 70): 4 units -> after 2 and 3
    assert comm.pipeline_segments(70, 8, pipe) == [(0, 8), (8, 16), (16, 40), (40, 56),
                                                   (56, 64), (64, 70)]
    # 2 units per end segment: the quarter cut is empty
    assert comm.pipeline_segments(1000, 128, pipe) == [(0, 128), (128, 256), (256, 512),
                                                       (512, 768), (768, 896), (896, 1000)]
    assert comm.pipeline_segments(1000, 1, pipe) == [
        (0, 62), (62, 125), (125, 250), (250, 500), (500, 750), (750, 875), (875, 937),
        (937, 1000)]
    pipe = flat
    p = comm.plan(Codec("int8", block=32), 1000, torch.float32, 3, "alltoall", pipeline=pipe)
    assert len(p.segments) == 4 and p.payload_bytes == sum(s.payload_bytes
                                                           for s in p.segments)
    for s in p.segments:  # chunks tile each segment at multiples of the block
        assert all(a % 32 == 0 for a, _ in s.chunks)
    assert [s.chunks[0][0] for s in p.segments] == [0, 256, 512, 768]
    # all-gather: the same segments, one payload (header included) each
    g = comm.plan(Codec("int8", block=32), 1000, torch.float32, 3, "allgather", pipeline=pipe)
    assert [s.chunks for s in g.segments] == [((0, 256),), ((256, 512),), ((512, 768),),
                                              ((768, 1000),)]
    assert [s.payload_bytes for s in g.segments] == [
        fmt.dense_payload_bytes(n, 8, 32) for n in (256, 256, 256, 232)]
    assert g.bytes_sent == 2 * sum(s.payload_bytes for s in g.segments)
    # top-k: the two-phase algorithm re-selects per chunk and is never cut further; the
    # all-gather cuts it like a dense codec, k split over the segments
    assert comm.plan(Codec("topk:0.1"), 1000, torch.float32, 3, "alltoall",
                     pipeline=pipe).segments == ()
    t = comm.plan(Codec("topk:0.1"), 1000, torch.float32, 3, "allgather", pipeline=pipe)
    assert [s.chunks[0] for s in t.segments] == comm.pipeline_segments(1000, 1, pipe)
    assert sum(s.ks[0] for s in t.segments) == 100
    # ramped: each piece its own 10 % (rounded to nearest, ties to even)
    t = comm.plan(Codec("topk:0.1"), 1000, torch.float32, 3, "allgather",
                  pipeline=comm.Pipeline(min_numel=30))
    assert [s.ks[0] for s in t.segments] == [6, 6, 12, 25, 25, 12, 6, 6]
    with pytest.raises(TypeError, match="ramp"):
        comm.Pipeline(ramp=1)
    with pytest.raises(ValueError, match="min_numel"):
        comm.Pipeline(min_numel=0)


@pytest.mark.parametrize("world", [2, 3])
def test_pipeline_changes_nothing_but_timing(world):
    res = run_ranks(world, segmented_battery)
    for algo in ("alltoall", "allgather"):
        assert len(res[0][("many", algo, "plan")].segments) > 1
        assert res[0][("one", algo, "plan")].segments == ()
        for spec in ("int8", "int4,block=64", "sign"):
            one_steps = res[0][("one", algo, spec)][0]
            # bit-identical to the unsegmented algorithm and to its reference simulation
            sim = Simulation(Codec(spec), algo, world, SEG_N, ef=True, base_seed=EF_SEED,
                             key=KEY)
            for t in range(SEG_STEPS):
                want = sim([make_input(SEG_N, r, t, tag=12) for r in range(world)])
                assert torch.equal(one_steps[t], want), (algo, spec, t)
                for r in range(world):
                    assert torch.equal(res[r][("many", algo, spec)][0][t], want), \
                        (algo, spec, t, r)
            # the residuals are the same: each rank's worker residual, and the server
            # residual of every element (held by whichever rank owns its chunk)
            for r in range(world):
                assert torch.equal(res[r][("one", algo, spec)][1],
                                   res[r][("many", algo, spec)][1]), (algo, spec, r)
            servers = {label: torch.stack([res[r][(label, algo, spec)][2]
                                           for r in range(world)]).sum(0)
                       for label in ("one", "many")}
            assert torch.equal(servers["one"], servers["many"]), (algo, spec)
            if algo == "alltoall":  # the comparison is not of zeros
                assert servers["many"].abs().sum() > 0, spec
    for r in range(world):
        assert res[r]["corrupt"] is not None and res[r]["corrupt"][0] == "ValueError", r
        bad = res[r]["corrupt-allgather"]
        assert bad is not None and bad[0] == "ValueError" and "segment [" in bad[1], (r, bad)
    assert _all_equal([res[r]["still-works"] for r in range(world)])


# ---------------------------------------------------------------------------------------
# staging buffers kept across calls (CPU)
# ---------------------------------------------------------------------------------------

POOL_N = 5_003


def pool_battery(rank: int, world: int) -> dict:
    """Calls of one signature: two asynchronous ones in flight at once (each must have its
    own buffers), then the same two one after the other with fresh states; the pool's
    size after each stage."""
    from gradzip.comm.groups import group_state

    pool = group_state(None).buffers
    out = {"start": pool.nbytes()}
    for algo in ("allgather", "alltoall"):
        xs = [make_input(POOL_N, rank, t, tag=21) for t in range(2)]
        states = [gradzip.ErrorFeedback(seed=EF_SEED) for _ in range(2)]
        futs = [gradzip.all_reduce(x, codec("int4"), state=st, algorithm=algo, key=KEY,
                                   async_op=True, pipeline=comm.Pipeline(min_numel=2_000))
                for x, st in zip(xs, states)]
        overlapped = [f.wait().clone() for f in futs]
        ys = [make_input(POOL_N, rank, t, tag=21) for t in range(2)]
        for y in ys:
            gradzip.all_reduce(y, codec("int4"), state=gradzip.ErrorFeedback(seed=EF_SEED),
                               algorithm=algo, key=KEY, pipeline=comm.Pipeline(min_numel=2_000))
        out[algo] = (overlapped, ys)
        out[(algo, "held")] = pool.nbytes()
    # the same calls again take the buffers back: the pool does not grow
    for algo in ("allgather", "alltoall"):
        gradzip.all_reduce(make_input(POOL_N, rank, 0, tag=21), codec("int4"),
                           state=gradzip.ErrorFeedback(seed=EF_SEED), algorithm=algo,
                           key=KEY, pipeline=comm.Pipeline(min_numel=2_000))
    out["again"] = pool.nbytes()
    comm.release_buffers()
    out["released"] = pool.nbytes()
    return out


def test_buffers_are_reused_never_shared():
    world = 2
    res = run_ranks(world, pool_battery)
    for algo in ("allgather", "alltoall"):
        for t in range(2):
            # a fresh state per call: each call is the first step of its own simulation
            sim = Simulation(Codec("int4"), algo, world, POOL_N, ef=True,
                             base_seed=EF_SEED, key=KEY)
            want = sim([make_input(POOL_N, r, t, tag=21) for r in range(world)])
            for r in range(world):
                overlapped, one_by_one = res[r][algo]
                assert torch.equal(overlapped[t], want), (algo, t, r)
                assert torch.equal(one_by_one[t], want), (algo, t, r)
    for r in range(world):
        assert res[r]["allgather", "held"] > res[r]["start"]
        assert res[r]["alltoall", "held"] >= res[r]["allgather", "held"]
        assert res[r]["again"] == res[r]["alltoall", "held"]  # reused, not grown
        assert res[r]["released"] == 0


def test_buffer_pool_unit():
    from gradzip.comm.buffers import MAX_FREE_PER_SIZE, BufferPool, Staging

    pool = BufferPool()
    a = pool.take(100, torch.device("cpu"))
    assert a.dtype == torch.uint8 and a.numel() == 100
    pool.give([a])
    assert pool.take(100, torch.device("cpu")) is a  # the same buffer back
    assert pool.take(100, torch.device("cpu")) is not a  # taken: a fresh one
    pool.give([torch.empty(8, dtype=torch.uint8) for _ in range(MAX_FREE_PER_SIZE + 3)])
    assert pool.nbytes() == 8 * MAX_FREE_PER_SIZE  # a bounded number kept per size
    # a call's staging: zero-filled where asked, float views, all given back at release
    st = Staging(pool, torch.device("cpu"))
    z = st.bytes(3, 16, zero=True)
    f = st.floats(5, zero=True)
    assert z.shape == (3, 16) and not z.any() and f.dtype == torch.float32 and not f.any()
    st.release()
    assert pool.nbytes() == 8 * MAX_FREE_PER_SIZE + 48 + 20
    # other devices allocate and keep nothing (the CUDA caching allocator reuses memory
    # and knows its streams)
    meta = Staging(pool, torch.device("meta"))
    assert meta.bytes(10).device.type == "meta"
    meta.release()
    assert pool.nbytes() == 8 * MAX_FREE_PER_SIZE + 48 + 20
