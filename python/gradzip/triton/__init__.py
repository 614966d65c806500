"""gradzip's Triton backend: the three fused ops as Triton kernels.

Each op is a ``torch.library.triton_op`` (``gradzip::triton_quantize_pack``,
``gradzip::triton_topk_select``, ``gradzip::triton_dequantize_accumulate``) whose launcher
wraps every kernel in ``torch.library.wrap_triton``, so ``torch.compile`` traces into the
kernels instead of treating the op as opaque. :mod:`gradzip.ops` reaches them with
``backend="triton"`` (and with ``backend="auto"`` for CUDA tensors when gradzip was built
without CUDA kernels) through the three functions exported here, after validating the
arguments with the checks every backend shares.

Payloads are byte-identical and residuals bit-identical to :mod:`gradzip.reference`; see
:mod:`gradzip.triton._common` for how the kernels keep that true on a GPU (no fused
multiply-add, correctly rounded division, round-half-even without libdevice).

On CPU tensors the kernels run under the Triton interpreter: set ``TRITON_INTERPRET=1``
before this module (or triton) is first imported. Autotuning is skipped there.
"""

from ._common import INTERPRET
from .dequantize_accumulate import (
    dequantize_accumulate,
    dequantize_accumulate_configs,
    triton_dequantize_accumulate,
)
from .quantize_pack import quantize_pack, quantize_pack_configs, triton_quantize_pack
from .topk_select import topk_select, topk_select_configs, triton_topk_select

__all__ = [
    "INTERPRET",
    "dequantize_accumulate",
    "dequantize_accumulate_configs",
    "quantize_pack",
    "quantize_pack_configs",
    "topk_select",
    "topk_select_configs",
    "triton_dequantize_accumulate",
    "triton_quantize_pack",
    "triton_topk_select",
]
