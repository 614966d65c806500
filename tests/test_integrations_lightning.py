"""gradzip.integrations.lightning.GradzipDDPStrategy: Lightning training on 2 CPU processes.

Each rank is one of dist_helpers' Gloo processes; Lightning sees ``LOCAL_RANK`` and an
initialised process group, as under ``torchrun``, and runs its DDP strategy in them. A run
of 3 epochs is compared with a run of 2 epochs, a Lightning checkpoint, and a resumed
third epoch.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("lightning", reason="PyTorch Lightning is not installed "
                                        "(pip install 'gradzip[lightning]')")

import lightning as L
import torch
from dist_helpers import run_ranks
from gradzip.integrations.lightning import CHECKPOINT_KEY, GradzipDDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.distributed

MIN_NUMEL = 1000  # _Net's 5508 parameters fit DDP's default bucket: one bucket, compressed


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 16, generator=g)
    y = torch.tanh(x[:, :4]) + 0.1 * x[:, 4:8]
    return DataLoader(TensorDataset(x, y), batch_size=16)  # 3 steps per epoch per rank


class _Residuals(L.Callback):
    """The compression state's residuals when training starts (after a restore)."""

    def on_train_start(self, trainer, pl_module):
        self.at_start = _residuals(trainer.strategy.compression_state)


def _residuals(state) -> dict:
    return {k: v["worker"].clone() for k, v in state.feedback.state_dict()["slots"].items()}


def _trainer(world, root, epochs, **strategy_kwargs):
    strategy = GradzipDDPStrategy(codec="int4", algorithm="allgather", warmup_steps=1,
                                  min_numel=MIN_NUMEL, **strategy_kwargs)
    return L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_epochs=epochs,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root,
                     callbacks=[_Residuals()])


def _as_launched(rank: int, world: int) -> None:
    # what torchrun sets: Lightning then uses the processes (and process group) it finds
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def train_save_resume(rank, world, root):
    _as_launched(rank, world)
    out = {}
    whole = _Net()
    t = _trainer(world, root, 3)
    t.fit(whole, _data())
    out["whole"] = flat(whole)
    out["stats"] = t.strategy.compression_state.stats()

    first = _Net()
    t = _trainer(world, root, 2)
    t.fit(first, _data())
    ckpt = os.path.join(root, "two_epochs.ckpt")
    t.save_checkpoint(ckpt)
    out["saved"] = _residuals(t.strategy.compression_state)

    resumed = _Net()
    t = _trainer(world, root, 3)
    t.fit(resumed, _data(), ckpt_path=ckpt)
    out["restored"] = next(c for c in t.callbacks if isinstance(c, _Residuals)).at_start
    out["resumed"] = flat(resumed)
    out["checkpoint_keys"] = sorted(torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY])
    return out


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lightning"))
    return root, run_ranks(2, train_save_resume, root, deadline=400)


def test_the_hook_ran_on_cpu(lightning_runs):
    """Lightning's DDPStrategy would not register a hook on CPU; this one does: the
    weight bucket was compressed after the warm-up step, every step."""
    _, res = lightning_runs
    for r in range(2):
        st = res[r]["stats"]
        assert st["iterations"] == 9
        assert sum(b["compressed_calls"] for b in st["buckets"]) == 8
        assert st["bytes_sent"] < st["uncompressed_bytes"] / 2
    assert torch.equal(res[0]["whole"], res[1]["whole"])


def test_checkpoint_holds_every_rank_and_resume_restores_the_residuals(lightning_runs):
    _, res = lightning_runs
    assert res[0]["checkpoint_keys"] == ["codec", "iteration", "layouts", "rank0_of_2",
                                         "rank1_of_2", "version", "world_size"]
    for r in range(2):
        saved, restored = res[r]["saved"], res[r]["restored"]
        assert saved and saved.keys() == restored.keys()
        assert all(torch.equal(saved[k], restored[k]) for k in saved), r
    assert any(not torch.equal(res[0]["saved"][k], res[1]["saved"][k]) for k in res[0]["saved"])


def test_resumed_run_equals_the_uninterrupted_one(lightning_runs):
    _, res = lightning_runs
    for r in range(2):
        assert torch.equal(res[r]["whole"], res[r]["resumed"]), r


def resume_on_one_rank(rank, world, root):
    _as_launched(rank, world)
    model = _Net()
    before = flat(model)
    t = _trainer(world, root, 3)
    try:
        t.fit(model, _data(), ckpt_path=os.path.join(root, "two_epochs.ckpt"))
    except ValueError as e:
        return str(e), torch.equal(before, flat(model))
    return None, None


def test_another_world_size_is_refused_before_the_weights_load(lightning_runs):
    root, _ = lightning_runs
    [(error, untouched)] = run_ranks(1, resume_on_one_rank, root, deadline=200)
    assert error is not None and "saved by a run of 2 ranks, this run has 1" in error
    assert untouched


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown codec"):
        GradzipDDPStrategy(codec="int5")
    with pytest.raises(ValueError, match="cannot take ddp_comm_hook"):
        GradzipDDPStrategy(codec="int4", ddp_comm_hook=lambda s, b: None)
    with pytest.raises(ValueError, match="top-k"):
        GradzipDDPStrategy(codec="topk:2.0")


def second_hook(rank, world):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    strategy = GradzipDDPStrategy(codec="int4")
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
    model.register_comm_hook(None, allreduce_hook)
    strategy.model = model
    try:
        strategy._register_ddp_hooks()
    except ValueError as e:
        return str(e)
    return None


def test_a_model_that_already_has_a_hook_is_refused():
    for err in run_ranks(2, second_hook):
        assert err is not None and "already has a communication hook" in err
