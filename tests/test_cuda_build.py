"""What can be checked of the CUDA kernels on a machine without a GPU.

* The CUDA sources compile with the machine's nvcc for every target architecture and no
  kernel spills registers (tools/ptxas_report.py, the same check CI runs).
* A CUDA build registers the CUDA kernels of all three ops.
* The bit-level helpers the kernels use to reproduce the x86 reference exactly
  (csrc/core/float_bits.h: NaN propagation, float16/bfloat16 conversions, the scale of a
  NaN block) are compiled for the host and compared with torch on the CPU. Their device
  build differs only in the native float operation underneath, which the tests stand in
  for with what a GPU returns (every NaN result is 0x7FFFFFFF).

The kernels themselves run only on a GPU: tests/test_cuda.py and `python -m gradzip.selftest`.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys

import gradzip
import numpy as np
import pytest
import torch
from gradzip import format as fmt
from gradzip import reference
from gradzip.testing import assert_bits_equal, assert_payload_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import ptxas_report

OPS = ("quantize_pack", "topk_select", "dequantize_accumulate")


def _toolkit() -> str | None:
    try:
        return ptxas_report.read_setup().helpers["_find_cuda_home"]()
    except (OSError, RuntimeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# registration and ptxas
# ---------------------------------------------------------------------------------------


def test_cuda_kernels_registered_in_a_cuda_build():
    info = gradzip.build_info()
    if not info["cuda"]:
        pytest.skip(f"CPU-only build of gradzip (CUDA kernels not compiled: "
                    f"{info.get('cuda_reason')})")
    missing = [op for op in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"gradzip::{op}", "CUDA")]
    assert not missing, f"CUDA build without CUDA kernels for {missing}"
    assert info["cuda_kernels_registered"]
    assert info["cuda_archs"]


def test_setup_flags_are_read_from_setup_py():
    cfg = ptxas_report.read_setup()
    # The arithmetic contract: no fused multiply-add on the device.
    assert "--fmad=false" in cfg.nvcc_flags
    assert "-DGRADZIP_WITH_CUDA=1" in cfg.nvcc_flags
    assert ptxas_report.parse_archs(cfg.default_archs) == [80, 86, 89, 90]
    assert ptxas_report.parse_archs("8.0;9.0+PTX 8.6") == [80, 86, 90]


SAMPLE_PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 16640 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    24 bytes stack frame, 16 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_ptxas_output_parser():
    got = {(r.arch, r.kernel): r for r in ptxas_report.parse_ptxas(SAMPLE_PTXAS, "x.cu")}
    foo, bar = got[("sm_80", "_Z3fooPf")], got[("sm_90", "_Z3barv")]
    assert (foo.registers, foo.smem_bytes, foo.spill_stores, foo.spill_loads) == (40, 16640, 0, 0)
    assert (bar.registers, bar.smem_bytes, bar.stack_bytes) == (64, 0, 24)
    assert (bar.spill_stores, bar.spill_loads) == (16, 32)


# Slow (a full nvcc compile of every kernel for four architectures): .ci/run runs the
# same tool directly, so the default test run does not compile the CUDA sources twice.
@pytest.mark.slow
@pytest.mark.skipif(_toolkit() is None,
                    reason="needs nvcc (CUDA toolkit): no nvcc on PATH, CUDA_HOME or CUDA_PATH")
def test_cuda_sources_compile_without_spills(tmp_path):
    """Every kernel, every default architecture: compiled, and no register spills."""
    out = tmp_path / "ptxas.json"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ptxas_report.py"),
                          "--json", str(out)], capture_output=True, text=True, env=env,
                         check=False)
    print(res.stdout)
    assert res.returncode == 0, f"ptxas report failed (exit {res.returncode}):\n" \
                                f"{res.stdout[-4000:]}\n{res.stderr[-8000:]}"
    report = json.loads(out.read_text())
    assert not report["failures"]
    kernels = report["kernels"]
    assert all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in kernels)
    archs = {"sm_80", "sm_86", "sm_89", "sm_90"}
    assert set(report["archs"]) == archs
    for src, names in {
        "quantize_pack.cu": ["quantize_pack_kernel"],
        "topk_select.cu": ["topk_hist_kernel", "topk_write_kernel", "topk_sample_kernel"],
        "dequantize_accumulate.cu": ["accumulate_dense_kernel", "accumulate_sparse_kernel"],
    }.items():
        for name in names:
            built = {k["arch"] for k in kernels
                     if k["file"].endswith(src) and name in k["kernel"]}
            assert built == archs, f"{name} ({src}) built for {sorted(built)}"


# ---------------------------------------------------------------------------------------
# csrc/core/float_bits.h compiled for the host
# ---------------------------------------------------------------------------------------

HARNESS = r"""
#include <cstdint>
#include "core/float_bits.h"
namespace core = gradzip::core;

