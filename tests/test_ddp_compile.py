"""gradzip's DDP hook under torch.compile, on 2 Gloo ranks (CPU).

* Default mode (DDPOptimizer): the compiled model keeps eager autograd and DDP's bucket
  hooks, so the run must equal the eager DDP run with the same hook.
* Compiled DDP (``optimize_ddp="python_reducer"`` + compiled autograd): DDP calls the hook
  per parameter with ``(grad, param)`` and compiled autograd traces it into the backward
  graph. The gradients must equal an independent eager computation: every rank's plain
  gradients through :func:`gradzip.all_reduce` per parameter (all-gather algorithm, its
  own residual), the first steps and small parameters through the plain all-reduce.

``aot_eager`` runs the same ATen operations as eager mode, so those comparisons are
exact; ``inductor`` (the default backend) fuses and reorders float arithmetic, so its run
is compared with a tolerance.
"""

from __future__ import annotations

import gradzip
import gradzip.ddp
import pytest
import torch
from dist_helpers import run_ranks
from test_ddp import batch, flat_params
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

pytestmark = pytest.mark.distributed

MIN_NUMEL = 100  # the MLP's biases (64, 64, 4) go plain; its weights are compressed


# ---- default mode ------------------------------------------------------------------------


def _wide():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 4))


def default_mode(rank, world, codec, backend, steps=8):
    """Eager and compiled runs of one DDP model (~273k parameters in 1 MiB buckets: DDP's
    first bucket is 1 MiB, and DDPOptimizer wants no bucket smaller than the first)."""
    out = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = DDP(_wide(), bucket_cap_mb=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        state = gradzip.ddp.CompressionState(codec, warmup_steps=2, algorithm="allgather")
        model.register_comm_hook(state, gradzip.ddp.compress_hook)
        fwd = torch.compile(model, backend=backend) if compiled else model
        losses = []
        for t in range(steps):
            x, y = batch(rank, t)
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.mse_loss(fwd(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        out[compiled] = (flat_params(model), losses, state.stats())
    return out


def test_default_mode_matches_eager_exactly():
    res = run_ranks(2, default_mode, "int4", "aot_eager")
    for r in range(2):
        (p_eager, l_eager, st_eager), (p_comp, l_comp, st_comp) = res[r][False], res[r][True]
        assert torch.equal(p_eager, p_comp) and l_eager == l_comp, r
        # the hook really compressed in the compiled run
        assert st_comp["bytes_sent"] < st_comp["uncompressed_bytes"]
        assert st_comp["bytes_sent"] == st_eager["bytes_sent"]
    assert torch.equal(res[0][True][0], res[1][True][0])


def test_default_mode_with_inductor():
    """Inductor's kernels round differently from eager ATen; a gradient that moves by an
    ulp can flip a quantization code, so the runs agree to compression-error scale:
    within 2% of the distance training moved the parameters."""
    res = run_ranks(2, default_mode, "int8", "inductor", 6)
    start = flat_params(_wide())
    for r in range(2):
        p_eager, p_comp = res[r][False][0], res[r][True][0]
        moved = float((p_eager - start).norm())
        assert float((p_comp - p_eager).norm()) <= 0.02 * moved, r
        assert res[r][True][2]["bytes_sent"] < res[r][True][2]["uncompressed_bytes"]
    assert torch.equal(res[0][True][0], res[1][True][0])


# ---- compiled DDP: the (grad, param) call --------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 4))


def compiled_ddp(rank, world, codec, warmup, steps, backend, compiled_autograd=True):
    """Gradients after the hook at every step, and the state's stats."""
    torch._dynamo.config.optimize_ddp = "python_reducer"
    module = _model()
    model = DDP(module)
    state = gradzip.ddp.CompressionState(codec, warmup_steps=warmup, min_numel=MIN_NUMEL,
                                         algorithm="allgather")
    model.register_comm_hook(state, gradzip.ddp.compress_hook)
    fwd = torch.compile(model, backend=backend)
    grads = []
    for t in range(steps):
        x, y = batch(rank, t)
        loss = nn.functional.mse_loss(fwd(x), y)
        if compiled_autograd and t >= warmup:  # warm-up runs eagerly (the hook counts it)
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend=backend)):
                loss.backward()
        else:
            loss.backward()
        grads.append([p.grad.clone() for p in module.parameters()])
        with torch.no_grad():
            for p in module.parameters():
                p -= 0.05 * p.grad
                p.grad = None
    return grads, state.stats()


def reference(rank, world, codec, warmup, steps):
    """The same training without DDP: each parameter's gradient through gradzip.all_reduce,
    in the order the hook sees them (last layer first)."""
    module = _model()
    feedback = gradzip.ErrorFeedback()
    grads = []
    for t in range(steps):
        x, y = batch(rank, t)
        nn.functional.mse_loss(module(x), y).backward()
        params = list(module.parameters())
        for i in reversed(range(len(params))):
            g = params[i].grad
            if t < warmup or g.numel() < MIN_NUMEL:
                gradzip.all_reduce(g, codec, algorithm="plain")
            else:
                gradzip.all_reduce(g, codec, state=feedback, key=i, algorithm="allgather",
                                   min_numel=0)
        grads.append([p.grad.clone() for p in params])
        with torch.no_grad():
            for p in params:
                p -= 0.05 * p.grad
                p.grad = None
    return grads


@pytest.mark.parametrize("codec", ["int8", "topk:0.1"])
def test_compiled_ddp_traced_hook_matches_eager_reduction(codec):
    warmup, steps = 2, 6
    got = run_ranks(2, compiled_ddp, codec, warmup, steps, "aot_eager")
    want = run_ranks(2, reference, codec, warmup, steps)
    for r in range(2):
        for t in range(steps):
            for g, w in zip(got[r][0][t], want[r][t]):
                assert torch.equal(g, w), (r, t)
        st = got[r][1]
        # 4 traced steps x 3 weights compressed, 2 warm-up steps and the biases plain
        assert st["iterations"] == steps
        assert sum(b["compressed_calls"] for b in st["buckets"]) == 3 * (steps - warmup)
        assert sum(b["warmup_calls"] for b in st["buckets"]) == 6 * warmup
        assert st["bytes_sent"] < st["uncompressed_bytes"]
    # the residuals differ per rank, the reduced gradients do not
    assert all(torch.equal(a, b) for a, b in zip(got[0][0][-1], got[1][0][-1]))


def test_python_reducer_without_compiled_autograd_runs_the_hook_eagerly():
    """The python reducer without compiled autograd calls the hook eagerly; it reduces
    synchronously (DDP ignores a returned future), through the same steps."""
    got = run_ranks(2, compiled_ddp, "int4", 1, 4, "aot_eager", False)
    want = run_ranks(2, reference, "int4", 1, 4)
    for r in range(2):
        for t in range(4):
            for g, w in zip(got[r][0][t], want[r][t]):
                assert torch.equal(g, w), (r, t)


def compiled_ddp_errors(rank, world):
    """What the traced hook refuses, each raised eagerly with its message."""
    errors = {}
    for codec in ("int4,rounding=stochastic", "topk:0.1,exact=false"):
        torch._dynamo.reset()
        try:
            compiled_ddp(rank, world, codec, 0, 1, "aot_eager")
            errors[codec] = None
        except ValueError as e:
            errors[codec] = str(e)
    torch._dynamo.reset()
    model = DDP(_model())
    state = gradzip.ddp.CompressionState("int4", warmup_steps=3)
    model.register_comm_hook(state, gradzip.ddp.compress_hook)
    x, y = batch(rank, 0)
    loss = nn.functional.mse_loss(torch.compile(model, backend="aot_eager")(x), y)
    try:
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
            loss.backward()
        errors["warmup"] = None
    except ValueError as e:
        errors["warmup"] = str(e)
    return errors


def test_what_a_compiled_graph_cannot_do_is_a_clear_error():
    for errors in run_ranks(2, compiled_ddp_errors):
        for codec in ("int4,rounding=stochastic", "topk:0.1,exact=false"):
            assert errors[codec] is not None and "per-step seed" in errors[codec], errors
            assert "Supported there: nearest rounding, exact top-k" in errors[codec]
        assert errors["warmup"] is not None and "warmup_steps=3" in errors["warmup"] and \
            "compiled autograd off" in errors["warmup"], errors


def test_hook_accepts_both_call_forms():
    """compress_hook dispatches on the argument: a GradBucket or compiled DDP's tuple."""
    res = run_ranks(2, _one_param_call)
    assert torch.equal(res[0], res[1])
    assert torch.equal(res[0], torch.full((8,), 0.5))  # mean of 0 and 1, plain (small)


def _one_param_call(rank, world):
    state = gradzip.ddp.CompressionState("int4", warmup_steps=0)
    p = torch.nn.Parameter(torch.zeros(8))
    grad = torch.full((8,), float(rank))
    out = gradzip.ddp.compress_hook(state, (grad, p))
    assert out is grad
    return grad
