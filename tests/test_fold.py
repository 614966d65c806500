"""The agreement check folded into the call's own collectives (gradzip.comm.fold).

On 2-4 Gloo ranks: once calls repeat, ``verify="always"`` makes no separate exchange (no
"verify" time is recorded) and changes nothing in the numbers (bit-identical to the same
sequence with ``verify="never"``, which never checks); a rank that deviates from the
predicted call makes every rank raise, with every tensor and residual left as it was, and
the group goes on; every rank changing its call together is no error.
"""

from __future__ import annotations

import gradzip
import pytest
import torch
from dist_helpers import TEST_BACKEND, catch, run_ranks
from gradzip import Codec, comm
from gradzip.comm import autotune, fold

pytestmark = pytest.mark.distributed

N = 2003
KEY = "g"
CASES = [("int8", "allgather"), ("int4", "alltoall"), ("sign", "allgather"),
         ("topk:0.05", "allgather"), ("int8", "plain"), ("int8", "auto")]


def codec(spec: str) -> Codec:
    return Codec(spec, backend=TEST_BACKEND)


def make_input(n: int, rank: int, step: int, tag: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * rank + 104_729 * step + 31 * tag + n)
    return torch.randn(n, generator=g) * (1 + step)


def _settle_on(kind: str):
    """Make "auto" settle at its first look, on ``kind``, the same on every rank (the
    measured choice depends on timing; what is tested here does not)."""
    def settle(self, device, group, final):
        self.choice = self.plain if kind == "plain" else self.planned
        self.times = (1.0, 1.0)
        return True
    return settle


