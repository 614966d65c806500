"""DDP training with gradzip vs fp32 and PyTorch's compression hooks, on an emulated link.

    python bench/train.py                       # both tasks, every method, 4 ranks, 1gbit
    python bench/train.py --quick --link none   # smoke test (a few steps, tiny models)

Tasks (real data that ships with an installed package; nothing is downloaded):

* ``digits``  scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1797
  8x8 grey images, 10 classes; 80/20 split with a fixed permutation) and a small CNN
  (two 3x3 convolutions, max-pool, two linear layers; 0.28 M parameters), SGD with
  momentum.
* ``chargpt``  a character-level decoder-only transformer on the English text of Python's
  own reference documentation as shipped with CPython in ``pydoc_data/topics.py`` (the
  text behind ``help('if')`` etc.; 465 k characters, 103 distinct; 90/10 split by
  position), AdamW.
* ``autoenc``  a regression task of another kind: an MLP autoencoder (64 -> 512 -> 512 ->
  16 -> 512 -> 512 -> 64, GELU; 0.6 M parameters) that reconstructs scikit-learn's digits
  images (mean squared error) through a 16-number bottleneck, Adam (AdamW with
  ``weight_decay=0``). Little compute per parameter, so its steps are link-bound. Its
  "accuracy" column is the held-out R² of the reconstruction.

Methods (``--methods``): ``fp32`` (DDP's default all-reduce), ``fp16_hook``
(``default_hooks.fp16_compress_hook``), ``powersgd_r4`` (``powerSGD_hook`` rank 4, error
feedback on as by default), ``gz:<codec>`` (``gradzip.ddp.compress_hook`` with error
feedback) and ``gz:<codec>:noef`` (the same without error feedback: the control that shows
what the residuals do), and for the Adam tasks ``gz-opt:<codec>`` (the task's AdamW
replaced by ``gradzip.optim.CompressedAdamW`` with the same hyperparameters, attached to
the DDP model: exact AdamW for its warm-up, then the frozen-variance compressed momentum;
options after ``+``: ``raw`` (the raw momentum travels, as in DeepSpeed's 1-bit Adam),
``allgather``, ``warmup<N>`` (default ``--opt-warmup``), ``refresh<N>``
(``variance_refresh``), ``refreshmax<N>`` (``refresh_max_interval``),
``refreshcodec:<codec>`` (``refresh_codec``), ``warmupcodec:<codec>`` (``warmup_codec``: the
warm-up's gradients averaged through it with error feedback), ``ownmomentum``
(``average_momentum=False``), ``block<N>`` (the codec's block size), ``local<N>`` (``local_steps``:
the ranks synchronise every N steps; evaluations inside an interval take rank 0's own model,
the final one and those after it the common model, synchronised inside the timed step),
e.g. ``gz-opt:int4+local6`` or ``gz-opt:int4+local7+refresh28+refreshmax28+refreshcodec:int8``. Every method starts from the same initial weights, sees the same
batches in the same order on every rank (seeded per rank), and has the same schedule; the
compressing methods (PowerSGD and gradzip) run the same number of uncompressed warm-up
steps (``--compress-warmup``).

Correctness before timing: before its timed run, each method trains a throwaway copy of
the model (same initial weights, other batches) for the uncompressed warm-up steps and two
more with its hook; the parameters must then be bit-identical on every rank and the losses
finite (bench/harness.py). A method that fails stops the run before it is timed, with exit
status 3.

Measured: training-set loss (a fixed subset of the training data, evaluated on rank 0 with
the model's current weights) and held-out accuracy every ``--eval-every`` steps, against
step and against wall time. Wall time is the sum of the training steps' times on rank 0
(forward, backward with the hooks' communication, optimizer step); evaluation is excluded
and the ranks meet at a barrier after each evaluation so none runs ahead while rank 0
evaluates.

Bytes per step: what one rank sends per step after the warm-up (and during it; for gz-opt
the mean over its compressed, synchronisation and variance-refresh steps, all also in the
JSON), computed from the model's parameters: ``gradzip.comm.plan(...).bytes_sent`` for
gradzip (for the hook's "auto", the algorithm it settled on),
``CompressedAdamW.bytes_after_warmup`` (from ``bytes_per_step``) for the optimizer, the ring all-reduce volume for fp32/fp16 and for PowerSGD's P and Q factors and
uncompressed tensors (the rules of ``powerSGD_hook``).

Writes JSON (``--out``), prints a summary table and draws a PNG next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # bench/harness.py: picks the gradzip build, so it comes before gradzip

# isort: split
import netlink

TASKS = ("digits", "chargpt", "autoenc")
TASK_STEPS = {"digits": 150, "chargpt": 300, "autoenc": 300}
DEFAULT_CODECS = ("int8", "int4", "sign", "topk:0.01")
ADAM_TASKS = ("chargpt", "autoenc")  # the tasks gz-opt:<codec> applies to
BASELINE_METHODS = ("fp32", "fp16_hook", "powersgd_r4")
PREFLIGHT_COMPRESSED_STEPS = 2  # steps after the uncompressed warm-up in the check


def default_methods() -> list[str]:
    ms = list(BASELINE_METHODS)
    for c in DEFAULT_CODECS:
        ms += [f"gz:{c}", f"gz:{c}:noef"]
    return ms


# ===========================================================================================
# tasks: data and models
# ===========================================================================================


class DigitsTask:
    """scikit-learn digits, small CNN, cross-entropy, SGD with momentum."""

    name = "digits"

    def __init__(self, cfg: dict):
        import torch
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        n_train = int(0.8 * len(y))
        self.xtr, self.ytr = x[perm[:n_train]], y[perm[:n_train]]
        self.xte, self.yte = x[perm[n_train:]], y[perm[n_train:]]
        self.batch = cfg["batch"] or 32
        self.width = 8 if cfg["quick"] else 32

    def model(self):
        from torch import nn

        w = self.width
        return nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * w * 16, 8 * w), nn.ReLU(), nn.Linear(8 * w, 10))

    def optimizer(self, params, cfg):
        import torch

        return torch.optim.SGD(params, lr=cfg["lr"] or 0.05, momentum=0.9)

    def batch_iter(self, gen):
        import torch

        while True:
            idx = torch.randint(0, len(self.ytr), (self.batch,), generator=gen)
            yield self.xtr[idx], self.ytr[idx]

    def loss(self, model, batch):
        import torch.nn.functional as F

        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model) -> tuple[float, float]:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            loss = float(F.cross_entropy(model(self.xtr), self.ytr))
            acc = float((model(self.xte).argmax(1) == self.yte).float().mean())
        return loss, acc


def load_corpus() -> tuple[str, str]:
    """Python's reference documentation text as shipped with CPython (pydoc_data.topics)."""
    from pydoc_data import topics

    text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
    return text, topics.__file__


