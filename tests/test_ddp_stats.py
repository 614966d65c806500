"""CompressionState.stats(): what the DDP hook really did, checked against independent counts.

Each rank wraps ``gradzip.ops.quantize_pack`` to count the compressions that really ran
per tensor size, and the expected bytes come from the payload a real ``quantize_pack``
call returns and from the ring all-reduce volume ``2 (W-1)/W * numel * 4``, not from the
plan the hook used.
"""

from __future__ import annotations

from collections import Counter

import gradzip
import gradzip.ddp
import gradzip.ops
import pytest
import torch
from dist_helpers import run_ranks
from test_ddp import MIN_NUMEL, build, step

pytestmark = pytest.mark.distributed

WORLD, STEPS, WARMUP = 3, 12, 2


def _payload_bytes(numel: int) -> int:
    return gradzip.quantize_pack(torch.zeros(numel), 4, 128).numel()


def _ring_bytes(numel: int) -> int:
    return 2 * (WORLD - 1) * numel * 4 // WORLD


def counted_run(rank, world, algorithm):
    counts: Counter = Counter()
    real = gradzip.ops.quantize_pack

    def counting(x, *args, **kwargs):
        counts[x.numel()] += 1
        return real(x, *args, **kwargs)

    gradzip.ops.quantize_pack = counting
    try:
        model, opt, state = build("int4", algorithm=algorithm, warmup=WARMUP)
        for t in range(STEPS):
            step(model, opt, rank, t)
    finally:
        gradzip.ops.quantize_pack = real
    return state.stats(), dict(counts), state.stats_table()


@pytest.fixture(scope="module", params=["allgather", "alltoall", "auto"])
def run(request):
    return request.param, run_ranks(WORLD, counted_run, request.param)


def test_calls_and_why_they_were_plain(run):
    algorithm, res = run
    for st, counts, _ in res:
        rows = st["buckets"]
        assert st["iterations"] == STEPS and st["world_size"] == WORLD
        # every iteration reduces every parameter's gradient once
        assert sum(b["calls"] * b["numel"] for b in rows) == STEPS * 5508  # MLP parameters
        for b in rows:
            assert b["warmup_calls"] + b["small_calls"] + b["compressed_calls"] <= b["calls"]
            if b["numel"] < MIN_NUMEL:
                assert b["compressed_calls"] == 0 and b["algorithm"] == "plain"
                assert b["small_calls"] == b["calls"] - b["warmup_calls"]
        # DDP's first iteration has one bucket of everything, later ones two (test_ddp)
        assert sum(b["warmup_calls"] for b in rows) == 1 + 2 * (WARMUP - 1)
        if algorithm != "auto":
            big = [b for b in rows if b["compressed_calls"]]
            assert len(big) == 1 and big[0]["compressed_calls"] == STEPS - WARMUP
            assert big[0]["algorithm"] == algorithm


def test_compressed_calls_are_the_compressions_that_ran(run):
    """allgather compresses once per call; the two-phase algorithm (which "auto" picks for
    int4 on 3 ranks: 2(W-1)/W payloads instead of W-1) compresses W chunks and then
    re-compresses its own; "auto" may also run the plain all-reduce instead (its probes,
    or settled there). The stats count what really happened."""
    algorithm, res = run
    for st, counts, _ in res:
        compressed = sum(b["compressed_calls"] for b in st["buckets"])
        if algorithm == "allgather":
            for b in st["buckets"]:
                assert counts.get(b["numel"], 0) == b["compressed_calls"], (b, counts)
        else:
            # "auto" times both compressed algorithms (int4 on 3 ranks: comm.autotune)
            gathered = sum(b["calls_by_algorithm"].get("allgather", 0) for b in st["buckets"])
            assert gathered == 0 or algorithm == "auto"
            assert sum(counts.values()) == (WORLD + 1) * (compressed - gathered) + gathered, \
                counts
        for b in st["buckets"]:
            assert sum(b["calls_by_algorithm"].values()) == b["calls"], b
            assert b["calls"] - b["calls_by_algorithm"].get("plain", 0) == \
                b["compressed_calls"], b
        if algorithm == "auto":
            for b in st["buckets"]:
                if b["numel"] >= MIN_NUMEL and b["calls"] > b["warmup_calls"]:
                    # 10 calls after warm-up: auto is still measuring (its first look comes
                    # at call 12 of three kinds) and has probed each kind
                    assert b["auto"] is None, b
                    assert b["calls_by_algorithm"]["alltoall"] > 0, b
                    assert b["calls_by_algorithm"]["allgather"] > 0, b
                    assert b["calls_by_algorithm"]["plain"] > b["warmup_calls"], b


def test_bytes_sent_against_real_payload_sizes(run):
    algorithm, res = run
    for st, _, _ in res:
        total = 0
        for b in st["buckets"]:
            n, by = b["numel"], b["calls_by_algorithm"]
            want = by.get("plain", 0) * _ring_bytes(n) + \
                by.get("allgather", 0) * (WORLD - 1) * _payload_bytes(n)
            if by.get("alltoall"):
                chunk = -(-n // 128) // WORLD * 128 + 128 * (-(-n // 128) % WORLD > 0)
                chunks = [min(chunk, max(0, n - i * chunk)) for i in range(WORLD)]
                want += by["alltoall"] * 2 * (WORLD - 1) * max(_payload_bytes(c)
                                                               for c in chunks if c)
            assert b["bytes_sent"] == want, (algorithm, b)
            assert b["uncompressed_bytes"] == b["calls"] * _ring_bytes(n)
            total += want
        assert st["bytes_sent"] == total
        assert st["compression"] == st["uncompressed_bytes"] / st["bytes_sent"] > 1
        assert st["compress_s"] > 0 and st["decompress_s"] > 0


def test_table_says_what_was_sent(run):
    algorithm, res = run
    st, _, table = res[0]
    assert table.startswith(f"gradzip int4 (algorithm={algorithm}, {WORLD} ranks, "
                            f"{STEPS} iterations): sent ")
    assert f"{st['bytes_sent'] / 2**20:.2f} MiB" in table
    assert "below min_numel" in table and "warm-up" in table


def test_reset_stats_starts_from_zero():
    res = run_ranks(2, _reset_run)
    for before, after in res:
        assert before["bytes_sent"] > 0
        assert after["bytes_sent"] == 0 and all(b["calls"] == 0 for b in after["buckets"])


def _reset_run(rank, world):
    model, opt, state = build("int4", algorithm="allgather", warmup=0)
    for t in range(3):
        step(model, opt, rank, t)
    before = state.stats()
    state.reset_stats()
    return before, state.stats()