# Cut N-sized tensors into 4 segments, 8 ramp pieces: a folded all-gather keeps only the
# pieces it compressed before its first piece came back (feedback.Journal)
SEGMENTED = comm.Pipeline(min_numel=N // 4)
# The deviation cases beyond CASES: (codec, algorithm, residual storage, pipeline, numel)
PIECEWISE = [("topk:0.05", "fp32", SEGMENTED, N), ("sign", "int8", SEGMENTED, N),
             ("int8", "bf16", SEGMENTED, N),
             ("int4", "fp32", comm.DEFAULT_PIPELINE, fold.FOLD_MAX_BYTES // 4 + 64)]


def sequence(rank: int, world: int, verify: str, calls: list[tuple], events: dict,
             pipeline: comm.Pipeline = comm.DEFAULT_PIPELINE) -> list:
    """Run ``calls`` ((codec, algorithm, numel, tag, async)) with one ErrorFeedback; per
    call the result, whether it recorded verify time, and the pending residual."""
    st = gradzip.ErrorFeedback(seed=3)
    out = []
    for i, (spec, algo, n, tag, is_async) in enumerate(calls):
        x = make_input(n, rank, i, tag)
        t: dict = {}
        r = gradzip.all_reduce(x, codec(spec), state=st, algorithm=algo, key=(KEY, n),
                               verify=verify, timings=t, async_op=is_async,
                               pipeline=pipeline)
        if is_async:
            assert r.wait() is x
        out.append((x, "verify" in t, st.pending((KEY, n))))
        if i in events:
            events[i](out)
    return out


STEADY_CALLS = 16


def steady_numel(case_index: int) -> int:
    """A numel of its own per case of CASES (an earlier case's history would predict it)."""
    return 5000 + 101 * case_index


def fresh_tuner(spec: str, numel: int, world: int) -> autotune.Tuner:
    """The tuner "auto" starts for a float32 tensor of ``numel`` elements (2 or 3 kinds)."""
    p = comm.plan(codec(spec), numel, torch.float32, world, "auto")
    return autotune.Tuner(p, comm.auto_candidates(codec(spec), numel, torch.float32, world))


def first_look(spec: str, numel: int, world: int) -> int:
    """The call at which "auto" first compares."""
    return fresh_tuner(spec, numel, world).first_look


def auto_kinds(spec: str, numel: int, world: int) -> list[str]:
    """The algorithms "auto" cycles through while probing, in call order."""
    return [k.algorithm for k in fresh_tuner(spec, numel, world).kinds]


def fold_battery(rank: int, world: int) -> dict:
    res: dict = {}
    last = world - 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autotune.Tuner, "_settle", _settle_on("compressed"))
        for j, (spec, algo) in enumerate(CASES):
            # a numel of its own per case (an earlier case's history would predict it)
            calls = [(spec, algo, steady_numel(j), 0, i % 2 == 1) for i in range(STEADY_CALLS)]
            comm.reset_auto()
            folded = sequence(rank, world, "always", calls, {})
            comm.reset_auto()
            never = sequence(rank, world, "never", calls, {})
            res[("steady", spec, algo)] = (folded, never)
        # a DDP-like cycle of three signatures
        cyc = [("int8", "allgather", n, 1, True) for n in (500, 7000, 1500)] * 4
        res["cycle"] = (sequence(rank, world, "always", cyc, {}),
                        sequence(rank, world, "never", cyc, {}))
    # "auto" settled on plain for one signature, compressed calls of the same key between:
    # the folded plain call adds what compression held back (and then forgets it)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autotune.Tuner, "_settle", _settle_on("plain"))
        mixed = [("int8", "auto", 5000, 2, False)] * (first_look("int8", 5000, world) + 2) + \
            [("int4", "allgather", 5000, 2, False), ("int8", "auto", 5000, 2, False)] * 3
        comm.reset_auto()
        a = sequence(rank, world, "always", mixed, {})
        comm.reset_auto()
        b = sequence(rank, world, "never", mixed, {})
        res["hand-over"] = (a, b)
    # segmented all-gathers fold too, at any size
    calls = [("topk:0.05", "allgather", N, 3, i % 2 == 1) for i in range(8)]
    res["segmented"] = (sequence(rank, world, "always", calls, {}, SEGMENTED),
                        sequence(rank, world, "never", calls, {}, SEGMENTED))
    res["reduce-scatter"] = reduce_scatter_fold(rank, world, last)
    res["probe-deviate"] = probe_deviate(rank, world, last)
    res["changing-order"] = changing_order(rank, world)
    res["plain-bits"] = plain_bits(rank, world)
    # deviations after a steady state
    for spec, algo in CASES[:5]:
        for how in ("numel", "codec", "refused", "async", "everyone"):
            res[("deviate", spec, algo, how)] = deviate(rank, world, spec, algo, how, last)
    for spec, storage, pipe, n in PIECEWISE:
        for how in ("numel", "async"):
            res[("deviate", spec, storage, n, how)] = deviate(
                rank, world, spec, "allgather", how, last, storage=storage, pipeline=pipe,
                n=n)
    return res


def deviate(rank: int, world: int, spec: str, algo: str, how: str, last: int, *,
            storage: str = "fp32", pipeline: comm.Pipeline = comm.DEFAULT_PIPELINE,
            n: int = N) -> dict:
    st = gradzip.ErrorFeedback(seed=4, storage=storage)
    # the same calls without the failed one, unchecked
    twin = gradzip.ErrorFeedback(seed=4, storage=storage)
    c = codec(spec)
    for state, verify in ((twin, "never"), (st, "always")):  # "never" forgets the history
        for i in range(4):
            x = make_input(n, rank, i)
            gradzip.all_reduce(x, c, state=state, algorithm=algo, key=KEY, verify=verify,
                               pipeline=pipeline)
    # the next call, as this rank makes it
    x = make_input(n, rank, 4)
    bad = rank == last or how == "everyone"
    resized = bad and how in ("numel", "everyone", "async")
    if resized:
        x = make_input(n + 7, rank, 4)
    elif bad and how == "refused":
        x = x.double()
    spec_here = ("int2" if spec != "int2" else "int4") if bad and how == "codec" else spec
    before, pending, step = x.clone(), st.pending(KEY), st.step(KEY)
    t: dict = {}

    def call():
        r = gradzip.all_reduce(x, codec(spec_here), state=st, algorithm=algo,
                               key="other" if resized else KEY, timings=t,
                               async_op=how == "async" and not bad, pipeline=pipeline)
        if how == "async" and not bad:
            r.wait()

    out = {"error": catch(call), "verify": "verify" in t,
           "unchanged": torch.equal(x, before) if how != "everyone" else None,
           "residual": _same(st.pending(KEY), pending) and st.step(KEY) == step}
    # the group goes on, and the failed call left no trace in the numbers
    a, b = make_input(n, rank, 5), make_input(n, rank, 5)
    gradzip.all_reduce(a, c, state=st, algorithm=algo, key=KEY, pipeline=pipeline)
    gradzip.all_reduce(b, c, state=twin, algorithm=algo, key=KEY, verify="never",
                       pipeline=pipeline)
    out["after"] = (a, b)
    out["everyone-result"] = x if how == "everyone" else None
    return out


ORDER = {"A": 700, "B": 900, "C": 1100}  # numel of three signatures
# A's successor alternates for 3 rounds (every rank mispredicts it once, then doubts it),
# then stays C (trusted again once C has followed A twice in a row)
CHANGING = list("ABACABAC") + list("AC") * 4


def changing_order(rank: int, world: int) -> dict:
    """A call order that changes from round to round: decoys (runs of the predicted call's
    collectives) and checks per call, and the results against ``verify="never"``."""
    decoys = []
    real = comm.run_decoy

    def counting(*args, **kwargs):
        decoys.append(len(out))
        return real(*args, **kwargs)

    import torch.distributed as dist

    group = dist.new_group(list(range(world)))  # a history of its own
    out: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comm, "run_decoy", counting)
        calls = [("int8", "allgather", ORDER[c], 13, False) for c in CHANGING]
        st = gradzip.ErrorFeedback(seed=3)
        for i, (spec, algo, n, tag, _) in enumerate(calls):
            x = make_input(n, rank, i, tag)
            t: dict = {}
            gradzip.all_reduce(x, codec(spec), state=st, algorithm=algo, key=(KEY, n),
                               group=group, timings=t)
            out.append((x, "verify" in t))
    never = sequence(rank, world, "never", calls, {})
    return {"decoys": decoys, "out": out, "never": [x for x, _, _ in never]}


def plain_bits(rank: int, world: int) -> dict:
    """The same plain all-reduce of the same input, first with the explicit check (no
    history yet), then folded: the same bits (the layout of a call that may fold does not
    depend on whether it does), also averaged and in bfloat16."""
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))  # a history of its own
    out = {}
    for dtype, average in ((torch.float32, False), (torch.float32, True),
                           (torch.bfloat16, True)):
        x0 = make_input(1000, rank, 0, tag=14).to(dtype)
        runs = []
        for _ in range(4):
            x, t = x0.clone(), {}
            gradzip.all_reduce(x, codec("int8"), algorithm="plain", average=average,
                               group=group, timings=t)
            runs.append((x, "verify" in t))
        out[dtype, average] = runs
    return out