// An NVIDIA GPU returns the canonical NaN 0x7FFFFFFF for every NaN result.
static float gpu(float r) {
  return core::is_nan_bits(core::float_bits(r)) ? core::bits_float(0x7FFFFFFFu) : r;
}

extern "C" {
void gz_to_16(const float* in, int64_t n, uint16_t* half, uint16_t* bf16) {
  for (int64_t i = 0; i < n; ++i) {
    half[i] = core::float_to_half_bits(in[i]);
    bf16[i] = core::float_to_bf16_bits(in[i]);
  }
}
void gz_from_16(float* from_half, float* from_bf16) {
  for (uint32_t h = 0; h < 65536; ++h) {
    from_half[h] = core::half_bits_to_float(static_cast<uint16_t>(h));
    from_bf16[h] = core::bf16_bits_to_float(static_cast<uint16_t>(h));
  }
}
// x86's result of a (op) b, rebuilt from a GPU-like native result.
void gz_arith(int op, const float* a, const float* b, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = a[i], y = b[i];
    const float r = op == 0 ? x + y : op == 1 ? x - y : op == 2 ? x * y : x / y;
    out[i] = core::x86_nan_result(x, y, gpu(r));
  }
}
void gz_absmax_scale(const float* amax, int64_t n, int bits, float* scale, float* inv) {
  for (int64_t i = 0; i < n; ++i) {
    const core::BlockParams p = core::absmax_params_exact(amax[i], bits);
    scale[i] = p.scale;
    inv[i] = p.inv;
  }
}
void gz_abs_neg(const float* in, int64_t n, float* absv, float* negv) {
  for (int64_t i = 0; i < n; ++i) {
    absv[i] = core::abs_bits(in[i]);
    negv[i] = core::neg_bits(in[i]);
  }
}
}
"""


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler (g++) to build the host copy of csrc/core")
    d = tmp_path_factory.mktemp("float_bits")
    src, lib = d / "harness.cpp", d / "harness.so"
    src.write_text(HARNESS)
    # The project's float contract: no contraction, no fast-math (as setup.py).
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off",
                    "-fno-fast-math", "-I", os.path.join(ROOT, "csrc"), str(src), "-o",
                    str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _bits(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.view(torch.int32 if t.element_size() == 4 else torch.int16)
        a = t.numpy()
    else:
        a = t
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)


NAN_PATTERNS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FC12345, 0x7FFFFFFF]


def _interesting_floats(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    special = np.array([0x0, 0x80000000, 0x3F800000, 0xBF800000, 0x7F800000, 0xFF800000,
                        0x7F7FFFFF, 0x00000001, 0x807FFFFF, 0x00800000, 0x477FE000,
                        0x477FF000, 0x477FEFFF, 0x47800000, 0x38800000, 0x387FFFFF,
                        0x33800000, 0x33000000, 0x33000001, 0x32FFFFFF] + NAN_PATTERNS,
                       dtype=np.uint32)
    random_bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    # Every float16 and bfloat16 value, and the midpoints between float16 neighbours
    # (round-half-even ties), plus one ulp either side of those midpoints.
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    hv = halves[np.isfinite(halves)].astype(np.float32)
    hv = np.unique(np.sort(hv))
    mids = ((hv[1:].astype(np.float64) + hv[:-1]) / 2).astype(np.float32)
    mid_bits = mids.view(np.uint32)
    bf = (np.arange(65536, dtype=np.uint32) << 16)
    bf_mid = bf | 0x8000
    pool = np.concatenate([special, random_bits, hv.view(np.uint32), mid_bits, mid_bits + 1,
                           mid_bits - 1, bf, bf_mid, bf_mid + 1, bf_mid - 1])
    return pool.view(np.float32)


def test_float_to_16bit_matches_torch(helpers):
    f = _interesting_floats()
    n = f.size
    half = np.empty(n, np.uint16)
    bf16 = np.empty(n, np.uint16)
    helpers.gz_to_16(_ptr(f), ctypes.c_int64(n), _ptr(half), _ptr(bf16))
    t = torch.from_numpy(f)
    want_half = _bits(t.to(torch.float16))
    want_bf16 = _bits(t.to(torch.bfloat16))
    bad = np.nonzero(half != want_half)[0]
    assert bad.size == 0, [(hex(f.view(np.uint32)[i]), hex(half[i]), hex(want_half[i]))
                           for i in bad[:10]]
    bad = np.nonzero(bf16 != want_bf16)[0]
    assert bad.size == 0, [(hex(f.view(np.uint32)[i]), hex(bf16[i]), hex(want_bf16[i]))
                           for i in bad[:10]]


def test_16bit_to_float(helpers):
    from_half = np.empty(65536, np.float32)
    from_bf16 = np.empty(65536, np.float32)
    helpers.gz_from_16(_ptr(from_half), _ptr(from_bf16))
    allbits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    # bfloat16 is the top half of a float32: exact for every pattern, NaN payloads included.
    assert_bits_equal(torch.from_numpy(from_bf16),
                      torch.from_numpy((allbits.astype(np.uint32) << 16).view(np.float32)),
                      "bfloat16 -> float")
    # float16: exact for numbers (numpy's conversion is an independent implementation);
    # a NaN keeps its sign and payload, quietened, as x86's F16C conversion does.
    h = allbits.view(np.float16)
    num = ~np.isnan(h)
    assert_bits_equal(torch.from_numpy(from_half[num]),
                      torch.from_numpy(h[num].astype(np.float32)), "float16 number -> float")
    hb = allbits[~num].astype(np.uint32)
    want_nan = ((hb & 0x8000) << 16) | 0x7FC00000 | ((hb & 0x3FF) << 13)
    assert_bits_equal(torch.from_numpy(from_half[~num]),
                      torch.from_numpy(want_nan.view(np.float32)), "float16 NaN -> float")


def test_x86_nan_rule_rebuilds_the_reference_from_gpu_results(helpers):
    rng = np.random.default_rng(1)
    pool = np.concatenate([
        np.array(NAN_PATTERNS + [0x7F800000, 0xFF800000, 0x0, 0x80000000, 0x3F800000,
                                 0x7F7FFFFF, 0x00000001], dtype=np.uint32),
        rng.integers(0, 2**32, size=64, dtype=np.uint64).astype(np.uint32)]).view(np.float32)
    a = np.repeat(pool, pool.size)
    b = np.tile(pool, pool.size)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    # Pairs of two different NaNs are left out: which one x86 returns then depends on the
    # operand order the compiler picked for torch's vector loop, which nothing pins down.
    both_nan = np.isnan(a) & np.isnan(b) & (_bits(a) != _bits(b))
    for op, want in enumerate([ta + tb, ta - tb, ta * tb, ta / tb]):
        out = np.empty(a.size, np.float32)
        helpers.gz_arith(op, _ptr(a), _ptr(b), ctypes.c_int64(a.size), _ptr(out))
        ok = (_bits(out) == _bits(want)) | both_nan
        bad = np.nonzero(~ok)[0]
        assert bad.size == 0, [(op, hex(_bits(a)[i]), hex(_bits(b)[i]), hex(_bits(out)[i]),
                                hex(_bits(want)[i])) for i in bad[:10]]


def test_abs_and_neg_by_sign_bit(helpers):
    f = _interesting_floats(2)[:50_000]
    absv, negv = np.empty_like(f), np.empty_like(f)
    helpers.gz_abs_neg(_ptr(f), ctypes.c_int64(f.size), _ptr(absv), _ptr(negv))
    t = torch.from_numpy(f)
    assert_bits_equal(torch.from_numpy(absv), t.abs(), "abs")
    flipped = (f.view(np.uint32) ^ np.uint32(0x80000000)).view(np.float32)
    assert_bits_equal(torch.from_numpy(negv), torch.from_numpy(flipped), "neg")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_block_scale_matches_reference_payload(helpers, bits):
    """The scale of blocks holding NaN (any payload), inf, zeros, tiny and ordinary values
    is the reference's, byte for byte."""
    block = 32
    specials = [np.uint32(p).view(np.float32) for p in NAN_PATTERNS] + \
        [np.float32(np.inf), np.float32(-np.inf), np.float32(0.0), np.float32(1e-45),
         np.float32(3e-39), np.float32(1.0), np.float32(-3.3e38), np.float32(7.25)]
    x = np.zeros(len(specials) * block, np.float32)
    amax = np.empty(len(specials), np.float32)
    for i, s in enumerate(specials):
        x[i * block + 3] = s
        with np.errstate(invalid="ignore"):
            amax[i] = np.abs(s) if not np.isnan(s) else s
    payload = reference.quantize_pack(torch.from_numpy(x), bits, block)
    want = payload[64: 64 + 4 * len(specials)].numpy().view(np.uint32)
    scale, inv = np.empty_like(amax), np.empty_like(amax)
    helpers.gz_absmax_scale(_ptr(amax), ctypes.c_int64(amax.size), ctypes.c_int(bits),
                            _ptr(scale), _ptr(inv))
    assert [hex(v) for v in _bits(scale)] == [hex(v) for v in want]


