"""Every vector instruction-set path of the C++ CPU kernels (scalar, AVX2, AVX-512, as far as
this CPU has them), in one process through ``gradzip::_cpu_set_isa``, against the reference:
payload bytes, residual bits and accumulated outputs.

The other op tests run whichever path ``GRADZIP_CPU_ISA`` selects; this file makes sure a
plain ``pytest`` run covers all of them, with inputs aimed at the places where the paths
differ: whole and partial vectors and tiles, short last blocks, and the boundary of
quantize_pack's fast residual store (blocks whose largest |v|, or 1-bit |v| sum, sits just
below, at or above 2^126, where v - decode can overflow)."""

from __future__ import annotations

import contextlib
import functools

import backends
import gradzip
import inputs
import pytest
import torch
from gradzip import reference
from gradzip.testing import assert_bits_equal, assert_payload_equal

ISAS = ("scalar", "avx2", "avx512")
pytestmark = pytest.mark.skipif(
    not backends.kernel_registered("quantize_pack", "CPU"),
    reason="the C++ CPU kernels are not in this build")


def _supported(isa: str) -> bool:
    old = torch.ops.gradzip._cpu_isa()
    try:
        torch.ops.gradzip._cpu_set_isa(isa)
    except ValueError:
        return False
    torch.ops.gradzip._cpu_set_isa(old)
    return True


@contextlib.contextmanager
def isa_path(isa: str):
    if not _supported(isa):
        pytest.skip(f"this CPU has no {isa}")
    old = torch.ops.gradzip._cpu_set_isa(isa)
    try:
        yield
    finally:
        torch.ops.gradzip._cpu_set_isa(old)


def test_isa_switch_reports_and_restores():
    start = torch.ops.gradzip._cpu_isa()
    with isa_path("scalar"):
        assert torch.ops.gradzip._cpu_isa() == "scalar"
        assert gradzip.ops.build_info.__wrapped__()["cpu_isa"] == "scalar"
    assert torch.ops.gradzip._cpu_isa() == start
    with pytest.raises(ValueError, match="cpu isa must be"):
        torch.ops.gradzip._cpu_set_isa("sse9")