PROBE_N = 6007  # above the default min_numel: "auto" probes it


def probe_deviate(rank: int, world: int, last: int) -> dict:
    """"auto" folds its probes too: rank ``last`` deviates at two of them (a compressed
    probe, then a plain one, the second asynchronous on the other ranks); every rank
    raises, changes nothing, and every rank's tuner counts both calls, so the probing
    goes on in step and settles at the same call everywhere."""
    c = codec("int8")
    st = gradzip.ErrorFeedback(seed=5)
    comm.reset_auto()
    outs, fails, settled_at = [], [], None
    for i in range(4 + 2 + 3 * comm.AUTO_PROBES):
        deviating = i in (4, 5)
        bad = deviating and rank == last
        x = make_input(PROBE_N + (7 if bad else 0), rank, i, tag=12)
        if not deviating:
            gradzip.all_reduce(x, c, state=st, algorithm="auto", key=KEY)
            outs.append(x)
            if settled_at is None and comm.auto_choice(x, c) is not None:
                settled_at = i
            continue
        before, pending, t = x.clone(), st.pending(KEY), {}

        def call(x=x, bad=bad, i=i, t=t):
            r = gradzip.all_reduce(x, c, state=st, algorithm="auto", key="other" if bad else KEY,
                                   timings=t, async_op=i == 5 and not bad)
            if i == 5 and not bad:
                r.wait()

        fails.append((catch(call), "verify" in t, torch.equal(x, before),
                      _same(st.pending(KEY), pending)))
    out = {"outs": outs, "fails": fails, "settled_at": settled_at,
           "choice": comm.auto_choice(PROBE_N, c)["algorithm"]}
    # after reset_auto (on every rank), the predicted call's tuner exists only on the ranks
    # that make it (their call creates it): a rank that deviates there must still get the
    # same verdict as the others (a clear error, no mismatched collectives)
    comm.reset_auto()
    x = make_input(PROBE_N + (7 if rank == last else 0), rank, 99, tag=12)
    before = x.clone()
    out["after-reset"] = (catch(lambda: gradzip.all_reduce(
        x, c, state=st, algorithm="auto", key="other" if rank == last else KEY)),
        torch.equal(x, before))
    x = make_input(PROBE_N, rank, 100, tag=12)
    gradzip.all_reduce(x, c, state=st, algorithm="auto", key=KEY)  # the group goes on
    out["after-reset-next"] = x
    return out