# ---------------------------------------------------------------------------------------
# The top-k selection algorithm of csrc/cuda/topk_select.cu, step by step on the host
# ---------------------------------------------------------------------------------------
# The CUDA kernels cannot run here, but the decisions they take can: this is a line-by-line
# transcription of warp_find_bin, the sample / histogram / find passes and the ordered
# compaction (S, W, q, per-chunk offsets, slot formula). If the algorithm had an off-by-one
# in a rank, the tie rule or the fill rule, these comparisons with the reference would fail.
TILE = 2048


def _pass(p: int) -> tuple[int, int]:
    return (2048, 20) if p == 0 else (1024, 10 if p == 1 else 0)


def _find_bin(hist: np.ndarray, rank: int):
    """csrc/cuda/common.cuh warp_find_bin: (found, digit, rank within the bin, total)."""
    nbins = hist.size
    per = nbins // 32
    mine = hist.reshape(32, per).sum(axis=1)
    suffix = np.cumsum(mine[::-1])[::-1]
    total = int(suffix[0])
    ballot = [rank >= 1 and int(suffix[j]) >= rank for j in range(32)]
    if not any(ballot):
        return False, 0, 1, total
    owner = max(j for j in range(32) if ballot[j])
    r = rank - (int(suffix[owner]) - int(mine[owner]))
    d = owner * per
    for b in range((owner + 1) * per - 1, owner * per - 1, -1):
        if r <= hist[b]:
            d = b
            break
        r -= int(hist[b])
    return True, d, r, total