class CharGPTTask:
    """Character-level decoder-only transformer on pydoc_data's text, AdamW."""

    name = "chargpt"

    def __init__(self, cfg: dict):
        import torch

        text, self.source = load_corpus()
        chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(data))
        self.train, self.val = data[:n], data[n:]
        self.vocab = len(chars)
        quick = cfg["quick"]
        self.ctx = 32 if quick else 64
        self.d = 32 if quick else 128
        self.layers = 1 if quick else 4
        self.heads = 2 if quick else 4
        self.batch = cfg["batch"] or 8
        g = torch.Generator().manual_seed(4321)
        n_eval = 16 if quick else 64
        self.eval_train = self._windows(self.train, n_eval, g)
        self.eval_val = self._windows(self.val, n_eval, g)

    def _windows(self, data, n, gen):
        import torch

        starts = torch.randint(0, len(data) - self.ctx - 1, (n,), generator=gen)
        x = torch.stack([data[s:s + self.ctx] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + 1 + self.ctx] for s in starts.tolist()])
        return x, y

    def model(self):
        return _make_gpt(self.vocab, self.ctx, self.d, self.layers, self.heads)

    def adam_args(self, cfg) -> dict:
        return {"lr": cfg["lr"] or 2e-3, "weight_decay": 0.01}

    def optimizer(self, params, cfg):
        import torch

        return torch.optim.AdamW(params, **self.adam_args(cfg))

    def batch_iter(self, gen):
        while True:
            yield self._windows(self.train, self.batch, gen)

    def loss(self, model, batch):
        import torch.nn.functional as F

        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def evaluate(self, model) -> tuple[float, float]:
        import torch

        with torch.no_grad():
            loss = float(self.loss(model, self.eval_train))
            x, y = self.eval_val
            acc = float((model(x).argmax(-1) == y).float().mean())
        return loss, acc


