"""PyTorch Lightning training with gradzip's compressed gradient all-reduce.

    python examples/lightning_train.py                      # 2 CPU processes (Lightning starts them)
    python examples/lightning_train.py --codec int8 --devices 4
    python examples/lightning_train.py --save ckpt/last.ckpt --epochs 2
    python examples/lightning_train.py --resume ckpt/last.ckpt --epochs 3
    python examples/lightning_train.py --accelerator gpu --devices 8

Needs ``pip install 'gradzip[lightning]'``. The only change to an ordinary Lightning script
is the strategy (marked below). ``GradzipDDPStrategy`` registers the hook on every device
type (Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` does so only on CUDA) and keeps
every rank's residuals in Lightning's checkpoints, so ``--resume`` continues where the
saved run stopped. At the end, rank 0 prints what was really sent.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from gradzip.integrations.lightning import GradzipDDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regression(L.LightningModule):
    """A small MLP learning a fixed random "teacher" network from synthetic data."""

    def __init__(self, width: int, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width),
                                 nn.GELU(), nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def synthetic_data(n: int, width: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, 10))
    x = torch.randn(n, 64, generator=g)
    with torch.no_grad():
        y = teacher(x)
    return TensorDataset(x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", default="int4", help="gradzip codec spec")
    ap.add_argument("--algorithm", default="auto", choices=["auto", "allgather", "alltoall"])
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--save", default=None, help="checkpoint file to write at the end")
    ap.add_argument("--resume", default=None, help="checkpoint file to resume from")
    args = ap.parse_args()

    torch.manual_seed(0)  # the same initial weights in every process
    model = Regression(args.width, args.lr)
    data = DataLoader(synthetic_data(4096, args.width), batch_size=args.batch, shuffle=True)
    # ---- the one change: gradzip's strategy ----------------------------------------------
    strategy = GradzipDDPStrategy(codec=args.codec, algorithm=args.algorithm,
                                  warmup_steps=args.warmup_steps)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy,
                        max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(model, data, ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)  # every rank's residuals, written by rank 0
    if trainer.is_global_zero:
        print(f"final loss {float(trainer.callback_metrics['loss']):.5f}")
        print(strategy.compression_state.stats_table())


if __name__ == "__main__":
    main()
