"""The CUDA kernels against the reference, byte for byte, on a GPU.

Every case runs the op with backend="cuda" and compares the payload bytes and residual bits
with gradzip.reference on the same inputs (and, where the C++ CPU kernels are built, with
backend="cpu" too). Also: CUDA-graph capture and replay, torch.compile(fullgraph=True),
non-default streams, and bad input (mixed devices, corrupt payloads) giving clear errors
with the user's tensors left untouched.

Without a GPU (or in a gradzip build without the CUDA kernels) the whole module is skipped:
those kernels cannot run there. tests/test_cuda_build.py checks what can be checked on such
a machine (compilation, spills, registration, the shared bit-level helpers).
"""

from __future__ import annotations

import itertools

import gradzip
import pytest
import torch
from gradzip import format as fmt
from gradzip import reference
from gradzip.testing import assert_bits_equal, assert_payload_equal

_CUDA_BUILT = gradzip.build_info()["cuda_kernels_registered"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: the CUDA kernels are compiled here but run "
                              "only on a GPU"),
    pytest.mark.skipif(not _CUDA_BUILT,
                       reason="this gradzip build has no CUDA kernels (see "
                              "gradzip.build_info()['cuda_reason'])"),
]

_CPU_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("gradzip::quantize_pack", "CPU")
needs_cpu_kernels = pytest.mark.skipif(not _CPU_BUILT,
                                       reason="the C++ CPU kernels are not in this build")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 7, 31, 33, 127, 1000, 2048, 4097, 65537)
DEV = "cuda"


