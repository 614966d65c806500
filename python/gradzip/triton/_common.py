"""Pieces shared by gradzip's Triton kernels: exact float primitives, the hash, headers.

Bit-exactness with :mod:`gradzip.reference` on a GPU needs three things Triton does not
give by default, and this module is where each is handled:

* **No fused multiply-add.** Triton lets LLVM contract ``a * b + c`` into ``fma`` (and
  ptxas do the same) unless the kernel is compiled with ``enable_fp_fusion=False``. Every
  launch passes that option (:data:`LAUNCH_OPTIONS`), and on CUDA the products that feed
  an addition are additionally written as ``mul.rn.f32`` / ``add.rn.f32`` / ``sub.rn.f32``
  inline PTX (:func:`fmul_rn`, :func:`fadd_rn`, :func:`fsub_rn`): an instruction with an
  explicit rounding modifier is never contracted, whatever options a caller (or
  torch.compile) launches with. libdevice's ``__nv_fmul_rn`` is not used because Triton
  links libdevice in flush-to-zero mode, which would flush subnormals the reference keeps.
* **Correctly rounded division.** Triton's ``/`` on fp32 is ``div.full.f32`` (about 2 ulp);
  the kernels use ``tl.math.div_rn`` (``div.rn.f32``).
* **Round half to even** without libdevice (which the interpreter cannot run):
  :func:`round_half_even` adds and subtracts 1.5 * 2**23, exact for |t| < 2**22, which
  covers every value the kernels round (|t| <= qmax * (1 + 2**-22)).
* **No flush-to-zero.** Triton links libdevice with ``__CUDA_FTZ`` set, so ``tl.floor``
  becomes ``cvt.rmi.ftz.f32.f32``; :func:`floor_f32` uses ``cvt.rmi.f32.f32`` instead.
  Plain arithmetic is compiled without ``.ftz``. (tests/test_triton.py compiles every
  kernel for sm_90 and checks the PTX has no ``fma``, ``.ftz`` or approximate division.)

Under ``TRITON_INTERPRET=1`` the kernels run on numpy, whose float32 operations are the
IEEE operations the reference uses; the inline-PTX branches are skipped there (they are
compile-time constants) and the plain operators, which numpy never contracts, are used.

NaN bit patterns. NaN bits of float arithmetic differ between hardware and code paths, so
the format fixes them: every NaN written into a payload is the canonical quiet NaN
(float32 0x7FC00000, bfloat16 0x7FC0), and top-k orders every NaN by the key 0x7FC00000.
The kernels apply that rule where they store a float into a payload (:data:`QNAN_BITS`,
:func:`canonical_nan`, :func:`f32_to_bf16_bits`); residuals only ever receive finite
values, whose bits IEEE arithmetic fixes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _checks
from .. import format as fmt
from ..spec import seed_key  # noqa: F401  (k1 of hash32, computed on the host for the kernels)

#: True when kernels run on the Triton CPU interpreter (set before this module is imported).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Compile-time switch inside the kernels: inline PTX on CUDA; plain operators under the
# interpreter and on ROCm (where enable_fp_fusion=False alone keeps mul and add apart).
_PTX = tl.constexpr(not INTERPRET and torch.version.hip is None)

#: Options passed to every kernel launch (ignored by the interpreter, which never fuses).
LAUNCH_OPTIONS: dict = {} if INTERPRET else {"enable_fp_fusion": False}

#: The canonical quiet NaN (float32 bits) every NaN in a payload is written as.
QNAN_BITS = tl.constexpr(0x7FC00000)


# ---------------------------------------------------------------------------------------
# exact float primitives
# ---------------------------------------------------------------------------------------


@triton.jit
def fmul_rn(a, b):
    """IEEE float32 a * b, round to nearest even, never fused with a later add."""
    if _PTX:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def fadd_rn(a, b):
    """IEEE float32 a + b, round to nearest even, never fused with an earlier multiply."""
    if _PTX:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a + b


@triton.jit
def fsub_rn(a, b):
    """IEEE float32 a - b, round to nearest even, never fused with an earlier multiply."""
    if _PTX:
        return tl.inline_asm_elementwise("sub.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a - b


# Trivial bit operations (float bits, finiteness) are written inline in the kernels rather
# than as helpers: the interpreter re-patches triton.language on every helper call, which
# costs about a millisecond each and dominates the run time of the tests.


@triton.jit
def round_half_even(t):
    """rint(t) for |t| < 2**22: t + 1.5 * 2**23 lands where the unit in the last place is 1,
    so the addition itself rounds half to even; subtracting the constant back is exact.
    A zero result takes t's sign, as rint does (it matters for v = -0.0: residual bits)."""
    if _PTX:
        r = tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, 0f4B400000;\n\tsub.rn.f32 $0, $0, 0f4B400000;", "=f,f", [t],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = (t + 12582912.0) - 12582912.0
    signed_zero = (t.to(tl.uint32, bitcast=True) & 0x80000000).to(tl.float32, bitcast=True)
    return tl.where(r == 0.0, signed_zero, r)