class AutoencTask:
    """MLP autoencoder of scikit-learn's digits (mean squared error), Adam."""

    name = "autoenc"

    def __init__(self, cfg: dict):
        import torch
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        n_train = int(0.8 * len(x))
        self.xtr, self.xte = x[perm[:n_train]], x[perm[n_train:]]
        self.batch = cfg["batch"] or 32
        self.width = 32 if cfg["quick"] else 512

    def model(self):
        from torch import nn

        w = self.width
        return nn.Sequential(
            nn.Linear(64, w), nn.GELU(), nn.Linear(w, w), nn.GELU(), nn.Linear(w, 16),
            nn.Linear(16, w), nn.GELU(), nn.Linear(w, w), nn.GELU(), nn.Linear(w, 64))

    def adam_args(self, cfg) -> dict:
        return {"lr": cfg["lr"] or 1e-3, "weight_decay": 0.0}

    def optimizer(self, params, cfg):
        import torch

        return torch.optim.AdamW(params, **self.adam_args(cfg))

    def batch_iter(self, gen):
        import torch

        while True:
            idx = torch.randint(0, len(self.xtr), (self.batch,), generator=gen)
            yield self.xtr[idx]

    def loss(self, model, batch):
        import torch.nn.functional as F

        return F.mse_loss(model(batch), batch)

    def evaluate(self, model) -> tuple[float, float]:
        """(training-set MSE, held-out R² of the reconstruction)."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            loss = float(F.mse_loss(model(self.xtr), self.xtr))
            err = float(F.mse_loss(model(self.xte), self.xte, reduction="sum"))
            var = float(((self.xte - self.xte.mean(0)) ** 2).sum())
        return loss, 1.0 - err / var


def _make_gpt(vocab: int, ctx: int, d: int, layers: int, heads: int):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 4 * d)
            self.out = nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, heads, d // heads).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.zeros(ctx, d))
            self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)

        def forward(self, idx):
            x = self.tok(idx) + self.pos[: idx.shape[1]]
            return self.head(self.ln(self.blocks(x)))

    return GPT()


def make_task(name: str, cfg: dict):
    if name == "digits":
        return DigitsTask(cfg)
    if name == "chargpt":
        return CharGPTTask(cfg)
    if name == "autoenc":
        return AutoencTask(cfg)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% (the same for every method)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


# ===========================================================================================
# worker (one rank, one method)
# ===========================================================================================


def register_method(model, method: str, cfg: dict):
    """Register the comm hook of ``method`` on the DDP ``model``; returns the hook state."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if method == "fp32":
        return None
    if method == "fp16_hook":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if method.startswith("powersgd_r"):
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=int(method[len("powersgd_r"):]),
            start_powerSGD_iter=max(2, cfg["compress_warmup"]), random_seed=cfg["seed"])
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    if method.startswith("gz-opt:"):
        return None  # build_optimizer attaches the optimizer, which installs its own hook
    if method.startswith("gz:"):
        import gradzip
        import gradzip.ddp

        spec = method[3:]
        ef = True
        if spec.endswith(":noef"):
            spec, ef = spec[: -len(":noef")], False
        state = gradzip.ddp.CompressionState(
            codec=gradzip.Codec(spec), process_group=None,
            warmup_steps=cfg["compress_warmup"], min_numel=cfg["min_numel"],
            algorithm=cfg["algorithm"], error_feedback=ef)
        model.register_comm_hook(state, gradzip.ddp.compress_hook)
        return state
    raise ValueError(f"unknown method {method!r}")


def opt_method(method: str, cfg: dict) -> tuple[str, dict]:
    """``gz-opt:<codec>[+option...]`` -> (codec spec, CompressedAdamW keyword arguments)."""
    spec, *options = method[len("gz-opt:"):].split("+")
    kw: dict = {"warmup_steps": cfg["opt_warmup"]}
    for o in options:
        if o == "raw":
            kw["precondition"] = False
        elif o == "allgather":
            kw["algorithm"] = "allgather"
        elif o.startswith("warmup") and o[len("warmup"):].isdigit():
            kw["warmup_steps"] = int(o[len("warmup"):])
        elif o.startswith("refresh") and o[len("refresh"):].isdigit():
            kw["variance_refresh"] = int(o[len("refresh"):])
        elif o.startswith("refreshmax") and o[len("refreshmax"):].isdigit():
            kw["refresh_max_interval"] = int(o[len("refreshmax"):])
        elif o.startswith("refreshcodec:"):
            kw["refresh_codec"] = o[len("refreshcodec:"):]
        elif o.startswith("warmupcodec:"):
            kw["warmup_codec"] = o[len("warmupcodec:"):]
        elif o.startswith("block") and o[len("block"):].isdigit():
            kw["block"] = int(o[len("block"):])
        elif o.startswith("local") and o[len("local"):].isdigit():
            kw["local_steps"] = int(o[len("local"):])
        elif o == "ownmomentum":
            kw["average_momentum"] = False
        else:
            raise ValueError(f"unknown gz-opt option {o!r} in {method!r} (raw, allgather, "
                             "warmup<N>, warmupcodec:<codec>, refresh<N>, refreshmax<N>, "
                             "refreshcodec:<codec>, block<N>, local<N>, ownmomentum)")
    return spec, kw


