"""Compressed-momentum AdamW: AdamW whose communication after a warm-up is a compressed
all-reduce of the *momentum*, with worker and server error feedback (1-bit Adam's scheme).

Why not compress the gradient (the DDP hook) under Adam
-------------------------------------------------------
Adam divides each coordinate by the square root of its own running second moment. Error
feedback on the gradient guarantees that the *sum* of the all-reduced gradients tracks the
sum of the exact ones, but Adam's update is not linear in the gradient, so that guarantee
does not carry over to the parameters: compression noise in small coordinates is squared
into their second moment and divided by it, and nothing gives it back. Measured on the
project's character transformer, 1-bit sign through the hook ends +3.4 % and top-k 1 %
+7.9 % above fp32 AdamW (docs/results.md, section 3).

What this optimizer does instead (1-bit Adam, Tang et al. 2021, with one change)
---------------------------------------------------------------------------------
1. **Warm-up** (``warmup_steps`` optimizer steps): exactly ``torch.optim.AdamW`` on fully
   averaged gradients (with :meth:`attach`, the DDP hook does a plain all-reduce; with
   ``warmup_codec``, a compressed one, item 6).
2. **Then** the second moment ``v`` is frozen (with its bias correction), so the update
   ``p -= lr / bc1 * m / d`` with ``d = sqrt(v / bc2) + eps`` is *linear* in the momentum
   ``m``, with a denominator ``d`` that is the same on every rank. Each rank folds its
   local gradient into the shared momentum, ``m_r = lerp(m, g_r, 1 - beta1)``, and the ranks
   all-reduce ``u_r = m_r / d`` through :func:`gradzip.all_reduce` (two-phase "alltoall" by
   default: a worker residual per rank and a server residual per chunk owner). The average
   ``u`` is the step direction on every rank, bit-identical: ``p -= lr / bc1 * u``, and
   ``m = u * d`` is kept for the next step. Because ``d`` is fixed, averaging the ``u_r`` is
   averaging the ``m_r``; error feedback keeps the sum of the all-reduced ``u`` equal to the
   sum of the exact ones up to the residuals, and ``u`` *is* the parameter update, so
   nothing the codec drops is lost, only delayed. DDP's own all-reduce is skipped (the hook
   returns the local gradient unchanged).

   The change from 1-bit Adam: it compresses ``m`` itself (``precondition=False`` here).
   A 1-bit code gives every element of a block the block's mean magnitude, and a block of
   ``m`` mixes coordinates whose ``d`` differ by orders of magnitude; the small-``d`` ones
   then take steps of ``lr * scale / d``, far larger than Adam would ever take: on the
   test MLP (tests/test_optim.py, lr 2e-2) the raw-momentum variant's momentum grew from
   0.008 to 2, 3e6 and NaN in the four steps after warm-up, while the preconditioned one
   trained. Dividing by ``d`` first makes the block share a scale
   in units of the step itself (Adam's steps are O(lr) per coordinate).
3. Coordinates whose frozen second moment is exactly zero (no gradient ever reached them,
   e.g. embedding rows of tokens that never occurred) keep a zero momentum and no update:
   1-bit codes cannot represent zero (DeepSpeed's 1-bit Adam asks the user for this mask;
   here it is derived from ``v``).
4. The second moment is refreshed (``variance_refresh=N``, default 10; 0 keeps it frozen;
   the doubling intervals are 0/1 Adam's, Lu et al. 2022) at post-warm-up steps N, 3N, 7N,
   15N, ...: those steps all-reduce the uncompressed gradient ``g`` and take an exact AdamW
   step in which the ``D`` steps since the last update count as if their squared gradients
   had been this one's, ``v = beta2**D * v + (1 - beta2**D) * g**2`` (what AdamW's ``v``
   would be were the second moment constant over the gap). A frozen ``v`` goes stale as
   gradients shrink during training: it then over-estimates them and slows the end of the
   run (measured: +21 % final loss on the autoencoder with a nearly lossless int8 codec,
   +1.1 % with the refresh). The residuals, owed in units of the old ``1/d``, are
   re-expressed in the new ones. Two options make refreshes cheap enough to be regular:
   ``refresh_max_interval=M`` stops the doubling at M, and ``refresh_codec="int8"`` averages
   the refresh's gradients through an int8 two-phase all-reduce (about a quarter of fp32's
   bytes) without residuals, so that its error enters one step and one update of ``v`` and
   does not accumulate. Why: an experiment that updated ``v`` from the exact averaged
   gradient at *every* step ended level with fp32 on the autoencoder with int8 (+0.00 %
   instead of +1.1 %), and int4 with ``local_steps=6`` at +1.2 % instead of +3.0 %; so
   what the frozen variance costs is that it goes stale between refreshes that come ever
   more rarely (none after post-warm-up step 630 in a 1000-step run). Fixed refreshes
   every 30 steps, exact or int8, took int8 to +0.2 % and int4 every 6 local steps to
   +1.0 %. (The exact running average of all skipped steps' squared gradients, applied
   only at the refreshes, did worse than the one-sample stand-in above, +3.7 %: it lags
   the shrinking gradients.) On the transformer the regular refreshes did not help (see
   docs/results.md, section 4).
5. **Local steps** (``local_steps=N`` > 1; 0/1 Adam's other half, Lu et al. 2022): after
   warm-up each rank takes AdamW's frozen-variance step with its *own* gradient on its own
   parameters and momentum, and only every N-th step (and before a variance refresh) the
   ranks synchronise: they average how far their parameters moved since the interval
   began and their (preconditioned) momenta, each through :func:`gradzip.all_reduce` with
   error feedback of its own; afterwards every rank holds the same parameters and
   momentum, bit for bit. With ``v`` frozen the update is linear in the gradients, so the
   average of the ranks' moves is the move of the average gradient, up to the gradients
   having been evaluated at slightly different points. Two compressed tensors every N
   steps instead of one every step buys N/2 times the bits per element per step: with
   ``codec="int4", local_steps=6`` a step sends about as much as 1-bit sign every step
   (22.5x fewer bytes than fp32 against 25.5x) but keeps far more of the signal
   (docs/results.md, section 4: on the autoencoder +3.0 % above fp32 instead of +13 %; on
   the transformer +0.1 % instead of +0.5 %). Between synchronisations the ranks'
   parameters differ: call :meth:`CompressedAdamW.synchronise` on every rank before
   evaluating or saving (``state_dict()`` refuses while an interval is open,
   :attr:`synchronised` says when).

   ``average_momentum=False`` keeps each rank's momentum its own: a synchronisation
   averages only the movement (one compressed tensor instead of two), and the momenta are
   averaged only before a variance refresh, whose exact step needs a shared one; that
   average goes as the refresh's gradients do (a plain all-reduce, or ``refresh_codec``),
   without residuals, since a residual would be owed since the previous refresh for momenta
   that have changed completely since (with sign, residual-free int8 momenta took the
   autoencoder from +5.4 % to +3.1 % above fp32, everything else equal). Since the
   frozen-variance update is linear, the ranks' momenta average to the momentum of the
   averaged gradient, and so their movements average to the movement of the averaged
   gradient just the same; what each rank's own, noisier momentum costs is only that the
   ranks drift a little further apart within an interval. Half the bytes per
   synchronisation buys twice as many of them: with int8 refreshes every 28 steps, the
   movement alone every 4 steps ended +1.02 % above fp32 on the autoencoder where both
   averaged every 7 steps ended +1.49 % (means over three seeds, 21.2x and 21.1x fewer
   bytes than fp32 per post-warm-up step, everything counted). The state_dict then carries
   each rank's momentum in its own entry.

   Settings measured over both tasks (docs/results.md, section 4, 4 ranks, 1000 steps,
   three seeds each), above fp32 on the autoencoder / the transformer:

   * 1-bit, **within 1 % on every seed**: +0.62 % / +0.15 % at 25.5x fewer bytes per
     post-warm-up step than fp32, reaching fp32's final loss on a 1 Gbit/s link 4.7x
     sooner (the autoencoder; see item 6)::

         CompressedAdamW(params, codec="sign", algorithm="allgather", local_steps=3,
                         average_momentum=False, refresh_max_interval=40,
                         refresh_codec="int8", warmup_codec="int8",
                         warmup_steps=run_steps // 4)
         # the same: CompressedAdamW.recommended(params, "sign", total_steps=run_steps)

     Each rank's own momentum means a codec error reaches the parameters once (1-bit
     Adam's shared momentum applies it again for ~1/(1-beta1) steps); ``"allgather"``
     sends each rank's signs, with its own residual, to every other rank, so no server
     re-compresses their mean into one more 1-bit code (two-phase: +1.9 % on the
     autoencoder); a quarter of the run as warm-up (a fifth: +1.03 % / -0.57 %). The
     all-gather's bytes grow with the ranks: 15.5x fewer than fp32 at 8 ranks, 8.6x at 16.
   * int4, two-phase, a warm-up of a tenth of the run: +1.03 % / +0.87 % at 21.5x
     (5.2x sooner to fp32's loss on the autoencoder, 1 Gbit/s)::

         CompressedAdamW(params, codec="int4", local_steps=4, average_momentum=False,
                         refresh_max_interval=40, refresh_codec="int8",
                         warmup_codec="int8", warmup_steps=run_steps // 10)

   * top-k 1 % as the 1-bit setting with ``local_steps=2`` and a warm-up of 40 % of the
     run: +1.44 % / +0.17 % (transformer: one seed) at 29.6x after the warm-up (8.1x over
     the whole run with the int8 warm-up; 2.4x with an exact one); with a quarter of the
     run, +5.3 %.

6. **Compressed warm-up** (``warmup_codec="int8"``): the warm-up's gradients are averaged
   through the codec, two-phase, with error feedback on the gradient, as the DDP hook
   (:class:`gradzip.ddp.CompressionState`) does with plain AdamW, which keeps AdamW's loss
   at int8 (docs/results.md, section 3). The settings above need long warm-ups (a quarter
   of the run for sign, 40 % for top-k), and an exact warm-up runs at fp32's speed: on the
   1 Gbit/s link the 1-bit setting's 250 exact steps were most of its time to fp32's loss
   (2.60x sooner in all). With an int8 warm-up the final losses stayed where they were
   (autoencoder, three seeds: sign +0.62 % against +0.65 %, int4 +1.03 % against +0.99 %,
   top-k +1.44 % against +1.42 %; transformer: sign +0.15 % against +0.44 %, int4 +0.87 %
   against +0.98 %) at 3.9x fewer bytes per warm-up step, and the 1-bit setting reached
   fp32's final loss on the autoencoder 4.70x sooner instead of 2.60x (1 Gbit/s link).
   What the warm-up's residuals still owe when it ends is dropped (int8: at most half a
   quantisation step per coordinate for each of its two compressions); the momentum's
   residuals start from zero then, as they always did.

Which codec (docs/results.md, section 4; 4 ranks, 1000 steps): with the default method
(every step, shared momentum) 1-bit ``"sign"`` ends +0.5 % above fp32 AdamW on the
character transformer and +13 % on an MLP autoencoder (the DDP hook with AdamW: +9.4 % and
+72 %) at 25.5x fewer bytes per compressed step; the settings above keep more of the loss.
Top-k sent every step is the wrong codec here: with a fixed denominator a coordinate that
top-k sends once in ~100 steps moves by ~100 steps' worth at once (+24 % / +77 %); the hook
with AdamW does no better when it really compresses (+48 % / +188 %).

Usage with DDP::

    model = DDP(net)
    opt = gradzip.optim.CompressedAdamW(model.parameters(), lr=1e-3, codec="sign")
    opt.attach(model)   # the optimizer owns gradient communication after its warm-up

Without DDP (plain ``torch.distributed``), call :meth:`CompressedAdamW.reduce_gradients`
between ``backward()`` and ``step()``: during warm-up it averages every gradient over the
process group (one plain all-reduce, or with ``warmup_codec`` a compressed one plus a plain
one of a flag per parameter), afterwards it does nothing and ``step()`` communicates. Any
other way of averaging the gradients during warm-up (and only then) works too;
:attr:`CompressedAdamW.warming_up` says when.

What differs from AdamW after warm-up (documented behaviour, tested in tests/test_optim.py):

* between ``backward()`` and ``step()`` the gradients are this rank's own, not averaged:
  clipping them (``clip_grad_norm_``) clips per rank;
* a parameter whose ``.grad`` is None on some ranks contributes a zero gradient from them;
  one whose ``.grad`` is None on every rank is not updated (no step, no weight decay, as
  AdamW), but its momentum, which travels in the shared compressed buffer, decays as with
  a zero gradient;
* under ``torch.amp.GradScaler`` the step is skipped on every rank when any rank found an
  inf/NaN (parameters, moments and residuals unchanged). The optimizer unscales the
  gradients itself (``_step_supports_amp_scaling``); the scalers' loss scales may then
  differ between ranks, which is harmless: each rank unscales its own gradients before
  anything is communicated;
* ``amsgrad``, ``capturable``, ``differentiable``, ``foreach=True`` and ``fused=True`` are
  refused (one implementation; the second moment is frozen);
* sparse gradients are refused (``RuntimeError``, on every rank together);
* under ``torch.compile``: the default DDP mode (DDPOptimizer) keeps DDP's bucket hooks and
  works unchanged; compiled DDP (``torch._dynamo.config.optimize_ddp = "python_reducer"``)
  calls the hook per parameter, which works eagerly, and with compiled autograd once the
  warm-up is over (the hook then leaves the gradients alone); a warm-up iteration under
  compiled autograd raises ``ValueError`` (run those with it off);
* with ``local_steps`` > 1 the parameters (and momenta) of the ranks differ between
  synchronisations; DDP's own checks do not mind (its hook returns the local gradient),
  but a model evaluated or saved then is this rank's: :meth:`CompressedAdamW.synchronise`
  first (a collective; calling it mid-interval changes the trajectory from one that did not).

Cost per step after warm-up: one compressed all-reduce of all parameters' momentum (with
``local_steps=N``: two every N steps; :meth:`CompressedAdamW.bytes_per_step`) plus one
small all-gather (a few bytes per parameter) in which the ranks agree on the step, the
settings, overflow and which gradients exist, so that a disagreement is an exception on
every rank instead of a hang.
"""

