"""Compressed all-reduce over ``torch.distributed`` (Gloo for CPU tensors, NCCL for CUDA).

Algorithms
----------
``"allgather"``
    Every rank compresses its whole tensor (worker residual), the payloads are all-gathered
    and every rank decodes all W of them with one ``dequantize_accumulate`` in rank order.
    Traffic per rank: (W-1) payloads in. Right for small W and for top-k.

``"alltoall"`` (two-phase, as in 1-bit Adam / ZeRO++ qgZ / CGX)
    The tensor is cut into W chunks at multiples of ``codec.alignment`` (the block for
    dense codecs, so every block of a chunk is a block of the whole tensor): chunk size
    ``c = align * ceil(ceil(n / align) / W)``, chunk i is ``[i*c, min((i+1)*c, n))``
    (the last chunks may be short or empty). Phase 1: each rank compresses its W chunks
    (worker residual), ``all_to_all_single`` sends chunk i to rank i, which accumulates
    the W payloads of its chunk in float32 (times 1/W when averaging). Phase 2: it
    re-compresses that chunk (server residual), the W chunk payloads are all-gathered and
    every rank decodes every chunk. Payloads of a short chunk are padded with zero bytes
    so that every message has the same size. Traffic per rank: about 2(W-1)/W payloads in.
    Large tensors of dense codecs are cut into pipeline segments first (one per
    ``PIPELINE_MIN_NUMEL`` elements, at most ``PIPELINE_MAX_SEGMENTS``, at multiples of
    the block), each reduced this way with its collectives started as soon as its payloads
    are ready: segment s+1 is compressed while segment s is on the wire, and segment s is
    decoded while s+1 is still arriving. Quantization is per block, so the result and the
    residuals are bit-identical to the unsegmented algorithm (only which rank holds which
    server residual changes).
    Top-k works too (k is split over the chunks and re-selected on the owner), though
    ``"auto"`` only picks it for dense codecs: re-selecting the sum of W sparse sets drops
    entries that a single selection would keep.

``"plain"``
    An uncompressed ``all_reduce`` (divided by W first when averaging, as DDP does).

``"auto"``
    ``"plain"`` for tensors below ``min_numel`` elements or a single rank; otherwise first
    the algorithm that moves the fewest bytes per rank by the volumes above (an
    uncompressed ring all-reduce moving 2(W-1)/W of the tensor), taking ``"alltoall"``
    only when it moves at most 3/4 of ``"allgather"`` (it compresses twice and adds one
    latency), and never for 1-bit sign: re-compressing a sum of scaled signs with a second
    residual made momentum-SGD training diverge in our runs where one compression did not
    (docs/results.md, section 3; ``algorithm="alltoall"`` still does it when asked). Bytes
    are not time, though: on a fast link the compression costs more than it
    saves. So "auto" then measures. The first calls of each signature (group, codec,
    numel, dtype, averaging) alternate between that compressed algorithm and the plain
    all-reduce and time themselves (wall time from entry to completion; CUDA events on a
    GPU); the first call of each kind is a warm-up and is not counted. At call
    ``AUTO_FIRST_LOOK`` and, if still undecided, at call ``2 * AUTO_PROBES`` the ranks
    exchange their median times in one small ``all_reduce``; a ratio of at least
    ``AUTO_CLEAR`` (or the last look) settles, and every rank keeps the faster algorithm
    for that signature from then on (the plain one on a tie: it is exact). Every rank
    decides from the same summed numbers, so they always agree. :func:`auto_choice` tells
    what was chosen; :func:`reset_auto` forgets the choices (for example after the link
    changed). With error feedback, a call that goes plain after settling adds the pending
    residuals to the tensor first, so nothing compression held back is lost. The
    agreement check below still runs on the calls that go plain: it is what turns ranks
    that disagree (say, on ``min_numel``, hence on the algorithm) into an error instead of
    a crash (Gloo aborts the process on a size mismatch). On small CPU tensors it is a
    visible part of the time (one more small round trip per call); ``verify="once"``
    removes it where the call sequence is known to be the same on every rank.

Every rank decodes the same payloads in the same order, so the result is bit-identical on
every rank. Only ``all_gather_single``/``all_gather_into_tensor``, ``all_to_all_single`` and
``all_reduce(SUM)`` are used (no ``reduce_scatter``, no ``ReduceOp.AVG``), so one code path
serves Gloo and NCCL. Collectives are issued from the calling thread in the same order on
every rank; with ``async_op=True`` only the last collective is left running and the
decode happens in the returned future's callback.

Agreement checks
----------------
Before anything else, ranks exchange a 16-integer fingerprint (format version, codec,
numel, dtype, chosen algorithm, averaging, payload size, and whether the rank accepted its
input). Ranks that disagree all raise the same ``ValueError`` after this small collective,
so none is left waiting in a later one. Every received payload header is then compared
with the one this rank expects; a mismatch found by any rank reaches every rank (in the
two-phase algorithm the owner of a bad chunk poisons its phase-2 header), so all raise
together. ``verify`` controls the cost: ``"always"`` (the default for CPU tensors) does
both on every call; ``"once"`` (the default for CUDA tensors, where reading the
fingerprint on the host would synchronise the stream) exchanges it on the first call of
each (group, signature) and skips header checks; ``"never"`` skips both.
"""

from __future__ import annotations