def make_input(n: int, dtype=torch.float32, seed: int = 0, kind: str = "normal") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    elif kind == "nonfinite":
        x = torch.randn(n, generator=g)
        for pos, val in ((0, float("inf")), (n // 2, float("nan")), (n - 1, -float("inf")),
                         (n // 3, float("nan"))):
            if pos < n:
                x[pos] = val
    elif kind == "zeros":
        x = torch.zeros(n)
    elif kind == "tiny":  # amax so small that qmax / amax overflows: scale 0
        x = torch.randn(n, generator=g) * 1e-44
    elif kind == "ties":  # few distinct magnitudes: ties everywhere in top-k
        x = torch.randint(-3, 4, (n,), generator=g).float()
    elif kind == "huge":
        x = torch.randn(n, generator=g) * 3e38
    else:
        raise ValueError(kind)
    return x.to(dtype)


def residual_for(n: int, seed: int = 5) -> torch.Tensor:
    return make_input(n, torch.float32, seed) * 0.01


def run_quantize(x, bits, block, residual, rounding, seed):
    """(cuda payload, cuda residual, reference payload, reference residual)."""
    r_ref = residual.clone() if residual is not None else None
    want = reference.quantize_pack(x, bits, block, r_ref, rounding, seed)
    r_dev = residual.to(DEV) if residual is not None else None
    got = gradzip.quantize_pack(x.to(DEV), bits, block, r_dev, rounding, seed, backend="cuda")
    return got, r_dev, want, r_ref


# ---------------------------------------------------------------------------------------
# quantize_pack
# ---------------------------------------------------------------------------------------

QUANT_CASES = [
    (bits, block, rounding)
    for bits, block in itertools.product((8, 4, 2, 1), (32, 64, 128, 1024, 4096))
    for rounding in (("nearest", "stochastic") if bits > 1 else ("nearest",))
]


@pytest.mark.parametrize("bits,block,rounding", QUANT_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False])
def test_quantize_pack_matches_reference(bits, block, rounding, dtype, with_residual):
    for n in SIZES:
        x = make_input(n, dtype, seed=n + bits)
        r = residual_for(n) if with_residual else None
        got, r_dev, want, r_ref = run_quantize(x, bits, block, r, rounding, seed=n)
        assert_payload_equal(got, want, f"payload n={n}")
        if with_residual:
            assert_bits_equal(r_dev, r_ref, f"residual n={n}")


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("kind", ["nonfinite", "zeros", "tiny", "huge"])
@pytest.mark.parametrize("block", [32, 4096])
def test_quantize_pack_special_values(bits, kind, block):
    n = 5000
    x = make_input(n, torch.float32, seed=3, kind=kind)
    # Zero, tiny and huge blocks only stay so with a zero residual (v = x + residual).
    r0 = residual_for(n) if kind == "nonfinite" else torch.zeros(n)
    got, r_dev, want, r_ref = run_quantize(x, bits, block, r0, "nearest", 0)
    assert_payload_equal(got, want, "payload")
    assert_bits_equal(r_dev, r_ref, "residual")
    assert torch.isfinite(r_dev).all(), "a non-finite input poisoned the residual"


@pytest.mark.parametrize("bits", [8, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_pack_non_contiguous_and_unaligned_inputs(bits, dtype):
    base = make_input(3 * 4099, dtype, seed=11).to(DEV).reshape(3, 4099)
    # strided, transposed, and a contiguous view that is not 16-byte aligned
    for x in (base[:, ::2], base.t(), base.reshape(-1)[1:4098]):
        want = reference.quantize_pack(x.cpu(), bits, 128)
        got = gradzip.quantize_pack(x, bits, 128, backend="cuda")
        assert_payload_equal(got, want, f"payload of a {tuple(x.shape)} view")
    # A residual view that is not 16-byte aligned: the scalar path, in place.
    big = residual_for(4099 + 1)
    r_ref = big[1:].clone()
    x = make_input(4099, dtype, seed=2)
    want = reference.quantize_pack(x, bits, 128, r_ref)
    r_dev_big = big.to(DEV)
    r_dev = r_dev_big[1:]
    got = gradzip.quantize_pack(x.to(DEV), bits, 128, r_dev, backend="cuda")
    assert_payload_equal(got, want, "payload with an unaligned residual")
    assert_bits_equal(r_dev, r_ref, "unaligned residual")
    assert_bits_equal(r_dev_big[:1], big[:1], "wrote before the residual view")


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_quantize_pack_large(bits):
    n = 2**20 + 3
    for rounding in ("nearest", "stochastic") if bits > 1 else ("nearest",):
        x = make_input(n, torch.float32, seed=bits)
        got, r_dev, want, r_ref = run_quantize(x, bits, 256, residual_for(n), rounding, 9)
        assert_payload_equal(got, want, "payload")
        assert_bits_equal(r_dev, r_ref, "residual")


@needs_cpu_kernels
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_pack_cuda_equals_cpu(bits, dtype):
    for n, block in ((1000, 32), (65537, 128), (9000, 4096)):
        x = make_input(n, dtype, seed=n)
        rounding = "stochastic" if bits > 1 else "nearest"
        r_cpu, r_dev = residual_for(n), residual_for(n).to(DEV)
        cpu = gradzip.quantize_pack(x, bits, block, r_cpu, rounding, 4, backend="cpu")
        dev = gradzip.quantize_pack(x.to(DEV), bits, block, r_dev, rounding, 4, backend="cuda")
        assert_payload_equal(dev, cpu, f"payload n={n}")
        assert_bits_equal(r_dev, r_cpu, f"residual n={n}")


def test_quantize_pack_empty_tensor():
    x = torch.zeros(0, device=DEV)
    got = gradzip.quantize_pack(x, 4, 64, backend="cuda")
    assert_payload_equal(got, reference.quantize_pack(x.cpu(), 4, 64), "empty payload")


# ---------------------------------------------------------------------------------------
# topk_select
# ---------------------------------------------------------------------------------------


def run_topk(x, k, residual, exact, values, seed):
    r_ref = residual.clone() if residual is not None else None
    want = reference.topk_select(x, k, r_ref, exact, values, seed)
    r_dev = residual.to(DEV) if residual is not None else None
    got = gradzip.topk_select(x.to(DEV), k, r_dev, exact, values, seed, backend="cuda")
    return got, r_dev, want, r_ref


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approx"])
@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_select_matches_reference(exact, values, dtype):
    for n in (1, 33, 1000, 4097, 20000, 65537, 300001):
        for k in sorted({1, max(1, n // 100), max(1, n // 3), n}):
            x = make_input(n, dtype, seed=n + k)
            got, r_dev, want, r_ref = run_topk(x, k, residual_for(n), exact, values, seed=k)
            assert_payload_equal(got, want, f"payload n={n} k={k}")
            assert_bits_equal(r_dev, r_ref, f"residual n={n} k={k}")


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approx"])
@pytest.mark.parametrize("kind", ["ties", "zeros", "nonfinite", "huge"])
def test_topk_select_ties_and_special_values(exact, kind):
    for n, k in ((1000, 10), (70000, 700), (70000, 25000), (70000, 69000)):
        x = make_input(n, torch.float32, seed=1, kind=kind)
        # A zero residual keeps the ties (and zeros) of x in v = x + residual.
        r0 = torch.zeros(n) if kind in ("ties", "zeros") else residual_for(n)
        for values in ("fp32", "int8"):
            got, r_dev, want, r_ref = run_topk(x, k, r0, exact, values, seed=2)
            assert_payload_equal(got, want, f"payload {kind} n={n} k={k} {values}")
            assert_bits_equal(r_dev, r_ref, f"residual {kind} n={n} k={k} {values}")


def test_topk_select_approximate_fill_rule():
    """Fewer candidates than k: large values only at the sampled positions, so the sampled
    threshold sits above the true k-th value and the lowest-index fill decides the rest."""
    n, k, seed = 4 * 16384, 1000, 7
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, generator=g) * 1e-3
    pos = reference.sample_positions(n, seed)
    x[pos] = 1.0 + torch.rand(pos.numel(), generator=g)
    key = reference.magnitude_key(x)
    skeys = torch.sort(key[pos], descending=True).values
    t = skeys[reference.approximate_rank(n, k) - 1]
    assert int((key >= t).sum()) < k  # the case is what it claims: the fill rule is used
    got, r_dev, want, r_ref = run_topk(x, k, residual_for(n), False, "fp32", seed)
    assert_payload_equal(got, want, "payload")
    assert_bits_equal(r_dev, r_ref, "residual")


def test_topk_select_many_equal_candidates_overflow_buffer():
    """Every element ties: more candidates than the candidate buffer holds (the kernel
    falls back to passes over the whole tensor) and the lowest indices win."""
    n, k = 200_000, 300
    x = torch.full((n,), 0.5)
    for exact in (True, False):
        got, r_dev, want, r_ref = run_topk(x, k, torch.zeros(n), exact, "bf16", 1)
        assert_payload_equal(got, want, f"payload exact={exact}")
        assert_bits_equal(r_dev, r_ref, f"residual exact={exact}")


@needs_cpu_kernels
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approx"])
@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
def test_topk_select_cuda_equals_cpu(exact, values):
    n, k = 100_003, 1000
    x = make_input(n, torch.float32, seed=3)
    r_cpu, r_dev = residual_for(n), residual_for(n).to(DEV)
    cpu = gradzip.topk_select(x, k, r_cpu, exact, values, 5, backend="cpu")
    dev = gradzip.topk_select(x.to(DEV), k, r_dev, exact, values, 5, backend="cuda")
    assert_payload_equal(dev, cpu, "payload")
    assert_bits_equal(r_dev, r_cpu, "residual")


def _free_gpu_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.slow
def test_topk_select_int64_indices():
    """numel >= 2**31: int64 indices. The expectation is built independently: x is zero
    except at k known positions (some beyond 2**31) holding distinct values."""
    n = 2**31 + 1000
    if _free_gpu_bytes() < 3 * n * 2 + (1 << 30):
        pytest.skip("needs about 14 GB of free GPU memory")
    k = 64
    pos = torch.sort(torch.cat([torch.arange(0, 2**31, 2**31 // 32)[:32],
                                torch.arange(2**31 - 16, 2**31 + 16)])).values
    vals = (torch.arange(1, k + 1, dtype=torch.float32) * 0.5).to(torch.bfloat16)
    x = torch.zeros(n, dtype=torch.bfloat16, device=DEV)
    x[pos.to(DEV)] = vals.to(DEV)
    payload = gradzip.topk_select(x, k, None, True, "fp32", backend="cuda")
    h = fmt.parse_header(payload)
    assert h.index_format == fmt.INDEX_INT64
    sec = h.sections()
    off, length = sec["indices"]
    got_idx = payload[off: off + length].cpu().view(torch.int64)
    off, length = sec["values"]
    got_val = payload[off: off + length].cpu().view(torch.float32)
    assert torch.equal(got_idx, pos)
    assert torch.equal(got_val, vals.float())
    out = torch.zeros(n, dtype=torch.bfloat16, device=DEV)
    gradzip.dequantize_accumulate(payload, out, 2.0, backend="cuda")
    assert torch.equal(out[pos.to(DEV)].cpu().float(), 2 * vals.float())
    assert int(torch.count_nonzero(out)) == k


# ---------------------------------------------------------------------------------------
# dequantize_accumulate
# ---------------------------------------------------------------------------------------


def make_payloads(codec: str, n: int, w: int, block: int = 64) -> torch.Tensor:
    rows = []
    for i in range(w):
        x = make_input(n, torch.float32, seed=100 + i)
        if codec.startswith("dense"):
            bits = int(codec[5:])
            rows.append(reference.quantize_pack(x, bits, block, rounding="nearest"))
        else:
            values = codec.split("_")[1]
            k = max(1, n // 20)
            rows.append(reference.topk_select(x, k, None, True, values, 0))
    return torch.stack(rows)


ACC_CODECS = ("dense8", "dense4", "dense2", "dense1", "topk_fp32", "topk_bf16", "topk_int8")


@pytest.mark.parametrize("codec", ACC_CODECS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w", [1, 3, 8])
def test_dequantize_accumulate_matches_reference(codec, out_dtype, w):
    for n, block in ((1, 32), (1000, 32), (4097, 64), (70001, 4096)):
        rows = make_payloads(codec, n, w, block)
        out0 = make_input(n, torch.float32, seed=9).to(out_dtype)
        for alpha in (1.0, 0.125, -3.3):
            want = reference.dequantize_accumulate(rows, out0.clone(), alpha)
            out = out0.clone().to(DEV)
            gradzip.dequantize_accumulate(rows.to(DEV), out, alpha, backend="cuda")
            assert_bits_equal(out, want, f"out n={n} alpha={alpha}")


def test_dequantize_accumulate_nonfinite_payloads():
    n = 3000
    rows = torch.stack([reference.quantize_pack(make_input(n, seed=s, kind="nonfinite"), b, 32)
                        for s, b in ((1, 8), (2, 8))])
    for out_dtype in DTYPES:
        out0 = make_input(n, seed=4).to(out_dtype)
        want = reference.dequantize_accumulate(rows, out0.clone(), 0.5)
        out = out0.clone().to(DEV)
        gradzip.dequantize_accumulate(rows.to(DEV), out, 0.5, backend="cuda")
        assert_bits_equal(out, want, f"out {out_dtype}")


def test_dequantize_accumulate_sparse_is_deterministic_and_one_pass():
    n, w = 1_000_003, 16
    rows = make_payloads("topk_fp32", n, w).to(DEV)
    outs = []
    for _ in range(3):
        out = torch.ones(n, device=DEV)
        gradzip.dequantize_accumulate(rows, out, 1.0 / w, backend="cuda")
        outs.append(out)
    assert_bits_equal(outs[1], outs[0], "out of run 2 vs run 1")
    assert_bits_equal(outs[2], outs[0], "out of run 3 vs run 1")
    want = reference.dequantize_accumulate(rows.cpu(), torch.ones(n), 1.0 / w)
    assert_bits_equal(outs[0], want, "out")


@needs_cpu_kernels
@pytest.mark.parametrize("codec", ACC_CODECS)
def test_dequantize_accumulate_cuda_equals_cpu(codec):
    n = 50_001
    rows = make_payloads(codec, n, 4)
    out_cpu = make_input(n, seed=1)
    out_dev = out_cpu.clone().to(DEV)
    gradzip.dequantize_accumulate(rows, out_cpu, 0.25, backend="cpu")
    gradzip.dequantize_accumulate(rows.to(DEV), out_dev, 0.25, backend="cuda")
    assert_bits_equal(out_dev, out_cpu, "out")


def test_dequantize_round_trip_on_device():
    x = make_input(10_000, seed=8)
    payload = gradzip.quantize_pack(x.to(DEV), 8, 128, backend="cuda")
    got = gradzip.dequantize(payload, torch.float32, backend="cuda")
    want = reference.dequantize_accumulate(reference.quantize_pack(x, 8, 128), torch.zeros(10_000))
    assert_bits_equal(got, want, "decoded")


# ---------------------------------------------------------------------------------------
# streams, CUDA graphs, torch.compile
# ---------------------------------------------------------------------------------------


def test_ops_run_on_the_current_stream():
    n = 100_000
    x = make_input(n, seed=3).to(DEV)
    r0 = residual_for(n).to(DEV)
    want_r = r0.clone()
    want = gradzip.quantize_pack(x, 4, 128, want_r, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        r = r0.clone()
        got = gradzip.quantize_pack(x, 4, 128, r, backend="cuda")
        out = torch.zeros(n, device=DEV)
        gradzip.dequantize_accumulate(got, out, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert_payload_equal(got, want, "payload on a side stream")
    assert_bits_equal(r, want_r, "residual on a side stream")
    assert_bits_equal(out, reference.dequantize_accumulate(want.cpu(), torch.zeros(n)),
                      "out on a side stream")


def _capture(fn):
    """Warm up on a side stream, then capture fn() into a CUDA graph; returns (graph, out)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def test_quantize_pack_cuda_graph_capture_and_replay():
    n = 300_001
    x = torch.empty(n, device=DEV)
    r = torch.empty(n, device=DEV)
    g, payload = _capture(lambda: gradzip.quantize_pack(x, 4, 128, r, "stochastic", 3,
                                                        backend="cuda"))
    for seed in (1, 2):
        x_new, r_new = make_input(n, seed=seed).to(DEV), residual_for(n, seed).to(DEV)
        x.copy_(x_new)
        r.copy_(r_new)
        g.replay()
        r_eager = r_new.clone()
        eager = gradzip.quantize_pack(x_new, 4, 128, r_eager, "stochastic", 3, backend="cuda")
        torch.cuda.synchronize()
        assert_payload_equal(payload, eager, "replayed payload vs eager")
        assert_bits_equal(r, r_eager, "replayed residual vs eager")


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approx"])
def test_topk_select_cuda_graph_capture_and_replay(exact):
    """topk_select makes no host synchronisation either, so it can be captured."""
    n, k = 200_000, 2000
    x = torch.empty(n, device=DEV)
    r = torch.empty(n, device=DEV)
    g, payload = _capture(lambda: gradzip.topk_select(x, k, r, exact, "int8", 1,
                                                      backend="cuda"))
    x_new, r_new = make_input(n, seed=4).to(DEV), residual_for(n).to(DEV)
    x.copy_(x_new)
    r.copy_(r_new)
    g.replay()
    r_eager = r_new.clone()
    eager = gradzip.topk_select(x_new, k, r_eager, exact, "int8", 1, backend="cuda")
    torch.cuda.synchronize()
    assert_payload_equal(payload, eager, "replayed payload vs eager")
    assert_bits_equal(r, r_eager, "replayed residual vs eager")


@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "offset3"])
def test_out_forms_match_allocating_forms(offset):
    """out= on the GPU: the same bytes and residual bits as the allocating form, into a
    16-byte aligned buffer (written in place) or one at an odd offset (staged)."""
    n = 100_003
    x = make_input(n, seed=8).to(DEV)
    for bits, rounding in ((8, "nearest"), (4, "stochastic"), (2, "nearest"), (1, "nearest")):
        r1, r2 = residual_for(n).to(DEV), residual_for(n).to(DEV)
        want = gradzip.quantize_pack(x, bits, 128, r1, rounding, 5, backend="cuda")
        raw = torch.full((want.numel() + offset,), 0xA5, dtype=torch.uint8, device=DEV)
        buf = raw[offset:]
        got = gradzip.quantize_pack(x, bits, 128, r2, rounding, 5, backend="cuda", out=buf)
        assert got is buf
        assert_payload_equal(buf, want, f"bits={bits} out= payload")
        assert_bits_equal(r2, r1, f"bits={bits} out= residual")
    for exact, values in ((True, "fp32"), (False, "bf16"), (True, "int8")):
        r1, r2 = residual_for(n).to(DEV), residual_for(n).to(DEV)
        want = gradzip.topk_select(x, 1000, r1, exact, values, 2, backend="cuda")
        raw = torch.full((want.numel() + offset,), 0xA5, dtype=torch.uint8, device=DEV)
        buf = raw[offset:]
        got = gradzip.topk_select(x, 1000, r2, exact, values, 2, backend="cuda", out=buf)
        assert got is buf
        assert_payload_equal(buf, want, f"topk {exact} {values} out= payload")
        assert_bits_equal(r2, r1, f"topk {exact} {values} out= residual")


def test_out_forms_cuda_graph_capture_and_replay():
    """A captured step that writes into fixed payload buffers (what comm's reused send
    buffers give a graph): replays match eager."""
    n, k = 200_000, 2000
    x = torch.empty(n, device=DEV)
    r = torch.empty(n, device=DEV)
    qbuf = torch.empty(fmt.dense_payload_bytes(n, 4, 128), dtype=torch.uint8, device=DEV)
    tbuf = torch.empty(fmt.topk_payload_bytes(n, k, "bf16"), dtype=torch.uint8, device=DEV)

    def step():
        gradzip.quantize_pack(x, 4, 128, r, "stochastic", 3, backend="cuda", out=qbuf)
        gradzip.topk_select(x, k, None, False, "bf16", 1, backend="cuda", out=tbuf)

    g, _ = _capture(step)
    for seed in (1, 2):
        x_new, r_new = make_input(n, seed=seed).to(DEV), residual_for(n, seed).to(DEV)
        x.copy_(x_new)
        r.copy_(r_new)
        g.replay()
        r_eager = r_new.clone()
        q_eager = gradzip.quantize_pack(x_new, 4, 128, r_eager, "stochastic", 3, backend="cuda")
        t_eager = gradzip.topk_select(x_new, k, None, False, "bf16", 1, backend="cuda")
        torch.cuda.synchronize()
        assert_payload_equal(qbuf, q_eager, "replayed quantize_pack out= vs eager")
        assert_payload_equal(tbuf, t_eager, "replayed topk_select out= vs eager")
        assert_bits_equal(r, r_eager, "replayed residual vs eager")


def test_torch_compile_fullgraph_on_gpu():
    ops = torch.ops.gradzip

    def step(x, residual, out):
        p = ops.quantize_pack(x, 8, 64, residual, False, 0)
        ops.dequantize_accumulate(p.unsqueeze(0), out, 0.5)
        t = ops.topk_select(x * 2, 100, None, True, 2, 0)
        return p, t

    n = 50_000
    x = make_input(n, seed=6).to(DEV)
    r_eager, r_comp = residual_for(n).to(DEV), residual_for(n).to(DEV)
    out_eager, out_comp = torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    want = step(x, r_eager, out_eager)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(x, r_comp, out_comp)
    for name, a, b in zip(("quantize_pack", "topk_select"), got, want, strict=True):
        assert_payload_equal(a, b, f"compiled {name} payload vs eager")
    assert_bits_equal(r_comp, r_eager, "compiled residual vs eager")
    assert_bits_equal(out_comp, out_eager, "compiled out vs eager")


def test_opcheck_on_gpu():
    x = make_input(3000, seed=1).to(DEV)
    r = residual_for(3000).to(DEV)
    torch.library.opcheck(torch.ops.gradzip.quantize_pack.default, (x, 4, 128, r, True, 7))
    torch.library.opcheck(torch.ops.gradzip.topk_select.default, (x, 30, r, False, 3, 7))
    qbuf = torch.empty(fmt.dense_payload_bytes(3000, 4, 128), dtype=torch.uint8, device=DEV)
    torch.library.opcheck(torch.ops.gradzip.quantize_pack.out, (x, 4, 128, r, True, 7),
                          {"out": qbuf})
    tbuf = torch.empty(fmt.topk_payload_bytes(3000, 30, "int8"), dtype=torch.uint8, device=DEV)
    torch.library.opcheck(torch.ops.gradzip.topk_select.out, (x, 30, r, False, 3, 7),
                          {"out": tbuf})
    rows = make_payloads("dense8", 3000, 2).to(DEV)
    torch.library.opcheck(torch.ops.gradzip.dequantize_accumulate.default,
                          (rows, torch.zeros(3000, device=DEV), 0.5))


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


def test_mixed_devices_are_rejected_clearly():
    x = torch.randn(1000, device=DEV)
    with pytest.raises(ValueError, match="residual is on"):
        gradzip.quantize_pack(x, 8, 128, torch.zeros(1000), backend="cuda")
    with pytest.raises(ValueError, match="residual is on"):  # the C++ check, reached directly
        torch.ops.gradzip.quantize_pack(x, 8, 128, torch.zeros(1000), False, 0)
    with pytest.raises(ValueError, match="residual is on"):
        torch.ops.gradzip.topk_select(x, 10, torch.zeros(1000), True, 1, 0)
    payload = gradzip.quantize_pack(x, 8, 128, backend="cuda")
    out_cpu = torch.zeros(1000)
    with pytest.raises(ValueError, match="out is on"):
        gradzip.dequantize_accumulate(payload, out_cpu)
    with pytest.raises(ValueError, match="out is on"):
        torch.ops.gradzip.dequantize_accumulate(payload.unsqueeze(0), out_cpu, 1.0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gradzip.quantize_pack(x.cpu(), 8, 128, backend="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_two_gpus_are_rejected():
    x = torch.randn(1000, device="cuda:0")
    with pytest.raises(ValueError, match="residual is on"):
        torch.ops.gradzip.quantize_pack(x, 8, 128, torch.zeros(1000, device="cuda:1"), False, 0)
    payload = gradzip.quantize_pack(x, 8, 128, backend="cuda").unsqueeze(0)
    with pytest.raises(ValueError, match="out is on"):
        torch.ops.gradzip.dequantize_accumulate(payload, torch.zeros(1000, device="cuda:1"), 1.0)


def test_ops_on_a_second_device_use_that_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = make_input(5000, seed=1)
    got = gradzip.quantize_pack(x.to("cuda:1"), 4, 64, backend="cuda")
    assert got.device == torch.device("cuda:1")
    assert_payload_equal(got, reference.quantize_pack(x, 4, 64), "payload on cuda:1")


def _corrupt(payload: torch.Tensor, offset: int, value: int) -> torch.Tensor:
    p = payload.clone()
    p[offset] = value
    return p


@pytest.mark.parametrize("damage,message", [
    (lambda p: _corrupt(p, 0, 0), "magic"),
    (lambda p: _corrupt(p, 4, 9), "version"),
    (lambda p: _corrupt(p, 7, 3), "bits"),
    (lambda p: _corrupt(p, 50, 1), "reserved"),
    (lambda p: p[:-16], "truncated|total_bytes"),
    (lambda p: p[:40], "truncated"),
])
def test_corrupt_dense_payload_raises_and_leaves_out_alone(damage, message):
    n = 1000
    good = reference.quantize_pack(make_input(n, seed=1), 8, 128)
    bad = damage(good)
    out = torch.ones(n, device=DEV)
    with pytest.raises(ValueError, match=message):
        torch.ops.gradzip.dequantize_accumulate(bad.unsqueeze(0).to(DEV), out, 1.0)
    assert bool((out == 1).all())


def test_corrupt_sparse_indices_raise_and_leave_out_alone():
    n, k = 5000, 100
    good = reference.topk_select(make_input(n, seed=2), k)
    h = fmt.parse_header(good)
    off, _ = h.sections()["indices"]
    idx = good[off: off + 4 * k].clone().view(torch.int32)
    cases = {
        "out of range": idx.clone().index_fill_(0, torch.tensor([k - 1]), n),
        "negative": idx.clone().index_fill_(0, torch.tensor([0]), -5),
        "ascending": idx.clone().index_fill_(0, torch.tensor([10]), int(idx[9])),
    }
    for name, bad_idx in cases.items():
        bad = good.clone()
        bad[off: off + 4 * k] = bad_idx.view(torch.uint8)
        rows = torch.stack([good, bad]).to(DEV)
        out = torch.ones(n, device=DEV)
        match = "ascending" if name == "ascending" else "out of range"
        with pytest.raises(ValueError, match=f"payload 1: .*{match}"):
            gradzip.dequantize_accumulate(rows, out, backend="cuda")
        assert bool((out == 1).all()), f"out was modified by a corrupt payload ({name})"


def test_mixed_codecs_and_wrong_out_size():
    n = 1000
    a = reference.quantize_pack(make_input(n), 8, 128)
    b = reference.quantize_pack(make_input(n), 8, 64)
    b = torch.cat([b, torch.zeros(a.numel() - b.numel(), dtype=torch.uint8)]) \
        if b.numel() < a.numel() else b[: a.numel()]
    with pytest.raises(ValueError):
        torch.ops.gradzip.dequantize_accumulate(torch.stack([a, b]).to(DEV),
                                                torch.zeros(n, device=DEV), 1.0)
    with pytest.raises(ValueError, match="elements"):
        torch.ops.gradzip.dequantize_accumulate(a.unsqueeze(0).to(DEV),
                                                torch.zeros(n + 1, device=DEV), 1.0)


def test_random_bytes_never_crash():
    g = torch.Generator().manual_seed(0)
    good = reference.topk_select(make_input(3000, seed=1), 50, values="int8")
    for trial in range(200):
        p = good.clone()
        pos = torch.randint(0, p.numel(), (4,), generator=g)
        p[pos] = torch.randint(0, 256, (4,), generator=g, dtype=torch.uint8)
        out = torch.zeros(3000, device=DEV)
        try:
            torch.ops.gradzip.dequantize_accumulate(p.unsqueeze(0).to(DEV), out, 1.0)
        except ValueError:
            pass
    torch.cuda.synchronize()  # an out-of-bounds access would surface here as a CUDA error