def reduce_scatter_fold(rank: int, world: int, last: int) -> dict:
    """gradzip.reduce_scatter's two-phase algorithm (phase 1 alone) folds too."""
    out = {}
    for verify in ("always", "never"):
        st = gradzip.ErrorFeedback(seed=6)
        seq = []
        for i in range(5):
            x = make_input(N * world, rank, i, tag=9)
            o = torch.empty(N)
            t: dict = {}
            gradzip.reduce_scatter(o, x, codec("int4"), state=st, algorithm="alltoall",
                                   verify=verify, timings=t)
            seq.append((o, "verify" in t))
        out[verify] = seq
    x = make_input(N * world + (world if rank == last else 0), rank, 5, tag=9)
    o = torch.zeros(N + (1 if rank == last else 0))
    out["deviate"] = catch(lambda: gradzip.reduce_scatter(o, x, codec("int4"),
                                                          algorithm="alltoall"))
    out["untouched"] = bool((o == 0).all())
    return out


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a, b)


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"world{w}")
def results(request):
    return request.param, run_ranks(request.param, fold_battery)


def _eq(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a is b


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_steady_calls_fold_and_change_nothing(results, case):
    world, res = results
    for r in range(world):
        folded, never = res[r][("steady", *case)]
        # the first call checks explicitly, the second too (it has no history yet); every
        # later call folds, but for the probe at which "auto" compares (its first look, call
        # 8 or 12: it settles there), which runs one more collective
        explicit = {0, 1}
        kinds = None
        if case[1] == "auto":
            look = first_look(case[0], steady_numel(CASES.index(case)), world)
            explicit.add(look)
            kinds = auto_kinds(case[0], steady_numel(CASES.index(case)), world)
            assert look < STEADY_CALLS
        assert [v for _, v, _ in folded] == [i in explicit for i in range(STEADY_CALLS)], r
        assert not any(v for _, v, _ in never)
        for i, ((x, _, p), (y, _, q)) in enumerate(zip(folded, never)):
            assert _eq(p, q)
            # "auto" probes the plain all-reduce as its last kind; settled on the compressed
            plain_probe = kinds is not None and i < look and i % len(kinds) == len(kinds) - 1
            if case[1] != "plain" and not (plain_probe and i not in explicit):
                assert torch.equal(x, y)
                continue
            # A folded plain all-reduce sums W more elements (the flags), so Gloo may cut
            # the buffer elsewhere and add in another order: each of the two sums is within
            # W 2^-24 mean_r |x_r| of the exact mean (see test_comm.assert_plain_mean),
            # so they are within twice that of each other; every rank gets the same bits.
            assert _plain_close(x, y, world, i)
            assert torch.equal(x, res[0][("steady", *case)][0][i][0])


def _plain_close(x: torch.Tensor, y: torch.Tensor, world: int, step: int) -> bool:
    n = x.numel()
    mags = torch.stack([make_input(n, q, step).double().abs() for q in range(world)]).mean(0)
    return bool(((x.double() - y.double()).abs() <= 4 * world * 2.0**-24 * mags).all())


def test_segmented_all_gathers_fold_and_change_nothing(results):
    """Pipelined all-gathers fold (at any size, journaling the residual piece by piece)
    with the numbers of unchecked calls."""
    world, res = results
    for r in range(world):
        folded, never = res[r]["segmented"]
        assert [v for _, v, _ in folded] == [True] * 2 + [False] * 6, r
        for (x, _, p), (y, _, q) in zip(folded, never):
            assert torch.equal(x, y) and _eq(p, q), r


@pytest.mark.parametrize("case", PIECEWISE, ids=lambda c: f"{c[0]}-{c[1]}-{c[3]}")
@pytest.mark.parametrize("how", ["numel", "async"])
def test_a_deviating_rank_leaves_a_segmented_all_gather_untouched(results, case, how):
    """A folded all-gather cut into pieces (or above the size the other algorithms fold
    at) learns of the deviation only when its first piece comes back: every piece it
    compressed before is restored (fp32 residuals: from the journal's copies; compact
    ones: the stored tensor was never written), so the next calls run as if the failed
    one had never been made."""
    world, res = results
    spec, storage, _, n = case
    last = world - 1
    for r in range(world):
        out = res[r][("deviate", spec, storage, n, how)]
        etype, msg = out["error"]
        if r == last:
            assert etype == "ValueError" and "this rank's call" in msg, msg
        else:
            assert etype in ("ValueError", "RuntimeError"), msg
            assert f"rank(s) [{last}] made a different call" in msg, msg
            assert not out["verify"], r  # it was folded: no explicit check
        assert out["unchanged"] and out["residual"], r
        a, b = out["after"]
        assert torch.equal(a, b), r


def test_a_cycle_of_signatures_folds_from_its_second_round(results):
    world, res = results
    for r in range(world):
        folded, never = res[r]["cycle"]
        assert [v for _, v, _ in folded] == [True] * 4 + [False] * 8
        for (x, _, p), (y, _, q) in zip(folded, never):
            assert torch.equal(x, y) and _eq(p, q)


def test_folded_plain_hands_over_what_compression_held_back(results):
    world, res = results
    seqs = [res[r]["hand-over"] for r in range(world)]
    settled = first_look("int8", 5000, world)  # plain from this call on, folded from the next
    kinds = auto_kinds("int8", 5000, world)
    for r in range(world):
        a, b = seqs[r]
        # the last calls folded (the one before them checked: after the run of "auto"
        # calls every rank mispredicted the int4 call, so it is trusted again only once it
        # has followed the "auto" call twice: comm.fold.Predictor)
        assert [v for _, v, _ in a[-4:]] == [True, False, False, False]
        assert a[-1][2] is None  # the plain call took the residual over
        for i, ((x, _, p), (y, _, q)) in enumerate(zip(a, b)):
            assert _eq(p, q)
            # plain calls, which with verify="always" sum the padded buffer of a folded
            # call whether they fold or not (fold.pads_plain): the probes of plain (which
            # hand nothing over: owed_r is then more than they sum, a looser bound) and,
            # once settled, every call of "auto": sums of x_r + owed_r
            probe = i < settled and kinds[i % len(kinds)] == "plain"
            if probe or i == settled or (i > settled and (i - settled) % 2 == 1):
                owed = [make_input(5000, w, i, 2).double() + (
                    0 if seqs[w][1][i - 1][2] is None else seqs[w][1][i - 1][2].double())
                    for w in range(world)]
                mags = torch.stack([o.abs() for o in owed]).mean(0)
                assert bool(((x.double() - y.double()).abs()
                             <= 4 * world * 2.0**-24 * mags).all()), i
                assert torch.equal(x, seqs[0][0][i][0])
            else:
                assert torch.equal(x, y), i


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("how", ["numel", "codec", "refused", "async"])
def test_a_deviating_rank_stops_every_rank_and_changes_nothing(results, case, how):
    world, res = results
    last = world - 1
    for r in range(world):
        out = res[r][("deviate", *case, how)]
        etype, msg = out["error"]
        if r == last and how == "refused":
            assert etype == "TypeError" and "float64" in msg
        elif r == last:
            assert etype == "ValueError" and "this rank's call" in msg, msg
            assert f"differs from the call of rank(s) {list(range(last))}" in msg
        elif how == "async":
            # torch's future reports what its callback raised as a RuntimeError
            assert etype == "RuntimeError" and "ValueError: gradzip.all_reduce:" in msg, msg
            assert f"rank(s) [{last}] made a different call" in msg, msg
        else:
            assert etype == "ValueError", msg
            assert f"rank(s) [{last}] made a different call" in msg, msg
        assert not out["verify"] or r == last  # only the deviating rank ran a decoy
        assert out["unchanged"] and out["residual"], r
        a, b = out["after"]  # as if the failed call had never been made
        assert torch.equal(a, b) if case[1] != "plain" else _plain_close(a, b, world, 5), r


def test_a_rank_deviating_at_auto_probes_leaves_the_tuners_in_step(results):
    world, res = results
    last = world - 1
    kinds = auto_kinds("int8", PROBE_N, world)
    # the two failed calls are probes of a compressed kind and of plain, both folded
    assert kinds[4 % len(kinds)] != "plain" and kinds[5 % len(kinds)] == "plain"
    looks = (first_look("int8", PROBE_N, world), comm.AUTO_PROBES * len(kinds))
    for r in range(world):
        out = res[r]["probe-deviate"]
        for j, ((etype, msg), verified, unchanged, residual) in enumerate(out["fails"]):
            if r == last:
                assert etype == "ValueError" and "this rank's call" in msg, msg
            elif j == 1:  # asynchronous: torch reports the callback's error so
                assert etype == "RuntimeError" and f"rank(s) [{last}] made a different " \
                    "call" in msg, msg
            else:
                assert etype == "ValueError" and f"rank(s) [{last}] made a different " \
                    "call" in msg, msg
            assert verified == (r == last)  # folded: only the deviating rank ran a decoy
            assert unchanged and residual, (r, j)
        # both failed calls counted as probes on every rank: it settles at a look
        assert out["settled_at"] in looks, out["settled_at"]
        assert out["settled_at"] == res[0]["probe-deviate"]["settled_at"]
        assert out["choice"] == res[0]["probe-deviate"]["choice"]
        for a, b in zip(out["outs"], res[0]["probe-deviate"]["outs"]):
            assert torch.equal(a, b)
        (etype, msg), unchanged = out["after-reset"]
        assert etype == "ValueError", msg
        assert unchanged
        assert torch.equal(out["after-reset-next"], res[0]["probe-deviate"]["after-reset-next"])


def test_an_order_that_changes_every_round_pays_one_check_per_call(results):
    world, res = results
    for r in range(world):
        got = res[r]["changing-order"]
        # calls 0-2 check (no history yet); 3 is C after A where B was predicted: every
        # rank runs the decoy, then the explicit check, and A is doubted; 4 checks (nothing
        # followed C yet); after A (doubted) calls 5, 7 and 9 check without a decoy, until
        # C has followed A twice in a row (7 and 9); the others (A after B or C) fold
        assert got["decoys"] == [3], got["decoys"]
        checked = [v for _, v in got["out"]]
        want = [i in (0, 1, 2, 3, 4, 5, 7, 9) for i in range(len(CHANGING))]
        assert checked == want, checked
        for (x, _), y in zip(got["out"], got["never"]):
            assert torch.equal(x, y)


def test_reduce_scatter_folds(results):
    world, res = results
    for r in range(world):
        rs = res[r]["reduce-scatter"]
        # after the "never" calls the history still ends with the "always" ones: its
        # predicted signature folds, the one after the deviation too
        assert [v for _, v in rs["always"]] == [True, True, False, False, False]
        for (a, _), (b, _) in zip(rs["always"], rs["never"]):
            assert torch.equal(a, b)
        etype, msg = rs["deviate"]
        assert etype == "ValueError" and "gradzip.reduce_scatter" in msg, msg
        wanted = "this rank's call" if r == world - 1 else \
            f"rank(s) [{world - 1}] made a different call"
        assert wanted in msg, msg
        assert rs["untouched"]


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: f"{c[0]}-{c[1]}")
def test_every_rank_changing_its_call_is_no_error(results, case):
    world, res = results
    xs = [res[r][("deviate", *case, "everyone")] for r in range(world)]
    for out in xs:
        assert out["error"] is None and out["verify"] and out["residual"]
        a, b = out["after"]
        assert torch.equal(a, b) if case[1] != "plain" else _plain_close(a, b, world, 5)
    reduced = [o["everyone-result"] for o in xs]
    assert reduced[0].numel() == N + 7
    assert all(torch.equal(reduced[0], v) for v in reduced[1:])


