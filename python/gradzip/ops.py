"""Public fused ops: validate once, pick a backend, call it.

Backends:

* ``"cpu"``    – the C++ kernels of ``gradzip._C`` (CPU tensors).
* ``"cuda"``   – the CUDA kernels of ``gradzip._C`` (CUDA tensors, CUDA builds only).
* ``"triton"`` – the Triton kernels in :mod:`gradzip.triton` (CUDA tensors; CPU tensors
  under ``TRITON_INTERPRET=1``).
* ``"torch"``  – :mod:`gradzip.reference`, the specification (runs on CPU; CUDA inputs are
  copied over and back).
* ``"auto"``   – ``cpu`` for CPU tensors; ``cuda`` for CUDA tensors when the CUDA kernels
  were built, else ``triton``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import cache

import torch

from . import (
    _C,  # noqa: F401  (loads the operator library)
    _checks,
)
from . import format as fmt
from ._checks import BACKENDS

# Decided once at import: backend selection reads plain module constants, which
# torch.compile treats as constants (no string parsing or imports inside a traced call).
_CUDA_KERNELS_REGISTERED = torch._C._dispatch_has_kernel_for_dispatch_key(
    "gradzip::quantize_pack", "CUDA")
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------------
# build information and backend selection
# ---------------------------------------------------------------------------------------


@cache
def build_info() -> dict:
    """What the loaded ``gradzip._C`` was compiled with, and which backends are usable.

    Keys: ``version``, ``torch`` (torch the extension was built against), ``cpu`` (always
    True), ``cuda`` (CUDA kernels compiled in), ``cuda_version``, ``cuda_archs``,
    ``compiler``, ``cpu_isa`` (vector ISA picked at run time), ``cuda_kernels_registered``,
    ``triton`` (importable).
    """
    info = json.loads(torch.ops.gradzip._build_info())
    info["cpu_isa"] = torch.ops.gradzip._cpu_isa()
    info["cuda_kernels_registered"] = _CUDA_KERNELS_REGISTERED
    info["triton"] = _TRITON_AVAILABLE
    return info


def _resolve(backend: str, device: torch.device) -> str:
    _checks.check_choice(backend, BACKENDS, "backend")
    cuda_built = _CUDA_KERNELS_REGISTERED
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            if cuda_built:
                return "cuda"
            if _TRITON_AVAILABLE:
                return "triton"
            raise RuntimeError("gradzip was built without CUDA kernels and Triton is not "
                               "installed: no backend can run CUDA tensors")
        raise ValueError(f"gradzip has no kernels for device type {device.type!r}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got a tensor on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got a tensor on {device}")
        if not cuda_built:
            raise RuntimeError("backend='cuda': this gradzip build has no CUDA kernels "
                               "(see gradzip.build_info(); rebuild with GRADZIP_CUDA=1)")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend


def _triton():
    from . import triton as gz_triton

    return gz_triton


def _reference():
    # Only backend="torch" runs the specification; nothing else here depends on it.
    from . import reference

    return reference


def _run_reference(op: str, x: torch.Tensor, residual: torch.Tensor | None,
                   out: torch.Tensor | None, **options) -> torch.Tensor:
    """backend="torch": the reference op runs on CPU copies; the residual is copied back,
    and the payload into ``out`` when given (the reference itself always allocates)."""
    r = None if residual is None else residual.detach().cpu()
    payload = getattr(_reference(), op)(x.detach().cpu(), residual=r, **options)
    if residual is not None:
        residual.copy_(r)
    if out is not None:
        out.copy_(payload)
        return out
    return payload.to(x.device)


# ---------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------


def quantize_pack(
    x: torch.Tensor,
    bits: int,
    block: int = 128,
    residual: torch.Tensor | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    backend: str = "auto",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize ``x`` to ``bits`` per element in blocks of ``block`` and bit-pack it.

    Args:
        x: float32/float16/bfloat16 tensor of any shape, contiguous or not. Not modified.
        bits: 8, 4 or 2 (symmetric absmax, codes in [-qmax, qmax]) or 1 (sign with a
            per-block mean-|v| scale).
        block: elements per scale, a power of two in [32, 4096]; the last block may be short.
        residual: optional float32 tensor with ``x.numel()`` elements on x's device,
            contiguous. Error feedback: the op quantizes ``v = x + residual`` and writes
            ``residual = v - decode(payload)`` **in place**.
        rounding: "nearest" (half to even) or "stochastic" (unbiased; from a counter-based
            hash of ``seed`` and the element index, identical on every backend).
        seed: int in [0, 2**32), used by stochastic rounding.
        backend: "auto", "cpu", "cuda", "triton" or "torch" (the reference).
        out: optional caller-owned payload buffer, written **in place** and returned: a
            1-D contiguous uint8 tensor of exactly ``dense_payload_bytes(numel, bits,
            block)`` bytes on x's device, sharing no memory with ``x`` or ``residual``.
            Reusing one buffer across calls spares the allocation and the page faults of
            a fresh payload; the bytes are the same as the allocating form's.

    Returns:
        1-D uint8 payload on x's device, ``gradzip.format.dense_payload_bytes(numel, bits,
        block)`` bytes (see docs/format.md); ``out`` itself when given.
    """
    _checks.check_quantize(x, bits, block, residual, rounding, seed)
    if out is not None:
        _checks.check_payload_out(out, fmt.dense_payload_bytes(x.numel(), bits, block), x,
                                  residual)
    be = _resolve(backend, x.device)
    stochastic = rounding == "stochastic"
    if be in ("cpu", "cuda"):
        if out is None:
            return torch.ops.gradzip.quantize_pack(x, bits, block, residual, stochastic, seed)
        torch.ops.gradzip.quantize_pack.out(x, bits, block, residual, stochastic, seed,
                                            out=out)
        return out
    if be == "triton":
        return _triton().quantize_pack(x, bits, block, residual, stochastic, seed, out)
    return _run_reference("quantize_pack", x, residual, out, bits=bits, block=block,
                          rounding=rounding, seed=seed)