@triton.jit
def floor_f32(t):
    """floor(t). On CUDA as cvt.rmi.f32.f32: tl.floor lowers to libdevice, which Triton
    links in flush-to-zero mode, so floor(-1e-40) would give -0.0 instead of -1.0."""
    if _PTX:
        return tl.inline_asm_elementwise("cvt.rmi.f32.f32 $0, $1;", "=f,f", [t],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.floor(t)


@triton.jit
def canonical_nan(f):
    """f with every NaN replaced by the canonical quiet NaN 0x7FC00000."""
    u = f.to(tl.uint32, bitcast=True)
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, QNAN_BITS, u).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_bits(f):
    """float32 -> bfloat16 bits (uint16 held in int32), round to nearest even; every NaN
    -> the canonical 0x7FC0."""
    u = f.to(tl.uint32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r.to(tl.int32))


@triton.jit
def load_f32(ptr, offs, mask):
    """Load float32/float16/bfloat16 elements as float32 (0.0 where masked).

    bfloat16 is widened by a shift of its bits, exactly what ATen does, so NaN payloads
    survive; float16 uses the hardware conversion (exact for every non-NaN value)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        h = tl.load(ptr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        return (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_v(x_ptr, res_ptr, offs, mask, HAS_RES: tl.constexpr):
    """v = float32(x) + residual (0.0 where masked: the reference's zero padding)."""
    x = load_f32(x_ptr, offs, mask)
    if HAS_RES:
        return x + tl.load(res_ptr + offs, mask=mask, other=0.0)
    else:
        return x


# ---------------------------------------------------------------------------------------
# counter-based random numbers (spec.hash32 / spec.uniform), uint32 arithmetic
# ---------------------------------------------------------------------------------------


@triton.jit
def hash32(k1, index):
    """hash32(seed, index) given k1 = lowbias32(seed ^ 0x9E3779B9) (from :func:`gradzip.spec.seed_key`)
    as a uint32 and int64 indices >= 0. lowbias32 is written out three times (not a
    helper) for the interpreter's sake, see above."""
    c1 = tl.full(index.shape, 0x7FEB352D, tl.uint32)
    c2 = tl.full(index.shape, 0x846CA68B, tl.uint32)
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    x = (index >> 32).to(tl.uint32) ^ k1  # k2 = lowbias32(hi ^ k1)
    x = x ^ (x >> 16)
    x = x * c1
    x = x ^ (x >> 15)
    x = x * c2
    x = x ^ (x >> 16)
    x = lo ^ x  # lowbias32(lo ^ k2)
    x = x ^ (x >> 16)
    x = x * c1
    x = x ^ (x >> 15)
    x = x * c2
    x = x ^ (x >> 16)
    x = x + k1  # lowbias32(... + k1), wrapping
    x = x ^ (x >> 16)
    x = x * c1
    x = x ^ (x >> 15)
    x = x * c2
    x = x ^ (x >> 16)
    return x


@triton.jit
def uniform(k1, index):
    """float32 in [0, 1): the top 24 bits of the hash times 2**-24 (both steps exact)."""
    return (hash32(k1, index) >> 8).to(tl.float32) * 5.9604644775390625e-08


# ---------------------------------------------------------------------------------------
# kernels tiled by quantization blocks (quantize_pack, dense dequantize_accumulate): ROWS
# blocks of BLOCK elements per program, autotuned on GPU, fixed under the interpreter
# ---------------------------------------------------------------------------------------


def rows_configs() -> list[triton.Config]:
    """Autotuning space on GPU: blocks per program (``ROWS``) and warps.
    :func:`prune_rows_configs` keeps the ones giving 1024..8192 elements per program for
    the block size at hand."""
    return [triton.Config({"ROWS": rows}, num_warps=warps)
            for rows in (1, 2, 4, 8, 16, 32, 64, 128) for warps in (2, 4, 8)]


def prune_rows_configs(configs, named_args, **kwargs):
    block = kwargs.get("BLOCK", named_args.get("BLOCK"))
    keep = [c for c in configs if 1024 <= c.kwargs["ROWS"] * block <= 8192]
    return keep or [c for c in configs if c.kwargs["ROWS"] == 1]


def autotune_rows(kernel, key: list[str], restore_value: list[str]):
    """``kernel`` autotuned over :func:`rows_configs` on GPU; unchanged under the
    interpreter. ``restore_value``: the arguments the kernel updates in place (autotuning
    runs it several times, and each run must see the caller's values)."""
    if INTERPRET:
        return kernel
    return triton.autotune(configs=rows_configs(), key=key,
                           prune_configs_by={"early_config_prune": prune_rows_configs},
                           restore_value=restore_value)(kernel)


def launch_rows(kernel, nb: int, block: int, *args, **constexprs) -> None:
    """Launch a kernel from :func:`autotune_rows` over ``nb`` blocks of ``block`` elements."""
    if INTERPRET:
        # The interpreter's cost is per program and per operation, not per element: big
        # tiles.
        rows = max(1, 32768 // block)
        wrap_triton(kernel)[(triton.cdiv(nb, rows),)](*args, **constexprs, BLOCK=block,
                                                      ROWS=rows)
    else:
        wrap_triton(kernel)[lambda meta: (triton.cdiv(nb, meta["ROWS"]),)](
            *args, **constexprs, BLOCK=block, **LAUNCH_OPTIONS)


# ---------------------------------------------------------------------------------------
# payload header (built on the host by gradzip.format, written by a tiny kernel so that a
# launch needs no host-to-device copy and torch.compile sees only kernels)
# ---------------------------------------------------------------------------------------


@triton.jit
def _header_kernel(out_ptr,  # *uint8 payload
                   w0, w1, w2, w3, w4, w5, w6, w7,  # the 64 header bytes as LE int64 words
                   p0, l0, p1, l1, p2, l2):  # up to three (offset, length < 16) zero pads
    j = tl.arange(0, 64)
    wi = j // 8
    z = tl.zeros([], dtype=tl.int64)  # widens i32 / constexpr arguments to int64
    word = tl.where(wi == 0, w0 + z, w1 + z)
    word = tl.where(wi == 2, w2 + z, word)
    word = tl.where(wi == 3, w3 + z, word)
    word = tl.where(wi == 4, w4 + z, word)
    word = tl.where(wi == 5, w5 + z, word)
    word = tl.where(wi == 6, w6 + z, word)
    word = tl.where(wi == 7, w7 + z, word)
    byte = (word >> ((j % 8) * 8)) & 0xFF
    tl.store(out_ptr + j, byte.to(tl.uint8))
    i = tl.arange(0, 16)
    zero = tl.zeros([16], dtype=tl.uint8)
    tl.store(out_ptr + p0 + i, zero, mask=i < l0)
    tl.store(out_ptr + p1 + i, zero, mask=i < l1)
    tl.store(out_ptr + p2 + i, zero, mask=i < l2)


def header_words(header: fmt.Header) -> list[int]:
    raw = header.pack()
    return [int.from_bytes(raw[8 * i: 8 * i + 8], "little", signed=True) for i in range(8)]


def section_pads(header: fmt.Header) -> list[tuple[int, int]]:
    """(offset, length) of the zero bytes that pad each section to 16 bytes."""
    pads = []
    for off, length in header.sections().values():
        pad = fmt.align16(length) - length
        if pad:
            pads.append((off + length, pad))
    return pads


def write_header(payload: torch.Tensor, header: fmt.Header, wrap) -> None:
    """Write ``header`` and the section padding into ``payload`` (one tiny kernel).

    ``wrap`` is ``torch.library.wrap_triton`` (passed in so callers inside a triton_op use
    the same wrapper for every launch)."""
    pads = section_pads(header)
    assert len(pads) <= 3
    pads += [(0, 0)] * (3 - len(pads))
    flat = [v for p in pads for v in p]
    wrap(_header_kernel)[(1,)](payload, *header_words(header), *flat, **LAUNCH_OPTIONS)


def misaligned(buf: torch.Tensor) -> bool:
    """Whether a caller's payload buffer starts off a 16-byte boundary. The kernels store
    float32 / int32 / int64 sections through typed pointers, which the hardware requires to
    be aligned; payloads they allocate always are. Fake tensors (torch.compile tracing) have
    no address and count as aligned."""
    return _checks.has_memory(buf) and buf.data_ptr() % 16 != 0


def dummy_like(t: torch.Tensor) -> torch.Tensor:
    """A one-element float32 stand-in for an absent optional tensor argument (never read)."""
    return torch.empty(1, dtype=torch.float32, device=t.device)