# No "from __future__ import annotations": DDP's register_comm_hook compares the hook's
# annotations with the real dist.GradBucket / torch.futures.Future objects.
import math
import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import _checks, comm
from .codecs import Codec, as_codec
from .comm import rank_state
from .ddp import CompressionState, _refuse_in_graph

ALGORITHMS = ("alltoall", "allgather")
_STATE_VERSION = 2
_AGREEMENT_BYTES = 1024
# Per-step row: settings crc32 (4), steps taken (8), status (1), found_inf (1), then one
# byte per parameter (does this rank hold a gradient for it).
_ROW_HEADER = struct.Struct("<IqBB")
_STATUS_OK, _STATUS_SPARSE = 0, 1


#: The settings measured to keep AdamW's loss (docs/results.md, section 4; 4 ranks, 1000
#: steps, three seeds), by codec: CompressedAdamW's arguments and the warm-up as a fraction
#: of the run. :meth:`CompressedAdamW.recommended` builds an optimizer from one.
RECOMMENDED: dict[str, tuple[dict, float]] = {
    "sign": ({"codec": "sign", "algorithm": "allgather", "local_steps": 3,
              "average_momentum": False, "refresh_max_interval": 40, "refresh_codec": "int8",
              "warmup_codec": "int8"}, 0.25),
    "int4": ({"codec": "int4", "local_steps": 4, "average_momentum": False,
              "refresh_max_interval": 40, "refresh_codec": "int8", "warmup_codec": "int8"},
             0.1),
    "topk:0.01": ({"codec": "topk:0.01", "algorithm": "allgather", "local_steps": 2,
                   "average_momentum": False, "refresh_max_interval": 40,
                   "refresh_codec": "int8", "warmup_codec": "int8"}, 0.4),
}


@dataclass
class _Flat:
    """One contiguous momentum buffer for the parameters of one (device, dtype): the tensor
    that is all-reduced. ``state[p]["exp_avg"]`` is a view into it."""

    key: tuple
    params: list
    offsets: list
    buffer: torch.Tensor


