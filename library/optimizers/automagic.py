"""Automagic optimizers: ``Automagic_Sinkgd`` (seed 001) and its CAME-based sibling ``Automagic_CameAMP`` (seed 004).

Both share the "automagic" machinery: a per-element learning-rate mask adapted Prodigy-style from sign agreement
between consecutive steps, ALLoRA row scaling for LoRA matrices, an ADOPT-style seed step, adaptive weight decay
in the first half of warm-up and OrthoGrad after it. They differ in the update direction:

* ``Automagic_Sinkgd``: momentum → Grams → SinkGD (Scetbon et al. 2025, arXiv 2502.06742) → VRAdam factor.
* ``Automagic_CameAMP``: CAME (Luo et al. 2023, arXiv 2307.02047) with factored second moment and confidence
  factor; optional 8-bit block-wise first moment.

One step of parameter θ (t = the parameter's own step count, starting at 1; W = ``warmup_steps``):

* t = 1 (seed, ADOPT's "no update at step 0"): momentum/second moment are seeded from g, the sign of g is
  recorded, θ₀ = θ is kept if the d_coef condition will need it; θ does not move.
* t > W and ``orthograd``: g ← OrthoGrad(θ, g).
* direction u (see the classes).
* lr mask (per element, in fp32 or fp64, never fp16/bf16): s = sign(g); where s·s_prev > 0 the mask grows by
  ``lr_bump``, where s·s_prev < 0 it shrinks by ``lr_bump``, where either is 0 it stays; clamp to
  [``min_lr``, ``max_lr``]. The "condition" of the seed doc is Prodigy's distance signal c = ⟨g, θ₀ − θ⟩ of the
  tensor: while t ≤ W/2, c > 0 (still descending away from the start) multiplies growth by ``d_coef`` and c < 0
  (the gradient points back to the start: overshoot) multiplies shrinkage by ``d_coef``. After W/2 θ₀ is freed.
  The mask keeps adapting after warm-up; there is no post-warm-up cut or decay (the original cut lr to 10%).
* step size η = mask · (group lr / the group's lr at construction) · ALLoRA row factor [· VRAdam factor]: an lr
  scheduler scales every element's step; with a constant schedule the factor is 1.
* t ≤ W/2 and ``weight_decay`` > 0: decoupled adaptive decay (Nakamura & Hong 2019, arXiv 1907.08931),
  θ ← θ − η·wd·a_p·θ with a_p = 2·sigmoid(4·(mean|g_p| − μ)/σ), μ/σ the mean/std of |g| over the group, refreshed
  every ``stats_update_freq`` steps.
* θ ← θ − η ⊙ u.

Tensors with 2+ dims are treated as matrices of shape (shape[0], rest): a conv weight out×in×kh×kw becomes
out×(in·kh·kw) for SinkGD, CAME's factored moments and ALLoRA rows. Math runs in fp32 for fp16/bf16 parameters
(fp64 parameters keep fp64), and states live in that working dtype. ``step()`` never synchronises with the host;
``log_metrics()`` returns the statistics (``avg_lr``, the mean of the mask) as tensors.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers import quant8
from library.optimizers.transforms import allora_row_scale, grams_, orthograd_

logger = logging.getLogger(__name__)

# Parameter-name fragments that mark LoRA matrices (kohya and PEFT spellings).
LORA_NAME_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B")
# Guards divisions by norms/std that are exactly zero (all-zero gradients or rows).
_TINY = 1e-30
# Tensors smaller than this keep fp32 moments even with optim_bits=8 (bitsandbytes' min_8bit_size).
MIN_8BIT_NUMEL = 4096


# ---------------------------------------------------------------------------------------------------------------
# Plain functions: the math, testable against float64 references.
# ---------------------------------------------------------------------------------------------------------------


def sinkgd_(x: Tensor, iters: int) -> Tensor:
    """SinkGD normalisation in place on (..., n, m): K times, rows to norm √m, then columns to norm √n.

    After it every entry has unit RMS on average, so the lr means the same for every matrix shape; all-zero
    rows/columns stay zero.
    """
    n, m = x.shape[-2], x.shape[-1]
    for _ in range(iters):
        x.mul_(math.sqrt(m) / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(_TINY))
        x.mul_(math.sqrt(n) / torch.linalg.vector_norm(x, dim=-2, keepdim=True).clamp_min_(_TINY))
    return x


def sinkgd_many_(updates: Sequence[Tensor], iters: int) -> None:
    """SinkGD on each tensor viewed as (shape[0], rest); same-shaped tensors are normalised as one batch."""
    buckets: dict[tuple[int, int], list[Tensor]] = defaultdict(list)
    for u in updates:
        buckets[(u.shape[0], u.numel() // max(u.shape[0], 1))].append(u)
    for (n, m), members in buckets.items():
        if len(members) == 1:
            sinkgd_(members[0].view(n, m), iters)
            continue
        batch = sinkgd_(torch.stack([u.view(n, m) for u in members]), iters)
        torch._foreach_copy_([u.view(n, m) for u in members], list(batch.unbind(0)))


def rms_normalize_(updates: Sequence[Tensor]) -> None:
    """Elementwise path for tensors with fewer than 2 dims: scale to unit RMS, the scale SinkGD gives matrices."""
    if not updates:
        return
    updates = list(updates)
    inv_norms = torch.stack(torch._foreach_norm(updates)).clamp_min_(_TINY).reciprocal_()
    torch._foreach_mul_(updates, list(inv_norms.unbind(0)))
    torch._foreach_mul_(updates, [math.sqrt(u.numel()) for u in updates])


def vradam_factor(momenta: Sequence[Tensor]) -> Tensor:
    """VRAdam per-tensor lr multiplier 1/(1 + min(3·Σm², 10)): large, volatile momentum damps the step."""
    sq = torch.stack(torch._foreach_norm(list(momenta))).square()
    return 1.0 / (1.0 + (3.0 * sq).clamp_max(10.0))


def lr_mask_update_(
    masks: Sequence[Tensor],
    signs: Sequence[Tensor],
    prev_signs: Sequence[Tensor],
    grow: Sequence[Tensor | float],
    shrink: Sequence[Tensor | float],
    min_lr: float,
    max_lr: float,
) -> None:
    """Prodigy-style mask step per element: +grow where the sign repeats, −shrink where it flips, then clamp.

    ``signs``/``prev_signs`` hold −1/0/+1 (int8); a zero on either side leaves that element unchanged.
    """
    for mask, s, prev, up, down in zip(masks, signs, prev_signs, grow, shrink, strict=True):
        agree = s * prev
        delta = (agree > 0).to(mask.dtype) * up - (agree < 0).to(mask.dtype) * down
        mask.add_(delta).clamp_(min_lr, max_lr)


def prodigy_bumps(
    grads: Sequence[Tensor], params: Sequence[Tensor], starts: Sequence[Tensor], lr_bump: float, d_coef: float
) -> tuple[list[Tensor], list[Tensor]]:
    """(grow, shrink) per tensor from Prodigy's c = ⟨g, θ₀ − θ⟩: c > 0 scales growth, c < 0 scales shrinkage."""
    c = torch.stack(
        [
            torch.dot(g.reshape(-1), (p0.to(g.dtype) - p.to(g.dtype)).reshape(-1))
            for g, p, p0 in zip(grads, params, starts, strict=True)
        ]
    )
    grow = (c > 0).to(c.dtype) * (lr_bump * (d_coef - 1.0)) + lr_bump
    shrink = (c < 0).to(c.dtype) * (lr_bump * (d_coef - 1.0)) + lr_bump
    return list(grow.unbind(0)), list(shrink.unbind(0))


