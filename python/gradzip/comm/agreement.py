"""Agreement: ranks that disagree raise the same ``ValueError`` together instead of hanging.

Two checks. Before anything else, ranks exchange (one all-to-all) an 18-integer
*fingerprint* of their call (format version, codec, numel, dtype, chosen algorithm and
whether "auto" chose it, pipeline segments, averaging, payload size, and whether the rank
accepted its input); every rank compares all W and, on any difference, raises the same
error after this small collective, so none is left waiting in a later one. Once a group's
calls repeat, that exchange is folded into the call's own collectives
(:mod:`.fold`).
Then every received payload *header* is compared with the one this rank expects; a
mismatch found by any rank reaches every rank (in the two-phase algorithm the owner of a
bad chunk sends an empty header in phase 2), so all raise together.

``verify`` sets the cost: ``"always"`` (the default for CPU tensors) does both on every
call (the first folded into the data once calls repeat); ``"once"`` (the default for CUDA
tensors, where reading the fingerprint on the host would synchronise the stream) exchanges
it on the first call of each (group, signature) and skips header checks; ``"never"`` skips both.
"""

from __future__ import annotations

import functools
import zlib

import torch

from .. import format as fmt
from ..codecs import Codec
from .collectives import all_gather_small
from .plan import Plan

VERIFY_MODES = ("auto", "always", "once", "never")
STATUS_OK = 0
STATUS_REFUSED = 1

_FP_MAGIC = 0x475A4650  # "GZFP"
_FP_FIELDS = ("magic", "format version", "codec", "bits", "block", "rounding", "k", "values",
              "exact", "numel", "dtype", "algorithm", "auto", "segments", "average",
              "payload bytes", "codec spec", "status")
_KIND_IDS = {"int8": 1, "int4": 2, "int2": 3, "sign": 4, "topk": 5}
_DTYPE_IDS = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_ALGO_IDS = {("all_reduce", "plain"): 1, ("all_reduce", "allgather"): 2,
             ("all_reduce", "alltoall"): 3, ("reduce_scatter", "plain"): 4,
             ("reduce_scatter", "alltoall"): 5}
_ROUNDING_IDS = {None: 0, "nearest": 1, "stochastic": 2}


def resolve_mode(verify: str, device: torch.device) -> str:
    """``"auto"`` -> ``"always"`` on the CPU, ``"once"`` elsewhere."""
    if verify != "auto":
        return verify
    return "always" if device.type == "cpu" else "once"


def fingerprint(codec: Codec, numel: int, dtype: torch.dtype, p: Plan | None, average: bool,
                status: int, auto: bool = False) -> tuple[int, ...]:
    """This rank's call in 18 integers (``p`` None when the rank refused its input; ``auto``:
    the algorithm is "auto"'s, whose first calls cycle through its candidates and the plain
    all-reduce)."""
    # The format version is read here, not frozen at import, and is part of the cache key.
    return _fingerprint(fmt.VERSION, codec, numel, dtype, p, average, status, auto)


@functools.lru_cache(maxsize=4096)
def _fingerprint(version: int, codec: Codec, numel: int, dtype: torch.dtype, p: Plan | None,
                 average: bool, status: int, auto: bool) -> tuple[int, ...]:
    k = codec.k_for(numel) if codec.is_sparse and numel > 0 else 0
    return (
        _FP_MAGIC, version, _KIND_IDS[codec.name], codec.bits or 0, codec.block or 0,
        _ROUNDING_IDS[codec.rounding], k,
        fmt.VALUE_FORMATS.get(codec.values, 0), int(bool(codec.exact)), numel,
        _DTYPE_IDS.get(dtype, 0), _ALGO_IDS[p.op, p.algorithm] if p else 0, int(auto),
        len(p.stages()) if p else 0, int(average),
        p.payload_bytes if p else 0, zlib.crc32(codec.spec.encode()), status,
    )


def describe_fingerprint(fp) -> str:
    """A fingerprint in words, for error messages."""
    kinds = {v: k for k, v in _KIND_IDS.items()}
    dtypes = {v: str(k).replace("torch.", "") for k, v in _DTYPE_IDS.items()}
    algos = {v: " ".join(k) for k, v in _ALGO_IDS.items()}
    roundings = {v: k for k, v in _ROUNDING_IDS.items()}
    f = dict(zip(_FP_FIELDS, fp))
    kind = kinds.get(f["codec"], f"?{f['codec']}")
    if kind == "topk":
        codec = (f"topk k={f['k']} values={fmt.VALUE_FORMAT_NAMES.get(f['values'])} "
                 f"exact={bool(f['exact'])}")
    else:
        codec = f"{kind} block={f['block']} rounding={roundings.get(f['rounding'])}"
    return (f"format v{f['format version']}, codec {codec}, numel {f['numel']}, dtype "
            f"{dtypes.get(f['dtype'], 'unsupported')}, algorithm "
            f"{algos.get(f['algorithm'], '-')}{' (auto)' if f['auto'] else ''}, "
            f"{f['segments']} segment(s), average={bool(f['average'])}")


def exchange_fingerprints(fp: tuple[int, ...], device: torch.device, group, world: int,
                          local_error: Exception | None, who: str = "gradzip.all_reduce"
                          ) -> None:
    """All-gather every rank's fingerprint; raise on every rank if any rank refused its
    input (that rank raises its own error) or the fingerprints differ."""
    mine = torch.tensor(fp, dtype=torch.int64, device=device)
    every = torch.empty(world * len(fp), dtype=torch.int64, device=device)
    all_gather_small(every, mine, group)
    rows = every.view(world, len(fp)).cpu().tolist()
    if local_error is not None:
        raise local_error
    refused = [r for r, row in enumerate(rows) if row[-1] != STATUS_OK or row[0] != _FP_MAGIC]
    if refused:
        raise ValueError(f"{who}: rank(s) {refused} refused their input (see the "
                         "error raised there); every rank stops")
    if any(row != rows[0] for row in rows):
        differing = [name for i, name in enumerate(_FP_FIELDS)
                     if len({row[i] for row in rows}) > 1 and name != "codec spec"]
        lines = "\n".join(f"  rank {r}: {describe_fingerprint(row)}" for r, row in enumerate(rows))
        raise ValueError(
            f"{who}: ranks disagree on "
            f"{', '.join(differing) or 'the codec options'}; every rank must reduce the same "
            f"tensor size and dtype with the same codec and options:\n{lines}")


def header_problems(rows: torch.Tensor, expected: list[fmt.Header | None],
                    lengths: list[int]) -> list[tuple[int, str]]:
    """Compare the header of each payload row (``rows``: [R, P] uint8, any device) with
    the expected header; (row, reason) per mismatch. ``None`` expects nothing."""
    heads = rows[:, : fmt.HEADER_BYTES].cpu()
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


def mismatch_error(what: str, problems: list[tuple[int, str]], source: str = "from rank",
                   who: str = "gradzip.all_reduce") -> ValueError:
    return ValueError(f"{who}: {what}: "
                      + "; ".join(f"{source} {w}: {why}" for w, why in problems))


__all__ = ["STATUS_OK", "STATUS_REFUSED", "VERIFY_MODES", "describe_fingerprint",
           "exchange_fingerprints",
           "fingerprint", "header_problems", "mismatch_error", "resolve_mode"]
