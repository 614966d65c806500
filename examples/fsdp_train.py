"""A small transformer trained with FSDP2 (or HSDP) and gradzip's compressed gradients.

Run on CPU with Gloo, 4 processes on one machine:

    torchrun --nproc-per-node 4 examples/fsdp_train.py                  # FSDP, int8 reduce-scatter
    torchrun --nproc-per-node 4 examples/fsdp_train.py --hsdp           # 2x2 HSDP, int4 replica hop
    torchrun --nproc-per-node 4 examples/fsdp_train.py --codec none     # uncompressed, to compare

On two hosts, start it on each with ``torchrun --nnodes 2 --nproc-per-node N
--rdzv-backend c10d --rdzv-endpoint HOST0:29400`` (``--device cuda`` for NCCL); with
``--hsdp`` the ranks of one host form the shard group and the slow inter-host hop is the
replica all-reduce that gradzip compresses.
"""

from __future__ import annotations

import argparse
import os
import time

import gradzip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int = 128, layers: int = 4, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def corpus() -> torch.Tensor:
    """Python's own reference documentation (ships with CPython), as character ids."""
    from pydoc_data import topics

    text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
    chars = sorted(set(text))
    ids = {c: i for i, c in enumerate(chars)}
    return torch.tensor([ids[c] for c in text], dtype=torch.long), len(chars)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--codec", default="int8", help="gradzip codec, or 'none'")
    p.add_argument("--hsdp", action="store_true",
                   help="shard within a node, replicate across nodes (2-D mesh)")
    p.add_argument("--nodes", type=int, default=2, help="replicas with --hsdp")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    backend = "nccl" if a.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    data, vocab = corpus()
    torch.manual_seed(0)
    model = TinyGPT(vocab, a.ctx).to(a.device)

    if a.hsdp:
        mesh = init_device_mesh(a.device, (a.nodes, world // a.nodes),
                                mesh_dim_names=("replicate", "shard"))
        shard_mesh = mesh["shard"]
    else:
        shard_mesh = init_device_mesh(a.device, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    state = None
    if a.codec != "none":
        if a.hsdp:  # the replica all-reduce (the inter-node hop) through gradzip
            state = gradzip.fsdp.enable(model, a.codec, reduce_scatter=False,
                                        replicate_group=mesh["replicate"].get_group())
        else:  # FSDP's reduce-scatter through gradzip
            state = gradzip.fsdp.enable(model, a.codec)
    elif a.hsdp:  # uncompressed: the same replica all-reduce, plain
        group = mesh["replicate"].get_group()
        for m in [*model.blocks, model]:
            m.set_all_reduce_hook(lambda g: dist.all_reduce(g.div_(a.nodes), group=group))

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(rank)
    t0 = time.perf_counter()
    for step in range(a.steps):
        starts = torch.randint(0, len(data) - a.ctx - 1, (a.batch,), generator=gen)
        x = torch.stack([data[s : s + a.ctx] for s in starts.tolist()]).to(a.device)
        y = torch.stack([data[s + 1 : s + 1 + a.ctx] for s in starts.tolist()]).to(a.device)
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 20 == 0 or step == a.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.1f} s",
                  flush=True)
    stats = state.stats() if state is not None else []
    if rank == 0 and stats:
        sent = sum(r["bytes_sent"] for r in stats)
        plain = sum(r["bytes_uncompressed"] for r in stats)
        print(f"gradzip {a.codec}: this rank sent {sent} bytes per step where uncompressed "
              f"sends {plain} ({plain / max(sent, 1):.2f}x less); per module and hop:")
        for r in stats:
            print(f"  {r['hop']:14s} {r['module'] or '<root>':10s} {r['algorithm']:10s} "
                  f"{r['bytes_sent']:>9d} / {r['bytes_uncompressed']:>9d} bytes")
        print("  ('auto' settles on the plain collective where compressing does not pay, e.g. "
              "on one machine's loopback)")
    if rank == 0 and state is not None:
        mem = state.memory_bytes()
        n = sum(p.numel() for p in TinyGPT(vocab, a.ctx).parameters())
        print(f"gradzip {a.codec}: residual memory per rank {mem} bytes for {n} parameters "
              f"({sum(mem.values()) / n:.2f} bytes/parameter)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
