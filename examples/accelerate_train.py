"""Hugging Face Accelerate training with gradzip's compressed gradient all-reduce.

    torchrun --nproc_per_node=2 examples/accelerate_train.py      # 2 CPU processes
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no examples/accelerate_train.py          # the same, Accelerate's way
    torchrun --nproc_per_node=2 examples/accelerate_train.py --save state/ --steps 50
    torchrun --nproc_per_node=2 examples/accelerate_train.py --resume state/ --steps 50
    accelerate launch examples/accelerate_train.py --codec int8   # GPUs, as configured

(``--multi_gpu`` picks Accelerate's torchrun launcher; without a GPU the script asks for
the CPU and Accelerate runs DDP on Gloo. ``accelerate launch --cpu`` starts a single
process unless MPI is configured: nothing to compress, and ``register`` says so.)

Needs ``pip install 'gradzip[accelerate]'``. The only change to an ordinary Accelerate
loop is the ``register`` line after ``prepare`` (marked below): Accelerate's own
``DistributedDataParallelKwargs(comm_hook=...)`` accepts only PyTorch's built-in hooks.
``--save``/``--resume`` use ``accelerator.save_state``/``load_state``, which keep every
rank's residuals. At the end, the main process prints what was really sent.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from gradzip.integrations.accelerate import register
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def synthetic_data(n: int, width: int) -> TensorDataset:
    """Inputs and the outputs of a fixed random "teacher" network."""
    g = torch.Generator().manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, 10))
    x = torch.randn(n, 64, generator=g)
    with torch.no_grad():
        return TensorDataset(x, teacher(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", default="int4", help="gradzip codec spec")
    ap.add_argument("--algorithm", default="auto", choices=["auto", "allgather", "alltoall"])
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--save", default=None, help="directory for accelerator.save_state")
    ap.add_argument("--resume", default=None, help="directory to accelerator.load_state from")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)  # the same initial weights in every process
    model = nn.Sequential(nn.Linear(64, args.width), nn.GELU(), nn.Linear(args.width, args.width),
                          nn.GELU(), nn.Linear(args.width, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = DataLoader(synthetic_data(8192, args.width), batch_size=args.batch, shuffle=True)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    # ---- the one change: gradzip's hook on the DDP model prepare returned ------------------
    state = register(accelerator, model, codec=args.codec, algorithm=args.algorithm,
                     warmup_steps=args.warmup_steps)
    if args.resume:
        accelerator.load_state(args.resume)  # model, optimizer and every rank's residuals

    step, data = 0, iter(loader)
    while step < args.steps:
        try:
            x, y = next(data)
        except StopIteration:
            data = iter(loader)
            continue
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)  # averaged over the processes here, compressed
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            accelerator.print(f"step {step:4d}  loss {loss.item():.5f}")
        step += 1

    if args.save:
        accelerator.save_state(args.save)
    if state is not None and accelerator.is_main_process:
        print(state.stats_table())
    accelerator.end_training()


if __name__ == "__main__":
    main()