import contextlib
import functools
import time
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import format as fmt
from .codecs import Codec, as_codec
from .reference import lowbias32

ALGORITHMS = ("auto", "allgather", "alltoall", "plain")
VERIFY_MODES = ("auto", "always", "once", "never")
DEFAULT_MIN_NUMEL = 4096
PIPELINE_MIN_NUMEL = 1 << 20  # alltoall: one pipeline segment per this many elements ...
PIPELINE_MAX_SEGMENTS = 4  # ... and at most this many
AUTO_PROBES = 8  # calls of each kind "auto" times before it settles (the first is a warm-up)
AUTO_FIRST_LOOK = 8  # "auto" first compares at this call (3 timed calls of each kind) ...
AUTO_CLEAR = 1.5  # ... and settles there if the ratio of median times is at least this
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_MASK32 = 0xFFFFFFFF

# ---------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------


def key_hash(key: Hashable) -> int:
    """A 32-bit hash of a residual key that is the same in every process.

    (Python's ``hash`` of strings changes between processes; ``repr`` of tuples of ints and
    strings does not.)
    """
    return zlib.crc32(repr(key).encode()) if key is not None else 0


def stochastic_seed(base: int, rank: int, step: int, key: int, phase: int, chunk: int) -> int:
    """The seed for one compression: different per rank, step, tensor key, phase (0 worker,
    1 server) and chunk, and a pure function of them, so a run is reproducible."""
    h = lowbias32((base & _MASK32) ^ 0x243F6A88)
    for v in (rank, step, key, phase, chunk):
        h = lowbias32((h + 0x9E3779B9 + lowbias32(v & _MASK32)) & _MASK32)
    return h