def build_optimizer(task, method: str, model, cfg: dict, warmup: int | None = None):
    """The task's optimizer, or for ``gz-opt:`` a CompressedAdamW with the task's AdamW
    hyperparameters, attached to the DDP ``model`` (``warmup`` overrides its warm-up)."""
    if not method.startswith("gz-opt:"):
        return task.optimizer(model.parameters(), cfg)
    import gradzip
    import gradzip.optim

    spec, kw = opt_method(method, cfg)
    if warmup is not None:
        kw["warmup_steps"] = warmup
    codec = gradzip.Codec(spec, block=kw.pop("block", None))
    opt = gradzip.optim.CompressedAdamW(model.parameters(), **task.adam_args(cfg),
                                        codec=codec, **kw)
    opt.attach(model)
    return opt


def method_warmup(method: str, cfg: dict) -> int:
    """Uncompressed steps at the start of ``method``'s run."""
    if method == "fp32" or method == "fp16_hook":
        return 0
    if method.startswith("gz-opt:"):
        return opt_method(method, cfg)[1]["warmup_steps"]
    if method.startswith("powersgd_r"):
        return max(2, cfg["compress_warmup"])
    return cfg["compress_warmup"]


def bytes_per_step(method: str, net, world: int, cfg: dict, opt) -> dict:
    """Bytes one rank sends per step during the warm-up and after it (see the module
    docstring), computed from the parameters (DDP's one bucket holds them all)."""
    import gradzip
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)

    def ring(numel: int, dtype=torch.float32) -> int:
        return gradzip.comm.plan("int8", numel, dtype, world, "plain").bytes_sent

    fp32 = ring(n)
    if method == "fp32":
        return {"warmup": fp32, "after": fp32}
    if method == "fp16_hook":
        return {"warmup": ring(n, torch.float16), "after": ring(n, torch.float16)}
    if method.startswith("powersgd_r"):
        rank = int(method[len("powersgd_r"):])
        plain = ps = qs = 0
        for p in params:
            rows = p.shape[0] if p.dim() else 1
            cols = p.numel() // rows
            r = min(rows, cols, rank)
            if (rows + cols) * r * 2 < rows * cols:  # powerSGD_hook's _should_compress
                ps, qs = ps + rows * r, qs + cols * r
            else:
                plain += p.numel()
        return {"warmup": fp32, "after": sum(ring(x) for x in (plain, ps, qs) if x)}
    if method.startswith("gz-opt:"):
        b = opt.bytes_per_step(world)
        # after warm-up, averaged over this run's compressed, synchronisation and
        # variance-refresh steps as the optimizer's schedule places them
        k = range(1, cfg["steps"] - opt.warmup_steps + 1)
        refreshes = sum(1 for i in k if opt.refresh_at(i))
        mean = opt.bytes_after_warmup(len(k), world)
        return {"warmup": b["warmup"], "after": b["compressed"], "refresh": b["refresh"],
                "refresh_steps": refreshes, "after_mean": mean, "fp32": fp32}
    spec = method[3:].removesuffix(":noef")
    algorithm = cfg["algorithm"]
    if n < cfg["min_numel"]:
        algorithm = "plain"
    elif algorithm == "auto":
        choice = gradzip.comm.auto_choice(n, spec)
        algorithm = choice["algorithm"] if choice else "auto"
    after = gradzip.comm.plan(spec, n, torch.float32, world, algorithm).bytes_sent
    return {"warmup": fp32, "after": after, "algorithm": algorithm}