def _radix(keys: np.ndarray, rank: int, lo: int, approx_total_check: int | None = None):
    prefix = mask = 0
    for p in range(3):
        nb, shift = _pass(p)
        m = (keys >= lo) & ((keys & mask) == prefix)
        hist = np.bincount((keys[m] >> shift) & (nb - 1), minlength=nb)
        found, d, r, total = _find_bin(hist, rank)
        if p == 0 and approx_total_check is not None and total < approx_total_check:
            return None, total  # fewer candidates than k
        assert found
        prefix |= d << shift
        mask |= (nb - 1) << shift
        rank = r
    return prefix, rank


def model_select(v: torch.Tensor, k: int, exact: bool, seed: int,
                 tiles_per_chunk: int | None = None) -> np.ndarray:
    key = reference.magnitude_key(v).numpy()  # core::magnitude_key: NaN keys are canonical
    n = key.size
    lo = 0
    if not exact:  # topk_sample_kernel
        skey = key[reference.sample_positions(n, seed).numpy()]
        lo, _ = _radix(skey, reference.approximate_rank(n, k), 0)
    t, r = _radix(key, k, lo, None if exact else k)  # topk_hist_kernel + topk_find_kernel
    if t is None:  # fill: every candidate, then the lowest-index non-candidates
        s_lo, w_lo, w_hi, q = lo, 0, lo, k - r
    else:
        s_lo, w_lo, w_hi, q = t + 1, t, t + 1, r
    ntiles = -(-n // TILE)
    tpc = tiles_per_chunk or -(-ntiles // 4096)
    nchunks = -(-ntiles // tpc)
    in_s = key >= s_lo
    in_w = (key >= w_lo) & (key < w_hi)
    bounds = [(c * tpc * TILE, min(n, (c + 1) * tpc * TILE)) for c in range(nchunks)]
    cs = np.array([in_s[a:b].sum() for a, b in bounds])
    cw = np.array([in_w[a:b].sum() for a, b in bounds])
    off_w = np.concatenate([[0], np.cumsum(cw)[:-1]])  # topk_scan_kernel
    take = np.clip(q - off_w, 0, cw)
    off_sel = np.concatenate([[0], np.cumsum(cs + take)[:-1]])
    out = np.full(k, -1, dtype=np.int64)
    for c, (a, b) in enumerate(bounds):  # topk_write_kernel
        s_, w_ = in_s[a:b], in_w[a:b]
        sb = np.cumsum(s_) - s_
        wb = np.cumsum(w_) - w_
        q_chunk = max(0, q - int(off_w[c]))
        sel = s_ | (w_ & (wb < q_chunk))
        pos = off_sel[c] + sb + np.minimum(wb, q_chunk)
        assert (pos[sel] < k).all()
        out[pos[sel]] = np.arange(a, b)[sel]
    assert (out >= 0).all(), "a payload slot was left unwritten"
    return out


def _fill_case():
    n, k, seed = 4 * 16384, 1000, 7
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, generator=g) * 1e-3
    pos = reference.sample_positions(n, seed)
    x[pos] = 1.0 + torch.rand(pos.numel(), generator=g)
    return x, k, seed


@pytest.mark.parametrize("case", ["normal", "ties", "zeros", "nonfinite", "fill", "k=n", "k=1",
                                  "equal", "chunks"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approx"])
def test_topk_algorithm_model_selects_the_reference_indices(case, exact):
    g = torch.Generator().manual_seed(3)
    n, k, seed, tpc = 40_000, 400, 5, None
    if case == "normal":
        v = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    elif case == "ties":  # S = {|v| = 3}, W = {|v| = 2} partly taken
        v, k = torch.randint(-3, 4, (n,), generator=g).float(), 15_000
    elif case == "zeros":
        v = torch.zeros(n)
    elif case == "nonfinite":
        v = torch.randn(n, generator=g)
        v[[3, 500, 9000, 39_999]] = torch.tensor([float("nan"), float("inf"), -float("inf"),
                                                   float("nan")])
        k = 3
    elif case == "fill":
        v, k, seed = _fill_case()
    elif case == "k=n":
        v, k = torch.randn(5000, generator=g), 5000
    elif case == "k=1":
        v, k = torch.randn(77_777, generator=g), 1
    elif case == "equal":
        v, k = torch.full((100_000,), -0.25), 300
    else:  # many chunks; W = {v = 3} half taken, across chunk boundaries
        v, k, tpc = torch.randint(0, 5, (50_001,), generator=g).float(), 15_000, 1
    got = model_select(v, k, exact, seed, tpc)
    want = reference.select_indices(v, k, exact, seed).numpy()
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------------------
# The CUDA kernels' own source, run on CPU threads (csrc/cuda/cpu_emulation.cuh)
# ---------------------------------------------------------------------------------------
# csrc/cuda/*.cu compiled as C++ with GZ_CUDA_EMULATION: each CUDA thread an OS thread,
# __syncthreads and warp shuffles real barriers, the host code (launch shapes, workspace
# layout, checks) unchanged. The device float intrinsics are replaced by the host branch of
# csrc/core, whose equivalence the float_bits tests above establish. Compared with the
# reference byte for byte, like tests/test_cuda.py does on a GPU.


@pytest.fixture(scope="module")
def emu():
    if sys.platform != "linux":
        pytest.skip("the CPU emulation of the CUDA kernels uses pthreads (Linux)")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler to build the CPU emulation of the CUDA kernels")
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    build = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(build, exist_ok=True)
    sources = []
    for op in OPS:
        path = os.path.join(build, f"emulated_{op}.cpp")
        text = f'#define GZ_CUDA_EMULATION 1\n#include "cuda/{op}.cu"\n'
        old = None
        if os.path.exists(path):
            with open(path) as f:
                old = f.read()
        if old != text:  # rewriting an unchanged file would make ninja rebuild it
            with open(path, "w") as f:
                f.write(text)
        sources.append(path)
    cpp_extension.load(name="gradzip_cuda_emu", sources=sources,
                       extra_include_paths=[os.path.join(ROOT, "csrc")],
                       extra_cflags=["-O1", "-std=c++20", "-ffp-contract=off", "-fno-fast-math"],
                       build_directory=build, is_python_module=False, verbose=False)
    return torch.ops.gradzip_cuda_emu


def _emulated_quantize(emu, x, bits, block, residual, rounding, seed=3):
    r_ref = residual.clone() if residual is not None else None
    want = reference.quantize_pack(x, bits, block, r_ref, rounding, seed)
    r = residual.clone() if residual is not None else None
    got = emu.quantize_pack(x, bits, block, r, rounding == "stochastic", seed)
    assert_payload_equal(got, want, "payload vs the reference")
    if residual is not None:
        assert_bits_equal(r, r_ref, "residual vs the reference")


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_emulated_quantize_pack_matches_reference(emu, bits):
    g = torch.Generator().manual_seed(bits)
    rounding = "stochastic" if bits > 1 else "nearest"
    for block in (32, 128, 512, 4096):
        for n in (1, 33, 5000):
            x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
            _emulated_quantize(emu, x, bits, block, torch.randn(n, generator=g) * 0.01, rounding)
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(1000, generator=g) * 4).to(dtype)
        _emulated_quantize(emu, x, bits, 64, torch.randn(1000, generator=g), "nearest")
        _emulated_quantize(emu, x, bits, 64, None, rounding)


@pytest.mark.parametrize("bits", [8, 1])
def test_emulated_quantize_pack_scalar_paths_and_special_values(emu, bits):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4001, generator=g)
    r_base = torch.randn(4001, generator=g) * 0.01
    # Views that are not 16-byte aligned take the scalar load / store path.
    _emulated_quantize(emu, base[1:], bits, 128, None, "nearest")
    r_ref = r_base[1:].clone()
    want = reference.quantize_pack(base[1:], bits, 128, r_ref)
    r = r_base.clone()
    got = emu.quantize_pack(base[1:], bits, 128, r[1:], False, 0)
    assert_payload_equal(got, want, "payload vs the reference")
    assert_bits_equal(r[1:], r_ref, "residual vs the reference")
    assert_bits_equal(r[:1], r_base[:1], "wrote outside the residual view")
    special = torch.randn(3000, generator=g)
    special[[0, 700, 1500, 2999]] = torch.tensor([float("inf"), float("nan"), -float("inf"),
                                                  float("nan")])
    # NaNs of other bit patterns: the payload still holds the canonical NaN.
    special.view(torch.int32)[[100, 2000]] = torch.tensor([0x7FC12345, -0x3FFFFF - 1],
                                                          dtype=torch.int32)
    _emulated_quantize(emu, special, bits, 32, torch.randn(3000, generator=g), "nearest")
    # Zero and tiny blocks (scale 0): a zero residual keeps v = x.
    for x in (torch.zeros(3000), torch.randn(3000, generator=g) * 1e-44):
        _emulated_quantize(emu, x, bits, 32, torch.zeros(3000), "nearest")


@pytest.mark.parametrize("offset", [0, 5], ids=["aligned", "offset5"])
def test_emulated_out_forms_match_reference(emu, offset):
    """The CUDA ops' out= host code (checks, in-place launch or the staged copy for a
    buffer off a 16-byte boundary) run by the emulation: the reference's bytes in the
    caller's buffer, whatever it held, and the reference's residual."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5000, generator=g) * 3
    r0 = torch.randn(5000, generator=g) * 0.1
    for bits, rounding in ((8, "nearest"), (4, "stochastic"), (1, "nearest")):
        r_ref = r0.clone()
        want = reference.quantize_pack(x, bits, 64, r_ref, rounding, 3)
        r = r0.clone()
        buf = torch.full((want.numel() + offset,), 0xA5, dtype=torch.uint8)[offset:]
        emu.quantize_pack_out(x, bits, 64, r, rounding == "stochastic", 3, buf)
        assert_payload_equal(buf, want, f"bits={bits} out= payload vs the reference")
        assert_bits_equal(r, r_ref, f"bits={bits} out= residual vs the reference")
    for exact, values in ((True, "fp32"), (False, "int8")):
        r_ref = r0.clone()
        want = reference.topk_select(x, 50, r_ref, exact, values, 5)
        r = r0.clone()
        buf = torch.full((want.numel() + offset,), 0xA5, dtype=torch.uint8)[offset:]
        emu.topk_select_out(x, 50, r, exact, fmt.VALUE_FORMATS[values], 5, buf)
        assert_payload_equal(buf, want, f"topk {values} out= payload vs the reference")
        assert_bits_equal(r, r_ref, f"topk {values} out= residual vs the reference")
    with pytest.raises(ValueError, match="out has 10 bytes but the payload is"):
        emu.quantize_pack_out(x, 8, 64, None, False, 0, torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out must not share memory with residual"):
        emu.topk_select_out(x, 50, r0, True, 3, 0, r0.view(torch.uint8)[:want.numel()])


def _emulated_topk(emu, x, k, exact, values, seed=5, keep_ties=False):
    g = torch.Generator().manual_seed(x.numel())
    # A zero residual keeps the ties of x in v = x + residual (and still gets updated).
    residual = torch.zeros(x.numel()) if keep_ties else torch.randn(x.numel(), generator=g) * 0.01
    r_ref = residual.clone()
    want = reference.topk_select(x, k, r_ref, exact, values, seed)
    r = residual.clone()
    got = emu.topk_select(x, k, r, exact, fmt.VALUE_FORMATS[values], seed)
    assert_payload_equal(got, want, f"payload n={x.numel()} k={k}")
    assert_bits_equal(r, r_ref, f"residual n={x.numel()} k={k}")



@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approx"])
@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
def test_emulated_topk_select_matches_reference(emu, exact, values):
    g = torch.Generator().manual_seed(1)
    for n, k in ((1, 1), (33, 5), (3000, 30), (5000, 1700)):
        _emulated_topk(emu, torch.randn(n, generator=g) * 3, k, exact, values)
    # Ties: S = {|x| = 3}, and only some of W = {|x| = 2}, lowest indices first.
    _emulated_topk(emu, torch.randint(-3, 4, (4000,), generator=g).float(), 1500, exact, values,
                   keep_ties=True)


def test_emulated_topk_select_special_cases(emu):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5000, generator=g)
    x[[0, 100, 2500, 4999]] = torch.tensor([float("inf"), float("nan"), -float("inf"),
                                            float("nan")])
    _emulated_topk(emu, x, 10, False, "int8")
    _emulated_topk(emu, x, 3, True, "fp32")
    # NaNs of different bit patterns tie at the canonical key: lowest indices first.
    x.view(torch.int32)[[50, 3000, 4000]] = torch.tensor([0x7FC12345, -0x3FFFFF - 1,
                                                          0x7F800001], dtype=torch.int32)
    for values in ("fp32", "bf16", "int8"):
        _emulated_topk(emu, x, 4, True, values, keep_ties=True)
    _emulated_topk(emu, torch.randn(3000, generator=g).half(), 30, True, "bf16")
    _emulated_topk(emu, torch.zeros(3000), 30, False, "int8", keep_ties=True)
    _emulated_topk(emu, torch.full((30_000,), 0.5), 10, True, "bf16", keep_ties=True)


@pytest.mark.slow
def test_emulated_topk_select_fill_and_buffer_overflow(emu):
    x, k, seed = _fill_case()  # approximate mode with fewer candidates than k
    _emulated_topk(emu, x, k, False, "fp32", seed)
    # Every key ties: more candidates than the key buffer holds, passes over the tensor.
    _emulated_topk(emu, torch.full((30_000,), 0.5), 10, False, "bf16", keep_ties=True)
    g = torch.Generator().manual_seed(3)
    _emulated_topk(emu, torch.randn(40_000, generator=g), 400, True, "fp32")
    _emulated_topk(emu, torch.randn(40_000, generator=g), 40_000, False, "int8")


def _payload(codec: str, n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    if codec.startswith("dense"):
        return reference.quantize_pack(x, int(codec[5:]), 64)
    return reference.topk_select(x, max(1, n // 20), values=codec.split("_")[1])


@pytest.mark.parametrize("codec", ["dense8", "dense4", "dense2", "dense1", "topk_fp32",
                                   "topk_bf16", "topk_int8"])
def test_emulated_dequantize_accumulate_matches_reference(emu, codec):
    for n in (1, 1000, 5000):
        for w in (1, 3):
            rows = torch.stack([_payload(codec, n, 10 * n + i) for i in range(w)])
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                out0 = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
                want = reference.dequantize_accumulate(rows, out0.clone(), -0.3)
                out = out0.clone()
                emu.dequantize_accumulate(rows, out, -0.3)
                assert_bits_equal(out, want, f"out n={n} w={w} {dtype}")


@pytest.mark.parametrize("codec", ["dense8", "dense1", "topk_fp32", "topk_int8"])
def test_emulated_dequantize_sum_matches_reference(emu, codec):
    """The CUDA kernels' overwriting form (gradzip::_dequantize_sum): out (prefilled with
    NaN) becomes the reference's zeroed out plus the accumulation, bit for bit; a corrupt
    payload is refused before out is written."""
    for n in (1, 1000, 5000):
        rows = torch.stack([_payload(codec, n, 10 * n + i) for i in range(3)])
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            want = reference.dequantize_accumulate(rows, torch.zeros(n, dtype=dtype), -0.3)
            out = torch.full((n,), float("nan"), dtype=dtype)
            emu._dequantize_sum(rows, out, -0.3)
            assert_bits_equal(out, want, f"out n={n} {dtype}")
    bad = rows[0].clone()
    bad[0] ^= 1
    out = torch.full((n,), float("nan"))
    with pytest.raises(ValueError, match="magic"):
        emu._dequantize_sum(bad.unsqueeze(0), out, 1.0)
    assert bool(out.isnan().all()), "out was written despite a corrupt payload"


def test_emulated_dequantize_accumulate_rejects_corrupt_payloads(emu):
    n, k = 5000, 100
    good = reference.topk_select(torch.randn(n, generator=torch.Generator().manual_seed(0)), k)
    off, _ = fmt.parse_header(good).sections()["indices"]
    idx = good[off: off + 4 * k].clone().view(torch.int32)
    bad_range = idx.clone()
    bad_range[k - 1] = n
    bad_order = idx.clone()
    bad_order[10] = bad_order[9]
    for bad_idx, message in ((bad_range, "out of range"), (bad_order, "ascending")):
        bad = good.clone()
        bad[off: off + 4 * k] = bad_idx.view(torch.uint8)
        out = torch.ones(n)
        with pytest.raises(ValueError, match=f"payload 1: .*{message}"):
            emu.dequantize_accumulate(torch.stack([good, bad]), out, 1.0)
        assert bool((out == 1).all()), "out was written despite a corrupt payload"
    dense = reference.quantize_pack(torch.randn(n), 8, 128)
    bad = dense.clone()
    bad[0] ^= 1
    with pytest.raises(ValueError, match="magic"):
        emu.dequantize_accumulate(bad.unsqueeze(0), torch.ones(n), 1.0)
    with pytest.raises(ValueError, match="truncated"):
        emu.dequantize_accumulate(dense[:32].unsqueeze(0), torch.ones(n), 1.0)
    with pytest.raises(ValueError, match="elements"):
        emu.dequantize_accumulate(dense.unsqueeze(0), torch.ones(n + 1), 1.0)
