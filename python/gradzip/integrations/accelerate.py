"""Hugging Face Accelerate: gradzip's hook on the DDP model ``accelerator.prepare`` returns.

::

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = gradzip.integrations.accelerate.register(accelerator, model, codec="int4")

Accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` knows only PyTorch's four
built-in hooks; anything else is silently not registered. :func:`register` registers
gradzip's hook itself, checks that Accelerate really wrapped the model in DDP, and (by
default) registers the compression state for ``accelerator.save_state`` /
``load_state``, with every rank's residuals in the one file Accelerate writes.

Needs ``accelerate`` (``pip install 'gradzip[accelerate]'``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..ddp import Codec, CompressionState, compress_hook

try:
    import accelerate  # noqa: F401  (the dependency this module adapts to)
except ImportError as e:
    raise ImportError("gradzip.integrations.accelerate needs Hugging Face Accelerate: "
                      "pip install 'gradzip[accelerate]'") from e


def _default_group():
    return dist.distributed_c10d._get_default_group() if dist.is_initialized() else None


class CheckpointedState:
    """What ``accelerator.register_for_checkpointing`` gets: Accelerate calls
    ``state_dict()`` on every process and writes the main process's, so this gathers every
    rank's compression state into it; each rank's ``load_state_dict`` takes its own."""

    def __init__(self, state: CompressionState) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state.gathered_state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.state.load_state_dict(state_dict)


def register(accelerator: Any, model: torch.nn.Module, codec: Codec | str = "int4", *,
             checkpoint: bool = True, **state_kwargs: Any) -> CompressionState | None:
    """Register gradzip's DDP communication hook on ``model``, the model
    ``accelerator.prepare`` returned.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: what ``accelerator.prepare`` returned for the model (a
            ``DistributedDataParallel``, possibly compiled).
        codec: a :class:`gradzip.Codec` or spec ("int8", "int4", "sign", "topk:0.01", ...).
        checkpoint: also ``accelerator.register_for_checkpointing`` the state, so that
            ``save_state``/``load_state`` keep the residuals (call :func:`register` before
            ``load_state``, in the same order as when saving).
        **state_kwargs: ``warmup_steps``, ``min_numel``, ``algorithm``,
            ``error_feedback``, ``seed``, ``verify`` of
            :class:`gradzip.ddp.CompressionState`.

    Returns:
        The :class:`gradzip.ddp.CompressionState` (``state.stats()`` says what was sent),
        or None for a single process, where there is nothing to communicate (with a
        warning).

    Raises:
        ValueError: an unknown codec or option; Accelerate configured for something other
            than DDP (FSDP, DeepSpeed, Megatron-LM, XLA); a model that already has a
            communication hook.
        TypeError: a model that is not the DDP model ``prepare`` returned.
    """
    state = CompressionState(codec, **state_kwargs)  # a bad codec fails first
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if accelerator.num_processes == 1 and not kind.startswith("MULTI_"):
        warnings.warn("gradzip.integrations.accelerate.register: a single process has no "
                      "gradients to communicate; the hook is not registered", stacklevel=2)
        return None
    if not kind.startswith("MULTI_"):
        raise ValueError(
            f"gradzip's hook is a DDP communication hook, and this Accelerator is configured "
            f"for {kind}. Supported: Accelerate's DDP (distributed_type MULTI_GPU, "
            "MULTI_CPU, MULTI_XPU, MULTI_NPU, ...). For FSDP2 use gradzip.fsdp.enable on the "
            "model; DeepSpeed, Megatron-LM and XLA run their own communication")
    ddp = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(f"register needs the DistributedDataParallel model that "
                         f"accelerator.prepare returned, got {type(ddp).__name__}")
    if getattr(ddp, "_comm_hooks", None):
        raise ValueError("the DDP model already has a communication hook (for example from "
                         "DistributedDataParallelKwargs(comm_hook=...)); gradzip's hook "
                         "replaces DDP's all-reduce and cannot be combined with another")
    if ddp.process_group is not _default_group():
        state.process_group = ddp.process_group
    ddp.register_comm_hook(state, compress_hook)
    if checkpoint:
        accelerator.register_for_checkpointing(CheckpointedState(state))
    return state


__all__ = ["CheckpointedState", "register"]