def _boundary_blocks(block: int) -> torch.Tensor:
    """Blocks whose amax is just below, exactly at and above 2^126, and near FLT_MAX."""
    g = inputs.generator(3)
    two126 = 2.0 ** 126
    below = torch.nextafter(torch.tensor(two126), torch.tensor(0.0)).item()
    rows = []
    for amax in (below, two126, 2.0 ** 127, 3.0e38, torch.finfo(torch.float32).max):
        r = torch.randn(block, generator=g)
        r = r / r.abs().max() * amax
        r[block // 2] = -amax
        rows.append(r)
    return torch.cat(rows)


def _sum_boundary_blocks(block: int) -> torch.Tensor:
    """1 bit: blocks whose |v| sum is just below and just above 2^126 (and overflows)."""
    two126 = 2.0 ** 126
    rows = []
    for total in (two126 * 0.999, two126 * 1.001, 2.0 ** 127, 2.0 ** 129):
        rows.append(torch.full((block,), total / block) * torch.where(
            torch.arange(block) % 3 == 0, -1.0, 1.0))
    return torch.cat(rows)


def _quantize_inputs(block: int) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    n = 5 * block + block // 2 + 7  # whole blocks, then a short one with a partial vector
    x = inputs.grad_like(n, seed=block)
    big = _boundary_blocks(block)
    sums = _sum_boundary_blocks(block)
    return [
        ("gradient", x, inputs.residual_like(n, seed=2)),
        ("gradient, no residual", x, None),
        # small residuals: v stays finite, and qmax * scale overflows in the FLT_MAX block
        ("amax near 2^126 and FLT_MAX", big, inputs.residual_like(big.numel(), seed=3)),
        # residuals that push v itself past the float32 range in the top blocks
        ("amax near 2^126, huge residual", big, torch.full_like(big, 2.0 ** 125)),
        ("amax near 2^126, negative residual", big, torch.full_like(big, -3.0e38)),
        ("|v| sums near 2^126", sums, torch.full_like(sums, 2.0 ** 120)),
    ]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", (8, 4, 2, 1))
@pytest.mark.parametrize("block", (32, 64, 256, 4096))
def test_quantize_pack_every_isa(isa, bits, block):
    with isa_path(isa):
        for rounding in ("nearest", "stochastic") if bits > 1 else ("nearest",):
            for dtype in (torch.float32, torch.bfloat16):
                for name, x, r in _quantize_inputs(block):
                    if dtype != torch.float32 and name != "gradient":
                        continue
                    xd = x.to(dtype)
                    r_ref = None if r is None else r.clone()
                    want = reference.quantize_pack(xd, bits, block, r_ref, rounding, 5)
                    r_got = None if r is None else r.clone()
                    got = gradzip.quantize_pack(xd, bits, block, r_got, rounding, 5,
                                                backend="cpu")
                    ctx = f"{isa} bits={bits} block={block} {rounding} {dtype} {name}"
                    assert_payload_equal(got, want, ctx)
                    if r is not None:
                        assert_bits_equal(r_got, r_ref, ctx + " residual")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", (8, 4, 2, 1))
@pytest.mark.parametrize("block", (32, 64, 128, 4096))
def test_dense_accumulate_every_isa(isa, bits, block):
    """Tiles of 8, 4 and 1 vectors and the scalar tail, 1 to 9 payloads, three out dtypes."""
    n = 3 * block + block // 2 + 5
    with isa_path(isa):
        for w in (1, 3, 9):
            rows = torch.stack([reference.quantize_pack(inputs.grad_like(n, seed=s), bits, block)
                                for s in range(w)])
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                out0 = inputs.grad_like(n, seed=77).to(dtype)
                want, got = out0.clone(), out0.clone()
                reference.dequantize_accumulate(rows, want, 0.3)
                gradzip.dequantize_accumulate(rows, got, 0.3, backend="cpu")
                assert_bits_equal(got, want, f"{isa} bits={bits} block={block} W={w} {dtype}")
        # scales near the float32 limit: decoded values overflow to inf and 0 * inf is NaN
        big = _boundary_blocks(block)
        rows = torch.stack([reference.quantize_pack(big * f, bits, block) for f in (1, -1, .5)])
        want, got = torch.zeros_like(big), torch.zeros_like(big)
        reference.dequantize_accumulate(rows, want, 1.0)
        gradzip.dequantize_accumulate(rows, got, 1.0, backend="cpu")
        assert_bits_equal(got, want, f"{isa} bits={bits} block={block} scales near FLT_MAX")


@pytest.mark.parametrize("isa", ISAS)
def test_topk_select_and_sparse_accumulate_every_isa(isa):
    n = 3 * 2**16 + 1001  # several chunks and a short one
    x = inputs.grad_like(n, seed=4)
    with isa_path(isa):
        for exact, values in ((True, "fp32"), (False, "bf16"), (True, "int8")):
            r_ref, r_got = inputs.residual_like(n), inputs.residual_like(n)
            want = reference.topk_select(x, 2000, r_ref, exact, values, 9)
            got = gradzip.topk_select(x, 2000, r_got, exact, values, 9, backend="cpu")
            assert_payload_equal(got, want, f"{isa} topk {exact} {values}")
            assert_bits_equal(r_got, r_ref, f"{isa} topk {exact} {values} residual")
            out_ref, out_got = torch.zeros(n), torch.zeros(n)
            rows = torch.stack([want, want])
            reference.dequantize_accumulate(rows, out_ref, 0.5)
            gradzip.dequantize_accumulate(rows, out_got, 0.5, backend="cpu")
            assert_bits_equal(out_got, out_ref, f"{isa} sparse accumulate {values}")


@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_sum_every_isa(isa):
    """The overwriting decode (gradzip::_dequantize_sum: out is written, never read) on
    every path: dense widths with whole and partial tiles, sparse value formats, every out
    dtype, against the reference's zeroed out plus dequantize_accumulate."""
    n = 3 * 2**14 + 4097 + 13
    rows = {f"dense {bits}": torch.stack([
        reference.quantize_pack(inputs.grad_like(n, seed=w), bits, 64, None, "nearest", w)
        for w in range(3)]) for bits in (8, 4, 2, 1)}
    rows.update({f"topk {values}": torch.stack([
        reference.topk_select(inputs.grad_like(n, seed=w), n // 20, None, True, values, 0)
        for w in range(3)]) for values in ("fp32", "bf16", "int8")})
    with isa_path(isa):
        for name, r in rows.items():
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                want = torch.zeros(n, dtype=dtype)
                reference.dequantize_accumulate(r, want, -0.375)
                got = torch.full((n,), float("nan"), dtype=dtype)
                torch.ops.gradzip._dequantize_sum(r, got, -0.375)
                assert_bits_equal(got, want, f"{isa} {name} {dtype}")


# Large enough (>= 4 MiB of float32 out) for the overwriting decode's streaming stores
# (csrc/cpu/dequantize_accumulate.cpp, kStreamMinBytes), with a partial last block and a
# tail shorter than a vector.
STREAM_N = 2**20 + 4099


@functools.cache
def _stream_case(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(payload rows, the reference's zeroed out plus dequantize_accumulate with alpha
    -0.375). Payloads come from the C++ kernels (they are only this test's input); the
    expectation from the reference."""
    n = STREAM_N
    xs = [inputs.grad_like(n, seed=w) for w in range(3)]
    if name.startswith("dense"):
        bits, block = (int(v) for v in name.split()[1:])
        rows = torch.stack([gradzip.quantize_pack(x, bits, block, backend="cpu") for x in xs])
    else:
        values = name.split()[1]
        rows = torch.stack([gradzip.topk_select(x, n // 50, values=values, backend="cpu")
                            for x in xs])
    want = torch.zeros(n)
    reference.dequantize_accumulate(rows, want, -0.375)
    return rows, want


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["dense 8 128", "dense 4 32", "dense 2 64", "dense 1 4096",
                                  "topk fp32", "topk int8"])
def test_dequantize_sum_large_out_every_isa(isa, name):
    """The overwriting decode into a float32 out of >= 4 MiB, which it writes with
    streaming stores where every vector store is aligned (dense: a 64-byte aligned out;
    sparse: after a scalar head): an aligned out, and one
    starting 4 bytes past an aligned address (dense: the ordinary stores; sparse: the
    head), both bit-identical to the reference."""
    rows, want = _stream_case(name)
    with isa_path(isa):
        got = torch.full((STREAM_N,), float("nan"))
        assert got.data_ptr() % 64 == 0
        torch.ops.gradzip._dequantize_sum(rows, got, -0.375)
        assert_bits_equal(got, want, f"{isa} {name} aligned")
        base = torch.full((STREAM_N + 16,), float("nan"))
        shifted = base[1:STREAM_N + 1]
        torch.ops.gradzip._dequantize_sum(rows, shifted, -0.375)
        assert_bits_equal(shifted, want, f"{isa} {name} shifted by 4 bytes")
        assert torch.isnan(base[0]) and torch.isnan(base[STREAM_N + 1:]).all()


def _topk_slow_path_input(case: str, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """Inputs that take topk_select's paths beyond the usual one (after a scan that may
    already have written part of the residual), and k.

    * "shortfall": the sampled positions hold the largest magnitudes, so far fewer than k
      candidates pass the sampled threshold: exact mode's full radix select, approximate
      mode's fill rule; a few huge and non-finite values where the sampler never looks.
    * "over budget": half the magnitudes equal the largest, so the candidates outnumber
      what the scan keeps (later chunks are scanned without keeping or writing anything).
    * "huge": NaN at every sampled position, so the threshold lies above every finite key
      and far fewer than k candidates pass it; values near FLT_MAX (bfloat16 rounds them
      to inf, so their residual update needs the old residual) below it.
    """
    g = inputs.generator(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    if case == "shortfall":
        x = (1.0 + torch.rand(n, generator=g)) * sign
        sampled = reference.sample_positions(n, seed)
        x[sampled] = (100.0 + torch.rand(sampled.numel(), generator=g)) * sign[sampled]
        free = torch.ones(n, dtype=torch.bool)
        free[sampled] = False
        spots = free.nonzero().flatten()[::9973][:6]
        x[spots] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, -3.39e38,
                                 2.0 ** 127])[: spots.numel()]
        return x, n // 2
    if case == "over budget":
        return torch.where(torch.rand(n, generator=g) < 0.5, 2.0, 1.0) * sign, 1000
    x = inputs.grad_like(n, seed=seed)
    u = torch.rand(n, generator=g)
    near_max, inf = u < 0.1, (u >= 0.1) & (u < 0.15)
    x[near_max] = 3.4e38 * sign[near_max]
    x[inf] = float("inf") * sign[inf]
    x[reference.sample_positions(n, seed)] = float("nan")
    return x, n // 2


@pytest.mark.parametrize("case", ("shortfall", "over budget", "huge"))
def test_topk_select_slow_paths_every_isa(case):
    """topk_select's slow paths, where the scan may already have written the residual of
    the entries it did not keep: bytes and residual bits equal the reference on every ISA
    path, for every value format, both modes, float32 and bfloat16 input."""
    n, seed = 2 * 2**16 + 777, 11
    x32, k = _topk_slow_path_input(case, n, seed)
    residual = (torch.zeros(n) if case == "over budget"
                else inputs.residual_like(n, seed=5))
    for dtype in (torch.float32, torch.bfloat16):
        x = x32.to(dtype)
        for exact in (True, False):
            for values in ("fp32", "bf16", "int8"):
                r_ref = residual.clone()
                want = reference.topk_select(x, k, r_ref, exact, values, seed)
                for isa in ISAS:
                    if not _supported(isa):
                        continue
                    ctx = f"{case} {isa} {dtype} exact={exact} values={values}"
                    with isa_path(isa):
                        r_got = residual.clone()
                        got = gradzip.topk_select(x, k, r_got, exact, values, seed,
                                                  backend="cpu")
                    assert_payload_equal(got, want, ctx)
                    assert_bits_equal(r_got, r_ref, ctx + " residual")