def topk_select(
    x: torch.Tensor,
    k: int,
    residual: torch.Tensor | None = None,
    exact: bool = True,
    values: str = "fp32",
    seed: int = 0,
    backend: str = "auto",
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Select the ``k`` entries of largest magnitude of ``v = x + residual``.

    Args:
        x: float32/float16/bfloat16 tensor of any shape, contiguous or not. Not modified.
        k: number of entries, 1 <= k <= x.numel().
        residual: optional float32 tensor with ``x.numel()`` elements, updated **in place**
            to ``v - decode(payload)`` (``v`` with the chosen entries zeroed for fp32 values).
        exact: True: the exact top-k (ties go to the lower index). False: a threshold from a
            sample of ``v`` picks the candidates in one pass; the result is the exact top-k
            whenever at least k candidates pass it (nearly always), and is still exactly k
            entries otherwise.
        values: "fp32", "bf16" or "int8" (int8 codes with one float32 scale).
        seed: int in [0, 2**32), picks the sample positions of approximate mode.
        backend: "auto", "cpu", "cuda", "triton" or "torch".
        out: optional caller-owned payload buffer, written **in place** and returned: a
            1-D contiguous uint8 tensor of exactly ``topk_payload_bytes(numel, k, values)``
            bytes on x's device, sharing no memory with ``x`` or ``residual``.

    Returns:
        1-D uint8 payload: ascending indices (int32; int64 when numel >= 2**31) and values;
        ``out`` itself when given.
    """
    _checks.check_topk(x, k, residual, exact, values, seed)
    if out is not None:
        _checks.check_payload_out(out, fmt.topk_payload_bytes(x.numel(), k, values), x,
                                  residual)
    be = _resolve(backend, x.device)
    vf = fmt.VALUE_FORMATS[values]
    if be in ("cpu", "cuda"):
        if out is None:
            return torch.ops.gradzip.topk_select(x, k, residual, exact, vf, seed)
        torch.ops.gradzip.topk_select.out(x, k, residual, exact, vf, seed, out=out)
        return out
    if be == "triton":
        return _triton().topk_select(x, k, residual, exact, vf, seed, out)
    return _run_reference("topk_select", x, residual, out, k=k, exact=exact, values=values,
                          seed=seed)


def dequantize_accumulate(
    payloads: torch.Tensor | list[torch.Tensor],
    out: torch.Tensor,
    alpha: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``out += alpha * sum_w decode(payloads[w])``, in one pass over ``out``.

    Args:
        payloads: W payloads of one codec and numel: a [W, P] uint8 tensor, a list of 1-D
            uint8 tensors, or one 1-D payload.
        out: contiguous float32/float16/bfloat16 tensor with ``numel`` elements, on the
            payloads' device. Updated **in place** (summed in float32, rounded once).
        alpha: scale applied to the sum (e.g. 1/W to average).
        backend: "auto", "cpu", "cuda", "triton" or "torch".

    Returns:
        ``out``. Sparse (top-k) payloads are summed in payload order without atomics, so
        the result is the same on every run.

    Raises:
        ValueError: a truncated or corrupt payload, wrong magic or version, payloads of
            mixed codecs or numels, or ``out`` of the wrong size.
    """
    return _decode_payloads(payloads, out, alpha, backend, overwrite=False)


def _dequantize_into(payloads: torch.Tensor, out: torch.Tensor, alpha: float = 1.0,
                     backend: str = "auto") -> torch.Tensor:
    """``out = alpha * sum_w decode(payloads[w])``: bit for bit ``out.zero_()`` followed by
    :func:`dequantize_accumulate`, for the collectives' own buffers. The C++ CPU and CUDA
    kernels do it in one pass that writes ``out`` without reading it (refusing bad payloads
    before writing anything); the Triton and reference backends check the headers, then
    zero and accumulate."""
    return _decode_payloads(payloads, out, alpha, backend, overwrite=True)


def _decode_payloads(payloads, out: torch.Tensor, alpha: float, backend: str,
                     overwrite: bool) -> torch.Tensor:
    """:func:`dequantize_accumulate` (``overwrite=False``) and :func:`_dequantize_into`:
    the checks and the backend dispatch, once."""
    rows = _checks.payload_rows(payloads)
    _checks.check_accumulate(rows, out, alpha)
    be = _resolve(backend, out.device)
    if be in ("cpu", "cuda"):
        op = torch.ops.gradzip._dequantize_sum if overwrite else \
            torch.ops.gradzip.dequantize_accumulate
        op(rows, out, float(alpha))
        return out
    header = _checks.check_accumulate_headers(rows, out)
    if overwrite:
        out.zero_()  # after the header check, so a refused call leaves out as it was
    if be == "triton":
        _triton().dequantize_accumulate(rows, out, float(alpha), header=header)
        return out
    o = out.detach().cpu()
    _reference().dequantize_accumulate(rows.cpu(), o, float(alpha))
    out.copy_(o)
    return out


def dequantize(
    payload: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    *,
    numel: int | None = None,
) -> torch.Tensor:
    """Decode one payload into a new flat tensor of ``numel`` elements of ``dtype``.

    Args:
        payload: one 1-D uint8 payload (or a [1, P] tensor).
        dtype: float32, float16 or bfloat16.
        backend: "auto", "cpu", "cuda", "triton" or "torch".
        numel: the number of elements the caller expects. The output is allocated from
            the header's count, and a top-k header of a hundred bytes may claim up to
            2**62 elements: give ``numel`` for every payload this process did not make
            itself, so that a header claiming another size raises before anything is
            allocated (as ``dequantize_accumulate`` checks it against ``out``).

    Raises:
        ValueError: a corrupt payload, or a header whose numel is not ``numel``.
    """
    rows = _checks.payload_rows(payload)
    if rows.shape[0] != 1:
        raise ValueError("dequantize decodes one payload; use dequantize_accumulate for many")
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if numel is not None:
        _checks.check_nonnegative_int(numel, "numel")
    h = fmt.parse_header(rows[0, : fmt.HEADER_BYTES].cpu().numpy().tobytes(),
                         length=rows.shape[1])
    if numel is not None and h.numel != numel:
        raise ValueError(f"the payload holds {h.numel} elements but numel={numel} was expected")
    out = torch.zeros(h.numel, dtype=dtype, device=rows.device)
    return dequantize_accumulate(rows, out, 1.0, backend=backend)


def compressed_size(numel: int, bits: int | None = None, block: int = 128, k: int | None = None,
                    values: str = "fp32") -> int:
    """Payload bytes for a dense (``bits``) or top-k (``k``) codec over ``numel`` elements."""
    if (bits is None) == (k is None):
        raise ValueError("give exactly one of bits (dense) or k (top-k)")
    if bits is not None:
        return fmt.dense_payload_bytes(numel, bits, block)
    return fmt.topk_payload_bytes(numel, k, values)


# ---------------------------------------------------------------------------------------
# fake (meta) kernels: shapes for torch.compile and opcheck. They run the argument checks
# the public ops run (a superset of the C++ kernels' csrc/core/checks.h), so tracing refuses
# what the kernels would; only the payload header checks of dequantize_accumulate, which
# read payload bytes, cannot run on fake tensors.
# ---------------------------------------------------------------------------------------


def _register_fakes() -> None:
    @torch.library.register_fake("gradzip::quantize_pack")
    def _quantize_pack_fake(x, bits, block, residual, stochastic, seed):
        _checks.check_quantize_op(x, bits, block, residual, stochastic, seed)
        return x.new_empty(fmt.dense_payload_bytes(x.numel(), bits, block), dtype=torch.uint8)

    @torch.library.register_fake("gradzip::quantize_pack.out")
    def _quantize_pack_out_fake(x, bits, block, residual, stochastic, seed, *, out):
        _checks.check_quantize_op(x, bits, block, residual, stochastic, seed, out)

    @torch.library.register_fake("gradzip::topk_select")
    def _topk_select_fake(x, k, residual, exact, value_format, seed):
        _checks.check_topk_op(x, k, residual, exact, value_format, seed)
        size = fmt.topk_header(x.numel(), k, value_format).total_bytes
        return x.new_empty(size, dtype=torch.uint8)

    @torch.library.register_fake("gradzip::topk_select.out")
    def _topk_select_out_fake(x, k, residual, exact, value_format, seed, *, out):
        _checks.check_topk_op(x, k, residual, exact, value_format, seed, out)

    @torch.library.register_fake("gradzip::dequantize_accumulate")
    def _dequantize_accumulate_fake(payloads, out, alpha):
        _checks.check_accumulate_op(payloads, out, alpha)

    @torch.library.register_fake("gradzip::_dequantize_sum")
    def _dequantize_sum_fake(payloads, out, alpha):
        _checks.check_accumulate_op(payloads, out, alpha)
