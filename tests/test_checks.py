"""gradzip._checks: the one definition of the legal values and the shared checks, and the
fake kernels refusing what the real operators refuse."""

from __future__ import annotations

import gradzip
import inputs
import pytest
import torch
from gradzip import _checks, codecs, ops, reference
from torch._subclasses.fake_tensor import FakeTensorMode


def test_one_definition_of_each_value_set():
    assert ops.BACKENDS is _checks.BACKENDS
    assert _checks.ROUNDINGS == ("nearest", "stochastic")
    assert _checks.FLOAT_DTYPES == (torch.float32, torch.float16, torch.bfloat16)
    assert not hasattr(codecs, "BACKENDS") and not hasattr(codecs, "ROUNDINGS")


@pytest.mark.parametrize("seed", [True, False, -1, 2**32, 1.0, "3", None])
def test_seed_check_rejects_bools_and_out_of_range(seed):
    with pytest.raises(ValueError, match="seed must be an int in"):
        _checks.check_seed(seed)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1])
def test_seed_check_accepts(seed):
    _checks.check_seed(seed)


def test_check_nonnegative_int():
    for ok in (0, 1, 2**40):
        _checks.check_nonnegative_int(ok, "min_numel")
    for bad in (-1, True, False, 1.0, "1", None):
        with pytest.raises(ValueError, match="min_numel must be a non-negative int, got"):
            _checks.check_nonnegative_int(bad, "min_numel")


def test_check_choice():
    _checks.check_choice("plain", ("auto", "plain"), "algorithm")
    with pytest.raises(ValueError, match=r"algorithm must be one of \('auto', 'plain'\), "
                                         r"got 'ring'"):
        _checks.check_choice("ring", ("auto", "plain"), "algorithm")
    with pytest.raises(ValueError, match="values must be one of"):
        _checks.check_choice("fp16", {"fp32": 1, "bf16": 2}, "values")


# ---- the fake kernels run the operators' checks ------------------------------------------

X = inputs.grad_like(300, seed=2)
PAYLOADS = torch.stack([reference.quantize_pack(X, 8, 128)] * 2)


def _fake(*tensors):
    mode = FakeTensorMode()
    return mode, [None if t is None else mode.from_tensor(t) for t in tensors]


@pytest.mark.parametrize("args,exc,match", [
    ((X, 3, 128, None, False, 0), ValueError, "bits must be one of"),
    ((X, 8, 100, None, False, 0), ValueError, "block must be a power of two"),
    ((X, 1, 128, None, True, 0), ValueError, "stochastic rounding is not defined"),
    ((X, 8, 128, None, False, -1), ValueError, "seed must be an int"),
    ((X.double(), 8, 128, None, False, 0), TypeError, "x must be float32"),
    ((X, 8, 128, torch.zeros(299), False, 0), ValueError, "residual has 299 elements"),
])
def test_quantize_pack_fake_checks(args, exc, match):
    mode, (x, r) = _fake(args[0], args[3])
    with mode, pytest.raises(exc, match=match):
        torch.ops.gradzip.quantize_pack(x, args[1], args[2], r, *args[4:])


@pytest.mark.parametrize("args,exc,match", [
    ((X, 0, None, True, 1, 0), ValueError, "k must be at least 1"),
    ((X, 301, None, True, 1, 0), ValueError, "larger than"),
    ((X, 5, None, True, 4, 0), ValueError, "value_format"),
    ((X, 5, None, True, 1, 2**32), ValueError, "seed"),
    ((X, 5, torch.zeros(300, dtype=torch.float16), True, 1, 0), TypeError, "residual"),
])
def test_topk_select_fake_checks(args, exc, match):
    mode, (x, r) = _fake(args[0], args[2])
    with mode, pytest.raises(exc, match=match):
        torch.ops.gradzip.topk_select(x, args[1], r, *args[3:])


@pytest.mark.parametrize("payloads,out,exc,match", [
    (PAYLOADS.float(), torch.zeros(300), TypeError, "uint8"),
    (PAYLOADS[0], torch.zeros(300), ValueError, r"\[W, P\]"),
    (PAYLOADS[:0], torch.zeros(300), ValueError, "at least one payload"),
    (PAYLOADS, torch.zeros(300, dtype=torch.int32), TypeError, "out must be float32"),
    (PAYLOADS, torch.zeros(600)[::2], ValueError, "out must be contiguous"),
])
def test_dequantize_accumulate_fake_checks(payloads, out, exc, match):
    mode, (p, o) = _fake(payloads, out)
    with mode, pytest.raises(exc, match=match):
        torch.ops.gradzip.dequantize_accumulate(p, o, 1.0)


def test_fake_kernels_accept_what_the_operators_accept():
    """Fake tensors have no memory: the residual-aliasing check must not mistake their
    data pointers (all 0) for shared memory."""
    mode, (x, r, p, o) = _fake(X, torch.zeros(300), PAYLOADS, torch.zeros(300))
    with mode:
        q = torch.ops.gradzip.quantize_pack(x, 4, 64, r, True, 7)
        t = torch.ops.gradzip.topk_select(x, 30, r, False, 3, 7)
        torch.ops.gradzip.dequantize_accumulate(p, o, 0.5)
    assert q.shape == (gradzip.compressed_size(300, bits=4, block=64),)
    assert t.shape == (gradzip.compressed_size(300, k=30, values="int8"),)
