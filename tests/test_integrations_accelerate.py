"""gradzip.integrations.accelerate.register: an Accelerate training loop on 2 CPU processes.

Each rank is one of dist_helpers' Gloo processes with the variables ``accelerate launch``
sets; Accelerate finds the process group and wraps the model in DDP (MULTI_CPU). A run of
9 steps is compared with 5 steps, ``accelerator.save_state``, a fresh model and
Accelerator, ``load_state`` and 4 more steps.
"""

from __future__ import annotations

import os
import types

import pytest

pytest.importorskip("accelerate", reason="Hugging Face Accelerate is not installed "
                                         "(pip install 'gradzip[accelerate]')")

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import DDPCommunicationHookType
from dist_helpers import run_ranks
from gradzip.integrations.accelerate import register
from torch import nn

pytestmark = pytest.mark.distributed

SAVE_AT, STEPS = 5, 9


def _as_launched(rank: int, world: int) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29556")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(7919 * rank + step)
    x = torch.randn(32, 16, generator=g)
    return x, torch.tanh(x[:, :4])


def _prepared(**kwargs):
    accelerator = Accelerator(cpu=True, **kwargs)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    return accelerator, model, opt


def _train(accelerator, model, opt, rank, steps):
    for t in steps:
        x, y = _batch(rank, t)
        opt.zero_grad()
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        opt.step()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _residuals(state) -> dict:
    return {k: v["worker"].clone() for k, v in state.feedback.state_dict()["slots"].items()}


def accelerate_run(rank, world, outdir):
    _as_launched(rank, world)
    out = {}
    accelerator, model, opt = _prepared()
    out["type"] = accelerator.distributed_type.name
    state = register(accelerator, model, "int4", algorithm="allgather", warmup_steps=1,
                     min_numel=1000)
    _train(accelerator, model, opt, rank, range(STEPS))
    out["whole"], out["stats"] = _flat(model), state.stats()

    accelerator, model, opt = _prepared()
    state = register(accelerator, model, "int4", algorithm="allgather", warmup_steps=1,
                     min_numel=1000)
    _train(accelerator, model, opt, rank, range(SAVE_AT))
    accelerator.save_state(outdir)
    out["saved"] = _residuals(state)

    accelerator, model, opt = _prepared()
    state = register(accelerator, model, "int4", algorithm="allgather", warmup_steps=1,
                     min_numel=1000)
    accelerator.load_state(outdir)
    out["restored"], out["iteration"] = _residuals(state), state.iteration
    _train(accelerator, model, opt, rank, range(SAVE_AT, STEPS))
    out["resumed"] = _flat(model)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("accelerate"))
    return run_ranks(2, accelerate_run, outdir, deadline=300)


def test_accelerate_wraps_in_ddp_and_the_hook_runs(runs):
    for r in range(2):
        assert runs[r]["type"] == "MULTI_CPU"
        st = runs[r]["stats"]
        assert st["iterations"] == STEPS
        assert sum(b["compressed_calls"] for b in st["buckets"]) == STEPS - 1  # warm-up 1
        assert st["bytes_sent"] < st["uncompressed_bytes"] / 2
    assert torch.equal(runs[0]["whole"], runs[1]["whole"])


def test_save_state_and_load_state_keep_each_ranks_residuals(runs):
    for r in range(2):
        saved, restored = runs[r]["saved"], runs[r]["restored"]
        assert saved and saved.keys() == restored.keys()
        assert all(torch.equal(saved[k], restored[k]) for k in saved), r
        assert runs[r]["iteration"] == SAVE_AT
    assert any(not torch.equal(runs[0]["saved"][k], runs[1]["saved"][k])
               for k in runs[0]["saved"])


def test_resumed_loop_equals_the_uninterrupted_one(runs):
    for r in range(2):
        assert torch.equal(runs[r]["whole"], runs[r]["resumed"]), r


def bad_models(rank, world):
    _as_launched(rank, world)
    errors = {}
    accelerator, model, _ = _prepared()
    try:
        register(accelerator, model.module, "int4")  # the unwrapped module
    except TypeError as e:
        errors["not-ddp"] = str(e)
    fp16 = DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.FP16)
    accelerator, model, _ = _prepared(kwargs_handlers=[fp16])
    try:
        register(accelerator, model, "int4")
    except ValueError as e:
        errors["hooked"] = str(e)
    return errors


def test_a_model_that_is_not_ddp_or_already_hooked_is_refused():
    for errors in run_ranks(2, bad_models, deadline=200):
        assert "needs the DistributedDataParallel model" in errors["not-ddp"]
        assert "already has a communication hook" in errors["hooked"]


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED,
                                  DistributedType.MEGATRON_LM])
def test_accelerate_configured_for_something_else_is_refused(kind):
    """What register reads of the Accelerator (its distributed type and process count),
    as an Accelerator configured for FSDP, DeepSpeed or Megatron-LM reports them."""
    accelerator = types.SimpleNamespace(distributed_type=kind, num_processes=2)
    with pytest.raises(ValueError, match=f"configured for {kind.name}.*Supported: "
                                         "Accelerate's DDP"):
        register(accelerator, nn.Linear(2, 2), "int4")


def test_unknown_codec_and_single_process():
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)
    with pytest.raises(ValueError, match="unknown codec"):
        register(accelerator, nn.Linear(2, 2), "int5")
    with pytest.warns(UserWarning, match="single process"):
        assert register(accelerator, nn.Linear(2, 2), "int4") is None
