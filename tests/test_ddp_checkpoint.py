"""gradzip.ddp.CompressionState as a ``Stateful`` in ``torch.distributed.checkpoint``.

DCP writes a plain tensor or value of a state dict once, as if every rank held the same;
gradzip's residuals differ per rank. The runs below save model, optimizer and compression
state with ``dcp.save`` on 2 Gloo ranks, rebuild everything from scratch, ``dcp.load`` and
check that each rank got its own residuals back (rank 1's differ from rank 0's, so a
de-duplicated copy would be caught) and that training continues bit-identically with the
run that never stopped. Then the bad cases: another world size, another codec, another
rank's state, a v1 state_dict.
"""

from __future__ import annotations

import io

import gradzip
import gradzip.ddp
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_helpers import run_ranks
from test_ddp import build, flat_params, step
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

pytestmark = pytest.mark.distributed

SAVE_AT, STEPS = 5, 9
CODECS = ["int4", "topk:0.05"]


def _residuals(state) -> dict:
    """The worker residuals this rank holds, by key (CPU copies)."""
    return {k: v["worker"].clone() for k, v in state.feedback.state_dict()["slots"].items()}


def save_and_resume(rank, world, ckdir, codec):
    model, opt, state = build(codec, algorithm="allgather", warmup=2)
    for t in range(SAVE_AT):
        step(model, opt, rank, t)
    saved = _residuals(state)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "gradzip": state}, checkpoint_id=ckdir)
    for t in range(SAVE_AT, STEPS):
        step(model, opt, rank, t)
    whole = flat_params(model)
    del model, opt, state

    model, opt, state = build(codec, algorithm="allgather", warmup=2)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd, "gradzip": state}
    dcp.load(sd, checkpoint_id=ckdir)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    loaded = _residuals(state)
    iteration = state.iteration
    for t in range(SAVE_AT, STEPS):
        step(model, opt, rank, t)
    return {"whole": whole, "resumed": flat_params(model), "saved": saved, "loaded": loaded,
            "iteration": iteration}


def load_into(rank, world, ckdir, codec):
    """Try to load a checkpoint: (error type and message or None, model untouched?,
    compression state untouched?)."""
    model, opt, state = build(codec, algorithm="allgather", warmup=2)
    before = flat_params(model)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd, "gradzip": state}
    error = None
    try:
        dcp.load(sd, checkpoint_id=ckdir)
    # DCP's CheckpointException derives from BaseException; the parent checks the message
    except BaseException as e:  # noqa: BLE001
        error = (type(e).__name__, str(e))
    untouched = state.iteration == 0 and not state.feedback.keys() and \
        not state.buckets.layouts
    return error, torch.equal(before, flat_params(model)), untouched


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for codec in CODECS:
        ckdir = str(tmp_path_factory.mktemp(codec.replace(":", "_")))
        out[codec] = (ckdir, run_ranks(2, save_and_resume, ckdir, codec))
    return out


@pytest.mark.parametrize("codec", CODECS)
def test_each_rank_gets_its_own_residuals_back(saved, codec):
    _, res = saved[codec]
    for r in range(2):
        assert res[r]["saved"].keys() == res[r]["loaded"].keys() and res[r]["saved"]
        for key, t in res[r]["saved"].items():
            assert torch.equal(res[r]["loaded"][key], t), (r, key)
        assert res[r]["iteration"] == SAVE_AT
    # the ranks' residuals differ, so rank 1 did not get rank 0's copy
    assert any(not torch.equal(res[0]["saved"][k], res[1]["saved"][k]) for k in res[0]["saved"])


@pytest.mark.parametrize("codec", CODECS)
def test_resumed_run_is_bit_identical(saved, codec):
    _, res = saved[codec]
    for r in range(2):
        assert torch.equal(res[r]["whole"], res[r]["resumed"]), r
    assert torch.equal(res[0]["resumed"], res[1]["resumed"])