def worker(cfg_path: str) -> None:
    """One rank: train ``cfg['methods']`` one after the other in this process group."""

    import torch
    import torch.distributed as dist

    cfg = json.loads(Path(cfg_path).read_text())
    rank, world = netlink.join_group(cfg["threads"], cfg["pg_timeout"])
    task = make_task(cfg["task"], cfg)
    target = cfg.get("target")
    for method, result_path in zip(cfg["methods"], cfg["result_paths"]):
        problem = preflight(task, method, cfg, rank)
        if problem:
            harness.stop_before_timing(f"{cfg['task']} with {method}", problem,
                                       show=rank == 0)
        out = train_one(task, method, cfg, rank, world, None if method == "fp32" else target)
        if method == "fp32":
            # Every rank needs fp32's final loss (known on rank 0) to know when to stop.
            t = torch.tensor([out["final_loss"] if rank == 0 else 0.0], dtype=torch.float64)
            dist.broadcast(t, 0)
            target = float(t)
        if rank == 0:
            # Written then renamed, so the parent's progress report never reads half a file.
            Path(result_path + ".tmp").write_text(json.dumps(out))
            os.replace(result_path + ".tmp", result_path)
        dist.barrier()
    dist.destroy_process_group()


def preflight(task, method: str, cfg: dict, rank: int) -> str | None:
    """Correctness before timing: train a throwaway copy of the model (same initial
    weights, other batches) with ``method``'s hook for the uncompressed warm-up steps and
    :data:`PREFLIGHT_COMPRESSED_STEPS` more. Returns what is wrong (the same on every
    rank), or None when the parameters are bit-identical on every rank and the losses
    finite. gradzip's "auto" forgets what these steps measured."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(cfg["seed"])
    net = task.model()
    model = DDP(net, bucket_cap_mb=cfg["bucket_mb"])
    register_method(model, method, cfg)
    # gz-opt: checked with the hooks' warm-up length, so that the check stays short
    opt = build_optimizer(task, method, model, cfg, warmup=cfg["compress_warmup"])
    batches = task.batch_iter(torch.Generator().manual_seed(cfg["seed"] * 1000 + 17 * rank + 9))
    losses = []
    for _ in range(cfg["compress_warmup"] + PREFLIGHT_COMPRESSED_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, next(batches))
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    if not getattr(opt, "synchronised", True):
        opt.synchronise()
    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    check = harness.check_all_reduce(params, None)
    bad_loss = torch.tensor([float(not bool(torch.isfinite(torch.stack(losses)).all()))])
    torch.distributed.all_reduce(bad_loss, op=torch.distributed.ReduceOp.MAX)
    if method.startswith("gz"):
        import gradzip

        gradzip.comm.reset_auto()
    problems = [f"parameters after {len(losses)} steps: {check.problem}"] if check.problem \
        else []
    if bad_loss.item():
        problems.append("a training loss was NaN or infinite")
    return "; ".join(problems) or None


def train_one(task, method: str, cfg: dict, rank: int, world: int,
              target: float | None) -> dict:
    """Train ``method`` for ``cfg['steps']`` steps; then, if its loss is still above
    ``target`` (fp32's final loss), go on at the final learning rate for up to
    ``cfg['extend']`` x steps more, until it gets there (the time-to-target measurement)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(cfg["seed"])
    net = task.model()
    n_params = sum(p.numel() for p in net.parameters())
    # One bucket for every method (see --bucket-mb): an explicit bucket_cap_mb also sets
    # the size of DDP's first bucket.
    model = DDP(net, bucket_cap_mb=cfg["bucket_mb"])
    register_method(model, method, cfg)
    opt = build_optimizer(task, method, model, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + 17 * rank + 1)
    batches = task.batch_iter(gen)
    steps = cfg["steps"]
    max_steps = steps + (int(cfg["extend"] * steps) if target is not None else 0)

    evals, step_times, losses = [], [], []
    wall = 0.0

    def do_eval(step: int) -> bool:
        """Evaluate on rank 0; every rank learns whether the target is reached."""
        flag = torch.zeros(1)
        if rank == 0:
            loss, acc = task.evaluate(net)
            evals.append({"step": step, "wall_s": wall, "loss": loss, "acc": acc})
            flag[0] = float(target is not None and loss <= target)
        dist.broadcast(flag, 0)
        return bool(flag.item())

    bar = None
    if rank == 0 and cfg["progress"]:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"{cfg['task']} {method}", leave=False,
                   dynamic_ncols=True, mininterval=1.0)
    model.train()
    do_eval(0)
    final = None
    for step in range(max_steps):
        f = lr_factor(min(step, steps - 1), steps, cfg["lr_warmup"])
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        batch = next(batches)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        eval_due = (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps
        if eval_due and step + 1 >= steps and not getattr(opt, "synchronised", True):
            # local steps: the final loss is the ranks' common model's (earlier evaluations
            # take rank 0's own, so that they do not add synchronisations to the run)
            opt.synchronise()
        dt = time.perf_counter() - t0
        wall += dt
        step_times.append(dt)
        losses.append(loss.item())
        if bar is not None:
            if step + 1 == steps + 1:
                bar.set_description(f"{cfg['task']} {method} (to fp32's loss)")
                bar.total = max_steps
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if eval_due:
            reached = do_eval(step + 1)
            if step + 1 == steps and rank == 0:
                final = dict(evals[-1])
            if step + 1 >= steps and (reached or target is None):
                break
    if bar is not None:
        bar.close()
    if not getattr(opt, "synchronised", True):
        opt.synchronise()  # local steps that ended between evaluations (untimed)
    # Parameters must still be identical on every rank after DDP (a check, not a timing).
    end_check = harness.check_all_reduce(
        torch.cat([p.detach().reshape(-1) for p in net.parameters()]), None)
    batch_losses = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(batch_losses)
    batch_losses /= world
    main_times = step_times[:steps]
    out = {"task": cfg["task"], "method": method, "steps": steps,
           "steps_run": len(step_times), "target_loss": target,
           "params": n_params, "evals": evals, "step_times_s": step_times,
           "batch_loss": batch_losses.tolist(), "wall_s": sum(main_times),
           "wall_total_s": wall, "median_step_s": statistics.median(main_times),
           "params_identical_across_ranks": end_check.identical,
           "final_loss": final["loss"] if final else None,
           "final_acc": final["acc"] if final else None,
           "warmup_steps": method_warmup(method, cfg),
           "bytes_per_step": bytes_per_step(method, net, world, cfg, opt)}
    if cfg["task"] == "chargpt":
        out["corpus"] = task.source
    return out


# ===========================================================================================
# parent
# ===========================================================================================


def time_to_reach(evals: list[dict], target: float) -> tuple[float, float] | None:
    """(wall time, step) at which the eval loss first reaches ``target``, linear between
    evaluations; ``None`` if it never does."""
    prev = None
    for e in evals:
        if e["loss"] <= target:
            if prev is None:
                return e["wall_s"], e["step"]
            f = (prev["loss"] - target) / (prev["loss"] - e["loss"])
            return (prev["wall_s"] + f * (e["wall_s"] - prev["wall_s"]),
                    prev["step"] + f * (e["step"] - prev["step"]))
        prev = e
    return None


def summarize(runs: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        tr = [r for r in runs if r["task"] == task]
        ref = next((r for r in tr if r["method"] == "fp32" and "final_loss" in r), None)
        for r in tr:
            if "final_loss" not in r:
                rows.append({"task": task, "method": r["method"], "error": r.get("error")})
                continue
            row = {"task": task, "method": r["method"], "final_loss": r["final_loss"],
                   "final_acc": r["final_acc"], "wall_s": r["wall_s"],
                   "median_step_s": r["median_step_s"],
                   "identical": r["params_identical_across_ranks"]}
            b = r.get("bytes_per_step")
            if b:
                # gz-opt: the mean over its compressed and variance-refresh steps
                row["bytes_per_step"] = b.get("after_mean", b["after"])
                row["bytes_per_step_warmup"] = b["warmup"]
                row["warmup_steps"] = r.get("warmup_steps")
                # (gz-opt's warm-up may be compressed: "fp32" is the plain all-reduce)
                row["fewer_bytes_than_fp32"] = b.get("fp32", b["warmup"]) / row["bytes_per_step"] \
                    if r["method"] != "fp16_hook" else 2.0
            if ref is not None:
                row["loss_vs_fp32"] = r["final_loss"] / ref["final_loss"] - 1
                hit = time_to_reach(r["evals"], ref["final_loss"])
                row["time_to_fp32_loss_s"] = hit[0] if hit else None
                row["steps_to_fp32_loss"] = hit[1] if hit else None
                row["steps_run"] = r.get("steps_run")
                row["step_speedup_vs_fp32"] = ref["median_step_s"] / r["median_step_s"]
                if hit:
                    row["time_speedup_to_fp32_loss"] = ref["wall_s"] / hit[0]
            rows.append(row)
    head = (f"{'task':<8} {'method':<24} {'final loss':>10} {'vs fp32':>8} {'acc':>6} "
            f"{'step':>8} {'speedup':>7} {'wall':>8} {'to fp32 loss':>21} "
            f"{'bytes/step':>10} {'fewer':>6} {'same':>4}")
    lines = [head, "-" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['task']:<8} {row['method']:<24} {row['error']}")
            continue
        ttr, sto = row.get("time_to_fp32_loss_s"), row.get("steps_to_fp32_loss")
        reach = (f"{ttr:.1f}s @{sto:.0f} steps" if ttr is not None
                 else f"not in {row.get('steps_run')} steps")
        bps = row.get("bytes_per_step")
        lines.append(
            f"{row['task']:<8} {row['method']:<24} {row['final_loss']:10.4f} "
            f"{row.get('loss_vs_fp32', float('nan')) * 100:+7.2f}% {row['final_acc']:6.3f} "
            f"{row['median_step_s'] * 1e3:6.1f}ms {row.get('step_speedup_vs_fp32', 0):6.2f}x "
            f"{row['wall_s']:7.1f}s {reach:>21} "
            f"{harness.fmt_bytes(bps) if bps else '-':>10} "
            f"{row.get('fewer_bytes_than_fp32', 0):5.1f}x "
            f"{'yes' if row['identical'] else 'NO':>4}")
    return "\n".join(lines), rows


def run_task(task: str, methods: list[str], base_cfg: dict, a, link, tmp: str) -> list[dict]:
    """Train every method of ``task`` in one launch of W ranks (one process start-up).

    If that launch fails, the methods that did not finish are retried one launch each, so
    one broken method does not take the others' results with it.
    """
    steps = a.steps.get(task) or (12 if a.quick else TASK_STEPS[task])
    task_cfg = dict(base_cfg, task=task, steps=steps,
                    eval_every=a.eval_every or max(1, steps // 30),
                    lr_warmup=a.lr_warmup or max(1, steps // 20),
                    opt_warmup=a.opt_warmup if a.opt_warmup is not None
                    else max(base_cfg["compress_warmup"], steps // 10))
    if task not in ADAM_TASKS:
        skipped = [m for m in methods if m.startswith("gz-opt:")]
        if skipped:
            print(f"[train] {task}: trains with SGD, so {', '.join(skipped)} (CompressedAdamW) "
                  "skipped", flush=True)
        methods = [m for m in methods if not m.startswith("gz-opt:")]

    def launch(ms: list[str], tag: str, target: float | None = None
               ) -> tuple[dict, str | None]:
        paths = [os.path.join(tmp, f"{task}-{tag}-{i}.json") for i in range(len(ms))]
        cfg = dict(task_cfg, methods=ms, result_paths=paths, target=target)
        cfg_path = os.path.join(tmp, f"cfg-{task}-{tag}.json")
        Path(cfg_path).write_text(json.dumps(cfg))
        err = None
        done: dict = {}

        def collect() -> None:
            for m, path in zip(ms, paths):
                if m not in done and os.path.exists(path):
                    try:
                        done[m] = json.loads(Path(path).read_text())
                    except json.JSONDecodeError:  # still being written
                        continue
                    r = done[m]
                    print(f"[train] {task:<8} {m:<24} final loss {r['final_loss']:.4f}  "
                          f"wall {r['wall_s']:.1f}s  ({r['steps_run']} steps run)", flush=True)

        try:
            netlink.launch([sys.executable, os.path.abspath(__file__), "--worker", cfg_path],
                           a.world, link, threads=a.threads,
                           timeout=a.timeout * len(ms), on_poll=collect)
        except netlink.RankFailed as e:
            if e.returncode == harness.CHECK_FAILED:
                raise  # a correctness check failed: no retries, nothing more is timed
            err = str(e)
        except (RuntimeError, TimeoutError) as e:
            err = str(e)
        collect()
        return done, err

    done, err = launch(methods, "all")
    if err is not None:
        print(f"[train] {task}: {err}; retrying the unfinished methods one by one", flush=True)
        target = done["fp32"]["final_loss"] if "fp32" in done else None
        for i, m in enumerate(x for x in methods if x not in done):
            one, e1 = launch([m], f"retry{i}", target)
            if m in one:
                done[m] = one[m]
            else:
                done[m] = {"task": task, "method": m, "error": e1 or "no result"}
                print(f"[train] {task:<8} {m:<24} FAILED: {done[m]['error']}", flush=True)
    return [done[m] for m in methods]


def parse_steps(text: str, p: argparse.ArgumentParser) -> dict[str, int]:
    """``"1000"`` -> every task 1000 steps; ``"chargpt=1000,autoenc=600"`` -> per task."""
    text = text.strip()
    if not text:
        return {}
    if text.isdigit():
        return dict.fromkeys(TASKS, int(text))
    out = {}
    for part in text.split(","):
        task, _, n = part.partition("=")
        if task.strip() not in TASKS or not n.strip().isdigit():
            p.error(f"--steps: {part!r} is not N or <task>=N with a task of {', '.join(TASKS)}")
        out[task.strip()] = int(n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(default_methods()),
                   help="fp32, fp16_hook, powersgd_r<r>, gz:<codec>, gz:<codec>:noef, "
                        "gz-opt:<codec>[+raw][+allgather][+warmup<N>][+refresh<N>][+local<N>]")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--link", default="1gbit",
                   help="none, 1gbit, 10gbit, ... (one bucket shared by all ranks) or "
                        "1gbit/rank (W times the rate: each rank's share)")
    p.add_argument("--steps", default="",
                   help="training steps: N for every task, or per task, e.g. "
                        "chargpt=1000,autoenc=600 (default digits 150, chargpt 300, "
                        "autoenc 300; --quick 12)")
    p.add_argument("--extend", type=float, default=0.5,
                   help="a run still above fp32's final loss after --steps goes on at the "
                        "final learning rate for up to this fraction of --steps more")
    p.add_argument("--eval-every", type=int, default=None, help="default steps/30")
    p.add_argument("--batch", type=int, default=None, help="per-rank batch (task default)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (task default)")
    p.add_argument("--lr-warmup", type=int, default=None, help="default steps/20")
    p.add_argument("--compress-warmup", type=int, default=10,
                   help="uncompressed steps before PowerSGD/gradzip compress (>= 2)")
    p.add_argument("--opt-warmup", type=int, default=None,
                   help="gz-opt: CompressedAdamW's warm-up steps (default: a tenth of the "
                        "steps, at least --compress-warmup)")
    p.add_argument("--min-numel", type=int, default=1024,
                   help="gradzip: buckets below this go through a plain all-reduce")
    p.add_argument("--algorithm", default="auto", help="gradzip all-reduce algorithm")
    p.add_argument("--bucket-mb", type=float, default=1024,
                   help="DDP bucket_cap_mb for every method; the default puts each model in "
                        "one bucket (PowerSGD's hook can deadlock or mismatch on Gloo with "
                        "several buckets, see docs/results.md)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny models, few steps (smoke test)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-netns", action="store_true")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--pg-timeout", type=float, default=600,
                   help="process-group timeout: a hung collective fails after this long")
    p.add_argument("--out", default="bench/results/train.json")
    p.add_argument("--plot", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker)
        return 0

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    a.steps = parse_steps(a.steps, p)
    methods = harness.split_specs(a.methods)
    if "fp32" not in methods:
        methods.insert(0, "fp32")
    netlink.parse_link(a.link, a.world)

    info = harness.machine_info()
    runs = []
    link, eff = netlink.open_link(a.link, world=a.world, netns=not a.no_netns)
    try:
        qdisc = link.qdisc() if link is not None else "host loopback"
        print(f"[train] link {eff}: {qdisc}; {a.world} ranks", flush=True)
        base_cfg = {"batch": a.batch, "lr": a.lr, "extend": a.extend,
                    "compress_warmup": a.compress_warmup, "min_numel": a.min_numel,
                    "algorithm": a.algorithm, "threads": a.threads, "seed": a.seed,
                    "bucket_mb": a.bucket_mb, "quick": a.quick,
                    "progress": not a.no_progress, "pg_timeout": a.pg_timeout}
        with tempfile.TemporaryDirectory(prefix="gz-train-") as tmp:
            for task in tasks:
                runs += run_task(task, methods, base_cfg, a, link, tmp)
    except netlink.RankFailed as e:
        return harness.stopped(e, "train")
    finally:
        if link is not None:
            link.remove()

    table, rows = summarize(runs)
    print(table)
    info["loadavg_end"] = os.getloadavg()
    doc = {"argv": sys.argv, "machine": info, "link": eff, "qdisc": qdisc, "world": a.world,
           "config": {k: v for k, v in vars(a).items() if k != "worker"},
           "runs": runs, "summary": rows, "table": table}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"[train] wrote {out}")
    png = Path(a.plot) if a.plot else out.with_suffix(".png")
    import plots

    plots.training_plot(doc, png)
    print(f"[train] wrote {png}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
