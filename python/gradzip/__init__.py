"""gradzip: fused gradient compression kernels and compressed all-reduce for PyTorch.

Ops (``gradzip.ops``): :func:`quantize_pack`, :func:`topk_select`,
:func:`dequantize_accumulate`, :func:`dequantize`; the specification they all follow is
:mod:`gradzip.reference`, the wire format :mod:`gradzip.format` (docs/format.md).
Communication: :class:`Codec`, :func:`all_reduce`, :func:`reduce_scatter`,
:class:`ErrorFeedback`, the DDP
hook in :mod:`gradzip.ddp`, and the compressed-momentum AdamW in :mod:`gradzip.optim`.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import (
    _C,  # noqa: F401  (registers torch.ops.gradzip.*)
    format,
    reference,
)
from .ops import (
    _register_fakes,
    build_info,
    compressed_size,
    dequantize,
    dequantize_accumulate,
    quantize_pack,
    topk_select,
)

_register_fakes()
del _register_fakes

__version__ = "0.1.0"

_LAZY = {"Codec": "codecs", "all_reduce": "comm", "reduce_scatter": "comm",
         "ErrorFeedback": "comm", "comm": None, "ddp": None, "fsdp": None}


def __getattr__(name):
    # The communication layer imports torch.distributed; load it on first use.
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        value = mod if _LAZY[name] is None else getattr(mod, name)
        globals()[name] = value  # found directly from now on (all_reduce is a hot path)
        return value
    raise AttributeError(f"module 'gradzip' has no attribute {name!r}")


__all__ = [
    "Codec",
    "ErrorFeedback",
    "all_reduce",
    "build_info",
    "compressed_size",
    "ddp",
    "dequantize",
    "dequantize_accumulate",
    "format",
    "fsdp",
    "optim",
    "quantize_pack",
    "reduce_scatter",
    "reference",
    "topk_select",
]
