"""gradzip.optim.CompressedAdamW on 2 and 3 Gloo ranks.

Every rank trains small models with the optimizer (through DDP and ``attach``, and without
DDP through ``reduce_gradients``) and returns what it saw: the initial parameters, the
gradients of every step before and after ``step()``, the final parameters. The parent
replays the same steps independently: ``torch.optim.AdamW`` itself for the warm-up and
refresh steps (bit for bit: the optimizer is written as AdamW's single-tensor
implementation), and after warm-up a simulation of the method built from
``gradzip.reference`` alone: every rank's momentum with its own gradient folded in, the
two-phase (or all-gather) compressed all-reduce with worker and server residuals, the
frozen-variance update. The final parameters must be bit-identical.
"""

from __future__ import annotations

import copy
import io
import math
import shutil
import tempfile
import warnings

import gradzip
import gradzip.ddp
import gradzip.optim
import pytest
import torch
import torch.distributed as dist
from dist_helpers import TEST_BACKEND, catch, run_ranks
from gradzip import Codec, reference
from gradzip.optim import CompressedAdamW
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

pytestmark = pytest.mark.distributed

LR, BETAS, EPS, WD = 2e-2, (0.9, 0.999), 1e-8, 0.1
BUCKET_MB = 0.004  # two DDP buckets for the MLP below
# warmup_codec: buckets of at most 5000 floats: l3 and l2 (4420 elements) in one that is
# compressed, l1 (1088) in one below the hook's min_numel (4096), which goes plain
WARMUP_CODEC_BUCKET_MB = 0.02
STEPS, WARMUP = 8, 3


class MLP(nn.Module):
    """16 -> 64 -> 64 -> 4 (5508 parameters: chunks of every world size are uneven)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def batch(rank: int, step: int):
    """Per-rank data. Input feature 0 is always zero, so column 0 of l1.weight never gets a
    gradient: its second moment stays exactly zero (the masked coordinates)."""
    g = torch.Generator().manual_seed(10_007 * rank + step)
    x = torch.randn(32, 16, generator=g)
    x[:, 0] = 0
    w = torch.linspace(-1, 1, 64).view(16, 4)
    return x, torch.tanh(x @ w) + 0.1 * torch.sin(3 * x[:, :4])


def param_groups(params):
    """Weights with weight decay, biases without: two groups, weights first."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": WD},
            {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}]


