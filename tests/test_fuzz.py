"""Fuzz: random and mutated payloads thrown at dequantize and dequantize_accumulate.

Every backend must answer each payload with a ValueError/TypeError or with exactly the
reference's decode, never anything else, and never a crash. Each backend is fuzzed in a
child process, so that a crash (a segfault in a kernel) is reported as a failure naming
the payload instead of killing the test session. Seeds are fixed; the case count is
bounded so a run takes seconds.

Beyond "no crash", the backend's verdict must agree with the reference's (the format
specification): it may not accept a payload the reference rejects (e.g. unsorted or
out-of-range top-k indices: that would write outside ``out`` or silently decode garbage),
nor reject one the reference accepts. A failed accumulate must leave ``out`` untouched.

Run by hand: ``python tests/test_fuzz.py cpu cpu 2000 1`` prints one JSON line per finding.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys

import pytest

HEADER = struct.Struct("<4sHBBIBBHQQQ24s")
# (name, struct format, offset) of each header field
FIELDS = [("magic", "4s", 0), ("version", "H", 4), ("codec", "B", 6), ("bits", "B", 7),
          ("block", "I", 8), ("value_format", "B", 12), ("index_format", "B", 13),
          ("flags", "H", 14), ("numel", "Q", 16), ("k", "Q", 24), ("total_bytes", "Q", 32),
          ("reserved", "B", 40)]
INTERESTING = {
    "4s": [b"GZPK", b"KPZG", b"\0\0\0\0", b"GZP\0"],
    "B": [0, 1, 2, 3, 4, 7, 8, 9, 16, 127, 128, 255],
    "H": [0, 1, 2, 3, 0x7FFF, 0x8000, 0xFFFF],
    "I": [0, 1, 16, 31, 32, 33, 48, 64, 4096, 4097, 8192, 2**31, 2**32 - 1],
    "Q": [0, 1, 2, 63, 64, 65, 100, 999, 1000, 1001, 2**31 - 1, 2**31, 2**32, 2**60,
          2**61 + 1, 2**62 - 1, 2**62, 2**63, 2**64 - 1],
}
KINDS = ("flip", "header_flip", "truncate", "extend", "field", "field_consistent", "index",
         "random_body", "random", "shuffle_rows")


def base_payloads():
    """Valid payloads of every codec (made by the reference), small enough to decode fast."""
    import inputs
    from gradzip import reference

    out = []
    for bits in (8, 4, 2, 1):
        for block, n in ((32, 77), (128, 1000), (64, 1)):
            rounding = "stochastic" if bits == 4 else "nearest"
            x = inputs.grad_like(n, seed=bits * n)
            out.append((f"dense{bits}/{block}/n{n}",
                        reference.quantize_pack(x, bits, block, None, rounding, 3)))
    for values in ("fp32", "bf16", "int8"):
        for n, k, exact in ((10, 1, True), (1000, 50, False), (333, 333, True)):
            x = inputs.grad_like(n, seed=n + k)
            out.append((f"topk-{values}/n{n}/k{k}", reference.topk_select(x, k, None, exact,
                                                                           values, 4)))
    return out


def _layout_total(h: dict) -> int | None:
    """Total bytes the fields imply, or None when they are not a valid layout."""
    from gradzip import format as fmt

    try:
        if h["codec"] == 1:
            return fmt.dense_header(h["numel"], h["bits"], h["block"]).total_bytes
        if h["codec"] == 2:
            return fmt.topk_header(h["numel"], h["k"], h["value_format"]).total_bytes
    except (KeyError, ZeroDivisionError, ValueError):
        return None
    return None


def mutate(rng: random.Random, p: bytes, kind: str) -> tuple[str, bytes]:
    """One mutation of payload ``p`` (bytes) of the given kind: (description, bytes)."""
    b = bytearray(p)
    if kind == "flip":
        nflip = rng.randint(1, 8)
        pos = [rng.randrange(len(b) * 8) for _ in range(nflip)]
        for bit in pos:
            b[bit // 8] ^= 1 << (bit % 8)
        return f"flip bits {pos}", bytes(b)
    if kind == "header_flip":
        bit = rng.randrange(64 * 8)
        b[bit // 8] ^= 1 << (bit % 8)
        return f"flip header bit {bit}", bytes(b)
    if kind == "truncate":
        n = rng.choice([0, 1, 16, 63, 64, 65, len(b) - 16, len(b) - 1, rng.randrange(len(b))])
        n = max(0, min(n, len(b) - 1))
        return f"truncate to {n}", bytes(b[:n])
    if kind == "extend":
        extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 15, 16, 64])))
        return f"append {len(extra)} bytes", bytes(b) + extra
    if kind in ("field", "field_consistent"):
        name, f, off = rng.choice(FIELDS)
        if name == "reserved":
            off += rng.randrange(24)
        val = rng.choice(INTERESTING[f])
        struct.pack_into("<" + f, b, off, val)
        if kind == "field":
            return f"set {name}={val!r}", bytes(b)
        # Make total_bytes and the buffer length agree with the new fields, so that the
        # body is what gets tested.
        h = dict(zip([n for n, _, _ in FIELDS[:11]], HEADER.unpack(bytes(b[:64]))[:11],
                     strict=True))
        total = _layout_total(h)
        if total is None or total < 64 or total > 1 << 20:
            return f"set {name}={val!r} (no consistent layout)", bytes(b)
        struct.pack_into("<Q", b, 32, total)
        body = bytes(b[64:total]) + bytes(rng.randrange(256) for _ in range(total - len(b)))
        return f"set {name}={val!r}, total_bytes={total}, resized", bytes(b[:64]) + body[
            : total - 64]
    if kind == "index":
        codec, numel, k = b[6], *struct.unpack_from("<QQ", b, 16)
        if codec != 2 or k == 0:
            return mutate(rng, p, "flip")
        j = rng.randrange(k)
        cur = struct.unpack_from("<i", b, 64 + 4 * j)[0]
        prev = struct.unpack_from("<i", b, 64 + 4 * (j - 1))[0] if j else -1
        val = rng.choice([-1, -(2**31), numel, numel + 1, 2**31 - 1, prev, prev - 1, cur + 1,
                          0, numel - 1])
        struct.pack_into("<i", b, 64 + 4 * j, val)
        return f"index[{j}] {cur} -> {val} (numel {numel}, k {k})", bytes(b)
    if kind == "random_body":
        return "random body", bytes(b[:64]) + bytes(rng.randrange(256) for _ in b[64:])
    if kind == "random":
        n = rng.choice([0, 3, 64, 96, 128, 300])
        return f"{n} random bytes", bytes(rng.randrange(256) for _ in range(n))
    raise ValueError(kind)


def _tensor(data: bytes):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.zeros(0, dtype=torch.uint8)


def _outcome(fn):
    """("ok", value) or ("raise", exception) for ValueError/TypeError; other exceptions
    propagate to the caller as findings."""
    try:
        return "ok", fn()
    except (ValueError, TypeError) as e:
        return "raise", e


def _same(a, b) -> bool:
    import torch

    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ia = a.view(torch.int32 if a.dtype == torch.float32 else torch.int16)
    ib = b.view(ia.dtype)
    return bool(((ia == ib) | (torch.isnan(a) & torch.isnan(b))).all())


MAX_DECODE = 1 << 22


def _decode_both(q, backend: str, device: str):
    """(reference outcome, backend outcome), or (message, None) for a finding."""
    import gradzip

    try:
        ref = _outcome(lambda: gradzip.dequantize(q, backend="torch"))
    except Exception as e:  # noqa: BLE001  (a finding, not a test error)
        return f"reference raised {type(e).__name__}: {e}", None
    try:
        got = _outcome(lambda: gradzip.dequantize(q.to(device), backend=backend))
    except Exception as e:  # noqa: BLE001
        return f"dequantize raised {type(e).__name__}: {e}", None
    return ref, got


def fuzz(backend: str, device: str, count: int, seed: int) -> list[dict]:
    """Run ``count`` mutated payloads through ``backend``; return the findings."""
    import gradzip
    import torch

    rng = random.Random(seed)
    bases = base_payloads()
    findings = []

    def finding(case, desc, what):
        findings.append({"case": case, "payload": desc, "problem": what})

    for case in range(count):
        name, base = rng.choice(bases)
        kind = KINDS[case % len(KINDS)]
        if kind == "shuffle_rows":  # a valid payload of another codec of the same size
            same = [p for n, p in bases if p.numel() == base.numel() and n != name]
            desc, data = ("another codec of the same size", bytes(
                same[0].numpy().tobytes())) if same else mutate(rng, bytes(
                    base.numpy().tobytes()), "flip")
        else:
            desc, data = mutate(rng, bytes(base.numpy().tobytes()), kind)
        desc = f"{name}: {desc}"
        print(f"CASE {case} {desc}", file=sys.stderr, flush=True)
        q = _tensor(data)
        try:
            numel = gradzip.format.parse_header(q).numel
        except (ValueError, TypeError):
            numel = None
        if numel is not None and numel > MAX_DECODE:
            # A top-k header's numel is not bounded by the payload's length: a corrupted
            # numel that still validates would make dequantize allocate numel floats
            # (up to 8 GiB below 2**31). Only the accumulate path (out's size fixed by
            # the caller) is exercised for those.
            numel = None
        else:
            numel = numel or 1000

        # 1. decode one payload
        if numel is None:
            ref = got = ("skip", None)
        else:
            ref, got = _decode_both(q, backend, device)
        if isinstance(ref, str):  # a finding
            finding(case, desc, ref)
            continue
        if got[0] == "ok" and ref[0] == "raise":
            finding(case, desc, f"dequantize accepted a payload the reference rejects "
                    f"({ref[1]})")
        elif got[0] == "raise" and ref[0] == "ok":
            finding(case, desc, f"dequantize rejected a payload the reference accepts: "
                    f"{got[1]}")
        elif got[0] == "ok" and not _same(got[1], ref[1]):
            finding(case, desc, "dequantize decoded differently from the reference")

        # 2. accumulate it among valid rows (same size), into a non-zero out
        good = [p for _, p in bases if p.numel() == q.numel()]
        rows = torch.stack(([good[0]] if good else []) + [q] + ([good[0]] if good else []))
        out_dtype = (torch.float32, torch.bfloat16)[case % 2]
        out0 = torch.linspace(-1, 1, numel or 1000).to(out_dtype)
        try:
            want_out = out0.clone()
            ref_acc = _outcome(lambda: gradzip.dequantize_accumulate(
                rows, want_out, 0.5, backend="torch"))  # noqa: B023
            out = out0.clone().to(device)
            got_acc = _outcome(lambda: gradzip.dequantize_accumulate(
                rows.to(device), out, 0.5, backend=backend))  # noqa: B023
        except Exception as e:  # noqa: BLE001
            finding(case, desc, f"accumulate raised {type(e).__name__}: {e}")
            continue
        if got_acc[0] == "raise":
            if not _same(out, out0):
                finding(case, desc, f"failed accumulate modified out ({got_acc[1]})")
            if ref_acc[0] == "ok":
                finding(case, desc, f"accumulate rejected rows the reference accepts: "
                        f"{got_acc[1]}")
        elif ref_acc[0] == "raise":
            finding(case, desc, f"accumulate accepted rows the reference rejects "
                    f"({ref_acc[1]})")
        elif not _same(out, want_out):
            finding(case, desc, "accumulate differs from the reference")
    return findings


# ---------------------------------------------------------------------------------------
# the tests: one child process per backend
# ---------------------------------------------------------------------------------------

import backends

CASES = 1000
LIGHT_CASES = 40  # the Triton interpreter takes ~0.1-1 s per launch


@pytest.mark.parametrize("target", backends.targets(["dequantize_accumulate"]))
def test_fuzz_decode_and_accumulate(target):
    count = LIGHT_CASES if target.light else CASES
    _run_child(target.backend, target.device, count, seed=20240601)


@pytest.mark.slow
@pytest.mark.parametrize("target", backends.targets(["dequantize_accumulate"], light=False))
def test_fuzz_more_seeds(target):
    for seed in (1, 2, 3):
        _run_child(target.backend, target.device, 3000, seed)


def _run_child(backend: str, device: str, count: int, seed: int) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, __file__, backend, device, str(count), str(seed)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("CASE ")]
    if proc.returncode != 0:
        sig = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        pytest.fail(f"{backend}/{device} fuzz child died ({sig}) on "
                    f"{last[-1] if last else 'startup'}\n{proc.stderr[-3000:]}")
    findings = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(last) == count, f"ran {len(last)} of {count} cases\n{proc.stderr[-2000:]}"
    if findings:
        lines = "\n".join(f"  case {f['case']}: {f['payload']}: {f['problem']}"
                          for f in findings[:15])
        pytest.fail(f"{backend}/{device}: {len(findings)} of {count} fuzz cases wrong "
                    f"(seed {seed}):\n{lines}")


if __name__ == "__main__":
    be, dev, n, s = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for f in fuzz(be, dev, n, s):
        print(json.dumps(f), flush=True)