class CompressedAdamW(torch.optim.Optimizer):
    """AdamW whose post-warm-up communication is a compressed all-reduce of the momentum
    with error feedback (see the module docstring for the method and why it works).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable,
            differentiable, fused: as ``torch.optim.AdamW`` (``weight_decay=0`` gives
            Adam). ``amsgrad``, ``capturable``, ``differentiable`` must be False and
            ``foreach``/``fused`` None or False.
        codec: how the momentum travels: a :class:`gradzip.Codec` or spec ("sign", the
            default and the case this optimizer is for; "int2", "int4", ...; top-k works
            but measured far worse than top-k through the DDP hook, see above).
        warmup_steps: optimizer steps of exact AdamW on averaged gradients before the
            second moment is frozen and the momentum is compressed.
        warmup_codec: None (default): the warm-up's gradients are averaged exactly (a
            plain all-reduce, fp32's bytes). A codec ("int8"): they are averaged through
            it, two-phase, with error feedback on the gradient (what
            :class:`gradzip.ddp.CompressionState` does for the DDP hook), so that the
            warm-up, often a quarter of the run, is not the run's slowest part; see
            "Compressed warm-up" above. The warm-up's residuals are dropped when it ends.
        variance_refresh: N > 0 (default 10) refreshes the second moment with an exact
            AdamW step (one uncompressed all-reduce) at post-warm-up steps N, 3N, 7N, 15N,
            ... (the skipped steps' squared gradients taken as this step's); 0 keeps it
            frozen for good (1-bit Adam).
        refresh_max_interval: None (default): the intervals between refreshes keep
            doubling (0/1 Adam's schedule). M >= ``variance_refresh``: they double up to M
            and then stay M (``variance_refresh=M, refresh_max_interval=M``: every M
            steps); see item 4 above.
        refresh_codec: None (default): a refresh averages the gradients exactly (a plain
            all-reduce, fp32's bytes). A codec ("int8"): the refresh's gradient average is a
            compressed two-phase all-reduce without error feedback (its error enters one
            exact step and one update of the second moment, nothing accumulates), so that
            refreshes can be frequent at a few bits per element.
        algorithm: "alltoall" (two-phase, worker + server residuals; the fewest bytes) or
            "allgather" (one compression per rank, (W-1) payloads per rank).
        local_steps: 1 (default): the momentum is all-reduced every post-warm-up step.
            N > 1: each rank steps on its own for N steps, then the ranks average how far
            their parameters moved and their momenta (two compressed all-reduces); see
            "Local steps" above. Memory: two more parameter-sized buffers and a second
            residual.
        average_momentum: with ``local_steps`` > 1. True (default): a synchronisation
            averages the ranks' momenta with their parameters' movement. False: each rank
            keeps its own momentum (the ranks' momenta then average to the momentum of the
            averaged gradient, since the frozen-variance update is linear), averaged only
            before a variance refresh, whose exact step needs a shared one; a
            synchronisation then sends one compressed tensor instead of two, so the ranks
            can synchronise twice as often for the same bytes (see "Local steps" above).
        precondition: True (default): what travels is the momentum divided by the frozen
            denominator, ``m / (sqrt(v / bc2) + eps)``, i.e. the update itself, so that the
            codec's per-block scale is shared by coordinates of comparable step size and
            error feedback acts on the parameter update directly. False: the raw momentum
            travels, as in DeepSpeed's 1-bit Adam. Identical without compression (the
            denominator is the same on every rank); see docs/results.md for what each does.
        process_group: the group to reduce over (default: the world, or the DDP model's
            group when :meth:`attach` is given one).
        seed: base of the stochastic-rounding seeds (stochastic codecs only).
        verify: agreement checks of :func:`gradzip.all_reduce` ("auto", "always", "once",
            "never").

    Raises:
        ValueError, TypeError: bad arguments (here, before any collective).
    """

    # GradScaler then calls step() on every rank with ``grad_scale`` and ``found_inf`` set
    # instead of deciding locally whether to skip it: after warm-up the gradients are
    # local, so only the ranks together can decide (see _exchange).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        codec: Codec | str = "sign",
        warmup_steps: int = 100,
        warmup_codec: Codec | str | None = None,
        variance_refresh: int = 10,
        refresh_max_interval: int | None = None,
        refresh_codec: Codec | str | None = None,
        algorithm: str = "alltoall",
        precondition: bool = True,
        local_steps: int = 1,
        average_momentum: bool = True,
        process_group: dist.ProcessGroup | None = None,
        seed: int = 0,
        verify: str = "auto",
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        for name, value in (("amsgrad", amsgrad), ("maximize", maximize),
                            ("capturable", capturable), ("differentiable", differentiable)):
            _checks.check_bool(value, name)
        for name, value in (("amsgrad", amsgrad), ("capturable", capturable),
                            ("differentiable", differentiable)):
            if value:
                raise ValueError(f"CompressedAdamW does not support {name}=True (the second "
                                 "moment is frozen after warm-up; one implementation)")
        for name, value in (("foreach", foreach), ("fused", fused)):
            if value not in (None, False):
                raise ValueError(f"CompressedAdamW has a single implementation: {name} must "
                                 f"be None or False, got {value!r}")
        self.codec = as_codec(codec)
        _checks.check_nonnegative_int(warmup_steps, "warmup_steps")
        _checks.check_nonnegative_int(variance_refresh, "variance_refresh")
        if refresh_max_interval is not None:
            _checks.check_nonnegative_int(refresh_max_interval, "refresh_max_interval")
            if refresh_max_interval < max(1, variance_refresh):
                raise ValueError(f"refresh_max_interval must be None or >= variance_refresh "
                                 f"({variance_refresh}) and >= 1, got {refresh_max_interval}")
        self.refresh_codec = None if refresh_codec is None else as_codec(refresh_codec)
        _checks.check_choice(algorithm, ALGORITHMS, "algorithm")
        _checks.check_bool(precondition, "precondition")
        _checks.check_nonnegative_int(local_steps, "local_steps")
        if local_steps < 1:
            raise ValueError(f"local_steps must be >= 1 (1: communicate every step), got "
                             f"{local_steps}")
        _checks.check_bool(average_momentum, "average_momentum")
        if not average_momentum and local_steps == 1:
            raise ValueError("average_momentum=False needs local_steps > 1 (with "
                             "local_steps=1 the averaged momentum is the update)")
        _checks.check_seed(seed)
        _checks.check_choice(verify, comm.VERIFY_MODES, "verify")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        self.warmup_steps = warmup_steps
        self.warmup_codec = None if warmup_codec is None else as_codec(warmup_codec)
        self.variance_refresh = variance_refresh
        self.refresh_max_interval = refresh_max_interval
        self.algorithm = algorithm
        self.precondition = precondition
        self.local_steps = local_steps
        self.average_momentum = average_momentum
        self.process_group = process_group
        self.verify = verify
        self.steps_taken = 0
        self.feedback = comm.ErrorFeedback(seed=seed)
        #: with ``warmup_codec``: the warm-up's gradient compression (its residuals, the
        #: DDP buckets' layouts); None without one
        self.warmup_state: CompressionState | None = self._new_warmup_state()
        self._flats: list[_Flat] | None = None
        # local_steps > 1: steps since the ranks last synchronised, where each interval
        # started (the shared parameters), the buffers of what the parameters moved
        self._local_count = 0
        # average_momentum=False: the ranks' momenta differ (local steps since the last
        # refresh averaged them)
        self._momentum_own = False
        self._anchors: dict[int, torch.Tensor] = {}
        self._deltas: dict[int, torch.Tensor] = {}
        self._layout: str | None = None
        self._agreement_pending = True
        self._attached_to = None
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_floating_point() or p.dtype not in _checks.FLOAT_DTYPES:
                    raise TypeError(f"CompressedAdamW needs float32/float16/bfloat16 "
                                    f"parameters, got {p.dtype}")

    @classmethod
    def recommended(cls, params: Iterable, codec: str = "sign", *, total_steps: int,
                    **kwargs) -> "CompressedAdamW":
        """The setting measured for ``codec`` (a key of :data:`RECOMMENDED`: "sign",
        "int4", "topk:0.01"), with a warm-up of the measured fraction of ``total_steps``
        (the optimizer steps the run will take). ``kwargs``: AdamW's arguments (``lr``,
        ``betas``, ``eps``, ``weight_decay``), ``process_group``, ``seed``, ``verify``, or
        any of the setting's own to override it. ``CompressedAdamW.recommended(params,
        "sign", total_steps=N, lr=...)`` is the 1-bit setting of the module docstring.

        Raises:
            ValueError: ``codec`` has no recommended setting, or ``total_steps`` < 1.
        """
        if not isinstance(codec, str) or codec not in RECOMMENDED:
            raise ValueError(f"no recommended CompressedAdamW setting for codec {codec!r}; "
                             f"there are: {', '.join(RECOMMENDED)} (or build one with "
                             "CompressedAdamW(...) directly)")
        _checks.check_nonnegative_int(total_steps, "total_steps")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        setting, fraction = RECOMMENDED[codec]
        args = {**setting, "warmup_steps": round(total_steps * fraction), **kwargs}
        return cls(params, **args)

    def __repr__(self) -> str:
        return (f"CompressedAdamW(codec={str(self.codec)!r}, warmup_steps={self.warmup_steps}, "
                f"warmup_codec={self._warmup_spec()!r}, variance_refresh={self.variance_refresh}, "
                f"refresh_max_interval={self.refresh_max_interval}, "
                f"refresh_codec={self._refresh_spec()!r}, algorithm={self.algorithm!r}, "
                f"precondition={self.precondition}, local_steps={self.local_steps}, "
                f"average_momentum={self.average_momentum}, "
                f"steps_taken={self.steps_taken}, groups={len(self.param_groups)})")

    def add_param_group(self, param_group: dict) -> None:
        _check_hyper(**{k: param_group.get(k, self.defaults[k])
                        for k in ("lr", "betas", "eps", "weight_decay")})
        if getattr(self, "_local_count", 0):
            raise RuntimeError(
                f"CompressedAdamW: add_param_group inside an interval of local steps "
                f"({self._local_count} taken since the ranks last synchronised); call "
                "opt.synchronise() on every rank first")
        super().add_param_group(param_group)
        if hasattr(self, "_flats"):  # after __init__: the layout the ranks agreed on changed
            self._flats = None
            self._layout = None
            self._agreement_pending = True

    # ---- phase ---------------------------------------------------------------------------
    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken (skipped steps do not count); warm-up while below
        ``warmup_steps``."""
        return self._steps_taken

    @steps_taken.setter
    def steps_taken(self, value: int) -> None:
        self._steps_taken = value
        # what a hook traced by compiled autograd reads (a bool: one recompilation when
        # the warm-up ends, where the step count would recompile it every step)
        self._gradients_local = value >= self.warmup_steps

    @property
    def warming_up(self) -> bool:
        """True while the next step is a warm-up step (exact AdamW on gradients the caller
        or the attached DDP hook has averaged)."""
        return self.steps_taken < self.warmup_steps

    def _refresh_due(self) -> bool:
        """Is the next post-warm-up step a variance refresh?"""
        return self.refresh_at(self.steps_taken - self.warmup_steps + 1)

    def refresh_at(self, k: int) -> bool:
        """Is post-warm-up step ``k`` (counted from 1) a variance refresh? With
        ``variance_refresh=N``: steps N, 3N, 7N, 15N, ... (the intervals double); with
        ``refresh_max_interval=M`` the intervals stop growing at M."""
        n, cap = self.variance_refresh, self.refresh_max_interval
        if n == 0 or k < n:
            return False
        pos, gap = n, n
        while cap is None or 2 * gap <= cap:
            if pos >= k:
                return pos == k
            gap *= 2
            pos += gap
        return k >= pos and (k - pos) % cap == 0

    def _refresh_spec(self) -> str | None:
        return None if self.refresh_codec is None else self.refresh_codec.spec

    def _warmup_spec(self) -> str | None:
        return None if self.warmup_codec is None else self.warmup_codec.spec

    def _new_warmup_state(self) -> CompressionState | None:
        """The warm-up's compression: every bucket (or, without DDP, every dtype's gradient
        buffer) two-phase through ``warmup_codec`` with error feedback from the first step
        (buckets below the hook's ``min_numel`` go plain, as with the hook)."""
        if self.warmup_codec is None:
            return None
        return CompressionState(self.warmup_codec, process_group=self.process_group,
                                warmup_steps=0, algorithm="alltoall", seed=self.feedback.seed,
                                verify=self.verify)

    # ---- DDP -----------------------------------------------------------------------------
    def attach(self, model: DistributedDataParallel) -> None:
        """Install the optimizer's communication hook on ``model``: during warm-up a plain
        all-reduce of each gradient bucket (through ``warmup_codec`` when one is set), none
        afterwards (:meth:`step` then all-reduces
        the compressed momentum). Call it on every rank, before the first backward; it
        checks (one small all-gather) that every rank's optimizer has the same settings.

        Raises:
            TypeError: ``model`` is not a ``DistributedDataParallel``.
            RuntimeError: this optimizer is already attached, or ``model`` already has a
                communication hook.
            ValueError: the optimizer's parameters are not exactly the model's trainable
                parameters, the process groups differ, or ranks disagree on the settings
                (raised on every rank).
        """
        if not isinstance(model, DistributedDataParallel):
            raise TypeError("CompressedAdamW.attach needs a torch.nn.parallel."
                            f"DistributedDataParallel model, got {type(model).__name__}")
        if self._attached_to is not None:
            raise RuntimeError("this CompressedAdamW is already attached to a DDP model; "
                               "attach it once")
        if getattr(model, "_comm_hooks", None):
            raise RuntimeError("this DDP model already has a communication hook; "
                               "CompressedAdamW.attach installs its own (register none, or "
                               "use the hook without this optimizer)")
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        theirs = {id(p) for p in model.parameters() if p.requires_grad}
        if mine != theirs:
            raise ValueError(
                f"CompressedAdamW.attach: the optimizer holds {len(mine)} parameters and the "
                f"model {len(theirs)} trainable ones, {len(mine - theirs)} of the optimizer's "
                f"are not in the model and {len(theirs - mine)} of the model's are not in "
                "the optimizer. After warm-up the hook stops DDP's all-reduce for every "
                "parameter, so the optimizer must hold exactly the model's trainable "
                "parameters")
        group = getattr(model, "process_group", None)
        if self.process_group is None:
            self.process_group = group
        elif group is not None and group is not self.process_group:
            raise ValueError("the optimizer's process_group is not the DDP model's")
        if self.warmup_state is not None:  # not used yet: attach comes before any backward
            self.warmup_state.process_group = self.process_group
        self._agree()
        try:
            model.register_comm_hook(self, _communication_hook)
        except RuntimeError as e:  # a built-in hook registered through the reducer
            raise RuntimeError("this DDP model already has a communication hook; "
                               f"CompressedAdamW.attach installs its own ({e})") from None
        self._attached_to = model

    def _hook(self, bucket: dist.GradBucket) -> torch.futures.Future:
        buf = bucket.buffer()
        if self._agreement_pending:
            self._agree()
        if self.warming_up:
            if self.warmup_state is not None:
                return self.warmup_state.hook(bucket)
            # The buckets' sizes are DDP's, the same on every rank, and the settings were
            # agreed on: "auto" checks each bucket's signature once, not on every call.
            verify = "once" if self.verify == "auto" else self.verify
            return comm.all_reduce(buf, self.codec, group=self.process_group,
                                   algorithm="plain", average=True, async_op=True,
                                   verify=verify)
        return comm.collectives.completed(buf)

    def _param_hook(self, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """Compiled DDP (``torch._dynamo.config.optimize_ddp = "python_reducer"``): one call
        per parameter. Eagerly (the python reducer without compiled autograd) it averages
        ``grad`` in place during warm-up (a plain all-reduce, or ``warmup_codec`` through the
        warm-up's CompressionState, per parameter) and leaves it alone afterwards. Traced by
        compiled autograd it can only do the latter: the warm-up's iterations must run with
        compiled autograd off (or ``warmup_steps=0``), else ``ValueError``."""
        if torch.compiler.is_compiling():
            # a bool that changes once, at the end of the warm-up: one recompilation
            if self._gradients_local:
                return grad
            _refuse_in_graph(
                "CompressedAdamW under compiled DDP: a warm-up iteration ran with compiled "
                f"autograd on ({self.steps_taken} of warmup_steps={self.warmup_steps} steps "
                "taken); the warm-up averages the gradients in the hook, which a compiled "
                "graph cannot, so run those iterations with compiled autograd off (the hook "
                "then runs eagerly) and turn it on afterwards, when the hook leaves the "
                "gradients alone")
        if self._agreement_pending:
            self._agree()
        if not self.warming_up:
            return grad
        if self.warmup_state is not None:
            return self.warmup_state.param_hook(grad, param)
        self._plain_mean(grad)
        return grad

    def reduce_gradients(self) -> None:
        """For use without DDP: during warm-up, average every parameter's gradient over the
        process group (one plain all-reduce per parameter dtype, or with ``warmup_codec``
        one compressed all-reduce per dtype plus a plain one of a presence flag per
        parameter; a gradient that is None on this rank but not on every rank becomes the
        average); after warm-up, do nothing. Call it on every rank between ``backward()``
        and ``step()``."""
        if self._agreement_pending:
            self._agree()
        if self.warming_up:
            self._average_gradients("plain" if self.warmup_codec is None else "warmup")

    # ---- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (see the module docstring). Under ``GradScaler`` the scaler
        sets ``grad_scale`` and ``found_inf`` on the optimizer and calls this on every
        rank."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._agreement_pending:
            self._agree()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self.warming_up:
            # Averaged gradients: the overflow (if any) is the same on every rank.
            if found_inf is not None and float(found_inf) != 0:
                return loss
            self._check_not_sparse()
            self._unscale(grad_scale)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        _adamw_update(p, _signed(p.grad, group), self._state_of(p), group)
            self.steps_taken += 1
            if not self.warming_up and self.warmup_state is not None:
                # what the warm-up's residuals still owe is dropped (and their memory
                # freed): from now on the momentum carries residuals of its own
                self.warmup_state.feedback.reset()
            return loss
        present, skip = self._exchange(found_inf)
        if skip:
            return loss
        self._unscale(grad_scale)
        if self._refresh_due():
            # a refresh is an exact step from shared parameters and momentum
            self._synchronise(refresh=True)
            old = self._denominators() if self.precondition else None
            if self.refresh_codec is None:
                self._average_gradients("plain")
            else:
                self._average_gradients("refresh", present)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        _adamw_update(p, _signed(p.grad, group), self._state_of(p), group)
            if old is not None:
                self._rescale_residuals(old)
        elif self.local_steps > 1:
            self._local_step(present)
            if self._local_count == self.local_steps:
                self._synchronise()
        else:
            self._compressed_step(present)
        self.steps_taken += 1
        return loss

    @property
    def synchronised(self) -> bool:
        """True when every rank holds the same parameters (and, unless
        ``average_momentum=False``, the same momentum): always with ``local_steps=1``;
        otherwise after every ``local_steps``-th post-warm-up step, a variance refresh or
        :meth:`synchronise`."""
        return self._local_count == 0

    @torch.no_grad()
    def synchronise(self) -> None:
        """With ``local_steps`` > 1: end the current interval of local steps now (the two
        compressed all-reduces that end every interval), so that every rank holds the same
        parameters and momentum, e.g. before evaluating or saving. Does nothing when
        already :attr:`synchronised`. A collective: call it on every rank (they compare
        their step counts at every step, so they agree on whether an interval is open).
        With ``average_momentum=False`` it averages the parameters only."""
        self._synchronise()

    def _compressed_step(self, present: dict[int, bool]) -> None:
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for flat in self._flat_buffers():
            # Each rank's momentum: the shared one with its own gradient folded in, divided
            # by the frozen denominator when the preconditioned momentum travels.
            for p in flat.params:
                state, group = self.state[p], groups[id(p)]
                m = state["exp_avg"]
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                m.lerp_(_signed(g, group), 1 - group["betas"][0])
                if self.precondition:
                    m.div_(_frozen_denominator(state, group))
            self._compressed_mean(flat.buffer, flat.key)
            for p in flat.params:
                state, group = self.state[p], groups[id(p)]
                reduced, v = state["exp_avg"], state["exp_avg_sq"]
                reduced.masked_fill_(v == 0, 0.0)
                denom = _frozen_denominator(state, group)
                if present[id(p)]:
                    _frozen_update(p, reduced, None if self.precondition else denom, state,
                                   group)
                if self.precondition:
                    reduced.mul_(denom)  # the momentum, in AdamW's units, is the state

    def _local_step(self, present: dict[int, bool]) -> None:
        """A local step (``local_steps`` > 1): this rank's own gradient folded into its own
        momentum, and AdamW's frozen-variance update of its own parameters. The first step
        of an interval records the shared parameters it starts from (the anchors)."""
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        start = self._local_count == 0
        for flat in self._flat_buffers():
            for p in flat.params:
                state, group = self.state[p], groups[id(p)]
                if start:
                    anchor = self._anchors.get(id(p))
                    if anchor is None or anchor.shape != p.shape or anchor.dtype != p.dtype:
                        anchor = self._anchors[id(p)] = torch.empty_like(p)
                    anchor.copy_(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                m.lerp_(_signed(g, group), 1 - group["betas"][0])
                m.masked_fill_(v == 0, 0.0)
                if present[id(p)]:
                    _frozen_update(p, m, _frozen_denominator(state, group), state, group)
        self._local_count += 1
        self._momentum_own = not self.average_momentum

    def _synchronise(self, refresh: bool = False) -> None:
        """End of an interval of local steps: the ranks average how far their parameters
        moved from the anchors (compressed, with residuals of its own) and their momenta
        (compressed as in the per-step method, divided by the frozen denominator unless
        ``precondition=False``); afterwards every rank holds the same of both, bit for
        bit. With ``average_momentum=False`` the momenta are averaged only before a
        ``refresh`` (whose exact step needs a shared momentum), and then even when no
        interval is open."""
        move = self._local_count > 0
        average = (move and self.average_momentum) or (refresh and self._momentum_own)
        if not (move or average):
            return
        flats = self._flat_buffers()
        denoms = self._denominators() if self.precondition else None
        if any(id(f.buffer) not in self._deltas for f in flats):
            self._deltas = {id(f.buffer): torch.empty_like(f.buffer) for f in flats}
        for flat in flats:
            if move:
                moved = self._deltas[id(flat.buffer)]
                for p, off in zip(flat.params, flat.offsets):
                    torch.sub(self._anchors[id(p)], p,
                              out=moved[off : off + p.numel()].view(p.shape))
                self._compressed_mean(moved, flat.key + ("moved",))
                for p, off in zip(flat.params, flat.offsets):
                    p.copy_(self._anchors[id(p)]).sub_(moved[off : off + p.numel()].view(p.shape))
            if not average:
                continue
            if denoms is not None:
                for p in flat.params:
                    self.state[p]["exp_avg"].div_(denoms[id(p)])
            if refresh and self._momentum_own:
                # each rank's own momentum: averaged as the refresh's gradients are, without
                # residuals (a residual would be owed since the previous refresh, for a
                # momentum that has changed completely since)
                self._refresh_mean(flat.buffer)
            else:
                self._compressed_mean(flat.buffer, flat.key)
            for p in flat.params:
                state = self.state[p]
                m = state["exp_avg"]
                m.masked_fill_(state["exp_avg_sq"] == 0, 0.0)
                if denoms is not None:
                    m.mul_(denoms[id(p)])
        self._local_count = 0
        if average:
            self._momentum_own = False

    def _compressed_mean(self, buffer: torch.Tensor, key: tuple) -> None:
        """``buffer`` averaged over the ranks in place through the optimizer's codec and
        algorithm, with the residuals ``self.feedback`` keeps under ``key``."""
        comm.all_reduce(buffer, self.codec, state=self.feedback, group=self.process_group,
                        algorithm=self.algorithm, average=True, key=key, verify=self.verify,
                        seed=self.feedback.seed)

    def _refresh_mean(self, buffer: torch.Tensor) -> None:
        """``buffer`` averaged over the ranks in place as a variance refresh averages: a
        plain all-reduce, or through ``refresh_codec`` (two-phase, no error feedback:
        bit-identical on every rank)."""
        if self.refresh_codec is None:
            self._plain_mean(buffer)
        else:
            comm.all_reduce(buffer, self.refresh_codec, group=self.process_group,
                            algorithm="alltoall", average=True, verify=self.verify)

    def _plain_mean(self, buffer: torch.Tensor) -> None:
        """``buffer`` averaged over the ranks in place by an uncompressed all-reduce."""
        comm.all_reduce(buffer, self.codec, group=self.process_group, algorithm="plain",
                        average=True, verify=self.verify)

    def _denominators(self) -> dict[int, torch.Tensor]:
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        return {id(p): _frozen_denominator(self.state[p], groups[id(p)])
                for p in self._params() if "exp_avg_sq" in self.state[p]}

    def _rescale_residuals(self, old: dict[int, torch.Tensor]) -> None:
        """A refresh changed the denominators: what the residuals owe, in units of the old
        preconditioned momentum, is re-expressed in the new ones (the server residual is
        folded into the worker residual on the way)."""
        if self._flats is None:
            return
        new = self._denominators()
        for flat in self._flats:
            pending = self.feedback.pending(flat.key)
            if pending is None:
                continue
            for p, off in zip(flat.params, flat.offsets):
                part = pending[off : off + p.numel()].view(p.shape)
                part.mul_(old[id(p)].float()).div_(new[id(p)].float())
            self.feedback.set_residual(flat.key, pending, step=self.feedback.step(flat.key))

    # ---- helpers of the step ---------------------------------------------------------------
    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["variance_step"] = 0
        return state

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _check_not_sparse(self) -> None:
        for p in self._params():
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("CompressedAdamW does not support sparse gradients")

    def _unscale(self, grad_scale: torch.Tensor | None) -> None:
        if grad_scale is None:
            return
        # GradScaler's own unscale: the reciprocal in float64, then one float32 multiply.
        inv = grad_scale.double().reciprocal().float()
        for p in self._params():
            if p.grad is not None:
                p.grad.mul_(inv.to(p.grad.device))

    def _flat_buffers(self) -> list[_Flat]:
        """The momentum buffers, (re)built when the state tensors are not (any longer)
        views into them: on the first post-warm-up step, after load_state_dict."""
        if self._flats is not None and all(
                self.state[p]["exp_avg"].untyped_storage().data_ptr()
                == f.buffer.untyped_storage().data_ptr()
                and self.state[p]["exp_avg"].storage_offset() == off
                for f in self._flats for p, off in zip(f.params, f.offsets)):
            return self._flats
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        fresh = 0
        for p in self._params():
            fresh += len(self.state[p]) == 0
            state = self._state_of(p)
            state.setdefault("variance_step", int(state["step"].item()))
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        if fresh:
            warnings.warn(f"CompressedAdamW: {fresh} parameter(s) had no gradient during "
                          "warm-up; their second moment is zero, so they stay unchanged while "
                          "it is frozen" + ("" if self.variance_refresh else
                                            " (variance_refresh=0: for good)"), stacklevel=3)
        flats = []
        for i, ((device, dtype), params) in enumerate(by_kind.items()):
            offsets, n = [], 0
            for p in params:
                offsets.append(n)
                n += p.numel()
            buffer = torch.empty(n, dtype=dtype, device=device)
            for p, off in zip(params, offsets):
                view = buffer[off : off + p.numel()].view(p.shape)
                view.copy_(self.state[p]["exp_avg"])
                self.state[p]["exp_avg"] = view
            flats.append(_Flat(("CompressedAdamW", i, str(dtype)), params, offsets, buffer))
        self._flats = flats
        return flats

    def _average_gradients(self, how: str, present: dict[int, bool] | None = None) -> None:
        """Average every gradient over the ranks in place, None as zeros; a parameter whose
        gradient exists on some rank gets the average on every rank. ``how``: "plain", a
        plain all-reduce, with each parameter's presence flag at the end of the buffer;
        "refresh", with ``present`` (who holds a gradient, as the step's agreement found),
        through ``refresh_codec`` (two-phase, no error feedback: bit-identical on every
        rank); "warmup", through ``warmup_codec`` (two-phase, with the warm-up's error
        feedback), the presence flags in a separate plain all-reduce (a codec would round
        them along with the gradients)."""
        flagged = how == "plain"
        if how == "warmup":
            flags = torch.tensor([float(p.grad is not None) for p in self._params()],
                                 device=self._device())
            self._plain_mean(flags)
            present = {id(p): f > 0 for p, f in zip(self._params(), flags.tolist())}
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in self._params():
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        for kind, ((device, dtype), params) in enumerate(by_kind.items()):
            n = sum(p.numel() for p in params)
            buf = torch.zeros(n + (len(params) if flagged else 0), dtype=dtype, device=device)
            off = 0
            for i, p in enumerate(params):
                if p.grad is not None:
                    buf[off : off + p.numel()].view(p.shape).copy_(p.grad)
                    if flagged:
                        buf[n + i] = 1
                off += p.numel()
            if flagged:
                self._plain_mean(buf)
            elif how == "refresh":
                self._refresh_mean(buf)
            else:
                feedback = self.warmup_state.feedback
                comm.all_reduce(buf, self.warmup_codec, state=feedback,
                                group=self.process_group, algorithm="alltoall", average=True,
                                key=("CompressedAdamW-warmup", kind, str(dtype)),
                                verify=self.verify, seed=feedback.seed)
            there = ([flag > 0 for flag in buf[n:].tolist()] if flagged
                     else [present[id(p)] for p in params])
            off = 0
            for p, held in zip(params, there):
                avg = buf[off : off + p.numel()].view(p.shape)
                if p.grad is not None:
                    p.grad.copy_(avg)
                elif held:
                    p.grad = avg.clone()
                off += p.numel()

    # ---- agreement -----------------------------------------------------------------------
    def _settings(self) -> str:
        """What every rank must agree on, as text (compared once, then by crc32 per step)."""
        if self._layout is None:  # the parameters' shapes change only with add_param_group
            params = self._params()
            shapes = zlib.crc32(repr([(tuple(p.shape), str(p.dtype))
                                      for p in params]).encode())
            self._layout = (f"params={len(params)} numel={sum(p.numel() for p in params)} "
                            f"shapes={shapes:08x}")
        groups = [(g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"], g["maximize"],
                   len(g["params"])) for g in self.param_groups]
        return (f"CompressedAdamW v{_STATE_VERSION} codec={self.codec.spec} "
                f"warmup_steps={self.warmup_steps} warmup_codec={self._warmup_spec()} "
                f"variance_refresh={self.variance_refresh} "
                f"refresh_max_interval={self.refresh_max_interval} "
                f"refresh_codec={self._refresh_spec()} "
                f"algorithm={self.algorithm} precondition={self.precondition} "
                f"local_steps={self.local_steps} average_momentum={self.average_momentum} "
                f"{self._layout} groups={groups}")

    def _device(self) -> torch.device:
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _world(self) -> tuple[int, int]:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("CompressedAdamW needs an initialised torch.distributed "
                               "process group (torch.distributed.init_process_group)")
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _agree(self) -> None:
        """Every rank's settings and step count, compared by every rank (one all-gather of
        a fixed size, so ranks that disagree cannot hang in it): a mismatch is the same
        ValueError on every rank."""
        _, world = self._world()
        text = f"{self._settings()} steps_taken={self.steps_taken}".encode()
        if len(text) > _AGREEMENT_BYTES:
            text = text[: _AGREEMENT_BYTES - 9] + f" {zlib.crc32(text):08x}".encode()
        row = torch.zeros(_AGREEMENT_BYTES, dtype=torch.uint8)
        row[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        device = self._device()
        out = torch.empty(world * _AGREEMENT_BYTES, dtype=torch.uint8, device=device)
        comm.collectives.all_gather_small(out, row.to(device), self.process_group)
        rows = [bytes(r).rstrip(b"\0").decode(errors="replace")
                for r in out.view(world, -1).cpu().tolist()]
        if len(set(rows)) > 1:
            lines = "\n".join(f"  rank {r}: {t}" for r, t in enumerate(rows))
            raise ValueError(f"CompressedAdamW: ranks disagree on the optimizer's settings "
                             f"or step count:\n{lines}")
        self._agreement_pending = False

    def _exchange(self, found_inf: torch.Tensor | None) -> tuple[dict[int, bool], bool]:
        """The per-step agreement after warm-up: settings, step, sparse gradients, overflow
        and which gradients exist, all-gathered. Returns (parameter id -> some rank has a
        gradient, skip this step); raises on every rank together."""
        _, world = self._world()
        params = self._params()
        status = _STATUS_SPARSE if any(p.grad is not None and p.grad.is_sparse
                                       for p in params) else _STATUS_OK
        inf = int(found_inf is not None and float(found_inf) != 0)
        head = _ROW_HEADER.pack(zlib.crc32(self._settings().encode()), self.steps_taken,
                                status, inf)
        row = bytearray(head) + bytearray(int(p.grad is not None) for p in params)
        device = self._device()
        out = torch.empty(world * len(row), dtype=torch.uint8, device=device)
        comm.collectives.all_gather_small(
            out, torch.frombuffer(row, dtype=torch.uint8).to(device), self.process_group)
        got = out.view(world, -1).cpu()
        heads = [_ROW_HEADER.unpack(bytes(r[: _ROW_HEADER.size].tolist())) for r in got]
        if len({(crc, step) for crc, step, _, _ in heads}) > 1:
            who = ", ".join(f"rank {r}: step {s}, settings {c:08x}"
                            for r, (c, s, _, _) in enumerate(heads))
            raise ValueError(f"CompressedAdamW: ranks are out of step or their settings "
                             f"changed ({who})")
        sparse = [r for r, h in enumerate(heads) if h[2] == _STATUS_SPARSE]
        if sparse:
            raise RuntimeError(f"CompressedAdamW does not support sparse gradients (rank(s) "
                               f"{sparse} hold some); no rank took this step")
        skip = any(h[3] for h in heads)
        anywhere = got[:, _ROW_HEADER.size :].amax(dim=0).tolist()
        return {id(p): bool(a) for p, a in zip(params, anywhere)}, skip

    # ---- accounting ------------------------------------------------------------------------
    def bytes_per_step(self, world_size: int | None = None) -> dict[str, int]:
        """Bytes one rank sends per optimizer step (as :attr:`gradzip.comm.Plan.bytes_sent`
        counts them: headers, scales and padding included, a ring for plain all-reduces):
        ``"warmup"`` (the plain all-reduce of every gradient, which DDP's hook or
        :meth:`reduce_gradients` does; with ``warmup_codec`` the two-phase compressed
        all-reduce, counted as one buffer per dtype: DDP's buckets add a header and scale
        padding each, :meth:`reduce_gradients` a plain all-reduce of one flag per
        parameter), ``"compressed"`` (a post-warm-up step: the
        compressed momentum plus the per-step agreement; with ``local_steps`` > 1 the
        agreement plus a ``local_steps``-th of a synchronisation, rounded down),
        ``"agreement"`` (the per-step all-gather in which the ranks agree on the step),
        ``"synchronisation"`` (what ends an interval of local steps: the compressed
        movement of the parameters and the compressed momentum; the movement alone with
        ``average_momentum=False``; with ``local_steps=1`` the compressed momentum alone),
        ``"momentum"`` (the compressed momentum on its own), ``"refresh"`` (a
        variance-refresh step, without the synchronisation that precedes it when an
        interval is open; through ``refresh_codec`` when one is set) and
        ``"refresh_momentum"`` (with ``average_momentum=False``, the average of the ranks'
        momenta before a refresh, as the refresh's gradients travel; 0 otherwise).
        :meth:`bytes_after_warmup` averages them over a run."""
        if world_size is None:
            world_size = self._world()[1]
        _checks.check_nonnegative_int(world_size, "world_size")
        kinds: dict[torch.dtype, int] = {}
        for p in self._params():
            kinds[p.dtype] = kinds.get(p.dtype, 0) + p.numel()
        row = _ROW_HEADER.size + len(self._params())
        agree = (world_size - 1) * row
        plain = sum(comm.plan(self.codec, n, d, world_size, "plain").bytes_sent
                    for d, n in kinds.items())
        warmup = plain if self.warmup_codec is None else sum(
            comm.plan(self.warmup_codec, n, d, world_size, "alltoall").bytes_sent
            for d, n in kinds.items())
        packed = sum(comm.plan(self.codec, n, d, world_size, self.algorithm).bytes_sent
                     for d, n in kinds.items())
        mean = plain if self.refresh_codec is None else sum(
            comm.plan(self.refresh_codec, n, d, world_size, "alltoall").bytes_sent
            for d, n in kinds.items())
        if self.local_steps == 1:
            return {"warmup": warmup, "compressed": packed + agree, "synchronisation": packed,
                    "refresh": agree + mean, "agreement": agree, "momentum": packed,
                    "refresh_momentum": 0}
        sync = (2 if self.average_momentum else 1) * packed
        return {"warmup": warmup, "compressed": agree + sync // self.local_steps,
                "synchronisation": sync, "refresh": agree + mean, "agreement": agree,
                "momentum": packed, "refresh_momentum": 0 if self.average_momentum else mean}

    def bytes_after_warmup(self, steps: int, world_size: int | None = None) -> float:
        """Mean bytes one rank sends per post-warm-up step over ``steps`` such steps, with
        this optimizer's schedule: every step's agreement and compressed momentum (or, with
        ``local_steps`` > 1, each synchronisation when it happens, including those that a
        refresh cuts short and one closing the last interval; with
        ``average_momentum=False`` the momenta's average before each refresh), and the
        variance refreshes (:meth:`refresh_at`) at what :meth:`bytes_per_step` says they
        cost."""
        _checks.check_nonnegative_int(steps, "steps")
        if steps == 0:
            return 0.0
        b = self.bytes_per_step(world_size)
        agree = b["agreement"]
        total, count, own = 0, 0, False
        movement = b["synchronisation"] - (b["momentum"] if self.average_momentum else 0)
        for k in range(1, steps + 1):
            if self.refresh_at(k):
                # the movement if an interval is open, the momenta if they differ
                total += b["refresh"] + (movement if count else 0)
                if own:
                    total += b["refresh_momentum"]
                elif count and self.average_momentum:
                    total += b["momentum"]
                count, own = 0, False
            elif self.local_steps == 1:
                total += b["compressed"]
            else:
                count += 1
                own = not self.average_momentum
                total += agree
                if count == self.local_steps:
                    total += b["synchronisation"]
                    count = 0
        return (total + (b["synchronisation"] if count else 0)) / steps

    # ---- checkpoints ---------------------------------------------------------------------
    def init_state(self) -> None:
        """Create the per-parameter state (zero moments, step 0) of every parameter that has
        none, without taking a step or communicating. ``torch.distributed.checkpoint.load``
        fills only the entries the state it is given already holds: call this on a fresh
        optimizer before loading into it (``get_state_dict`` does the same for torch's
        optimizers with a zero-learning-rate step)."""
        for p in self._params():
            self._state_of(p)

    def state_dict(self) -> dict:
        """AdamW's state_dict (per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, plus
        ``variance_step``, the step its second moment was last updated) and a ``"gradzip"``
        entry: the settings and step counter every rank shares, and this rank's residuals.

        The moments are the same on every rank (the momentum is all-reduced); the residuals
        are not, so they are one serialised entry under ``"rank{r}_of_{W}"`` (with
        ``average_momentum=False`` this rank's momenta too, while they differ). That makes the
        optimizer a ``Stateful`` for ``torch.distributed.checkpoint`` (which writes a plain
        tensor once, as if every rank held the same): ``dcp.save({"model": net, "optim":
        opt}, ...)``, and for loading into a fresh optimizer :meth:`init_state` first, then
        ``dcp.load`` with the same dict; each rank gets its own residuals back. With
        ``torch.save`` save one file per rank (or one for all: every rank finds its entry).
        ``get_optimizer_state_dict`` keeps only AdamW's part: resuming from it loses what
        the residuals held (a warning says so)."""
        if not self.synchronised:
            raise RuntimeError(
                f"CompressedAdamW(local_steps={self.local_steps}): {self._local_count} local "
                "step(s) since the ranks last synchronised, so their parameters and momenta "
                "differ; call opt.synchronise() on every rank before saving (or save when "
                "opt.synchronised is True)")
        sd = super().state_dict()
        # variance_step as a 0-d tensor: DCP restores plain integers nested under the
        # optimizer's integer parameter ids under string keys, where load_state_dict never
        # looks (the copies keep the live state untouched).
        sd["state"] = {i: {k: torch.tensor(v, dtype=torch.int64) if k == "variance_step" else v
                           for k, v in st.items()} for i, st in sd["state"].items()}
        rank, world = self._rank_world()
        mine = {"rank": rank, "feedback": self.feedback.state_dict()}
        if self._momentum_own:  # average_momentum=False: this rank's own momenta
            mine["exp_avg"] = {i: self.state[p]["exp_avg"].clone()
                               for i, p in enumerate(self._params())
                               if "exp_avg" in self.state[p]}
        if self.warmup_state is not None and self.warming_up:
            mine["warmup"] = self.warmup_state.state_dict()
        sd["gradzip"] = {"version": _STATE_VERSION, "codec": self.codec.spec,
                         "warmup_steps": self.warmup_steps, "steps_taken": self.steps_taken,
                         "world_size": world, **rank_state.pack(mine, rank, world)}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (bit-identical continuation: each rank takes its own
        residuals), or a ``torch.optim.AdamW`` state_dict (steps taken = the largest
        per-parameter step, no residuals). Everything is checked before anything changes;
        the ranks check on the next hook call or step that they agree."""
        gz = state_dict.get("gradzip")
        mine = None
        if gz is not None:
            if not isinstance(gz, dict) or gz.get("version") != _STATE_VERSION:
                raise ValueError("not a gradzip CompressedAdamW state_dict "
                                 f"(version {_STATE_VERSION})")
            if gz["codec"] != self.codec.spec:
                raise ValueError(f"the state_dict was saved with codec {gz['codec']!r}, this "
                                 f"optimizer uses {self.codec.spec!r}")
            mine = rank_state.unpack(gz, *self._rank_world())
            feedback = comm.ErrorFeedback(seed=self.feedback.seed)
            feedback.load_state_dict(mine["feedback"])
            params = self._params()
            for i, m in (mine.get("exp_avg") or {}).items():
                if not (isinstance(i, int) and 0 <= i < len(params)) or \
                        tuple(m.shape) != tuple(params[i].shape):
                    raise ValueError(f"the state_dict's momentum of this rank (parameter {i}) "
                                     "does not fit this optimizer's parameters")
            warm = mine.get("warmup")
            if warm is not None and self.warmup_codec is None:
                raise ValueError(f"the state_dict was saved during a warm-up with "
                                 f"warmup_codec={warm.get('codec')!r} and holds its residuals; "
                                 "this optimizer has warmup_codec=None")
            warmup_state = self._new_warmup_state()
            if warm is not None:
                if self.warmup_state is not None and self.warmup_state.buckets.params:
                    raise ValueError(
                        "load_state_dict of a state saved during a compressed warm-up must "
                        "come before the first backward of the attached model: the warm-up's "
                        "residuals are keyed by the order in which DDP's first buckets "
                        "hold the parameters")
                warmup_state.load_state_dict(warm)  # raises for another codec or rank
        adamw = {k: v for k, v in state_dict.items() if k != "gradzip"}
        if isinstance(adamw.get("state"), dict):
            adamw["state"] = {i: {k: int(v) if k == "variance_step" else v
                                  for k, v in st.items()}
                              for i, st in adamw["state"].items()}
        super().load_state_dict(adamw)
        for state in self.state.values():
            if "step" in state:
                state.setdefault("variance_step", int(state["step"].item()))
        self._momentum_own = False
        if mine is not None:
            self.feedback = feedback
            self.warmup_state = warmup_state
            self.steps_taken = int(gz["steps_taken"])
            own = mine.get("exp_avg")
            if own is not None:
                params = self._params()
                for i, m in own.items():
                    self.state[params[i]]["exp_avg"] = m.to(params[i].device).clone()
                self._momentum_own = True
        else:
            self.feedback.reset()
            self.warmup_state = self._new_warmup_state()
            self.steps_taken = max((int(s["step"].item()) for s in self.state.values()
                                    if "step" in s), default=0)
            if self.steps_taken > self.warmup_steps:
                warnings.warn("CompressedAdamW.load_state_dict: the state_dict has no "
                              "'gradzip' entry (a torch.optim.AdamW one, or one from "
                              "get_optimizer_state_dict) but is past the warm-up: the "
                              "residuals start from zero, what they held is lost", stacklevel=2)
        self._flats = None
        self._local_count = 0  # a state_dict is saved synchronised
        self._agreement_pending = True

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world) in the optimizer's process group; (0, 1) without torch.distributed."""
        if dist.is_available() and dist.is_initialized():
            return self._world()
        return 0, 1


def _communication_hook(optimizer, bucket):
    """The DDP communication hook :meth:`CompressedAdamW.attach` registers: a plain
    all-reduce during warm-up, the local gradient unchanged afterwards. Compiled DDP calls
    it per parameter with ``(grad, param)`` (:meth:`CompressedAdamW._param_hook`)."""
    if isinstance(bucket, tuple):
        return optimizer._param_hook(*bucket)
    return optimizer._hook(bucket)


# ---- the formulas --------------------------------------------------------------------------


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _signed(grad: torch.Tensor, group: dict) -> torch.Tensor:
    return -grad if group["maximize"] else grad


def _adamw_update(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One step of torch.optim.AdamW, written as its single-tensor implementation
    (torch/optim/adam.py, ``_single_tensor_adam``), so the results are bit-identical."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    step_t = state["step"]
    step_t += 1
    step = step_t.item()
    if wd != 0:
        p.mul_(1 - lr * wd)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    # Steps since the second moment was last updated: 1 in warm-up (AdamW's own update,
    # bit for bit); at a variance refresh the frozen steps count as if their squared
    # gradients had been this one's.
    gap = int(step) - state["variance_step"]
    state["exp_avg_sq"].mul_(beta2**gap).addcmul_(grad, grad, value=1 - beta2**gap)
    state["variance_step"] = int(step)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(state["exp_avg"], denom, value=-step_size)


def _frozen_denominator(state: dict, group: dict) -> torch.Tensor:
    """AdamW's denominator ``sqrt(v / bc2) + eps``, with the second moment and its bias
    correction frozen at ``variance_step`` (a zero second moment has no bias to correct)."""
    beta2, vstep = group["betas"][1], state["variance_step"]
    bias_correction2_sqrt = (1 - beta2**vstep) ** 0.5 if vstep > 0 else 1.0
    return (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])


def _frozen_update(p: torch.Tensor, reduced: torch.Tensor, denom: torch.Tensor | None,
                   state: dict, group: dict) -> None:
    """The post-warm-up update: AdamW's with the frozen denominator. ``reduced`` is the
    all-reduced momentum (divided by ``denom`` when None: the preconditioned momentum)."""
    beta1 = group["betas"][0]
    lr, wd = group["lr"], group["weight_decay"]
    step_t = state["step"]
    step_t += 1
    step = step_t.item()
    if wd != 0:
        p.mul_(1 - lr * wd)
    step_size = lr / (1 - beta1**step)
    if denom is None:
        p.add_(reduced, alpha=-step_size)
    else:
        p.addcdiv_(reduced, denom, value=-step_size)


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be a float in [0, 1), got {b!r}")


__all__ = ["ALGORITHMS", "RECOMMENDED", "CompressedAdamW"]