def test_signatures_and_plans_are_pure():
    """fold_plan asks only what every rank agreed on."""
    c = Codec("int8")
    p = comm.plan(c, N, torch.float32, 4, "alltoall")
    sig = fold.Signature((1,), "all_reduce", c, N, torch.float32, True, 4, False, p)
    assert fold.fold_plan(sig, {}) is p
    big = fold.Signature((1,), "all_reduce", c, fold.FOLD_MAX_BYTES, torch.float32, True, 4,
                         False, p)
    assert fold.fold_plan(big, {}) is None
    numel = fold.FOLD_MAX_BYTES // 4
    # the plain and two-phase calls copy what they must restore: a size limit; the
    # all-gather journals only the pieces it sends before the verdict: any size
    for n, limited in ((numel, True), (numel + 1, False), (64 * numel, False)):
        for algo in ("plain", "alltoall", "allgather"):
            p = comm.plan(c, n, torch.float32, 4, algo)
            s = fold.Signature((1,), "all_reduce", c, n, torch.float32, True, 4, False, p)
            assert (fold.fold_plan(s, {}) is p) == (limited or algo == "allgather"), (n, algo)
    tiny = comm.plan(c, 10, torch.float32, 4, "alltoall")  # empty chunks
    assert fold.fold_plan(fold.Signature((1,), "all_reduce", c, 10, torch.float32, True, 4,
                                         False, tiny), {}) is None
    auto = fold.Signature((1,), "all_reduce", c, N, torch.float32, True, 4, True, p)
    assert fold.fold_plan(auto, {}) is None  # "auto" has not settled
    rows = torch.zeros(3, 80, dtype=torch.uint8)
    fold.fill_poison(rows[1])
    assert fold.poisoned(rows) == [1]


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_folded_plain_buffer_splits_into_aligned_shares(itemsize):
    """One flag slot per rank, then padding: W equal shares of whole 64-byte lines."""
    for world in range(1, 10):
        line = 64 // itemsize
        for numel in (1, 7, 63, 64, 1000, 2**20, 2**20 + 5):
            slots = fold.flag_slots(numel, world, itemsize)
            assert world <= slots < world + world * line, (numel, world)
            assert ((numel + slots) * itemsize) % (world * 64) == 0, (numel, world)


def test_a_folded_plain_call_gives_the_bits_of_a_checked_one(results):
    """A resumed run starts with no history, so its first calls check explicitly where the
    uninterrupted run folds: the plain sums must not depend on which."""
    world, res = results
    for r in range(world):
        for case, runs in res[r]["plain-bits"].items():
            assert [v for _, v in runs] == [True, True, False, False], case  # check, fold
            for x, _ in runs[1:]:
                assert torch.equal(x, runs[0][0]), (case, r)