def test_another_world_size_fails_before_anything_is_loaded(saved):
    """3 ranks ask for keys 'rank{r}_of_3', which a 2-rank checkpoint does not have: DCP's
    planner refuses on every rank before reading, so the model is not touched either."""
    ckdir, _ = saved["int4"]
    res = run_ranks(3, load_into, ckdir, "int4")
    for r, (error, model_untouched, state_untouched) in enumerate(res):
        assert error is not None and f"gradzip.rank{r}_of_3" in error[1], (r, error)
        assert model_untouched and state_untouched, r


def test_another_codec_is_refused_and_nothing_is_half_loaded(saved):
    ckdir, _ = saved["int4"]
    res = run_ranks(2, load_into, ckdir, "int8")
    for error, _, state_untouched in res:
        assert error is not None and "saved with codec 'int4'" in error[1], error
        assert state_untouched


# ---- the state_dict itself, without DCP ---------------------------------------------------


def _trained_state_dicts(rank, world):
    model, opt, state = build("int4", algorithm="allgather", warmup=0)
    for t in range(3):
        step(model, opt, rank, t)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    out = {"sd": buf.getvalue()}
    # another rank's state is refused, and the state stays as it was
    others = [None] * world
    dist.all_gather_object(others, out["sd"])
    fresh = gradzip.ddp.CompressionState("int4")
    try:
        fresh.load_state_dict(torch.load(io.BytesIO(others[(rank + 1) % world]),
                                         weights_only=True))
        out["wrong-rank"] = None
    except ValueError as e:
        out["wrong-rank"] = str(e)
    out["wrong-rank-untouched"] = not fresh.feedback.keys() and fresh.iteration == 0
    own = gradzip.ddp.CompressionState("int4")
    own.load_state_dict(torch.load(io.BytesIO(out["sd"]), weights_only=True))
    out["own-iteration"] = own.iteration
    return out


def test_torch_save_per_rank_and_wrong_rank():
    res = run_ranks(2, _trained_state_dicts)
    for r in range(2):
        sd = torch.load(io.BytesIO(res[r]["sd"]), weights_only=True)
        assert sd["version"] == 2 and sd["world_size"] == 2 and sd["iteration"] == 3
        assert [k for k in sd if k.startswith("rank")] == [f"rank{r}_of_2"]
        assert isinstance(sd[f"rank{r}_of_2"], bytes)
        assert len(sd["layouts"]) >= 1
        assert f"not rank {r}'s" in res[r]["wrong-rank"] and res[r]["wrong-rank-untouched"]
        assert res[r]["own-iteration"] == 3


def test_world_size_and_version_checks_without_a_process_group():
    state = gradzip.ddp.CompressionState("int4")
    sd = state.state_dict()
    assert list(sd) == ["version", "codec", "world_size", "iteration", "layouts", "rank0_of_1"]
    bad = dict(sd, world_size=4)
    with pytest.raises(ValueError, match="saved by a run of 4 ranks, this run has 1"):
        state.load_state_dict(bad)
    with pytest.raises(ValueError, match="not a gradzip.ddp.CompressionState"):
        state.load_state_dict({"version": 3})


def test_a_version_1_state_dict_still_loads():
    """gradzip 0.1's per-rank dict (no rank key) is read as before."""
    state = gradzip.ddp.CompressionState("int4")
    feedback = gradzip.ErrorFeedback()
    feedback.set_residual(("bucket", (0, 1)), torch.arange(6, dtype=torch.float32), step=4)
    v1 = {"version": 1, "codec": "int4", "iteration": 7, "rank": 0, "world_size": 1,
          "numels": {0: 2, 1: 4}, "layouts": {("bucket", (0, 1)): ((0, 0, 2), (1, 2, 4))},
          "owner": {0: ("bucket", (0, 1)), 1: ("bucket", (0, 1))},
          "order": [((0, 0, 2), (1, 2, 4))], "feedback": feedback.state_dict()}
    state.load_state_dict(v1)
    assert state.iteration == 7
    assert torch.equal(state.feedback.residual(("bucket", (0, 1))),
                       torch.arange(6, dtype=torch.float32))
    assert state.feedback.step(("bucket", (0, 1))) == 4
