"""Planning: which algorithm moves a tensor, how it is cut, and how many bytes that costs.

Pure functions of the codec, the tensor's size and dtype, the group size and the settings
given as arguments: no ``torch.distributed``, no module state. Every rank that agrees on
those inputs computes the same :class:`Plan` (the agreement check compares a fingerprint
of it).

Cuts
----
Two-phase (``"alltoall"``): the tensor is cut into W chunks at multiples of
``codec.alignment`` (the block for dense codecs, so every block of a chunk is a block of
the whole tensor): chunk size ``c = align * ceil(ceil(n / align) / W)``, chunk i is
``[i*c, min((i+1)*c, n))`` (the last chunks may be short or empty). Top-k splits k over the
chunks. Large tensors of dense codecs are first cut into pipeline segments (one per
``Pipeline.min_numel`` elements, at most ``Pipeline.max_segments``, at multiples of the
block), each with chunks of its own; quantization is per block, so segments change the
timing, never the numbers (with nearest rounding; stochastic rounding seeds each
segment's compression on its own). ``"allgather"`` cuts every codec into the same
segments, each one payload and one all-gather, so segment s+1 is compressed while s is on
the wire and s is decoded while s+1 arrives; top-k then selects per segment, k split over
the segments as over the two-phase chunks, so for top-k the segments do change the numbers
(a large tensor keeps the k largest of each segment, as the two-phase algorithm always has
per chunk).

Volumes (bytes one rank sends per call)
---------------------------------------
``plain``: a ring all-reduce, ``2 (W-1)/W * numel * itemsize``. ``allgather``: ``(W-1)``
payloads (one header per segment). ``alltoall``: ``2 (W-1)`` chunk payloads (phase-1 all-to-all plus phase-2
all-gather). ``"auto"`` plans the compressed algorithm that moves the fewest bytes,
taking ``"alltoall"`` only when it moves at most 3/4 of ``"allgather"`` (it compresses
twice and adds one latency), never for 1-bit sign (re-compressing a sum of scaled signs
with a second residual made momentum-SGD training diverge in our runs where one
compression did not: docs/results.md, section 3), and ``"plain"`` when compression would
not move fewer bytes, for a single rank, or below ``min_numel`` elements. Where it plans
``"alltoall"``, the all-gather is a second candidate (:func:`auto_candidates`); which of
them runs is then measured (:mod:`.autotune`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from ..codecs import Codec, as_codec

ALGORITHMS = ("auto", "allgather", "alltoall", "plain")
DEFAULT_MIN_NUMEL = 4096


@dataclass(frozen=True)
class Pipeline:
    """How the compressed algorithms cut large tensors of dense codecs into segments that
    overlap compression and decoding with the wire: one segment per ``min_numel``
    elements, at most ``max_segments``. With ``ramp`` (the default), the first of them is
    sent as pieces of a quarter, a quarter and a half and the last as a half, a quarter
    and a quarter, so that the wire starts after a quarter segment's compression and the
    call ends a quarter segment's decode after the last bytes arrive (compression runs
    about twice as fast as a 1 Gbit/s wire, so each piece is ready before the one ahead of
    it has left: measured on the 1 Gbit/s link, 4 ranks, 64 MiB, the wire-bytes limit
    reached rose from 98/96/94/82 % to 99/98/96/85 % for int8/int4/sign/top-k 1 %)."""

    min_numel: int = 1 << 20
    max_segments: int = 4
    ramp: bool = True

    def __post_init__(self) -> None:
        for name in ("min_numel", "max_segments"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Pipeline.{name} must be a positive int, got {v!r}")
        if not isinstance(self.ramp, bool):
            raise TypeError(f"Pipeline.ramp must be a bool, got {self.ramp!r}")


DEFAULT_PIPELINE = Pipeline()


@dataclass(frozen=True)
class Plan:
    """What one all-reduce will do; identical on every rank that agrees on its inputs."""

    algorithm: str  # "plain", "allgather" or "alltoall"
    numel: int  # of the reduced tensor (reduce-scatter: of the input, W shards)
    world: int = 1
    itemsize: int = 4  # bytes per element of the reduced tensor (the plain volume)
    # alltoall: [start, stop) per rank; an allgather segment: its one [start, stop)
    chunks: tuple[tuple[int, int], ...] = ()
    ks: tuple[int | None, ...] = ()  # alltoall top-k: k per chunk
    sizes: tuple[int, ...] = ()  # payload bytes per chunk (alltoall) or of the whole
    payload_bytes: int = 0  # bytes of each row on the wire
    # large tensors of dense codecs: the pipeline segments, each a Plan of the same
    # algorithm (absolute offsets); empty for one segment, which the fields above describe.
    segments: tuple[Plan, ...] = ()
    op: str = "all_reduce"  # or "reduce_scatter": phase 1 alone, one chunk per shard

    def stages(self) -> tuple[Plan, ...]:
        """The pipeline segments in order (the plan itself when it has one)."""
        return self.segments or (self,)

    @property
    def bytes_sent(self) -> int:
        """Bytes one rank sends in one call of this plan (headers, scales and padding
        included; the plain all-reduce counted as a ring)."""
        w = self.world
        phases = 1 if self.op == "reduce_scatter" else 2
        if self.algorithm == "plain":
            return phases * (w - 1) * self.numel * self.itemsize // w
        if self.algorithm == "allgather":
            return (w - 1) * self.payload_bytes
        return phases * (w - 1) * self.payload_bytes


def alltoall_chunks(numel: int, world: int, align: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank's chunk: multiples of ``align``, short/empty at the end."""
    units = -(-numel // align)
    c = align * -(-units // world)
    return [(min(i * c, numel), min((i + 1) * c, numel)) for i in range(world)]


def pipeline_segments(numel: int, align: int,
                      pipeline: Pipeline = DEFAULT_PIPELINE) -> list[tuple[int, int]]:
    """``[start, stop)`` of the compressed algorithms' pipeline segments, cut at multiples
    of ``align`` (see :class:`Pipeline`). Segment s+1 is compressed while segment s is on
    the wire."""
    count = max(1, min(pipeline.max_segments, numel // pipeline.min_numel))
    units = -(-numel // align)
    size = align * -(-units // count)
    segs = [(min(i * size, numel), min((i + 1) * size, numel)) for i in range(count)
            if i * size < numel]
    if not pipeline.ramp or len(segs) < 2:
        return segs
    return (_cut(*segs[0], align, (1, 2)) + segs[1:-1] + _cut(*segs[-1], align, (2, 3)))


def _cut(a: int, b: int, align: int, quarters: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[a, b)`` cut after the given quarters of its length (in units of ``align``)."""
    units = -(-(b - a) // align)
    cuts = [a] + [min(b, a + align * (units * q // 4)) for q in quarters] + [b]
    return [(x, y) for x, y in itertools.pairwise(cuts) if y > x]


def _chunk_k(codec: Codec, numel: int, length: int) -> int | None:
    if not codec.is_sparse or length == 0:
        return None
    if isinstance(codec.k, int):
        # Split a count over the chunks in proportion to their length.
        return max(1, min(length, -(-codec.k_for(numel) * length // numel)))
    return codec.k_for(length)


def _one_segment_plan(codec: Codec, numel: int, world: int, itemsize: int, start: int,
                      stop: int) -> Plan:
    chunks = [(start + a, start + b) for a, b in alltoall_chunks(stop - start, world,
                                                                 codec.alignment)]
    ks = tuple(_chunk_k(codec, numel, b - a) for a, b in chunks)
    sizes = tuple(codec.header(b - a, k=k).total_bytes if b > a else 0
                  for (a, b), k in zip(chunks, ks))
    return Plan("alltoall", numel, world, itemsize, tuple(chunks), ks, sizes, max(sizes))


def _alltoall_plan(codec: Codec, numel: int, world: int, itemsize: int,
                   pipeline: Pipeline) -> Plan:
    # Top-k re-selects per chunk, so cutting it further would change which entries travel;
    # dense codecs quantize block by block, so segments change nothing but the timing.
    segs = [(0, numel)] if codec.is_sparse else pipeline_segments(numel, codec.alignment,
                                                                 pipeline)
    if len(segs) == 1:
        return _one_segment_plan(codec, numel, world, itemsize, 0, numel)
    parts = tuple(_one_segment_plan(codec, numel, world, itemsize, a, b) for a, b in segs)
    return Plan("alltoall", numel, world, itemsize,
                payload_bytes=sum(q.payload_bytes for q in parts), segments=parts)


def _allgather_plan(codec: Codec, numel: int, world: int, itemsize: int,
                    pipeline: Pipeline) -> Plan:
    # Top-k selects per segment (k split over them as over the two-phase chunks), so that
    # segment s+1 is selected while s is on the wire.
    segs = pipeline_segments(numel, codec.alignment, pipeline)
    parts = []
    for a, b in segs:
        k = _chunk_k(codec, numel, b - a)
        size = codec.header(b - a, k=k).total_bytes
        parts.append(Plan("allgather", numel, world, itemsize, ((a, b),), ks=(k,),
                          sizes=(size,), payload_bytes=size))
    if len(parts) == 1:
        return parts[0]
    return Plan("allgather", numel, world, itemsize,
                payload_bytes=sum(q.payload_bytes for q in parts), segments=tuple(parts))


@functools.lru_cache(maxsize=4096)
def plan(codec: Codec | str, numel: int, dtype: torch.dtype, world: int,
         algorithm: str = "auto", min_numel: int = DEFAULT_MIN_NUMEL,
         pipeline: Pipeline = DEFAULT_PIPELINE) -> Plan:
    """Decide how :func:`gradzip.all_reduce` moves a tensor (see the module docstring).

    Cached: all arguments are immutable, and the hot path asks once per bucket per step.
    """
    codec = as_codec(codec)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    itemsize = dtype.itemsize
    if numel == 0 or algorithm == "plain":
        return Plan("plain", numel, world, itemsize)
    if algorithm == "alltoall":
        return _alltoall_plan(codec, numel, world, itemsize, pipeline)
    if algorithm == "allgather":
        return _allgather_plan(codec, numel, world, itemsize, pipeline)
    # auto: the fewest bytes sent
    candidates = auto_candidates(codec, numel, dtype, world, min_numel, pipeline)
    return candidates[0] if candidates else Plan("plain", numel, world, itemsize)


@functools.lru_cache(maxsize=4096)
def auto_candidates(codec: Codec | str, numel: int, dtype: torch.dtype, world: int,
                    min_numel: int = DEFAULT_MIN_NUMEL,
                    pipeline: Pipeline = DEFAULT_PIPELINE) -> tuple[Plan, ...]:
    """The compressed plans ``"auto"`` times against the plain all-reduce (empty: it goes
    plain without measuring). The first is the one that moves the fewest bytes (what
    :func:`plan` returns for ``"auto"``); when that is the two-phase plan, the all-gather
    follows if it too moves fewer bytes than the ring: it sends more but makes one round
    trip instead of two and compresses once, which wins where latency, not bandwidth,
    decides (small tensors, fast links: measured in docs/results.md, section 2)."""
    codec = as_codec(codec)
    itemsize = dtype.itemsize
    if world == 1 or numel == 0 or numel < min_numel:
        return ()
    # The exact (unrounded) ring volume, as the choice has always been made.
    ring = 2 * (world - 1) / world * numel * itemsize
    gather = _allgather_plan(codec, numel, world, itemsize, pipeline)
    found = [gather] if gather.bytes_sent < ring else []
    if not codec.is_sparse and codec.bits > 1 and -(-numel // codec.alignment) >= world:
        a2a = _alltoall_plan(codec, numel, world, itemsize, pipeline)
        if a2a.bytes_sent <= 0.75 * gather.bytes_sent and a2a.bytes_sent < ring:
            found.insert(0, a2a)
    return tuple(found)


@functools.lru_cache(maxsize=4096)
def reduce_scatter_plan(codec: Codec | str, numel: int, dtype: torch.dtype, world: int,
                        algorithm: str = "auto", min_numel: int = DEFAULT_MIN_NUMEL) -> Plan:
    """How :func:`gradzip.reduce_scatter` moves an input of ``numel`` elements (``world``
    shards of ``numel // world``): ``"alltoall"`` (each shard compressed on its own with
    its slice of the worker residual, sent to its owner, decoded there) or ``"plain"``.
    ``"auto"`` compresses when that sends fewer bytes, there is more than one rank and the
    input has at least ``min_numel`` elements."""
    codec = as_codec(codec)
    if algorithm not in REDUCE_SCATTER_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {REDUCE_SCATTER_ALGORITHMS}, got "
                         f"{algorithm!r}")
    itemsize = dtype.itemsize
    plain = Plan("plain", numel, world, itemsize, op="reduce_scatter")
    if numel == 0 or algorithm == "plain":
        return plain
    shard = numel // world
    chunks = tuple((i * shard, (i + 1) * shard) for i in range(world))
    ks = tuple(_chunk_k(codec, numel, shard) for _ in chunks)
    sizes = tuple(codec.header(shard, k=k).total_bytes if shard else 0 for k in ks)
    compressed = Plan("alltoall", numel, world, itemsize, chunks, ks, sizes, max(sizes),
                      op="reduce_scatter")
    if algorithm == "alltoall":
        return compressed
    if world == 1 or numel < min_numel or compressed.bytes_sent >= plain.bytes_sent:
        return plain
    return compressed


REDUCE_SCATTER_ALGORITHMS = ("auto", "alltoall", "plain")

__all__ = ["ALGORITHMS", "DEFAULT_MIN_NUMEL", "DEFAULT_PIPELINE", "REDUCE_SCATTER_ALGORITHMS",
           "Pipeline", "Plan", "alltoall_chunks", "auto_candidates", "pipeline_segments", "plan",
           "reduce_scatter_plan"]
