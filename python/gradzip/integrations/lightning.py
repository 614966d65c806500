"""PyTorch Lightning: a ``DDPStrategy`` with gradzip's compressed gradient all-reduce.

::

    from gradzip.integrations.lightning import GradzipDDPStrategy

    trainer = lightning.Trainer(accelerator="cpu", devices=2,
                                strategy=GradzipDDPStrategy(codec="int4"))

Lightning's own ``DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)`` registers a hook
only when the device is CUDA; on CPU/Gloo (and other accelerators) it silently trains
uncompressed. This strategy registers gradzip's hook on every device type, refuses a
second hook, and saves every rank's compression state (residuals, counters, bucket
layouts) in Lightning's checkpoint under ``"gradzip"``; resuming with ``ckpt_path``
gives each rank its own back. ``trainer.strategy.compression_state.stats()`` says what
was sent.

Needs ``lightning`` (``pip install 'gradzip[lightning]'``); the standalone
``pytorch_lightning`` package is used when ``lightning`` is not installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from ..ddp import DEFAULT_MIN_NUMEL, Codec, CompressionState, compress_hook

try:
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError:  # the standalone package
    try:
        from pytorch_lightning.strategies import DDPStrategy
        from pytorch_lightning.trainer.states import TrainerFn
    except ImportError as e:
        raise ImportError("gradzip.integrations.lightning needs PyTorch Lightning: "
                          "pip install 'gradzip[lightning]'") from e

CHECKPOINT_KEY = "gradzip"
_NOT_WITH = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")


class GradzipDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with gradzip's DDP communication hook.

    Args:
        codec: a :class:`gradzip.Codec` or spec ("int8", "int4", "int2", "sign",
            "topk:0.01", ...).
        warmup_steps, min_numel, algorithm, error_feedback, seed, verify: as in
            :class:`gradzip.ddp.CompressionState`.
        **kwargs: everything else ``DDPStrategy`` takes (``process_group_backend``,
            ``find_unused_parameters``, ``static_graph``, ``timeout``, ...), except a
            communication hook of its own (``ddp_comm_hook``, ``ddp_comm_state``,
            ``ddp_comm_wrapper``) or post-local-SGD ``model_averaging_period``.

    Raises:
        ValueError: an unknown codec or option; another hook given; the DDP model already
            has a communication hook; a checkpoint saved with another world size or codec.

    Use one strategy object per ``Trainer``: its compression state belongs to one run.
    """

    def __init__(self, codec: Codec | str = "int4", *, warmup_steps: int = 10,
                 min_numel: int = DEFAULT_MIN_NUMEL, algorithm: str = "auto",
                 error_feedback: bool = True, seed: int = 0, verify: str = "auto",
                 **kwargs: Any) -> None:
        given = [k for k in _NOT_WITH if kwargs.get(k) is not None]
        if given:
            raise ValueError(f"GradzipDDPStrategy registers gradzip's own communication hook; "
                             f"it cannot take {', '.join(given)} (use Lightning's DDPStrategy "
                             "for another hook)")
        # Built first: a bad codec or option fails here, before Lightning starts anything.
        self.compression_state = CompressionState(
            codec, warmup_steps=warmup_steps, min_numel=min_numel, algorithm=algorithm,
            error_feedback=error_feedback, seed=seed, verify=verify)
        super().__init__(**kwargs)

    def _register_ddp_hooks(self) -> None:
        # DDPStrategy registers hooks only when the device is CUDA; gradzip's hook runs on
        # Gloo (CPU) and NCCL alike.
        model = self.model
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(f"GradzipDDPStrategy expected a DistributedDataParallel model, got "
                            f"{type(model).__name__}")
        if getattr(model, "_comm_hooks", None):
            raise ValueError("the DDP model already has a communication hook; gradzip's hook "
                             "replaces DDP's all-reduce and cannot be combined with another")
        model.register_comm_hook(self.compression_state, compress_hook)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any | None = None) -> None:
        # Lightning calls this on every rank and writes from rank 0: gather every rank's
        # state there (a collective).
        checkpoint = {**checkpoint,
                      CHECKPOINT_KEY: self.compression_state.gathered_state_dict()}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # Resuming a fit: this rank's residuals first, so that a checkpoint of another world
        # size or codec is refused before the model's weights change.
        trainer = getattr(self.lightning_module, "_trainer", None)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if fitting and CHECKPOINT_KEY in checkpoint:
            self.compression_state.load_state_dict(checkpoint[CHECKPOINT_KEY])
        super().load_model_state_dict(checkpoint, strict=strict)


__all__ = ["CHECKPOINT_KEY", "GradzipDDPStrategy"]