# ---------------------------------------------------------------------------------------
# error feedback state
# ---------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """Residuals of one tensor key. ``server`` belongs to the alltoall algorithm: the
    concatenated server residuals of the ranges this rank owns (its chunk of every pipeline
    segment); ``server_layout`` = (world, ranges, scale) with ``ranges`` those ``[start,
    stop)`` ranges and ``scale`` the factor that turns a server residual into input units
    (W when averaging, else 1)."""

    worker: torch.Tensor | None = None
    server: torch.Tensor | None = None
    server_layout: tuple | None = None
    step: int = 0

    def add_server_to(self, out: torch.Tensor) -> None:
        """``out`` (input units, the whole tensor) += the server residual where it lives."""
        _, ranges, scale = self.server_layout
        off = 0
        for start, stop in ranges:
            out[start:stop].add_(self.server[off : off + stop - start].to(out.device),
                                 alpha=scale)
            off += stop - start

    def fold_server(self) -> None:
        """Move the server residual into the worker residual (in input units), so that no
        error is lost when the chunk layout or the algorithm changes."""
        if self.server is None:
            return
        if self.worker is not None:
            self.add_server_to(self.worker)
        self.server = None
        self.server_layout = None


def _normalized_layout(layout) -> tuple | None:
    """(world, ((start, stop), ...), scale); also reads the one-range form
    (world, start, stop, scale) of earlier state_dicts."""
    if layout is None:
        return None
    if len(layout) == 4:
        world, start, stop, scale = layout
        return (int(world), ((int(start), int(stop)),), float(scale))
    world, ranges, scale = layout
    return (int(world), tuple((int(a), int(b)) for a, b in ranges), float(scale))


class ErrorFeedback:
    """Residual memory for :func:`all_reduce`, reused across calls.

    Holds, per key (one per tensor being reduced; see ``key`` in :func:`all_reduce`), the
    worker residual (what this rank's compression dropped, one float32 per element) and,
    for the two-phase algorithm, the server residual of the chunk this rank owns, plus a
    step counter that feeds the stochastic-rounding seeds.

    Args:
        seed: base of the stochastic-rounding seeds (combined with rank, step and key).
    """

    def __init__(self, seed: int = 0) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        self.seed = seed
        self._slots: dict[Hashable, _Slot] = {}

    def __repr__(self) -> str:
        return f"ErrorFeedback(seed={self.seed}, keys={len(self._slots)})"

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def keys(self) -> list[Hashable]:
        return list(self._slots)

    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The worker residual of ``key`` (flat float32), or None. Live: do not modify."""
        slot = self._slots.get(key)
        return None if slot is None else slot.worker

    def pending(self, key: Hashable) -> torch.Tensor | None:
        """Everything this rank still owes for ``key``, in the units of its input: the worker
        residual plus, on the chunk it owns, the server residual times W (when averaging).
        Averaged over ranks this is what the sum of results lags behind the sum of exact
        all-reduces. A new tensor."""
        slot = self._slots.get(key)
        if slot is None or slot.worker is None:
            return None
        out = slot.worker.clone()
        if slot.server is not None:
            slot.add_server_to(out)
        return out

    def set_residual(self, key: Hashable, worker: torch.Tensor, step: int = 0) -> None:
        """Start ``key`` from the given worker residual (used to carry residuals over when a
        tensor's layout changes, e.g. DDP's bucket rebuild)."""
        if worker.dtype != torch.float32 or worker.dim() != 1 or not worker.is_contiguous():
            raise ValueError("a residual must be a contiguous 1-D float32 tensor")
        self._slots[key] = _Slot(worker=worker, step=step)

    def drop(self, key: Hashable) -> None:
        self._slots.pop(key, None)

    def reset(self) -> None:
        """Forget every residual."""
        self._slots.clear()

    def _slot(self, key: Hashable, numel: int, device: torch.device) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        if slot.worker is None:
            slot.worker = torch.zeros(numel, dtype=torch.float32, device=device)
        elif slot.worker.numel() != numel:
            raise ValueError(
                f"ErrorFeedback key {key!r} holds a residual of {slot.worker.numel()} elements "
                f"but the tensor has {numel}; give each tensor its own key")
        elif slot.worker.device != device:
            slot.worker = slot.worker.to(device)
        if slot.server is not None and slot.server.device != device:
            slot.server = slot.server.to(device)
        return slot

    def state_dict(self) -> dict:
        """This rank's residuals and step counters (CPU copies), for ``torch.save``."""
        slots = {}
        for key, s in self._slots.items():
            slots[key] = {
                "worker": None if s.worker is None else s.worker.detach().cpu().clone(),
                "server": None if s.server is None else s.server.detach().cpu().clone(),
                "server_layout": s.server_layout,
                "step": s.step,
            }
        return {"version": 1, "seed": self.seed, "slots": slots}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (on this same rank). Tensors move to the
        reduced tensor's device on first use."""
        if not isinstance(state, dict) or state.get("version") != 1 or "slots" not in state:
            raise ValueError("not an ErrorFeedback state_dict (version 1)")
        self.seed = int(state["seed"])
        self._slots = {}
        for key, s in state["slots"].items():
            self._slots[key] = _Slot(
                worker=None if s["worker"] is None else s["worker"].clone(),
                server=None if s["server"] is None else s["server"].clone(),
                server_layout=_normalized_layout(s["server_layout"]),
                step=int(s["step"]))


# ---------------------------------------------------------------------------------------
# planning: which algorithm, which chunks
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one all-reduce will do; identical on every rank that agrees on its inputs."""

    algorithm: str  # "plain", "allgather" or "alltoall"
    numel: int
    chunks: tuple[tuple[int, int], ...] = ()  # alltoall: [start, stop) per rank
    ks: tuple[int | None, ...] = ()  # alltoall top-k: k per chunk
    sizes: tuple[int, ...] = ()  # payload bytes per chunk (alltoall) or of the whole
    payload_bytes: int = 0  # bytes of each row on the wire
    # alltoall on large tensors: the pipeline segments, each an alltoall Plan of its own
    # (absolute chunk offsets); empty for one segment, which the fields above describe.
    segments: tuple[Plan, ...] = ()

    def stages(self) -> tuple[Plan, ...]:
        """The alltoall segments in order (the plan itself when it has one)."""
        return self.segments or (self,)


def alltoall_chunks(numel: int, world: int, align: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank's chunk: multiples of ``align``, short/empty at the end."""
    units = -(-numel // align)
    c = align * -(-units // world)
    return [(min(i * c, numel), min((i + 1) * c, numel)) for i in range(world)]


def _chunk_k(codec: Codec, numel: int, length: int) -> int | None:
    if not codec.is_sparse or length == 0:
        return None
    if isinstance(codec.k, int):
        # Split a count over the chunks in proportion to their length.
        return max(1, min(length, -(-codec.k_for(numel) * length // numel)))
    return codec.k_for(length)


def pipeline_segments(numel: int, align: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the two-phase algorithm's pipeline segments: one per
    ``PIPELINE_MIN_NUMEL`` elements, at most ``PIPELINE_MAX_SEGMENTS``, cut at multiples of
    ``align``. Segment s+1 is compressed while segment s is on the wire."""
    count = max(1, min(PIPELINE_MAX_SEGMENTS, numel // max(1, PIPELINE_MIN_NUMEL)))
    units = -(-numel // align)
    size = align * -(-units // count)
    return [(min(i * size, numel), min((i + 1) * size, numel)) for i in range(count)
            if i * size < numel]


def _one_segment_plan(codec: Codec, numel: int, world: int, start: int, stop: int) -> Plan:
    chunks = [(start + a, start + b) for a, b in alltoall_chunks(stop - start, world,
                                                                 codec.alignment)]
    ks = tuple(_chunk_k(codec, numel, b - a) for a, b in chunks)
    sizes = tuple(codec.header(b - a, k=k).total_bytes if b > a else 0
                  for (a, b), k in zip(chunks, ks))
    return Plan("alltoall", numel, tuple(chunks), ks, sizes, max(sizes))


def _alltoall_plan(codec: Codec, numel: int, world: int) -> Plan:
    # Top-k re-selects per chunk, so cutting it further would change which entries travel;
    # dense codecs quantize block by block, so segments change nothing but the timing.
    segs = [(0, numel)] if codec.is_sparse else pipeline_segments(numel, codec.alignment)
    if len(segs) == 1:
        return _one_segment_plan(codec, numel, world, 0, numel)
    parts = tuple(_one_segment_plan(codec, numel, world, a, b) for a, b in segs)
    return Plan("alltoall", numel, payload_bytes=sum(q.payload_bytes for q in parts),
                segments=parts)


def plan(codec: Codec | str, numel: int, dtype: torch.dtype, world: int,
         algorithm: str = "auto", min_numel: int = DEFAULT_MIN_NUMEL) -> Plan:
    """Decide how :func:`all_reduce` moves a tensor (see the module docstring for "auto")."""
    codec = as_codec(codec)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if numel == 0 or algorithm == "plain":
        return Plan("plain", numel)
    if algorithm == "alltoall":
        return _alltoall_plan(codec, numel, world)
    if algorithm == "allgather":
        size = codec.compressed_size(numel)
        return Plan("allgather", numel, sizes=(size,), payload_bytes=size)
    # auto
    if world == 1 or numel < min_numel:
        return Plan("plain", numel)
    esize = torch.empty((), dtype=dtype).element_size()
    plain_volume = 2 * (world - 1) / world * numel * esize
    size = codec.compressed_size(numel)
    allgather_volume = (world - 1) * size
    best = Plan("allgather", numel, sizes=(size,), payload_bytes=size)
    best_volume = allgather_volume
    # 1-bit sign is never re-compressed: its second (server) compression, with its own
    # residual, made training diverge where one compression did not (docs/results.md).
    if not codec.is_sparse and codec.bits > 1 and -(-numel // codec.alignment) >= world:
        a2a = _alltoall_plan(codec, numel, world)
        a2a_volume = 2 * (world - 1) * a2a.payload_bytes
        if a2a_volume <= 0.75 * allgather_volume:
            best, best_volume = a2a, a2a_volume
    return best if best_volume < plain_volume else Plan("plain", numel)


# ---------------------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------------------

_FP_MAGIC = 0x475A4650  # "GZFP"
_FP_FIELDS = ("magic", "format version", "codec", "bits", "block", "rounding", "k", "values",
              "exact", "numel", "dtype", "algorithm", "average", "payload bytes", "codec spec",
              "status")
_KIND_IDS = {"int8": 1, "int4": 2, "int2": 3, "sign": 4, "topk": 5}
_DTYPE_IDS = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_ALGO_IDS = {"plain": 1, "allgather": 2, "alltoall": 3}
_STATUS_OK = 0


def _fingerprint(codec: Codec, numel: int, dtype: torch.dtype, p: Plan | None, average: bool,
                 status: int) -> list[int]:
    k = codec.k_for(numel) if codec.is_sparse and numel > 0 else 0
    return [
        _FP_MAGIC, fmt.VERSION, _KIND_IDS[codec.name], codec.bits or 0, codec.block or 0,
        {None: 0, "nearest": 1, "stochastic": 2}[codec.rounding], k,
        fmt.VALUE_FORMATS.get(codec.values, 0), int(bool(codec.exact)), numel,
        _DTYPE_IDS.get(dtype, 0), _ALGO_IDS[p.algorithm] if p else 0, int(average),
        p.payload_bytes if p else 0, zlib.crc32(codec.spec.encode()), status,
    ]


# Plans and fingerprints are pure functions of hashable, immutable arguments: computed once
# per signature instead of on every call (all_reduce is called per bucket per step).
@functools.lru_cache(maxsize=4096)
def _plan_of(pipeline: tuple[int, int], *args) -> Plan:
    # ``pipeline`` (the module's pipeline settings, read by plan) is part of the cache key.
    return plan(*args)


def _cached_plan(*args) -> Plan:
    return _plan_of((PIPELINE_MIN_NUMEL, PIPELINE_MAX_SEGMENTS), *args)


@functools.lru_cache(maxsize=4096)
def _fingerprint_of(version: int, *args) -> tuple[int, ...]:
    # ``version`` (the format version, read by _fingerprint) is part of the cache key.
    return tuple(_fingerprint(*args))


def _cached_fingerprint(*args) -> tuple[int, ...]:
    return _fingerprint_of(fmt.VERSION, *args)


def _describe_fp(fp: list[int]) -> str:
    kinds = {v: k for k, v in _KIND_IDS.items()}
    dtypes = {v: str(k).replace("torch.", "") for k, v in _DTYPE_IDS.items()}
    algos = {v: k for k, v in _ALGO_IDS.items()}
    f = dict(zip(_FP_FIELDS, fp))
    kind = kinds.get(f["codec"], f"?{f['codec']}")
    if kind == "topk":
        codec = (f"topk k={f['k']} values={fmt.VALUE_FORMAT_NAMES.get(f['values'])} "
                 f"exact={bool(f['exact'])}")
    else:
        codec = (f"{kind} block={f['block']} "
                 f"rounding={ {1: 'nearest', 2: 'stochastic'}.get(f['rounding'])}")
    return (f"format v{f['format version']}, codec {codec}, numel {f['numel']}, dtype "
            f"{dtypes.get(f['dtype'], 'unsupported')}, algorithm "
            f"{algos.get(f['algorithm'], '-')}, average={bool(f['average'])}")


_VERIFIED: set[tuple] = set()


def _exchange_fingerprints(fp: list[int], device: torch.device, group, world: int,
                           local_error: Exception | None) -> None:
    """All-gather every rank's fingerprint; raise on every rank if any rank refused its
    input or the fingerprints differ."""
    mine = torch.tensor(list(fp), dtype=torch.int64, device=device)
    every = torch.empty(world * len(fp), dtype=torch.int64, device=device)
    _all_gather(every, mine, group, async_op=False)
    rows = every.view(world, len(fp)).cpu().tolist()
    if local_error is not None:
        raise local_error
    refused = [r for r, row in enumerate(rows) if row[-1] != _STATUS_OK or row[0] != _FP_MAGIC]
    if refused:
        raise ValueError(f"gradzip.all_reduce: rank(s) {refused} refused their input (see the "
                         "error raised there); every rank stops")
    if any(row != rows[0] for row in rows):
        differing = [name for i, name in enumerate(_FP_FIELDS)
                     if len({row[i] for row in rows}) > 1 and name != "codec spec"]
        lines = "\n".join(f"  rank {r}: {_describe_fp(row)}" for r, row in enumerate(rows))
        raise ValueError(
            "gradzip.all_reduce: ranks disagree on "
            f"{', '.join(differing) or 'the codec options'}; every rank must reduce the same "
            f"tensor size and dtype with the same codec and options:\n{lines}")


# ---------------------------------------------------------------------------------------
# collectives and header checks
# ---------------------------------------------------------------------------------------


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool):
    # torch 2.14 renamed all_gather_into_tensor to all_gather_single; keep both working.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, inp, group=group, async_op=async_op)


def _header_problems(heads: torch.Tensor, expected: list[fmt.Header | None],
                     lengths: list[int]) -> list[tuple[int, str]]:
    """Compare each row's 64 header bytes with the expected header; (row, reason) per
    mismatch. ``heads``: [R, 64] uint8 on the CPU."""
    problems = []
    for w, (h, length) in enumerate(zip(expected, lengths)):
        if h is None:
            continue
        want = torch.frombuffer(bytearray(h.pack()), dtype=torch.uint8)
        if torch.equal(heads[w], want):
            continue
        try:
            got = fmt.parse_header(heads[w].numpy().tobytes(), length=length)
            reason = f"header says {got.describe()}, expected {h.describe()}"
        except ValueError as e:
            reason = str(e)
        problems.append((w, reason))
    return problems


class _NullTimer:
    def __call__(self, name: str):
        return contextlib.nullcontext()


class _Timings:
    """Adds wall seconds per phase into a dict (CPU work; on CUDA it sees launch time)."""

    def __init__(self, sink: dict[str, float]) -> None:
        self.sink = sink

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sink[name] = self.sink.get(name, 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------------------------------------
# "auto": measure, then settle
# ---------------------------------------------------------------------------------------


class _Clock:
    """Times one call: wall clock on the CPU, CUDA events (read when settling) on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.kind = ""  # the algorithm of the call it times
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()
        self.end = None

    def stop(self) -> None:
        if self.cuda:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()
        else:
            self.end = time.perf_counter()

    def seconds(self) -> float | None:
        if self.end is None:  # an async call still running when the ranks settle
            return None
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.end - self.start


class _AutoTuner:
    """The measured choice between a compressed plan and the plain all-reduce for one
    signature (see "auto" in the module docstring)."""

    def __init__(self, compressed: Plan) -> None:
        self.compressed = compressed
        self.calls = 0
        self.clocks: tuple[list[_Clock], list[_Clock]] = ([], [])  # compressed, plain
        self.choice: Plan | None = None
        self.times: tuple[float | None, float | None] = (None, None)

    def upcoming_plain(self) -> bool:
        """Whether the next call is a plain all-reduce (settled on it, or a plain probe)."""
        if self.choice is not None:
            return self.choice.algorithm == "plain"
        return self.calls < 2 * AUTO_PROBES and self.calls % 2 == 1

    def next_plan(self, numel: int, device: torch.device, group) -> tuple[Plan, list | None]:
        """The plan of this call and, while probing, the list its clock goes into."""
        if self.choice is not None:
            return self.choice, None
        i = self.calls
        self.calls += 1
        # A first look after three timed calls of each kind settles clear cases early.
        if i in (AUTO_FIRST_LOOK, 2 * AUTO_PROBES) and self._settle(
                numel, device, group, final=i == 2 * AUTO_PROBES):
            return self.choice, None
        if i < 2 * AUTO_PROBES:
            kind = i % 2
            # The first call of each kind warms caches and allocators: not timed.
            return (self.compressed if kind == 0 else Plan("plain", numel)), \
                (self.clocks[kind] if i >= 2 else None)
        raise AssertionError("unreachable: the last probe settles")

    def _settle(self, numel: int, device: torch.device, group, final: bool) -> bool:
        """Exchange the median times; settle if ``final`` or one kind is clearly faster
        (by ``AUTO_CLEAR``). Every rank sees the same sums, so all decide alike."""
        row = []
        for clocks in self.clocks:
            secs = [s for s in (c.seconds() for c in clocks) if s is not None]
            row += [float(torch.tensor(secs).median()) if secs else 0.0, float(bool(secs))]
        both = torch.tensor(row, dtype=torch.float64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        t_c, n_c, t_p, n_p = both.cpu().tolist()
        t_c = t_c / n_c if n_c else None
        t_p = t_p / n_p if n_p else None
        if not final and not (t_c and t_p and max(t_c, t_p) >= AUTO_CLEAR * min(t_c, t_p)):
            return False
        self.times = (t_c, t_p)
        plain = t_c is not None and t_p is not None and t_p <= t_c
        self.choice = Plan("plain", numel) if plain else self.compressed
        self.clocks = ([], [])
        return True


_AUTO: dict[tuple, _AutoTuner] = {}


def _auto_key(group, codec: Codec, numel: int, dtype: torch.dtype, average: bool,
              world: int) -> tuple:
    return (id(group) if group is not None else None, world, codec.spec, numel, str(dtype),
            bool(average))


def auto_choice(tensor_or_numel, codec: Codec | str, *, dtype: torch.dtype | None = None,
                group: dist.ProcessGroup | None = None, average: bool = True
                ) -> dict | None:
    """What ``algorithm="auto"`` settled on for this signature, or None while it is still
    measuring (or never saw it). Returns ``{"algorithm": ..., "compressed_s": ...,
    "plain_s": ...}`` with the rank-averaged median times it compared (seconds)."""
    codec = as_codec(codec)
    if isinstance(tensor_or_numel, torch.Tensor):
        numel, dtype = tensor_or_numel.numel(), tensor_or_numel.dtype
    else:
        numel, dtype = int(tensor_or_numel), dtype or torch.float32
    world = dist.get_world_size(group)
    t = _AUTO.get(_auto_key(group, codec, numel, dtype, average, world))
    if t is None or t.choice is None:
        return None
    return {"algorithm": t.choice.algorithm, "compressed_algorithm": t.compressed.algorithm,
            "compressed_s": t.times[0], "plain_s": t.times[1]}


def reset_auto() -> None:
    """Forget every choice "auto" has settled on; the next calls measure again. Call it on
    every rank at the same point."""
    _AUTO.clear()


# ---------------------------------------------------------------------------------------
# all_reduce
# ---------------------------------------------------------------------------------------


def _completed(value: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future(
        devices=[value.device] if value.is_cuda else None)
    fut.set_result(value)
    return fut


def _check_input(tensor: torch.Tensor) -> Exception | None:
    if tensor.layout != torch.strided:
        return TypeError(f"gradzip.all_reduce needs a dense (strided) tensor, got layout "
                         f"{tensor.layout}")
    if tensor.dtype not in FLOAT_DTYPES:
        return TypeError(f"gradzip.all_reduce needs a float32, float16 or bfloat16 tensor, "
                         f"got {tensor.dtype}")
    return None


def all_reduce(
    tensor: torch.Tensor,
    codec: Codec | str,
    *,
    state: ErrorFeedback | None = None,
    group: dist.ProcessGroup | None = None,
    algorithm: str = "auto",
    average: bool = True,
    async_op: bool = False,
    key: Hashable | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
    verify: str = "auto",
    seed: int = 0,
    timings: dict[str, float] | None = None,
) -> torch.Tensor | torch.futures.Future:
    """All-reduce ``tensor`` in place across ``group`` through compressed payloads.

    Args:
        tensor: float32/float16/bfloat16 tensor of any shape (contiguous or not), CPU for
            Gloo or CUDA for NCCL. Overwritten with the (averaged) sum, bit-identical on
            every rank.
        codec: a :class:`gradzip.Codec` or spec string ("int8", "int4", "topk:0.01", ...).
        state: an :class:`ErrorFeedback` reused across calls; None for no error feedback.
        group: process group (default: the world).
        algorithm: "auto", "allgather", "alltoall" or "plain" (see :mod:`gradzip.comm`).
        average: divide the sum by the group size.
        async_op: return a ``torch.futures.Future`` whose value is ``tensor`` once reduced.
        key: names the residual slot in ``state`` (default: the tensor's shape and dtype).
            Give distinct keys to distinct tensors of one shape.
        min_numel: with "auto", tensors with fewer elements take the plain all-reduce.
        verify: "auto", "always", "once" or "never": how often ranks check that they agree
            (fingerprint and payload headers; see the module docstring).
        seed: base of the stochastic-rounding seeds when ``state`` is None (with a state,
            its seed and step counter are used). Seeds always differ per rank.
        timings: if a dict, wall seconds of this call are added to its "verify", "compress",
            "communicate" and "decompress" entries.

    Returns:
        ``tensor`` (``async_op=False``) or a Future holding it.

    Raises:
        ValueError: ranks disagree on codec, numel, dtype, algorithm or format version, or
            a received payload header does not match (raised on every rank together);
            bad arguments.
        TypeError: a tensor of another dtype.
        RuntimeError: from torch.distributed, e.g. a peer died (within the group's timeout).
    """
    codec = as_codec(codec)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if state is not None and not isinstance(state, ErrorFeedback):
        raise TypeError(f"state must be a gradzip.ErrorFeedback or None, got "
                        f"{type(state).__name__}")
    if not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"min_numel must be a non-negative int, got {min_numel!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("gradzip.all_reduce needs an initialised torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0 or world < 1:
        raise ValueError("this process is not a member of the given process group")
    timer = _Timings(timings) if timings is not None else _NullTimer()

    local_error = _check_input(tensor)
    numel = tensor.numel()
    p = None if local_error else _cached_plan(codec, numel, tensor.dtype, world, algorithm,
                                              min_numel)
    # "auto" with a compressed plan: measured against the plain all-reduce first.
    tuner = None
    if p is not None and algorithm == "auto" and p.algorithm != "plain":
        tkey = _auto_key(group, codec, numel, tensor.dtype, average, world)
        tuner = _AUTO.get(tkey)
        if tuner is None or tuner.compressed != p:
            tuner = _AUTO[tkey] = _AutoTuner(p)
    # Only a call that may be a probe is timed (settled calls make no CUDA events).
    clock_at_entry = _Clock(tensor.device) if tuner is not None and tuner.choice is None \
        else None
    # Will this call be a plain all-reduce that "auto" chose? (Known before any collective.)
    auto_plain = algorithm == "auto" and p is not None and (
        p.algorithm == "plain" or tuner.upcoming_plain())
    if state is not None and key is None:
        key = (tuple(tensor.shape), str(tensor.dtype))
    slot = None
    if p is not None and p.algorithm != "plain" and state is not None and not auto_plain:
        try:
            slot = state._slot(key, numel, tensor.device)
        except ValueError as e:
            local_error = e
    mode = verify if verify != "auto" else ("always" if tensor.device.type == "cpu" else "once")
    if mode != "never":
        # A rank that refuses its input still takes part in the exchange, so that its
        # peers raise too instead of waiting for it in the next collective.
        fp = _cached_fingerprint(codec, numel, tensor.dtype, p, average,
                                 _STATUS_OK if local_error is None else 1)
        sig = (id(group) if group is not None else None, fp)
        if mode == "always" or sig not in _VERIFIED or local_error:
            with timer("verify"):
                _exchange_fingerprints(fp, tensor.device, group, world, local_error)
            _VERIFIED.add(sig)
    if local_error:
        raise local_error
    check_headers = mode == "always"

    if numel == 0:
        return _completed(tensor) if async_op else tensor
    clock = None
    if tuner is not None:
        p, clocks = tuner.next_plan(numel, tensor.device, group)
        if clocks is not None:
            clock = clock_at_entry
            clock.kind = p.algorithm
            clocks.append(clock)
    with torch.no_grad():
        flat = tensor.detach().reshape(-1) if tensor.is_contiguous() \
            else tensor.detach().contiguous().view(-1)
        if p.algorithm == "plain":
            if tuner is not None and tuner.choice is p and state is not None and key in state:
                # Settled on plain: hand over what compression held back (the plain sum
                # is exact). A plain probe leaves it for the next compressed call.
                flat.add_(state.pending(key).to(flat.dtype))
                state.drop(key)
            run = _plain
            args = ()
        else:
            if slot is not None:
                base, step, khash = state.seed, slot.step, key_hash(key)
                slot.step += 1
            else:
                base, step, khash = seed, 0, 0
            seeds = (base, rank, step, khash)
            run = _allgather if p.algorithm == "allgather" else _alltoall
            args = (codec, p, slot, seeds, check_headers)
        finish = run(flat, world, rank, group, average, timer, *args)

    def complete(_=None) -> torch.Tensor:
        with torch.no_grad():
            finish()
            if flat.data_ptr() != tensor.data_ptr() or not tensor.is_contiguous():
                tensor.copy_(flat.view(tensor.shape))
        if clock is not None:
            clock.stop()
        return tensor

    if not async_op:
        with timer("communicate"):
            finish.wait()
        return complete()
    return finish.future().then(complete)


class _Finish:
    """The tail of an algorithm: the running collectives plus the decode that follows.
    ``wait`` waits for the first; ``decode`` waits for the others as it goes, so that with
    several it decodes one while the next is still arriving."""

    def __init__(self, works, decode: Callable[[bool], None]) -> None:
        self.works = list(works) if isinstance(works, (list, tuple)) else [works]
        self.decode = decode
        self.via_future = False

    def wait(self) -> None:
        self.works[0].wait()

    def future(self) -> torch.futures.Future:
        # The decode then runs in this future's callback, when every collective is done:
        # it must not wait on them there (a work's wait inside its own callback deadlocks).
        self.via_future = True
        if len(self.works) == 1:
            return self.works[0].get_future()
        return torch.futures.collect_all([w.get_future() for w in self.works])

    def __call__(self) -> None:
        self.decode(not self.via_future)


def _plain(flat, world, rank, group, average, timer) -> _Finish:
    if average and world > 1:
        flat.div_(world)  # before the sum, as DDP does, so fp16 sums overflow later
    with timer("communicate"):
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return _Finish(work, lambda wait: None)


def _allgather(flat, world, rank, group, average, timer, codec, p, slot, seeds,
               check_headers) -> _Finish:
    with timer("compress"):
        payload = codec.compress(flat, slot.worker if slot is not None else None,
                                 seed=stochastic_seed(*seeds, 0, 0))
    rows = torch.empty((world, p.payload_bytes), dtype=torch.uint8, device=flat.device)
    with timer("communicate"):
        work = _all_gather(rows.view(-1), payload, group, async_op=True)

    def decode(wait: bool) -> None:  # one collective: _Finish.wait() waited for it
        with timer("decompress"):
            if check_headers:
                expected = codec.header(p.numel)
                problems = _header_problems(rows[:, : fmt.HEADER_BYTES].cpu(),
                                            [expected] * world, [p.payload_bytes] * world)
                if problems:
                    raise ValueError(
                        "gradzip.all_reduce: received payloads do not match this rank's "
                        f"codec {codec.spec} for numel {p.numel}: "
                        + "; ".join(f"from rank {w}: {why}" for w, why in problems))
            flat.zero_()
            codec.decompress_accumulate(rows, flat, 1.0 / world if average else 1.0)

    return _Finish(work, decode)


def _alltoall(flat, world, rank, group, average, timer, codec, p, slot, seeds,
              check_headers) -> _Finish:
    dev = flat.device
    segs = p.stages()
    alpha = 1.0 / world if average else 1.0
    worker = slot.worker if slot is not None else None
    # This rank's server residual: its chunk of every segment, concatenated.
    owned = tuple(s.chunks[rank] for s in segs)
    server = None
    if slot is not None:
        layout = (world, owned, float(world) if average else 1.0)
        if slot.server is not None and slot.server_layout != layout:
            slot.fold_server()
        if slot.server is None and any(b > a for a, b in owned):
            slot.server = torch.zeros(sum(b - a for a, b in owned), dtype=torch.float32,
                                      device=dev)
            slot.server_layout = layout
        server = slot.server

    # Phase 1: compress each segment's W chunks and start its all-to-all at once, so the
    # next segment is compressed while this one is on the wire.
    recvs, works = [], []
    for j, sp in enumerate(segs):
        with timer("compress"):
            send = torch.zeros((world, sp.payload_bytes), dtype=torch.uint8, device=dev)
            for i, ((a, b), k, size) in enumerate(zip(sp.chunks, sp.ks, sp.sizes)):
                if b > a:
                    res = worker[a:b] if worker is not None else None
                    send[i, :size] = codec.compress(
                        flat[a:b], res, seed=stochastic_seed(*seeds, 0, j * world + i), k=k)
        recv = torch.empty_like(send)
        with timer("communicate"):
            works.append(dist.all_to_all_single(recv.view(-1), send.view(-1), group=group,
                                                async_op=True))
        recvs.append(recv)

    # Phase 2, segment by segment as they arrive: accumulate this rank's chunk, re-compress
    # it (server residual), start its all-gather.
    phase1_problems: list[tuple[int, int, str]] = []
    gathered, gworks = [], []
    off = 0
    for j, sp in enumerate(segs):
        with timer("communicate"):
            works[j].wait()
        a, b = sp.chunks[rank]
        my_size, my_k = sp.sizes[rank], sp.ks[rank]
        gathered_in = torch.zeros(sp.payload_bytes, dtype=torch.uint8, device=dev)
        problems: list[tuple[int, str]] = []
        if b > a:
            with timer("decompress"):
                if check_headers:
                    problems = _header_problems(
                        recvs[j][:, : fmt.HEADER_BYTES].cpu(),
                        [codec.header(b - a, k=my_k)] * world, [my_size] * world)
                if not problems:
                    rows = recvs[j][:, :my_size]
                    acc = torch.zeros(b - a, dtype=torch.float32, device=dev)
                    codec.decompress_accumulate(rows if my_size == sp.payload_bytes
                                                else rows.contiguous(), acc, alpha)
            if not problems:
                with timer("compress"):
                    res = server[off : off + b - a] if server is not None else None
                    gathered_in[:my_size] = codec.compress(
                        acc, res, seed=stochastic_seed(*seeds, 1, j * world + rank), k=my_k)
            # else: the zero header tells every other rank that this one found bad
            # payloads, after it has taken part in the all-gather, so nobody waits on it.
        off += b - a
        phase1_problems += [(j, w, why) for w, why in problems]
        g = torch.empty((world, sp.payload_bytes), dtype=torch.uint8, device=dev)
        with timer("communicate"):
            gworks.append(_all_gather(g.view(-1), gathered_in, group, async_op=True))
        gathered.append(g)

    def decode(wait: bool) -> None:
        for j, sp in enumerate(segs):
            if wait and j > 0:  # _Finish.wait() waited for the first
                with timer("communicate"):
                    gworks[j].wait()
            with timer("decompress"):
                if phase1_problems:
                    a, b = sp.chunks[rank]
                    raise ValueError(
                        "gradzip.all_reduce: received payloads do not match this rank's "
                        f"codec {codec.spec} for chunk [{a}, {b}) of numel {p.numel}: "
                        + "; ".join(f"from rank {w}: {why}" for _, w, why in phase1_problems))
                if check_headers:
                    expected = [codec.header(e - s, k=k) if e > s else None
                                for (s, e), k in zip(sp.chunks, sp.ks)]
                    problems = _header_problems(gathered[j][:, : fmt.HEADER_BYTES].cpu(),
                                                expected, list(sp.sizes))
                    if problems:
                        raise ValueError(
                            "gradzip.all_reduce: phase-2 payloads do not match (a rank whose "
                            "phase-1 payloads were bad sends an empty header): "
                            + "; ".join(f"chunk of rank {w}: {why}" for w, why in problems))
                for i, ((s, e), size) in enumerate(zip(sp.chunks, sp.sizes)):
                    if e > s:
                        out = flat[s:e]
                        out.zero_()
                        codec.decompress_accumulate(gathered[j][i : i + 1, :size], out, 1.0)

    return _Finish(gworks, decode)


__all__ = [
    "ALGORITHMS",
    "AUTO_CLEAR",
    "AUTO_FIRST_LOOK",
    "AUTO_PROBES",
    "DEFAULT_MIN_NUMEL",
    "PIPELINE_MAX_SEGMENTS",
    "PIPELINE_MIN_NUMEL",
    "ErrorFeedback",
    "Plan",
    "all_reduce",
    "alltoall_chunks",
    "auto_choice",
    "key_hash",
    "pipeline_segments",
    "plan",
    "reset_auto",
    "stochastic_seed",
]
