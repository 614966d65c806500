"""State that belongs to one process group: the signatures whose agreement was verified,
the history that predicts its next call (:mod:`.fold`), the tuners of ``"auto"`` and the
staging buffers its calls reuse.

It lives in a map weakly keyed by the ``ProcessGroup`` object itself, so it goes away with
the group: a group created after another was destroyed starts fresh even when Python
reuses the old object's ``id`` (keying by ``id(group)`` would let it inherit the old
group's settled choices and "verified" marks).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch.distributed as dist

from .buffers import BufferPool
from .fold import Predictor


@dataclass
class GroupState:
    verified: set = field(default_factory=set)  # fingerprints exchanged at least once
    predictor: Predictor = field(default_factory=Predictor)  # verify="always": the history
    tuners: dict = field(default_factory=dict)  # signature -> autotune.Tuner
    buffers: BufferPool = field(default_factory=BufferPool)  # CPU staging, across calls
    rank_world: tuple[int, int] | None = None  # this process's (rank, size) in the group


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def group_state(group: dist.ProcessGroup | None) -> GroupState:
    """The state of ``group`` (None: the default group)."""
    pg = group if group is not None else dist.group.WORLD
    state = _STATES.get(pg)
    if state is None:
        state = _STATES[pg] = GroupState()
    return state


def rank_and_world(group: dist.ProcessGroup | None, state: GroupState) -> tuple[int, int]:
    """(rank, size) of this process in ``group``, asked of torch.distributed once per group
    (they never change; the lookups cost more than the rest of a small call's checks)."""
    if state.rank_world is None:
        state.rank_world = dist.get_rank(group), dist.get_world_size(group)
    return state.rank_world


def all_group_states() -> list[GroupState]:
    return list(_STATES.values())