def adaptive_decay_factor(grads: Sequence[Tensor]) -> Tensor:
    """Per-tensor a_p = 2·sigmoid(4·(mean|g_p| − μ)/σ), μ/σ = mean/std of |g| over all elements of ``grads``.

    Tensors whose gradients are larger than the group's typical gradient are decayed more (up to 2×).
    """
    grads = list(grads)
    numel = [g.numel() for g in grads]
    abs_sums = torch._foreach_norm(grads, 1)
    mean_abs = torch.stack(torch._foreach_div(abs_sums, numel))
    total = sum(numel)
    mu = torch.stack(abs_sums).sum() / total
    sq_mean = torch.stack(torch._foreach_norm(grads, 2)).square().sum() / total
    sigma = (sq_mean - mu * mu).clamp_min(0).sqrt().clamp_min(_TINY)
    return 2.0 * torch.sigmoid(4.0 * (mean_abs - mu) / sigma)


def _as_matrix(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _factored_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """rsqrt of the rank-1 estimate (row/mean(row)) ⊗ col of a non-negative matrix (Adafactor/CAME)."""
    return torch.outer((row / row.mean().clamp_min(_TINY)).rsqrt(), col.rsqrt())


# ---------------------------------------------------------------------------------------------------------------
# Shared optimizer machinery.
# ---------------------------------------------------------------------------------------------------------------


def _require(cls_name: str, name: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise OptimizerError(f"{cls_name}: {name}={value!r} is invalid; {valid}")


def _work_dtype(p: Tensor) -> torch.dtype:
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def _group_names(group: dict) -> list[str] | None:
    return group.get("names") or group.get("param_names")


class _AutomagicBase(torch.optim.Optimizer):
    """Gathers state and runs the common part of the step; subclasses supply the update direction."""

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        name = type(self).__name__
        lr, min_lr, max_lr = defaults["lr"], defaults["min_lr"], defaults["max_lr"]
        _require(name, "lr", lr, lr > 0, "must be > 0")
        _require(name, "min_lr", min_lr, min_lr >= 0, "must be >= 0")
        _require(name, "max_lr", max_lr, max_lr >= min_lr, f"must be >= min_lr ({min_lr})")
        _require(name, "lr_bump", defaults["lr_bump"], defaults["lr_bump"] >= 0, "must be >= 0")
        _require(name, "eta", defaults["eta"], defaults["eta"] > 0, "must be > 0")
        _require(name, "d_coef", defaults["d_coef"], defaults["d_coef"] > 0, "must be > 0")
        _require(
            name, "weight_decay", defaults["weight_decay"], defaults["weight_decay"] >= 0, "must be >= 0"
        )
        warmup = defaults["warmup_steps"]
        _require(
            name, "warmup_steps", warmup, isinstance(warmup, int) and warmup >= 0, "must be an integer >= 0"
        )
        freq = defaults["stats_update_freq"]
        _require(
            name, "stats_update_freq", freq, isinstance(freq, int) and freq >= 1, "must be an integer >= 1"
        )
        self._logged_plain_params = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # The lr the masks start from; a scheduler's later changes of group["lr"] scale the masks by lr / this.
        group.setdefault("mask_init_lr", group["lr"])
        names = _group_names(group)
        if names is not None and len(names) != len(group["params"]):
            raise OptimizerError(
                f"{type(self).__name__}: param group has {len(group['params'])} params but {len(names)} names; "
                "'names' must be parallel to 'params'"
            )
        if names is None and not group["full_finetune"] and not self._logged_plain_params:
            logger.info(
                "%s: parameters come without names; ALLoRA row scaling applies to every tensor with 2+ dims",
                type(self).__name__,
            )
            self._logged_plain_params = True

    # -- state -------------------------------------------------------------------------------------------------

    def _uses_allora(self, group: dict, index: int, p: Tensor) -> bool:
        names = _group_names(group)
        if names is not None:
            return any(marker in names[index] for marker in LORA_NAME_MARKERS)
        return p.dim() >= 2 and not group["full_finetune"]

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        dtype = _work_dtype(p)
        init_lr = min(max(group["mask_init_lr"], group["min_lr"]), group["max_lr"])
        state["step"] = 0
        state["lr_mask"] = torch.full_like(p, init_lr, dtype=dtype, memory_format=torch.contiguous_format)
        state["avg_lr"] = torch.tensor(init_lr, dtype=dtype, device=p.device)
        state["decay_factor"] = torch.ones((), dtype=dtype, device=p.device)
        state["sign"] = torch.zeros_like(p, dtype=torch.int8)

    @staticmethod
    def _needs_start(group: dict) -> bool:
        """θ₀ is kept only while the d_coef condition can act (t ≤ W/2 with t ≥ 2)."""
        return group["d_coef"] != 1 and group["warmup_steps"] >= 4

    def _seed(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]) -> None:
        for p, g, state in zip(params, grads, states, strict=True):
            state["sign"].copy_(torch.sign(g))
            if self._needs_start(group):
                state["start"] = p.detach().clone()
        self._seed_direction(group, params, grads, states)

    def _seed_direction(
        self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> None:
        raise NotImplementedError

    def _direction(
        self, group: dict, step: int, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> tuple[list[Tensor], Tensor | None]:
        """Return the update direction per tensor (working dtype, new tensors) and an optional lr factor."""
        raise NotImplementedError

    # -- step --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, list[tuple[int, Tensor]]] = defaultdict(list)
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise OptimizerError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(group, p, state)
                state["step"] += 1
                by_step[state["step"]].append((index, p))
            for t, members in by_step.items():
                self._step_members(group, t, members)
        return loss

    def _step_members(self, group: dict, t: int, members: list[tuple[int, Tensor]]) -> None:
        params = [p for _, p in members]
        states = [self.state[p] for p in params]
        grads = [p.grad.to(_work_dtype(p)) for p in params]
        if t == 1:
            self._seed(group, params, grads, states)
            return
        warmup = group["warmup_steps"]
        early = t <= warmup / 2
        if group["orthograd"] and t > warmup:
            grads = [g.clone() for g in grads]
            orthograd_(params, grads)

        updates, lr_factor = self._direction(group, t, params, grads, states)

        # lr mask
        signs = [torch.sign(g).to(torch.int8) for g in grads]
        lr_bump = group["lr_bump"]
        if early and "start" in states[0]:
            grow, shrink = prodigy_bumps(
                grads, params, [s["start"] for s in states], lr_bump, group["d_coef"]
            )
        else:
            grow = shrink = [lr_bump] * len(params)
            for state in states:
                state.pop("start", None)
        masks = [s["lr_mask"] for s in states]
        lr_mask_update_(
            masks, signs, [s["sign"] for s in states], grow, shrink, group["min_lr"], group["max_lr"]
        )
        torch._foreach_copy_([s["sign"] for s in states], signs)

        if (t - 2) % group["stats_update_freq"] == 0:
            for state, mask in zip(states, masks, strict=True):
                state["avg_lr"].copy_(mask.mean())
            if early and group["weight_decay"] > 0:
                for state, a in zip(states, adaptive_decay_factor(grads).unbind(0), strict=True):
                    state["decay_factor"].copy_(a)

        # decoupled adaptive weight decay folded into the update: θ ← θ − η ⊙ (u + wd·a_p·θ)
        if early and group["weight_decay"] > 0:
            coef = [s["decay_factor"] * group["weight_decay"] for s in states]
            torch._foreach_add_(
                updates,
                torch._foreach_mul([p.to(u.dtype) for p, u in zip(params, updates, strict=True)], coef),
            )

        torch._foreach_mul_(updates, masks)
        ratio = group["lr"] / group["mask_init_lr"]
        if lr_factor is not None:
            torch._foreach_mul_(updates, list((lr_factor * ratio).unbind(0)))
        elif ratio != 1.0:
            torch._foreach_mul_(updates, ratio)
        lora = [i for i, (index, p) in enumerate(members) if self._uses_allora(group, index, p)]
        if lora:
            scales = allora_row_scale([params[i].to(updates[i].dtype) for i in lora], group["eta"])
            torch._foreach_mul_([updates[i] for i in lora], scales)

        same = [i for i, p in enumerate(params) if p.dtype == updates[i].dtype]
        if same:
            torch._foreach_sub_([params[i] for i in same], [updates[i] for i in same])
        for i, p in enumerate(params):
            if p.dtype != updates[i].dtype:
                p.copy_(p.to(updates[i].dtype).sub_(updates[i]))

    # -- checkpointing and logging -----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then restore every state tensor's saved dtype.

        torch casts floating state to the parameter's dtype, which would turn the fp32 lr mask of a bf16
        parameter into bf16 (and lose the bumps); states are also copied so they never alias the caller's dict.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    state[key] = value.to(device=p.device, dtype=value.dtype, copy=True)

    def log_metrics(self) -> dict[str, Tensor]:
        """``avg_lr`` (element-weighted mean of the lr masks, as of the last statistics refresh), per group too."""
        metrics: dict[str, Tensor] = {}
        group_avgs, group_sizes = [], []
        for index, group in enumerate(self.param_groups):
            entries = [
                (self.state[p]["avg_lr"], p.numel()) for p in group["params"] if "avg_lr" in self.state[p]
            ]
            if not entries:
                continue
            size = sum(n for _, n in entries)
            dtype = functools.reduce(torch.promote_types, [a.dtype for a, _ in entries])
            avg = torch.stack([a.to(dtype) * (n / size) for a, n in entries]).sum()
            group_avgs.append(avg)
            group_sizes.append(size)
            if len(self.param_groups) > 1:
                metrics[f"avg_lr/group{index}"] = avg
        if group_avgs:
            total = sum(group_sizes)
            dtype = functools.reduce(torch.promote_types, [a.dtype for a in group_avgs])
            metrics["avg_lr"] = torch.stack(
                [a.to(dtype) * (n / total) for a, n in zip(group_avgs, group_sizes, strict=True)]
            ).sum()
        return metrics


# ---------------------------------------------------------------------------------------------------------------
# Automagic_Sinkgd
# ---------------------------------------------------------------------------------------------------------------


class Automagic_Sinkgd(_AutomagicBase):  # noqa: N801 - user-facing name from the seed docs
    """Automagic with a SinkGD-normalised Grams update (seed 001).

    Direction: m ← β₁m + (1−β₁)g (m seeded with g at step 1, no update then: ADOPT's rule, which also means a
    zero first gradient, as for lora_down under a zero lora_up, cannot blow up step 2); u = sign(g)·|m| (Grams);
    matrices: K SinkGD iterations (K = 4, 5 with ``full_finetune``); tensors with < 2 dims: scaled to unit RMS.
    The step is additionally scaled by the VRAdam factor 1/(1 + min(3·Σm², 10)) of the tensor.

    ``full_finetune`` means "not a LoRA": 5 SinkGD iterations and, for parameters without names, no ALLoRA.
    ALLoRA applies to parameters whose group ``names`` mark them as LoRA matrices (``lora_down``/``lora_up``),
    or, without names, to every tensor with 2+ dims unless ``full_finetune``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-5,
        min_lr: float = 1e-6,
        max_lr: float = 1e-2,
        lr_bump: float = 1e-5,
        eta: float = 2.0,
        beta1: float = 0.9,
        d_coef: float = 2.0,
        weight_decay: float = 5e-4,
        warmup_steps: int = 500,
        full_finetune: bool = False,
        orthograd: bool = False,
        stats_update_freq: int = 5,
    ) -> None:
        _require(type(self).__name__, "beta1", beta1, 0.0 <= beta1 < 1.0, "must be in [0, 1)")
        defaults = dict(
            lr=lr,
            min_lr=min_lr,
            max_lr=max_lr,
            lr_bump=lr_bump,
            eta=eta,
            beta1=beta1,
            d_coef=d_coef,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            full_finetune=full_finetune,
            orthograd=orthograd,
            stats_update_freq=stats_update_freq,
        )
        super().__init__(params, defaults)

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        super()._init_state(group, p, state)
        state["exp_avg"] = torch.zeros_like(p, dtype=_work_dtype(p), memory_format=torch.contiguous_format)

    def _seed_direction(
        self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> None:
        torch._foreach_copy_([s["exp_avg"] for s in states], grads)

    def _direction(
        self, group: dict, step: int, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> tuple[list[Tensor], Tensor | None]:
        momenta = [s["exp_avg"] for s in states]
        torch._foreach_lerp_(momenta, grads, 1.0 - group["beta1"])
        updates = [m.clone(memory_format=torch.contiguous_format) for m in momenta]
        grams_(updates, grads)
        sinkgd_many_([u for u in updates if u.dim() >= 2], 5 if group["full_finetune"] else 4)
        rms_normalize_([u for u in updates if u.dim() < 2])
        return updates, vradam_factor(momenta)


# ---------------------------------------------------------------------------------------------------------------
# Automagic_CameAMP
# ---------------------------------------------------------------------------------------------------------------


class Automagic_CameAMP(_AutomagicBase):  # noqa: N801 - user-facing name from the seed docs
    """Automagic with a CAME update (seed 004's "Automagic CameAMP"), optionally with an 8-bit first moment.

    CAME (Luo et al. 2023): v (factored into row/column means for matrices, full for < 2 dims) tracks g² + ε₁;
    u = g/√v, clipped to RMS ≤ ``clip_threshold``; m ← β₁m + (1−β₁)u; the instability U = (u − m)² + ε₂ is
    tracked the same way as R (β₃) and the direction is m/√R̂. Two choices of ours: the seed step sets v to
    g² + ε₁ (ADOPT's v₀ = g₀², so step 2 is not inflated by a v that starts at zero), and R is bias-corrected,
    R̂ = R/(1−β₃^k) for the k-th update — without it CAME's first steps are up to 100/√k times larger, for
    thousands of steps with β₃ = 0.9999.

    Defaults: ``lr=1e-4`` and ``max_lr=1e-3`` because CAME's direction has Adam-like unit scale and Adam-family
    LoRA training of SD runs at ~1e-4 (the original CameAMP capped its mask at 1e-3 too); the other mask/warm-up
    arguments mean the same as in :class:`Automagic_Sinkgd`. ``optim_bits=8`` stores m block-wise quantised (uint8
    codes + fp32 absmax per 256 elements) for tensors of ≥ 4096 elements; the factored moments are already tiny
    and the lr mask stays fp32 (8-bit or 16-bit masks cannot represent ``lr_bump`` steps).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        min_lr: float = 1e-6,
        max_lr: float = 1e-3,
        lr_bump: float = 1e-5,
        eta: float = 2.0,
        d_coef: float = 2.0,
        weight_decay: float = 5e-4,
        warmup_steps: int = 500,
        full_finetune: bool = False,
        orthograd: bool = False,
        stats_update_freq: int = 5,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        optim_bits: int = 32,
    ) -> None:
        name = type(self).__name__
        _require(
            name,
            "betas",
            betas,
            len(betas) == 3 and all(0.0 <= b < 1.0 for b in betas),
            "need 3 values in [0, 1)",
        )
        _require(name, "eps", eps, len(eps) == 2 and all(e > 0 for e in eps), "need 2 values > 0")
        _require(name, "clip_threshold", clip_threshold, clip_threshold > 0, "must be > 0")
        _require(name, "optim_bits", optim_bits, optim_bits in (8, 32), "must be 8 or 32")
        defaults = dict(
            lr=lr,
            min_lr=min_lr,
            max_lr=max_lr,
            lr_bump=lr_bump,
            eta=eta,
            d_coef=d_coef,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            full_finetune=full_finetune,
            orthograd=orthograd,
            stats_update_freq=stats_update_freq,
            betas=tuple(betas),
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            optim_bits=optim_bits,
        )
        super().__init__(params, defaults)

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        super()._init_state(group, p, state)
        dtype = _work_dtype(p)
        if group["optim_bits"] == 8 and p.numel() >= MIN_8BIT_NUMEL:
            quant8.init_state(state, "exp_avg", p, signed=True)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        if p.dim() >= 2:
            n, m = _as_matrix(p).shape
            for key, size in (("v_row", n), ("v_col", m), ("r_row", n), ("r_col", m)):
                state[key] = torch.zeros(size, dtype=dtype, device=p.device)
        else:
            state["v"] = torch.zeros_like(p, dtype=dtype)
            state["r"] = torch.zeros_like(p, dtype=dtype)

    def _seed_direction(
        self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> None:
        eps1 = group["eps"][0]
        for g, state in zip(grads, states, strict=True):
            sq = g.square().add_(eps1)
            if g.dim() >= 2:
                sq = _as_matrix(sq)
                state["v_row"].copy_(sq.mean(dim=1))
                state["v_col"].copy_(sq.mean(dim=0))
            else:
                state["v"].copy_(sq)

    @staticmethod
    def _ema_second_moment(state: dict, prefix: str, x: Tensor, beta: float) -> Tensor:
        """Fold x (≥ 0) into the (factored) EMA ``prefix`` and return rsqrt of its current estimate."""
        if x.dim() >= 2:
            x = _as_matrix(x)
            row, col = state[f"{prefix}_row"], state[f"{prefix}_col"]
            row.lerp_(x.mean(dim=1), 1.0 - beta)
            col.lerp_(x.mean(dim=0), 1.0 - beta)
            return _factored_rsqrt(row, col)
        full = state[prefix]
        full.lerp_(x, 1.0 - beta)
        return full.rsqrt()

    def _direction(
        self, group: dict, step: int, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> tuple[list[Tensor], Tensor | None]:
        beta1, beta2, beta3 = group["betas"]
        eps1, eps2 = group["eps"]
        k = step - 1  # CAME update count (step 1 only seeded v)
        r_correction = 1.0 - beta3**k
        updates = []
        for g, state in zip(grads, states, strict=True):
            u = g * self._ema_second_moment(state, "v", g.square().add_(eps1), beta2).view_as(g)
            rms = torch.linalg.vector_norm(u) / math.sqrt(u.numel())
            u.div_((rms / group["clip_threshold"]).clamp_min_(1.0))
            quantised = quant8.has_state(state, "exp_avg")
            m = quant8.load(state, "exp_avg", signed=True, dtype=g.dtype) if quantised else state["exp_avg"]
            m.lerp_(u, 1.0 - beta1)
            if quantised:
                quant8.store_(state, "exp_avg", m, signed=True)
            instability = u.sub_(m).square_().add_(eps2)
            inv_r = self._ema_second_moment(state, "r", instability, beta3).view_as(g)
            updates.append(inv_r.mul_(m).mul_(math.sqrt(r_correction)))
        return updates, None
