"""Checkpoints of what differs between ranks: one serialised entry per rank.

``torch.distributed.checkpoint`` writes a plain tensor or value once, as if every rank held
the same. Residuals differ per rank, so the DDP state, the FSDP state and the optimizer keep
everything of one rank as one ``torch.save`` blob (bytes) under a key that names the rank
and the world size, ``"rank{r}_of_{W}"``: DCP writes each rank's and gives it back to that
rank only, and ``torch.save`` of one rank's state dict works the same way. What every rank
shares (version, codec, ``world_size``, ...) stays at the top level, beside the entry.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import torch


def key(rank: int, world: int) -> str:
    """The key of rank ``rank``'s entry in a run of ``world`` ranks."""
    return f"rank{rank}_of_{world}"


def pack(mine: dict, rank: int, world: int) -> dict[str, bytes]:
    """``{key(rank, world): mine serialised}``, to merge into a state dict."""
    buf = io.BytesIO()
    torch.save(mine, buf)
    return {key(rank, world): buf.getvalue()}


def unpack(state: Mapping, rank: int, world: int) -> dict:
    """This rank's entry of ``state``, after checking the world size it was saved with
    (``state["world_size"]``). Raises ``ValueError`` for another world size or a state dict
    without this rank's entry; changes nothing."""
    if state["world_size"] != world:
        raise ValueError(
            f"the state_dict was saved by a run of {state['world_size']} ranks, this run has "
            f"{world}: residuals belong to ranks and cannot be split anew (resume with "
            f"{state['world_size']} ranks, or start without the gradzip state)")
    blob = state.get(key(rank, world))
    if not isinstance(blob, bytes | bytearray):
        held = sorted(k for k in state if isinstance(k, str) and k.startswith("rank"))
        # absent (another rank's state dict): a wrong value, not a wrong type
        raise ValueError(  # noqa: TRY004
            f"the state_dict holds {held or 'no rank state'}, not rank {rank}'s "
            f"({key(rank, world)!r}): give each rank the state it saved")
    return torch.load(io.BytesIO(bytes(blob)), weights_only=True)


__all__ = ["key", "pack", "unpack"]