def ordered(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(ts) -> list[torch.Tensor]:
    return [None if t is None else t.detach().clone() for t in ts]


def codec(spec: str) -> Codec:
    return Codec(spec, backend=TEST_BACKEND)


def build(spec="sign", *, warmup=WARMUP, algorithm="alltoall", refresh=0, attach=True,
          precondition=True, local=1, refresh_max=None, refresh_codec=None,
          average_momentum=True, warmup_codec=None, bucket_mb=BUCKET_MB):
    model = DDP(MLP(), bucket_cap_mb=bucket_mb)
    opt = CompressedAdamW(param_groups(model.parameters()), lr=LR, betas=BETAS, eps=EPS,
                          codec=codec(spec), warmup_steps=warmup, algorithm=algorithm,
                          variance_refresh=refresh, precondition=precondition,
                          local_steps=local, refresh_max_interval=refresh_max,
                          average_momentum=average_momentum,
                          refresh_codec=None if refresh_codec is None else codec(refresh_codec),
                          warmup_codec=None if warmup_codec is None else codec(warmup_codec))
    if attach:
        opt.attach(model)
    return model, opt


def one_step(model, opt, rank, t, log=None, scaler=None):
    x, y = batch(rank, t)
    opt.zero_grad(set_to_none=False)
    loss = nn.functional.mse_loss(model(x), y)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if log is not None:
        log["before"].append(snapshot(p.grad for p in ordered(opt)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the optimizer's note about column 0 of l1
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    if log is not None:
        log["after"].append(snapshot(p.grad for p in ordered(opt)))
    return float(loss.detach())


def train(rank, spec="sign", steps=STEPS, **kw):
    model, opt = build(spec, **kw)
    log = {"init": snapshot(ordered(opt)), "before": [], "after": []}
    for t in range(steps):
        one_step(model, opt, rank, t, log)
    log["final"] = snapshot(ordered(opt))
    log["pending"] = {k: opt.feedback.pending(k) for k in list(opt.feedback.keys())}
    # After warm-up the gradients are this rank's own: the module without DDP computes the
    # same ones for the next batch.
    x, y = batch(rank, steps)
    local = copy.deepcopy(model.module)
    opt.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(x), y).backward()
    nn.functional.mse_loss(local(x), y).backward()
    log["local_grads"] = all(torch.equal(a.grad, b.grad) for a, b in
                             zip(model.module.parameters(), local.parameters()))
    return log


# ---------------------------------------------------------------------------------------
# the parent's replay
# ---------------------------------------------------------------------------------------


def ref_compress(c: Codec, x, residual, k=None):
    if c.is_sparse:
        return reference.topk_select(x, k if k is not None else c.k_for(x.numel()), residual,
                                     c.exact, c.values, 0)
    return reference.quantize_pack(x, c.bits, c.block, residual, c.rounding, 0)


class CompressedMean:
    """The ranks' compressed all-reduce (average) of one flat tensor, with worker and
    server residuals, replayed with the reference ops (docs/architecture.md step 3)."""

    def __init__(self, c: Codec, algorithm: str, world: int, n: int) -> None:
        self.c, self.algorithm, self.world, self.n = c, algorithm, world, n
        align = c.block if not c.is_sparse else 1
        size = align * math.ceil(math.ceil(n / align) / world)
        self.chunks = [(min(i * size, n), min((i + 1) * size, n)) for i in range(world)]
        self.worker = [torch.zeros(n) for _ in range(world)]
        self.server = [torch.zeros(b - a) for a, b in self.chunks]

    def __call__(self, xs: list[torch.Tensor]) -> torch.Tensor:
        W, c = self.world, self.c
        out = torch.zeros(self.n)
        if self.algorithm == "allgather":
            rows = torch.stack([ref_compress(c, xs[r], self.worker[r]) for r in range(W)])
            reference.dequantize_accumulate(rows, out, 1.0 / W)
            return out
        for i, (a, b) in enumerate(self.chunks):
            if b == a:
                continue
            k = c.k_for(b - a) if c.is_sparse else None
            rows = torch.stack([ref_compress(c, xs[r][a:b], self.worker[r][a:b], k)
                                for r in range(W)])
            acc = torch.zeros(b - a)
            reference.dequantize_accumulate(rows, acc, 1.0 / W)
            q = ref_compress(c, acc, self.server[i], k)
            part = torch.zeros(b - a)
            reference.dequantize_accumulate(q[None], part, 1.0)
            out[a:b] = part
        return out

    def pending(self, rank: int) -> torch.Tensor:
        p = self.worker[rank].clone()
        if self.algorithm == "alltoall":
            a, b = self.chunks[rank]
            p[a:b].add_(self.server[rank], alpha=float(self.world))
        return p

    def rescale(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Residuals owed in units of ``1/old`` re-expressed in ``1/new`` (server residuals
        folded into the worker residuals)."""
        self.worker = [self.pending(r).mul_(old).div_(new) for r in range(self.world)]
        self.server = [torch.zeros_like(s) for s in self.server]


def refresh_due(t: int, warmup: int, refresh: int, cap: int | None = None) -> bool:
    """Post-warm-up steps refresh, refresh + 2 refresh, ... (the gaps double, up to cap)."""
    k = t - warmup + 1
    pos, gap = refresh, refresh
    while 0 < pos <= k:
        if pos == k:
            return True
        gap = 2 * gap if cap is None else min(2 * gap, cap)
        pos += gap
    return False


def refresh_gradients(runs: list[dict], t: int, spec: str | None) -> list[torch.Tensor]:
    """The gradients a refresh at step t steps with: the exact average (what the ranks
    recorded after step()), or with a refresh codec the two-phase compressed average of the
    ranks' own gradients, without residuals."""
    if spec is None:
        return runs[0]["after"][t]
    shapes = [g.shape for g in runs[0]["before"][t]]
    n = sum(math.prod(s) for s in shapes)
    xs = [torch.cat([g.reshape(-1) for g in run["before"][t]]) for run in runs]
    avg = CompressedMean(Codec(spec), "alltoall", len(runs), n)(xs)
    return [avg[off : off + math.prod(s)].view(s) for off, s in
            zip(offsets([math.prod(s) for s in shapes]), shapes)]


def denominator(adamw, p, vstep) -> torch.Tensor:
    bc2 = (1 - BETAS[1] ** vstep) ** 0.5
    return (adamw.state[p]["exp_avg_sq"].sqrt() / bc2).add_(EPS)


def replay_start(runs: list[dict]):
    """The replay's parameters (rank 0's initial ones), the torch.optim.AdamW that takes
    the exact steps, and each parameter's weight decay."""
    params = [nn.Parameter(t.clone()) for t in runs[0]["init"]]
    n_weights = sum(1 for p in params if p.dim() > 1)
    groups = [{"params": params[:n_weights], "weight_decay": WD},
              {"params": params[n_weights:], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    return params, adamw, {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def warmup_step(adamw, params, grads, vstep: dict) -> None:
    """A warm-up step: torch.optim.AdamW itself on the averaged gradients."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    adamw.step()
    for p in params:
        vstep[id(p)] = int(adamw.state[p]["step"].item())


@torch.no_grad()
def refresh_step(adamw, params, grads, vstep: dict, wd_of: dict) -> None:
    """A variance refresh: AdamW's step on the averaged gradients, the second moment updated
    as if the frozen steps' squared gradients had been this one's."""
    for p, g in zip(params, grads):
        st = adamw.state[p]
        st["step"] += 1
        step = st["step"].item()
        if wd_of[id(p)]:
            p.mul_(1 - LR * wd_of[id(p)])
        st["exp_avg"].lerp_(g, 1 - BETAS[0])
        gap = int(step) - vstep[id(p)]
        st["exp_avg_sq"].mul_(BETAS[1] ** gap).addcmul_(g, g, value=1 - BETAS[1] ** gap)
        vstep[id(p)] = int(step)
        p.addcdiv_(st["exp_avg"], denominator(adamw, p, vstep[id(p)]),
                   value=-(LR / (1 - BETAS[0] ** step)))


def replay(runs: list[dict], spec: str, algorithm: str, warmup: int, refresh: int = 0,
           precondition: bool = True, cap: int | None = None,
           refresh_codec: str | None = None):
    """Parameters (and residuals) after the recorded steps, computed in this process."""
    world = len(runs)
    params, adamw, wd_of = replay_start(runs)
    sizes = [p.numel() for p in params]
    mean = CompressedMean(Codec(spec), algorithm, world, sum(sizes))
    vstep = {}
    for t in range(len(runs[0]["before"])):
        if t < warmup:  # AdamW itself, on the gradients DDP's hook averaged
            warmup_step(adamw, params, runs[0]["after"][t], vstep)
            continue
        if refresh_due(t, warmup, refresh, cap):
            # AdamW's step on the gradients averaged inside step(), the second moment
            # updated as if the frozen steps' squared gradients had been this one's
            old = torch.cat([denominator(adamw, p, vstep[id(p)]).reshape(-1) for p in params])
            refresh_step(adamw, params, refresh_gradients(runs, t, refresh_codec), vstep, wd_of)
            if precondition and t > warmup:
                mean.rescale(old, torch.cat([denominator(adamw, p, vstep[id(p)]).reshape(-1)
                                             for p in params]))
            continue
        ms = []
        for r in range(world):
            m = torch.cat([adamw.state[p]["exp_avg"].reshape(-1) for p in params])
            for (p, g), off in zip(zip(params, runs[r]["before"][t]), offsets(sizes)):
                mp = m[off : off + p.numel()].view(p.shape)
                mp.lerp_(g, 1 - BETAS[0])
                if precondition:
                    mp.div_(denominator(adamw, p, vstep[id(p)]))
            ms.append(m)
        u = mean(ms)
        with torch.no_grad():
            for p, off in zip(params, offsets(sizes)):
                st = adamw.state[p]
                up = u[off : off + p.numel()].view(p.shape)
                up.masked_fill_(st["exp_avg_sq"] == 0, 0.0)
                denom = denominator(adamw, p, vstep[id(p)])
                st["step"] += 1
                step = st["step"].item()
                if wd_of[id(p)]:
                    p.mul_(1 - LR * wd_of[id(p)])
                step_size = LR / (1 - BETAS[0] ** step)
                if precondition:
                    p.add_(up, alpha=-step_size)
                    st["exp_avg"].copy_(up * denom)
                else:
                    p.addcdiv_(up, denom, value=-step_size)
                    st["exp_avg"].copy_(up)
    return [p.detach() for p in params], mean


def offsets(sizes):
    out, n = [], 0
    for s in sizes:
        out.append(n)
        n += s
    return out


def replay_local(runs: list[dict], spec: str, warmup: int, refresh: int, local: int,
                 average_momentum: bool = True, refresh_codec: str | None = None,
                 algorithm: str = "alltoall"):
    """``local_steps=local``: after warm-up every rank takes AdamW's frozen-variance step
    with its own gradient on its own parameters and momentum; every ``local`` steps, before
    a refresh and at the end the ranks average how far their parameters moved since the
    interval began and their preconditioned momenta, each through its own compressed
    all-reduce (with ``average_momentum=False`` the momenta only before a refresh, and each
    rank keeps its own until then, and that average goes through ``refresh_codec`` without
    residuals, as the refresh's gradients do). Returns the shared parameters, the two
    compressed means,
    the ranks' parameters before the last synchronisation and their momenta at the end."""
    world = len(runs)
    params, adamw, wd_of = replay_start(runs)
    sizes = [p.numel() for p in params]
    moved_mean = CompressedMean(Codec(spec), algorithm, world, sum(sizes))
    mom_mean = CompressedMean(Codec(spec), algorithm, world, sum(sizes))
    vstep, local_p, local_m, anchor, count = {}, None, None, None, 0

    def synchronise(momenta: bool, fresh: bool = False):
        nonlocal local_p, local_m, count
        d = {id(p): denominator(adamw, p, vstep[id(p)]) for p in params}
        with torch.no_grad():
            if count:
                moved = moved_mean([torch.cat([(a - q).reshape(-1) for a, q in zip(anchor, qs)])
                                    for qs in local_p])
                for p, a, off in zip(params, anchor, offsets(sizes)):
                    p.copy_(a - moved[off : off + p.numel()].view(p.shape))
            if momenta:
                # fresh: each rank's own momenta before a refresh, residual-free
                mean = CompressedMean(Codec(refresh_codec), "alltoall", world, sum(sizes)) \
                    if fresh else mom_mean
                u = mean([torch.cat([(m / d[id(p)]).reshape(-1)
                                     for p, m in zip(params, ms)]) for ms in local_m])
                for p, off in zip(params, offsets(sizes)):
                    up = u[off : off + p.numel()].view(p.shape).clone()
                    up.masked_fill_(adamw.state[p]["exp_avg_sq"] == 0, 0.0)
                    adamw.state[p]["exp_avg"].copy_(up * d[id(p)])
                local_m = None
        local_p = None
        count = 0

    for t in range(len(runs[0]["before"])):
        if t < warmup:  # AdamW itself, on the gradients DDP's hook averaged
            warmup_step(adamw, params, runs[0]["after"][t], vstep)
            continue
        if refresh_due(t, warmup, refresh):
            if count or local_m is not None:
                synchronise(momenta=local_m is not None, fresh=not average_momentum)
            old = torch.cat([denominator(adamw, p, vstep[id(p)]).reshape(-1) for p in params])
            refresh_step(adamw, params, refresh_gradients(runs, t, refresh_codec), vstep, wd_of)
            mom_mean.rescale(old, torch.cat([denominator(adamw, p, vstep[id(p)]).reshape(-1)
                                             for p in params]))
            continue
        if count == 0:  # an interval starts from the shared parameters
            anchor = [p.detach().clone() for p in params]
            local_p = [[p.detach().clone() for p in params] for _ in range(world)]
            if local_m is None:  # ... and the shared momentum
                local_m = [[adamw.state[p]["exp_avg"].clone() for p in params]
                           for _ in range(world)]
        step = adamw.state[params[0]]["step"].item() + 1
        for r in range(world):
            for p, q, m, g in zip(params, local_p[r], local_m[r], runs[r]["before"][t]):
                m.lerp_(g, 1 - BETAS[0])
                m.masked_fill_(adamw.state[p]["exp_avg_sq"] == 0, 0.0)
                if wd_of[id(p)]:
                    q.mul_(1 - LR * wd_of[id(p)])
                q.addcdiv_(m, denominator(adamw, p, vstep[id(p)]),
                           value=-(LR / (1 - BETAS[0] ** step)))
        for p in params:
            adamw.state[p]["step"] += 1
        count += 1
        if count == local:
            synchronise(momenta=average_momentum)
    local_then = [list(q) for q in local_p] if count else None
    if count:
        synchronise(momenta=average_momentum)
    momenta = [[adamw.state[p]["exp_avg"].clone() for p in params]] * world \
        if local_m is None else local_m
    return [p.detach() for p in params], moved_mean, mom_mean, local_then, momenta


# ---------------------------------------------------------------------------------------
# what runs on every rank
# ---------------------------------------------------------------------------------------

# (codec, algorithm, precondition). The raw momentum (1-bit Adam's choice) with int8: with
# sign it diverges on this model (see docs/results.md), which a bit-exact replay would
# follow into NaN.
CASES = [("sign", "alltoall", True), ("sign", "allgather", True), ("topk:0.05", "alltoall", True),
         ("int4", "alltoall", True), ("int8", "alltoall", False)]


def resume_run(rank, spec, n1, n2, algorithm="alltoall", via="torch.save", local=1,
               average_momentum=True):
    """n1 steps, checkpoint (model, optimizer), rebuild everything, load, n2 more steps.
    ``via="dcp"``: torch.distributed.checkpoint with the module and the optimizer as
    Stateful objects in one directory shared by the ranks (the moments are the same on
    every rank, so DCP writes them once; each rank must still get its own residuals)."""
    model, opt = build(spec, algorithm=algorithm, local=local,
                       average_momentum=average_momentum)
    for t in range(n1):
        one_step(model, opt, rank, t)
    if via == "dcp":
        import torch.distributed.checkpoint as dcp
        where = [tempfile.mkdtemp(prefix="gz-optim-dcp-") if rank == 0 else None]
        dist.broadcast_object_list(where, src=0)
        dcp.save({"model": model.module, "optim": opt}, checkpoint_id=where[0])
        del model, opt
        model, opt = build(spec, algorithm=algorithm, local=local,
                           average_momentum=average_momentum)
        opt.init_state()
        dcp.load({"model": model.module, "optim": opt}, checkpoint_id=where[0])
        dist.barrier()
        if rank == 0:
            shutil.rmtree(where[0])
    else:
        buf = io.BytesIO()
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, buf)
        del model, opt
        buf.seek(0)
        ck = torch.load(buf, weights_only=False)
        model, opt = build(spec, algorithm=algorithm, local=local,
                           average_momentum=average_momentum)
        model.module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
    for t in range(n1, n1 + n2):
        one_step(model, opt, rank, t)
    if average_momentum:
        return snapshot(ordered(opt))
    return snapshot(ordered(opt)), snapshot(opt.state[p]["exp_avg"] for p in ordered(opt))


def overflow_run(rank, world, bad_steps=(1, 5), steps=8, warmup_codec=None):
    """GradScaler training; the last rank's gradient holds inf at each of ``bad_steps``
    (one in warm-up, one after)."""
    model, opt = build("sign", warmup_codec=warmup_codec,
                       bucket_mb=BUCKET_MB if warmup_codec is None else WARMUP_CODEC_BUCKET_MB)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    target = model.module.l2.weight
    log = []
    for t in range(steps):
        handle = None
        if t in bad_steps and rank == world - 1:
            handle = target.register_hook(
                lambda g: g.index_put((torch.tensor([3]), torch.tensor([5])),
                                      torch.tensor(float("inf"))))
        before = snapshot(ordered(opt))
        taken = opt.steps_taken
        pending = {k: opt.feedback.pending(k) for k in list(opt.feedback.keys())}
        one_step(model, opt, rank, t, scaler=scaler)
        if handle is not None:
            handle.remove()
        after = {k: opt.feedback.pending(k) for k in list(opt.feedback.keys())}
        log.append({
            "moved": any(not torch.equal(a, b) for a, b in zip(before, ordered(opt))),
            "taken": opt.steps_taken - taken,
            "residuals_kept": all(torch.equal(pending[k], after[k]) for k in pending),
            "residuals_finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
            "warmup_residuals_finite": opt.warmup_state is None or all(
                bool(torch.isfinite(opt.warmup_state.feedback.pending(k)).all())
                for k in list(opt.warmup_state.feedback.keys())),
            "params": snapshot(ordered(opt)),
        })
    return log


def manual_run(rank, world, none_on: str, steps=6, warmup=2):
    """Without DDP: three free-standing parameters, gradients set by hand, averaged in
    warm-up with reduce_gradients(). ``a`` has no gradient on rank 0 (``none_on="some"``)
    or a zero one (``"zeros"``); ``b`` never has one."""
    torch.manual_seed(1)
    a, b, c = (nn.Parameter(torch.randn(300)) for _ in range(3))
    opt = CompressedAdamW([a, b, c], lr=LR, codec=codec("sign"), warmup_steps=warmup)
    b0 = b.detach().clone()
    for t in range(steps):
        g = torch.Generator().manual_seed(31 * rank + t)
        opt.zero_grad(set_to_none=True)
        c.grad = torch.randn(300, generator=g)
        if rank != 0:
            a.grad = torch.randn(300, generator=g)
        elif none_on == "zeros":
            a.grad = torch.zeros(300)
        opt.reduce_gradients()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    return {"a": a.detach().clone(), "b": b.detach().clone(), "b0": b0,
            "c": c.detach().clone(), "b_state": dict(opt.state[b]),
            "a_step": int(opt.state[a]["step"].item())}


def error_cases(rank, world) -> dict:
    out = {}
    # attach twice; on a model that has a hook; parameters that do not match
    model, opt = build("sign")
    out["twice"] = catch(lambda: opt.attach(model))
    other = DDP(MLP(), bucket_cap_mb=BUCKET_MB)
    other.register_comm_hook(gradzip.ddp.CompressionState("int8"), gradzip.ddp.compress_hook)
    opt2 = CompressedAdamW(other.parameters(), codec=codec("sign"))
    out["hooked"] = catch(lambda: opt2.attach(other))
    third = DDP(MLP(), bucket_cap_mb=BUCKET_MB)
    opt3 = CompressedAdamW(list(third.parameters())[:-1], codec=codec("sign"))
    out["params"] = catch(lambda: opt3.attach(third))
    # ranks that disagree on the codec or on the warm-up: every rank raises in attach
    m4 = DDP(MLP(), bucket_cap_mb=BUCKET_MB)
    o4 = CompressedAdamW(m4.parameters(), codec=codec("sign" if rank == 0 else "int4"))
    out["codec"] = catch(lambda: o4.attach(m4))
    m5 = DDP(MLP(), bucket_cap_mb=BUCKET_MB)
    o5 = CompressedAdamW(m5.parameters(), codec=codec("sign"), warmup_steps=3 + (rank == 1))
    out["warmup"] = catch(lambda: o5.attach(m5))
    m5b = DDP(MLP(), bucket_cap_mb=BUCKET_MB)
    o5b = CompressedAdamW(m5b.parameters(), codec=codec("sign"), local_steps=1 + rank)
    out["local"] = catch(lambda: o5b.attach(m5b))
    m5c = DDP(MLP())
    o5c = CompressedAdamW(m5c.parameters(), codec=codec("sign"),
                          refresh_codec=codec("int8") if rank == 0 else None)
    out["refresh-codec"] = catch(lambda: o5c.attach(m5c))
    m5d = DDP(MLP())
    o5d = CompressedAdamW(m5d.parameters(), codec=codec("sign"), local_steps=2,
                          average_momentum=rank != 0)
    out["own-momentum"] = catch(lambda: o5d.attach(m5d))
    # without DDP the first reduce_gradients() (or step()) checks the same
    p6 = nn.Parameter(torch.zeros(100))
    o6 = CompressedAdamW([p6], codec=codec("sign"), warmup_steps=2 * (rank + 1))
    p6.grad = torch.ones(100)
    out["warmup-manual"] = catch(o6.reduce_gradients)
    # a checkpoint of another step loaded on one rank: the next backward raises everywhere
    model, opt = build("sign")
    saved = []
    for t in range(5):
        one_step(model, opt, rank, t)
        saved.append(copy.deepcopy(opt.state_dict()))
    m7, o7 = build("sign")
    o7.load_state_dict(saved[3] if rank == 0 else saved[4])
    x, y = batch(rank, 0)
    out["out-of-step"] = catch(lambda: nn.functional.mse_loss(m7(x), y).backward())
    # sparse gradients after warm-up (rank 0 only) and in warm-up
    p8, q8 = nn.Parameter(torch.zeros(50)), nn.Parameter(torch.zeros(50))
    o8 = CompressedAdamW([p8, q8], codec=codec("sign"), warmup_steps=0)
    p8.grad = torch.ones(50)
    q8.grad = torch.ones(50).to_sparse() if rank == 0 else torch.ones(50)
    out["sparse"] = catch(o8.step)
    out["sparse-params"] = (p8.detach().clone(), o8.steps_taken)
    o9 = CompressedAdamW([p8], codec=codec("sign"), warmup_steps=5)
    p8.grad = torch.ones(50).to_sparse()
    out["sparse-warmup"] = catch(o9.step)
    return out


def warmup_codec_ddp(rank, steps=5, warmup=5):
    """A compressed (int8) warm-up through DDP and ``attach``, and its twin: the same model
    and batches with gradzip's DDP hook (CompressionState, int8, two-phase, no warm-up of its
    own) and torch.optim.AdamW."""
    model, opt = build("sign", warmup=warmup, warmup_codec="int8",
                       bucket_mb=WARMUP_CODEC_BUCKET_MB)
    log = {"init": snapshot(ordered(opt)), "before": [], "after": []}
    for t in range(steps):
        if t == steps - 1:
            log["warmup_keys_before_end"] = list(opt.warmup_state.feedback.keys())
        one_step(model, opt, rank, t, log)
    log["final"] = snapshot(ordered(opt))
    log["warmup_keys"] = list(opt.warmup_state.feedback.keys())
    twin = DDP(MLP(), bucket_cap_mb=WARMUP_CODEC_BUCKET_MB)
    state = gradzip.ddp.CompressionState(codec("int8"), warmup_steps=0, algorithm="alltoall")
    twin.register_comm_hook(state, gradzip.ddp.compress_hook)
    adamw = torch.optim.AdamW(param_groups(twin.parameters()), lr=LR, betas=BETAS, eps=EPS)
    twin_grads = []
    for t in range(steps):
        one_step(twin, adamw, rank, t)
        twin_grads.append(snapshot(p.grad for p in ordered(adamw)))
    log["twin"] = snapshot(ordered(adamw))
    log["twin_grads"] = twin_grads
    return log


def warmup_codec_resume(rank, n1, steps=8, warmup=5):
    """int8 warm-up of 5 steps, saved after ``n1`` (None: never), resumed, to step 8."""
    def make():
        return build("sign", warmup=warmup, warmup_codec="int8",
                     bucket_mb=WARMUP_CODEC_BUCKET_MB)
    model, opt = make()
    for t in range(steps if n1 is None else n1):
        one_step(model, opt, rank, t)
    if n1 is None:
        return snapshot(ordered(opt)), None
    buf = io.BytesIO()
    sd = opt.state_dict()
    rank_entry = gradzip.comm.rank_state.unpack(sd["gradzip"], rank, dist.get_world_size())
    held = "warmup" in rank_entry and bool(rank_entry["warmup"])
    torch.save({"model": model.module.state_dict(), "opt": sd}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model, opt = make()
    model.module.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    for t in range(n1, steps):
        one_step(model, opt, rank, t)
    return snapshot(ordered(opt)), held


def warmup_codec_manual(rank, world, steps=5, warmup=4):
    """Without DDP, an int8 warm-up through reduce_gradients(): ``a`` (3000 elements) has a
    gradient everywhere, ``b`` (2000) on every rank but 0, ``c`` (50) nowhere; one buffer of
    5050 elements, above min_numel, so it is compressed."""
    torch.manual_seed(2)
    a, b, c = nn.Parameter(torch.randn(3000)), nn.Parameter(torch.randn(2000)), \
        nn.Parameter(torch.randn(50))
    opt = CompressedAdamW([a, b, c], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                          codec=codec("sign"), warmup_steps=warmup, warmup_codec=codec("int8"))
    log = {"init": snapshot([a, b, c]), "before": [], "after": [], "pending": []}
    for t in range(steps):
        g = torch.Generator().manual_seed(101 * rank + t)
        opt.zero_grad(set_to_none=True)
        a.grad = torch.randn(3000, generator=g)
        if rank != 0:
            b.grad = torch.randn(2000, generator=g)
        log["before"].append(snapshot([a.grad, b.grad, c.grad]))
        opt.reduce_gradients()
        log["after"].append(snapshot([a.grad, b.grad, c.grad]))
        if t < warmup:
            log["pending"].append({k: opt.warmup_state.feedback.pending(k)
                                   for k in list(opt.warmup_state.feedback.keys())})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # c never had a gradient
            opt.step()
        if t == warmup - 1:
            log["warm_end"] = snapshot([a, b, c])
            log["warmup_keys"] = list(opt.warmup_state.feedback.keys())
    log["bytes"] = opt.bytes_per_step()
    return log


def warmup_codec_battery(rank: int, world: int) -> dict:
    out = {"ddp": warmup_codec_ddp(rank), "manual": warmup_codec_manual(rank, world)}
    out["resume"] = {n1: warmup_codec_resume(rank, n1) for n1 in (None, 2, 5)}
    out["overflow"] = overflow_run(rank, world, warmup_codec="int8")
    m = DDP(MLP())
    o = CompressedAdamW(m.parameters(), codec=codec("sign"),
                        warmup_codec=codec("int8") if rank == 0 else None)
    out["disagree"] = catch(lambda: o.attach(m))
    # a warm-up state loaded into an attached model that has already run a backward
    model, opt = build("sign", warmup=5, warmup_codec="int8", bucket_mb=WARMUP_CODEC_BUCKET_MB)
    one_step(model, opt, rank, 0)
    sd = opt.state_dict()
    one_step(model, opt, rank, 1)
    out["late-load"] = catch(lambda: opt.load_state_dict(sd))
    return out


def local_run(rank, steps=10, warmup=2, refresh=2, local=3, average_momentum=True,
              refresh_codec=None, spec="int4", algorithm="alltoall"):
    """local_steps=3 with refreshes at post-warm-up steps 2 and 6: an interval cut short by
    a refresh, one ended by the count, and one left open at the end (closed by
    synchronise())."""
    model, opt = build(spec, warmup=warmup, refresh=refresh, local=local,
                       average_momentum=average_momentum, refresh_codec=refresh_codec,
                       algorithm=algorithm)
    log = {"init": snapshot(ordered(opt)), "before": [], "after": []}
    for t in range(steps):
        one_step(model, opt, rank, t, log)
    log["open"] = (opt.synchronised, snapshot(ordered(opt)))
    log["state_dict"] = catch(opt.state_dict)
    groups = len(opt.param_groups)
    log["add_group"] = (catch(lambda: opt.add_param_group({"params": [nn.Parameter(
        torch.zeros(2))]})), len(opt.param_groups) == groups)
    opt.synchronise()
    log["closed"] = (opt.synchronised, snapshot(ordered(opt)))
    log["momenta"] = snapshot(opt.state[p]["exp_avg"] for p in ordered(opt))
    log["pending"] = {k: opt.feedback.pending(k) for k in list(opt.feedback.keys())}
    log["state_dict_after"] = sorted(opt.state_dict()["gradzip"])
    return log


def own_exact_refresh(rank):
    """average_momentum=False with exact refreshes: two warm-up steps, one local step (the
    ranks' momenta now differ), then the refresh at post-warm-up step 2."""
    model, opt = build("int4", warmup=2, refresh=2, local=3, average_momentum=False)
    log = {"before": [], "after": []}
    for t in range(3):
        one_step(model, opt, rank, t, log)
    log["m_before"] = snapshot(opt.state[p]["exp_avg"] for p in ordered(opt))
    log["v"] = snapshot(opt.state[p]["exp_avg_sq"] for p in ordered(opt))
    one_step(model, opt, rank, 3, log)
    log["m_after"] = snapshot(opt.state[p]["exp_avg"] for p in ordered(opt))
    log["keys"] = list(opt.feedback.keys())
    return log


def battery(rank: int, world: int) -> dict:
    out = {}
    out["local"] = local_run(rank)
    out["local-own"] = local_run(rank, steps=12, average_momentum=False, refresh_codec="int8")
    out["own-exact-refresh"] = own_exact_refresh(rank)
    # the 1-bit setting of the docs: sign, each rank's signs to every other rank
    out["local-own-sign"] = local_run(rank, steps=12, average_momentum=False,
                                      refresh_codec="int8", spec="sign", algorithm="allgather")
    # local_steps=2 after a 3-step warm-up: steps 5 and 7 synchronise; saved at step 5
    model, opt = build("int4", local=2)
    for t in range(STEPS):
        one_step(model, opt, rank, t)
    out["local-resume"] = {"whole": snapshot(ordered(opt)), "synchronised": opt.synchronised,
                           "dcp": resume_run(rank, "int4", 5, STEPS - 5, via="dcp", local=2),
                           "save": resume_run(rank, "int4", 5, STEPS - 5, local=2)}
    # the same with each rank's own momentum: saved with the ranks' momenta differing
    model, opt = build("int4", local=2, average_momentum=False)
    for t in range(STEPS):
        one_step(model, opt, rank, t)
    out["own-resume"] = {
        "whole": (snapshot(ordered(opt)), snapshot(opt.state[p]["exp_avg"] for p in ordered(opt))),
        "dcp": resume_run(rank, "int4", 5, STEPS - 5, via="dcp", local=2, average_momentum=False),
        "save": resume_run(rank, "int4", 5, STEPS - 5, local=2, average_momentum=False)}
    out["warmup-only"] = train(rank, "sign", steps=5, warmup=5)
    for spec, algo, pre in CASES:
        out[("train", spec, algo, pre)] = train(rank, spec, algorithm=algo, precondition=pre)
    out["refresh"] = train(rank, "sign", steps=10, warmup=2, refresh=1)
    out["refresh-int8"] = train(rank, "sign", steps=10, warmup=2, refresh=1, refresh_max=2,
                                refresh_codec="int8")
    for spec in ("sign", "topk:0.05"):
        model, opt = build(spec)
        for t in range(STEPS):
            one_step(model, opt, rank, t)
        whole = snapshot(ordered(opt))
        out[("resume", spec)] = {n1: resume_run(rank, spec, n1, STEPS - n1)
                                 for n1 in (2, 5)}
        out[("resume", spec)]["whole"] = whole
        out[("resume", spec)]["dcp"] = resume_run(rank, spec, 5, STEPS - 5, via="dcp")
    out["overflow"] = overflow_run(rank, world)
    out["none-some"] = manual_run(rank, world, "some")
    out["none-zeros"] = manual_run(rank, world, "zeros")
    out["errors"] = error_cases(rank, world)
    return out


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def results(request):
    world = request.param
    return world, run_ranks(world, battery)


def assert_same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), (what, i, float((g - w).abs().max()))


def test_warmup_is_adamw_bit_for_bit(results):
    """Five warm-up steps equal torch.optim.AdamW fed the same averaged gradients."""
    world, res = results
    runs = [res[r]["warmup-only"] for r in range(world)]
    for r in range(1, world):
        assert_same(runs[r]["final"], runs[0]["final"], "ranks")
        assert_same(runs[r]["before"][-1], runs[0]["before"][-1], "averaged gradients")
    params = [nn.Parameter(t.clone()) for t in runs[0]["init"]]
    n_weights = sum(1 for p in params if p.dim() > 1)
    adamw = torch.optim.AdamW([{"params": params[:n_weights], "weight_decay": WD},
                               {"params": params[n_weights:], "weight_decay": 0.0}],
                              lr=LR, betas=BETAS, eps=EPS)
    for grads in runs[0]["after"]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        adamw.step()
    assert_same(runs[0]["final"], [p.detach() for p in params], "AdamW")
    assert not torch.equal(runs[0]["final"][0], runs[0]["init"][0])


@pytest.mark.parametrize("spec,algo,pre", CASES)
def test_after_warmup_matches_reference_simulation(results, spec, algo, pre):
    world, res = results
    runs = [res[r][("train", spec, algo, pre)] for r in range(world)]
    for r in range(1, world):
        assert_same(runs[r]["final"], runs[0]["final"], "ranks")
    assert all(run["local_grads"] for run in runs)
    want, mean = replay(runs, spec, algo, WARMUP, precondition=pre)
    assert_same(runs[0]["final"], want, (spec, algo))
    # the residuals the ranks keep are the simulation's
    for r in range(world):
        (pending,) = runs[r]["pending"].values()
        assert torch.equal(pending, mean.pending(r)), (spec, algo, r)
    # after warm-up the gradients were local: they differ between ranks
    assert not torch.equal(runs[0]["before"][-1][0], runs[1]["before"][-1][0])


def test_local_steps_match_reference_simulation(results):
    """local_steps=3, int4, two refreshes: bit for bit the simulation, the residuals of both
    compressed all-reduces included; between synchronisations the ranks differ, and
    state_dict() refuses until synchronise()."""
    world, res = results
    runs = [res[r]["local"] for r in range(world)]
    want, moved, mom, open_params, _ = replay_local(runs, "int4", warmup=2, refresh=2,
                                                    local=3)
    assert open_params is not None  # the run ended inside an interval
    for r in range(world):
        synced, closed = runs[r]["closed"]
        assert synced and not runs[r]["open"][0]
        assert_same(closed, want, ("synchronised", r))
        # before synchronise(): this rank's own parameters, as the simulation's rank r
        assert_same(runs[r]["open"][1], open_params[r], ("open interval", r))
        err = runs[r]["state_dict"]
        assert err[0] == "RuntimeError" and "synchronise()" in err[1] and "local" in err[1]
        err, unchanged = runs[r]["add_group"]
        assert err[0] == "RuntimeError" and "synchronise()" in err[1] and unchanged
        assert "rank" in " ".join(runs[r]["state_dict_after"])
        keys = sorted(runs[r]["pending"], key=len)
        assert len(keys) == 2 and keys[1][-1] == "moved"
        assert torch.equal(runs[r]["pending"][keys[0]], mom.pending(r))
        assert torch.equal(runs[r]["pending"][keys[1]], moved.pending(r))
    assert not torch.equal(runs[0]["open"][1][0], runs[1]["open"][1][0])
    assert not torch.equal(runs[0]["open"][1][0], want[0])


@pytest.mark.parametrize("case, spec, algorithm", [("local-own", "int4", "alltoall"),
                                                   ("local-own-sign", "sign", "allgather")])
def test_own_momenta_match_reference_simulation(results, case, spec, algorithm):
    """average_momentum=False (local_steps=3, 12 steps, int8 refreshes at post-warm-up
    steps 2 and 6): a synchronisation averages the parameters only, each rank keeps its own
    momentum, and a refresh averages the momenta first (at 6 with no interval open) through
    int8 without residuals; after the synchronisation at post-warm-up step 9 the ranks go on
    with their own momenta: bit for bit the simulation, residuals included; at the end the
    ranks' momenta differ, each the simulation's rank's. With int4 two-phase, and with the
    1-bit setting of the docs (sign, each rank's signs of its movement, with its own
    residual, sent to every rank by the all-gather)."""
    world, res = results
    runs = [res[r][case] for r in range(world)]
    want, moved, _, open_params, momenta = replay_local(
        runs, spec, warmup=2, refresh=2, local=3, average_momentum=False,
        refresh_codec="int8", algorithm=algorithm)
    for r in range(world):
        assert runs[r]["closed"][0] and not runs[r]["open"][0]
        assert_same(runs[r]["closed"][1], want, ("synchronised", r))
        assert_same(runs[r]["open"][1], open_params[r], ("open interval", r))
        assert_same(runs[r]["momenta"], momenta[r], ("own momentum", r))
        # the momenta's averages before the refreshes left no residual: only the movement's
        (key,) = runs[r]["pending"]
        assert key[-1] == "moved"
        assert torch.equal(runs[r]["pending"][key], moved.pending(r))
    assert not torch.equal(runs[0]["momenta"][0], runs[1]["momenta"][0])
    # not the method that averages the momenta too, nor (sign) the two-phase algorithm
    same = replay_local(runs, spec, warmup=2, refresh=2, local=3, refresh_codec="int8",
                        algorithm=algorithm)[0]
    assert not torch.equal(runs[0]["closed"][1][0], same[0])
    if algorithm == "allgather":
        two_phase = replay_local(runs, spec, warmup=2, refresh=2, local=3,
                                 average_momentum=False, refresh_codec="int8")[0]
        assert not torch.equal(two_phase[0], want[0])


def test_own_momenta_before_an_exact_refresh_are_averaged_exactly(results):
    """average_momentum=False, refresh_codec=None: the ranks' own momenta (different after
    a local step) are averaged by a plain all-reduce before the exact refresh step, which
    then folds the averaged gradient in: every rank holds the same momentum, that of the
    mean, and no residual is kept for it. The tolerance: Gloo sums the ranks' momenta
    (divided by the frozen denominator, multiplied back after) in its own order, a few
    float32 roundings that a sum in Python's order need not reproduce."""
    world, res = results
    runs = [res[r]["own-exact-refresh"] for r in range(world)]
    assert not torch.equal(runs[0]["m_before"][0], runs[1]["m_before"][0])
    for r in range(world):
        assert_same(runs[r]["m_after"], runs[0]["m_after"], ("same momentum", r))
        assert all(key[-1] == "moved" for key in runs[r]["keys"])
    for i, got in enumerate(runs[0]["m_after"]):
        mean = (sum(run["m_before"][i] for run in runs) / world).masked_fill_(
            runs[0]["v"][i] == 0, 0.0)
        want = torch.lerp(mean, runs[0]["after"][3][i], 1 - BETAS[0])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_own_momenta_resume_is_bit_identical(results):
    """average_momentum=False, saved at step 5 of 8 (synchronised parameters, each rank's
    own momentum) through DCP and torch.save: each rank gets its own momentum back and the
    resumed run ends where the uninterrupted one does."""
    world, res = results
    for r in range(world):
        case = res[r]["own-resume"]
        for via in ("dcp", "save"):
            assert_same(case[via][0], case["whole"][0], (via, "parameters", r))
            assert_same(case[via][1], case["whole"][1], (via, "momenta", r))
    assert not torch.equal(res[0]["own-resume"]["whole"][1][0],
                           res[1]["own-resume"]["whole"][1][0])


def test_local_steps_resume_is_bit_identical(results):
    """Saved synchronised (step 5 of 8, local_steps=2), through DCP and torch.save: the
    resumed run ends where the uninterrupted one does, inside an open interval, each rank
    with its own parameters."""
    world, res = results
    for r in range(world):
        case = res[r]["local-resume"]
        assert not case["synchronised"]
        assert_same(case["dcp"], case["whole"], ("dcp", r))
        assert_same(case["save"], case["whole"], ("torch.save", r))
    assert not torch.equal(res[0]["local-resume"]["whole"][0], res[1]["local-resume"]["whole"][0])


def test_zero_variance_coordinates_only_decay(results):
    """Column 0 of l1.weight never had a gradient (v == 0): after warm-up it is moved by
    weight decay alone, although a 1-bit code cannot carry the zero momentum there."""
    _, res = results
    run = res[0][("train", "sign", "alltoall", True)]
    col = run["init"][0][:, 0].clone()
    for _ in range(STEPS):
        col.mul_(1 - LR * WD)
    assert torch.equal(run["final"][0][:, 0], col)


def test_variance_refresh_steps_are_adamw(results):
    """refresh=1 after a 2-step warm-up: steps 2, 4, 8 (post-warm-up steps 1, 3, 7) are
    exact AdamW steps on averaged gradients whose second-moment update stands in for the
    compressed steps before them (beta2**gap), the others compressed."""
    world, res = results
    runs = [res[r]["refresh"] for r in range(world)]
    want, _ = replay(runs, "sign", "alltoall", 2, refresh=1)
    assert_same(runs[0]["final"], want, "refresh")
    assert [t for t in range(10) if refresh_due(t, 2, 1)] == [2, 4, 8]
    assert torch.equal(runs[0]["after"][2][0], runs[1]["after"][2][0])  # averaged there
    assert not torch.equal(runs[0]["after"][3][0], runs[1]["after"][3][0])  # local


def test_capped_compressed_refreshes_match_reference(results):
    """refresh=1, refresh_max_interval=2, refresh_codec="int8" after a 2-step warm-up:
    steps 2, 4, 6, 8 (post-warm-up 1, 3, 5, 7: the gaps stop doubling at 2) are AdamW steps
    on the int8 two-phase average of the ranks' gradients (no residuals), the others
    compressed momentum steps: bit for bit the simulation."""
    world, res = results
    runs = [res[r]["refresh-int8"] for r in range(world)]
    assert [t for t in range(10) if refresh_due(t, 2, 1, cap=2)] == [2, 4, 6, 8]
    want, _ = replay(runs, "sign", "alltoall", 2, refresh=1, cap=2, refresh_codec="int8")
    for r in range(world):
        assert_same(runs[r]["final"], want, ("refresh-int8", r))
        for t in (2, 4, 6, 8):  # the gradients the refresh stepped with, on every rank
            assert_same(runs[r]["after"][t], refresh_gradients(runs, t, "int8"), (r, t))
    exact = sum(run["before"][4][0] for run in runs) / world
    assert not torch.equal(runs[0]["after"][4][0], exact)  # compressed, not exact
    # int8 twice (worker and server): within ~1/127 of a block's largest magnitude
    assert torch.allclose(runs[0]["after"][4][0], exact, rtol=0,
                          atol=float(exact.abs().max()) / 50)
    assert not torch.equal(runs[0]["after"][5][0], runs[1]["after"][5][0])  # local


def test_resume_is_bit_identical(results):
    """Saved after warm-up (step 5), the resumed run is bit-identical to the one that never
    stopped. Saved during warm-up (step 2) too with 2 ranks; with 3, the first resumed
    iteration goes through DDP's initial bucket layout (DDP rebuilds its buckets after the
    first iteration of every new instance), so Gloo's ring sums some gradient elements in
    another order: the optimizer's own state is restored exactly, the averaged gradient of
    that one step differs by float rounding (as it would for torch.optim.AdamW under DDP)."""
    world, res = results
    for spec in ("sign", "topk:0.05"):
        for r in range(world):
            case = res[r][("resume", spec)]
            assert_same(case[5], case["whole"], (spec, 5, r))
            assert_same(case["dcp"], case["whole"], (spec, "dcp", r))
            if world == 2:
                assert_same(case[2], case["whole"], (spec, 2, r))
            else:
                for got, want in zip(case[2], case["whole"]):
                    assert torch.allclose(got, want, rtol=0, atol=1e-6), (spec, 2, r)


def test_overflow_skips_on_every_rank(results):
    """GradScaler: the last rank's gradient holds inf at steps 1 (warm-up: DDP's average
    spreads it) and 5 (after warm-up: only that rank sees it). Both steps are skipped on
    every rank, the residuals are untouched, and training goes on identically."""
    world, res = results
    assert_overflow_skipped([res[r]["overflow"] for r in range(world)])


def assert_overflow_skipped(logs: list) -> None:
    """``overflow_run``'s logs, one per rank: steps 1 and 5 skipped on every rank, the
    residuals (the warm-up's too, if any) finite and the momentum's untouched, the ranks
    identical throughout."""
    for r, log in enumerate(logs):
        for t, entry in enumerate(log):
            bad = t in (1, 5)
            assert entry["moved"] is not bad, (r, t)
            assert entry["taken"] == (0 if bad else 1), (r, t)
            assert entry["residuals_kept"] or not bad, (r, t)
            assert entry["residuals_finite"] and entry["warmup_residuals_finite"], (r, t)
            assert_same(entry["params"], logs[0][t]["params"], (r, t))


def test_gradients_none_on_some_ranks(results):
    """Without DDP: ``a`` has no gradient on rank 0 -> exactly as a zero gradient there;
    ``b`` has none anywhere -> never updated, no state (as AdamW)."""
    world, res = results
    for r in range(world):
        some, zeros = res[r]["none-some"], res[r]["none-zeros"]
        for name in ("a", "c"):
            assert torch.equal(some[name], zeros[name]), (r, name)
            assert torch.equal(some[name], res[0]["none-some"][name]), (r, name)
        assert torch.equal(some["b"], some["b0"]), r
        assert some["a_step"] == 6
        # b joined the momentum buffer after warm-up, with nothing to move it
        assert int(some["b_state"]["step"]) == 0 and not some["b_state"]["exp_avg"].any()


def test_errors_raise_on_every_rank(results):
    world, res = results
    for r in range(world):
        e = res[r]["errors"]
        assert e["twice"][0] == "RuntimeError" and "already attached" in e["twice"][1]
        assert e["hooked"][0] == "RuntimeError" and "already has a comm" in e["hooked"][1]
        assert e["params"][0] == "ValueError" and "trainable" in e["params"][1]
        for case in ("codec", "warmup", "warmup-manual", "local", "refresh-codec",
                     "own-momentum"):
            assert e[case] is not None and e[case][0] == "ValueError", (r, case, e[case])
            assert "disagree" in e[case][1], (r, case)
        assert "codec=sign" in e["codec"][1] and "codec=int4" in e["codec"][1]
        assert "warmup_steps=3" in e["warmup"][1] and "warmup_steps=4" in e["warmup"][1]
        assert "local_steps=1" in e["local"][1] and "local_steps=2" in e["local"][1]
        assert "refresh_codec=int8" in e["refresh-codec"][1] and \
            "refresh_codec=None" in e["refresh-codec"][1]
        assert "average_momentum=False" in e["own-momentum"][1]
        assert e["out-of-step"] is not None and e["out-of-step"][0] == "ValueError", \
            (r, e["out-of-step"])
        assert "steps_taken=4" in e["out-of-step"][1] and "steps_taken=5" in \
            e["out-of-step"][1]
        assert e["sparse"][0] == "RuntimeError" and "sparse" in e["sparse"][1]
        assert e["sparse-params"][1] == 0 and not e["sparse-params"][0].any()
        assert e["sparse-warmup"][0] == "RuntimeError" and "sparse" in e["sparse-warmup"][1]


# ---- warmup_codec: the warm-up's gradients compressed ----------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def warmup_results(request):
    world = request.param
    return world, run_ranks(world, warmup_codec_battery)


def test_compressed_warmup_is_adamw_on_the_ddp_hooks_gradients(warmup_results):
    """With DDP: each warm-up step's averaged gradients are, bit for bit, those of gradzip's
    DDP hook (int8, two-phase, error feedback) on a twin model fed the same batches, and the
    parameters those of torch.optim.AdamW on them. The residuals are dropped at the end."""
    world, res = warmup_results
    for r in range(world):
        run = res[r]["ddp"]
        assert_same(run["final"], res[0]["ddp"]["final"], ("ranks", r))
        for t, (got, want) in enumerate(zip(run["after"], run["twin_grads"], strict=True)):
            assert_same(got, want, ("averaged gradients", r, t))
        assert_same(run["final"], run["twin"], ("AdamW", r))
        assert run["warmup_keys_before_end"] and not run["warmup_keys"]
    assert not torch.equal(res[0]["ddp"]["final"][0], res[0]["ddp"]["init"][0])


def test_compressed_warmup_without_ddp_matches_reference(warmup_results):
    """reduce_gradients() with warmup_codec="int8": the average is the reference's two-phase
    int8 all-reduce of the ranks' gradients (None as zeros) with worker and server
    residuals, a gradient that only some ranks hold becomes the average on every rank, one
    that no rank holds stays None; the warm-up is torch.optim.AdamW on those averages."""
    world, res = warmup_results
    runs = [res[r]["manual"] for r in range(world)]
    sizes = [3000, 2000, 50]
    mean = CompressedMean(Codec("int8"), "alltoall", world, sum(sizes))
    warmup = len(runs[0]["pending"])
    params = [nn.Parameter(t.clone()) for t in runs[0]["init"]]
    adamw = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for t in range(warmup):
        xs = [torch.cat([torch.zeros(n) if g is None else g for g, n in
                         zip(run["before"][t], sizes)]) for run in runs]
        avg = mean(xs)
        want = [avg[o : o + n] for o, n in zip(offsets(sizes), sizes)]
        for r, run in enumerate(runs):
            a, b, c = run["after"][t]
            assert torch.equal(a, want[0]) and torch.equal(b, want[1]), (r, t)
            assert c is None, (r, t)
            (pending,) = run["pending"][t].values()
            assert torch.equal(pending, mean.pending(r)), (r, t)
        # compressed: not the exact average (int8 twice: within ~1/50 of the largest)
        exact = sum(xs) / world
        assert not torch.equal(avg, exact)
        assert torch.allclose(avg, exact, rtol=0, atol=float(exact.abs().max()) / 50)
        for p, g in zip(params, want[:2] + [None], strict=True):
            p.grad = None if g is None else g.clone()
        adamw.step()
    for r, run in enumerate(runs):
        assert_same(run["warm_end"], [p.detach() for p in params], ("AdamW", r))
        assert not run["warmup_keys"], r
        assert run["bytes"]["warmup"] == gradzip.comm.plan(
            "int8", sum(sizes), torch.float32, world, "alltoall").bytes_sent


def test_compressed_warmup_resume_is_bit_identical(warmup_results):
    """Saved in the middle of the compressed warm-up (step 2: its residuals and DDP's bucket
    layouts travel in the rank's entry) and at its end (step 5), the resumed runs are
    bit-identical to the one that never stopped, past the warm-up to step 8."""
    world, res = warmup_results
    for r in range(world):
        case = {n1: params for n1, (params, _) in res[r]["resume"].items()}
        assert_same(case[2], case[None], (2, r))
        assert_same(case[5], case[None], (5, r))
        assert_same(case[None], res[0]["resume"][None][0], ("ranks", r))
        # the warm-up's residuals travel while it lasts, not after it
        assert res[r]["resume"][2][1] is True and res[r]["resume"][5][1] is False


def test_compressed_warmup_overflow_skips_on_every_rank(warmup_results):
    """GradScaler with an int8 warm-up: the inf at step 1 reaches every rank through the
    compressed average (its block decodes to NaN), the step is skipped everywhere and the
    warm-up's residuals stay finite (a block that held inf keeps its old residual)."""
    world, res = warmup_results
    assert_overflow_skipped([res[r]["overflow"] for r in range(world)])


def test_compressed_warmup_errors(warmup_results):
    world, res = warmup_results
    for r in range(world):
        e = res[r]
        kind, message = e["disagree"]
        assert kind == "ValueError" and "disagree" in message, (r, message)
        assert "warmup_codec=int8" in message and "warmup_codec=None" in message
        kind, message = e["late-load"]
        assert kind == "ValueError" and "before the first backward" in message, (r, message)


# ---------------------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    ({"codec": "int5"}, ValueError, "unknown codec"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ({"variance_refresh": 1.5}, ValueError, "variance_refresh"),
    ({"local_steps": 0}, ValueError, "local_steps"),
    ({"refresh_max_interval": 5}, ValueError, "refresh_max_interval"),
    ({"refresh_max_interval": 0, "variance_refresh": 0}, ValueError, "refresh_max_interval"),
    ({"refresh_max_interval": 20.0}, ValueError, "refresh_max_interval"),
    ({"refresh_codec": "int5"}, ValueError, "unknown codec"),
    ({"warmup_codec": "int5"}, ValueError, "unknown codec"),
    ({"local_steps": 2.0}, ValueError, "local_steps"),
    ({"average_momentum": False}, ValueError, "average_momentum=False needs local_steps"),
    ({"average_momentum": 0, "local_steps": 2}, TypeError, "average_momentum"),
    ({"algorithm": "plain"}, ValueError, "algorithm"),
    ({"seed": -1}, ValueError, "seed"),
    ({"verify": "sometimes"}, ValueError, "verify"),
    ({"amsgrad": True}, ValueError, "amsgrad"),
    ({"fused": True}, ValueError, "fused"),
    ({"foreach": True}, ValueError, "foreach"),
    ({"maximize": 1}, TypeError, "maximize"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"betas": (1.0, 0.9)}, ValueError, "betas"),
    ({"betas": (0.9,)}, ValueError, "betas"),
])
def test_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        CompressedAdamW([nn.Parameter(torch.zeros(3))], **kwargs)


def test_attach_needs_ddp_and_step_needs_a_group():
    p = nn.Parameter(torch.zeros(3))
    opt = CompressedAdamW([p])
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        opt.attach(nn.Linear(3, 3))
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        opt.step()


def test_bytes_per_step():
    """1-bit momentum, two-phase, 4 ranks, 1 M parameters: >= 20x fewer bytes per step
    than the warm-up's plain all-reduce (headers, scales and the agreement counted)."""
    params = [nn.Parameter(torch.zeros(1000, 1000)), nn.Parameter(torch.zeros(1000))]
    sizes = CompressedAdamW(params, codec="sign").bytes_per_step(world_size=4)
    n = 1_001_000
    assert sizes["warmup"] == 2 * 3 * n * 4 // 4
    plan = gradzip.comm.plan("sign", n, torch.float32, 4, "alltoall")
    assert sizes["compressed"] == plan.bytes_sent + 3 * (14 + 2)
    assert sizes["warmup"] / sizes["compressed"] >= 20
    assert sizes["refresh"] == sizes["warmup"] + 3 * (14 + 2)
    assert sizes["synchronisation"] == plan.bytes_sent
    # local steps: a synchronisation (parameters moved + momentum) every 4th step
    int4 = gradzip.comm.plan("int4", n, torch.float32, 4, "alltoall").bytes_sent
    local = CompressedAdamW(params, codec="int4", local_steps=4).bytes_per_step(world_size=4)
    assert local["synchronisation"] == 2 * int4
    assert local["compressed"] == 3 * (14 + 2) + 2 * int4 // 4
    assert local["warmup"] / local["compressed"] >= 14  # int4 every 2 steps' worth


def test_bytes_after_warmup_follows_the_schedule():
    """int4, local_steps=3, 4 ranks, 10 post-warm-up steps, counted by hand from
    gradzip.comm.plan: refreshes every 4 steps through int8 (posts 4, 8: each ends its
    interval, no synchronisation before it), or doubling from 2 (posts 2, 6: the first cuts
    an interval short, so a synchronisation precedes it); the interval still open at the end
    is closed once."""
    params = [nn.Parameter(torch.zeros(1000, 1000)), nn.Parameter(torch.zeros(1000))]
    n, agree = 1_001_000, 3 * (14 + 2)
    sync = 2 * gradzip.comm.plan("int4", n, torch.float32, 4, "alltoall").bytes_sent
    int8 = gradzip.comm.plan("int8", n, torch.float32, 4, "alltoall").bytes_sent
    plain = gradzip.comm.plan("int4", n, torch.float32, 4, "plain").bytes_sent
    capped = CompressedAdamW(params, codec="int4", local_steps=3, variance_refresh=4,
                             refresh_max_interval=4, refresh_codec="int8")
    assert [k for k in range(1, 11) if capped.refresh_at(k)] == [4, 8]
    assert capped.bytes_per_step(4)["refresh"] == int8 + agree
    # steps 1-3, 5-7: local, synchronised at 3 and 7; 9-10 local, closed at the end
    assert capped.bytes_after_warmup(10, 4) == (8 * agree + 3 * sync + 2 * (int8 + agree)) / 10
    doubling = CompressedAdamW(params, codec="int4", local_steps=3, variance_refresh=2)
    assert [k for k in range(1, 11) if doubling.refresh_at(k)] == [2, 6]
    # 1 | sync, refresh 2 | 3-5 sync | refresh 6 | 7-9 sync | 10, closed at the end
    assert doubling.bytes_after_warmup(10, 4) == (8 * agree + 4 * sync + 2 * (plain + agree)) / 10
    sign = CompressedAdamW(params, codec="sign", variance_refresh=3)
    packed = gradzip.comm.plan("sign", n, torch.float32, 4, "alltoall").bytes_sent
    assert sign.bytes_after_warmup(10, 4) == (8 * (packed + agree) + 2 * (plain + agree)) / 10
    assert sign.bytes_after_warmup(0, 4) == 0.0
    # each rank's own momentum: a synchronisation is the movement alone; a refresh first
    # averages the momenta (at 4 the interval just ended; at 8 also), 9-10 closed at the end
    own = CompressedAdamW(params, codec="int4", local_steps=3, variance_refresh=4,
                          refresh_max_interval=4, refresh_codec="int8", average_momentum=False)
    assert own.bytes_per_step(4)["synchronisation"] == sync // 2
    assert own.bytes_per_step(4)["refresh_momentum"] == int8  # as the refresh's gradients
    assert own.bytes_after_warmup(10, 4) == \
        (8 * agree + 3 * sync // 2 + 2 * (int8 + int8 + agree)) / 10


def test_refresh_schedule_with_a_cap():
    opt = CompressedAdamW([nn.Parameter(torch.zeros(3))], variance_refresh=10,
                          refresh_max_interval=40)
    assert [k for k in range(1, 300) if opt.refresh_at(k)] == [10, 30, 70, 110, 150, 190, 230,
                                                                 270]
    assert [k for k in range(1, 700) if CompressedAdamW(
        [nn.Parameter(torch.zeros(3))]).refresh_at(k)] == [10, 30, 70, 150, 310, 630]
    never = CompressedAdamW([nn.Parameter(torch.zeros(3))], variance_refresh=0)
    assert not any(never.refresh_at(k) for k in range(1, 100))


def test_state_dict_checks_and_adamw_state():
    p = nn.Parameter(torch.zeros(3))
    opt = CompressedAdamW([p], codec="sign")
    sd = opt.state_dict()
    assert sd["gradzip"]["codec"] == "sign" and sd["gradzip"]["steps_taken"] == 0
    with pytest.raises(ValueError, match="saved with codec 'sign'"):
        CompressedAdamW([p], codec="int4").load_state_dict(sd)
    with pytest.raises(ValueError, match="not a gradzip CompressedAdamW"):
        CompressedAdamW([p]).load_state_dict({**sd, "gradzip": {"version": 9}})
    with pytest.raises(ValueError, match="saved by a run of 2 ranks, this run has 1"):
        CompressedAdamW([p]).load_state_dict({**sd, "gradzip": {**sd["gradzip"],
                                                                "world_size": 2}})
    others = {k: v for k, v in sd["gradzip"].items() if k != "rank0_of_1"}
    with pytest.raises(ValueError, match=r"not rank 0's \('rank0_of_1'\)"):
        CompressedAdamW([p]).load_state_dict({**sd, "gradzip": others})
    # a torch.optim.AdamW state_dict: the steps taken are its step count
    adamw = torch.optim.AdamW([p])
    for _ in range(4):
        p.grad = torch.ones(3)
        adamw.step()
    opt = CompressedAdamW([p], warmup_steps=10)
    opt.load_state_dict(adamw.state_dict())
    assert opt.steps_taken == 4 and opt.warming_up
    assert opt.state[p]["variance_step"] == 4
    assert torch.equal(opt.state[p]["exp_avg"], adamw.state[p]["exp_avg"])
    # ... past the warm-up, that state has no residuals: said, not silent
    with pytest.warns(UserWarning, match="residuals start from zero"):
        CompressedAdamW([p], warmup_steps=2).load_state_dict(adamw.state_dict())
    # init_state: zero moments at step 0, no step taken, nothing communicated
    fresh = CompressedAdamW([p])
    fresh.init_state()
    assert fresh.state[p]["step"].item() == 0 and fresh.steps_taken == 0
    assert not fresh.state[p]["exp_avg"].any() and fresh.state[p]["variance_step"] == 0


def test_warmup_codec_bytes_and_state_dict_checks():
    """The warm-up's bytes are the two-phase plan of its codec; a state saved during a
    compressed warm-up holds its residuals and refuses an optimizer without that codec;
    after the warm-up it holds none."""
    params = [nn.Parameter(torch.zeros(1000, 1000)), nn.Parameter(torch.zeros(1000))]
    n = 1_001_000
    opt = CompressedAdamW(params, codec="sign", warmup_codec="int8")
    assert opt.bytes_per_step(world_size=4)["warmup"] == gradzip.comm.plan(
        "int8", n, torch.float32, 4, "alltoall").bytes_sent
    assert CompressedAdamW(params).bytes_per_step(world_size=4)["warmup"] == 2 * 3 * n * 4 // 4
    assert "warmup_codec='int8'" in repr(opt)
    p = nn.Parameter(torch.zeros(5000))
    opt = CompressedAdamW([p], codec="sign", warmup_steps=3, warmup_codec="int8")
    sd = opt.state_dict()
    entry = gradzip.comm.rank_state.unpack(sd["gradzip"], 0, 1)
    assert entry["warmup"]["codec"] == "int8"
    with pytest.raises(ValueError, match="warmup_codec=None"):
        CompressedAdamW([p], codec="sign", warmup_steps=3).load_state_dict(sd)
    with pytest.raises(ValueError, match="saved with codec 'int8'"):
        CompressedAdamW([p], codec="sign", warmup_steps=3, warmup_codec="int4").load_state_dict(sd)
    CompressedAdamW([p], codec="sign", warmup_steps=3, warmup_codec="int8").load_state_dict(sd)


def test_recommended_settings():
    """recommended() builds the measured setting with its warm-up fraction of the run;
    keyword arguments override; unknown codecs and run lengths are refused."""
    p = [nn.Parameter(torch.zeros(3))]
    opt = CompressedAdamW.recommended(p, "sign", total_steps=1000, lr=3e-3)
    assert (opt.codec.spec, opt.algorithm, opt.local_steps, opt.average_momentum,
            opt.refresh_max_interval, opt.warmup_steps) == ("sign", "allgather", 3, False, 40,
                                                            250)
    assert opt.refresh_codec.spec == "int8" and opt.warmup_codec.spec == "int8"
    assert opt.defaults["lr"] == 3e-3
    four = CompressedAdamW.recommended(p, "int4", total_steps=500, warmup_steps=7)
    assert four.codec.spec == "int4" and four.local_steps == 4 and four.warmup_steps == 7
    assert CompressedAdamW.recommended(p, "topk:0.01", total_steps=10).warmup_steps == 4
    with pytest.raises(ValueError, match="no recommended .* 'int2'.*sign, int4, topk:0.01"):
        CompressedAdamW.recommended(p, "int2", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        CompressedAdamW.recommended(p, total_steps=0)
    with pytest.raises(ValueError, match="total_steps"):
        CompressedAdamW.recommended(p, total_steps=10.5)


# ---- compiled DDP ----------------------------------------------------------------------


def compiled_run(rank, mode: str, steps=6, warmup=WARMUP, warmup_codec=None):
    """``mode``: "buckets" (eager DDP, the reference run), "reducer" (compiled DDP's python
    reducer, eager backward: the hook is called per parameter, eagerly), "compiled" (the
    same with compiled autograd after the warm-up), "compiled-warmup" (compiled autograd
    from the first step), "twin" (the python reducer with gradzip's own DDP hook, int8 from
    the first step, and torch.optim.AdamW)."""
    import torch._dynamo

    torch._dynamo.reset()
    if mode != "buckets":
        torch._dynamo.config.optimize_ddp = "python_reducer"
    model = DDP(MLP())
    if mode == "twin":
        state = gradzip.ddp.CompressionState(codec("int8"), warmup_steps=0,
                                             algorithm="alltoall")
        model.register_comm_hook(state, gradzip.ddp.compress_hook)
        opt = torch.optim.AdamW(param_groups(model.parameters()), lr=LR, betas=BETAS,
                                eps=EPS)
    else:
        opt = CompressedAdamW(param_groups(model.parameters()), lr=LR, betas=BETAS, eps=EPS,
                              codec=codec("sign"), warmup_steps=warmup,
                              warmup_codec=None if warmup_codec is None else codec(warmup_codec))
        opt.attach(model)
    fwd = model if mode == "buckets" else torch.compile(model, backend="aot_eager")
    try:
        for t in range(steps):
            x, y = batch(rank, t)
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.mse_loss(fwd(x), y)
            traced = mode == "compiled-warmup" or (mode == "compiled" and t >= warmup)
            if traced:
                with torch._dynamo.compiled_autograd._enable(
                        torch.compile(backend="aot_eager")):
                    loss.backward()
            else:
                loss.backward()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # column 0 of l1 has no gradient
                opt.step()
    except ValueError as e:
        return ("ValueError", str(e))
    finally:
        torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    return snapshot(ordered(opt))


def compiled_battery(rank: int, world: int) -> dict:
    out = {mode: compiled_run(rank, mode)
           for mode in ("buckets", "reducer", "compiled", "compiled-warmup")}
    out["reducer-int8"] = compiled_run(rank, "reducer", warmup=STEPS, warmup_codec="int8")
    out["twin"] = compiled_run(rank, "twin")
    return out


def test_compiled_ddp():
    """torch.compile with compiled DDP (the python reducer: the hook is called per
    parameter): eagerly and with compiled autograd after the warm-up, the parameters equal
    the eager DDP run's bit for bit (2 ranks: a sum of two is the same in any order;
    aot_eager runs eager's ATen ops); an int8 warm-up equals gradzip's own per-parameter
    hook with AdamW; compiled autograd during the warm-up is refused on every rank."""
    res = run_ranks(2, compiled_battery)
    for r in range(2):
        want = res[r]["buckets"]
        assert_same(res[r]["reducer"], want, ("reducer", r))
        assert_same(res[r]["compiled"], want, ("compiled", r))
        assert_same(res[r]["reducer-int8"], res[r]["twin"], ("int8 warm-up", r))
        assert_same(res[r]["reducer-int8"], res[0]["reducer-int8"], ("ranks", r))
        assert not all(torch.equal(a, b) for a, b in zip(res[r]["reducer-int8"], want))
        kind, message = res[r]["compiled-warmup"]
        assert kind == "ValueError" and "compiled autograd off" in message, message
        assert f"0 of warmup_steps={WARMUP}" in message, message
