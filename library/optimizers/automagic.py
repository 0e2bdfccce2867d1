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

A LoRA step is bound by kernel launches (hundreds of small tensors), so the step launches a number of kernels
that does not grow with the number of tensors: elementwise math is one ``torch._foreach_*`` call over the list,
per-tensor reductions are ``_foreach_norm`` calls (signed sums as the L1 norms of the positive and negative
parts), per-tensor scalars are broadcast with one ``repeat_interleave`` (lists of 0-d tensors would send CUDA
foreach kernels down their per-tensor slow path), and row/column math (SinkGD, CAME's factored moments, ALLoRA)
runs on one [k, n, m] stack per distinct matrix shape. Exceptions that still loop per tensor: 8-bit moments of
tensors whose size is not a multiple of the 256-element block, and of tensors with < 2 dims.
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
from library.optimizers.state import ExactStateLoad

logger = logging.getLogger(__name__)

# Parameter-name fragments that mark LoRA matrices (kohya and PEFT spellings).
LORA_NAME_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B")
# Guards divisions by norms/std that are exactly zero (all-zero gradients or rows).
_TINY = 1e-30
# Per-tensor scalars are expanded to full tensors (see _per_tensor) up to this many elements per step.
_EXPAND_MAX_NUMEL = 1 << 26
# Tensors smaller than this keep fp32 moments even with optim_bits=8 (bitsandbytes' min_8bit_size).
MIN_8BIT_NUMEL = 4096


# ---------------------------------------------------------------------------------------------------------------
# Plain functions: the math, testable against float64 references.
# ---------------------------------------------------------------------------------------------------------------


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """(rows, cols) of a tensor viewed as a matrix: dim 0 by the rest; 1-D as a column, 0-D as 1×1."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


@functools.lru_cache(maxsize=256)
def _bucket_plan(shapes: tuple[torch.Size, ...]) -> tuple[tuple[tuple[int, int], tuple[int, ...]], ...]:
    """Indices grouped by matrix shape, so each group is stacked into one [k, n, m] batch (cached per shape list)."""
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, shape in enumerate(shapes):
        buckets[_matrix_shape(shape)].append(i)
    return tuple((key, tuple(idx)) for key, idx in buckets.items())


def _stack(tensors: Sequence[Tensor], idx: Sequence[int], n: int, m: int) -> Tensor:
    return torch.stack([tensors[i].view(n, m) for i in idx])


@functools.lru_cache(maxsize=64)
def _numel_tensor(numels: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(numels, dtype=torch.int64, device=device)


def _per_tensor(values: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """One value per tensor, broadcast to each tensor's shape for foreach ops.

    A list of 0-d tensors against full tensors sends CUDA foreach kernels down their per-tensor slow path
    (different shapes); one ``repeat_interleave`` into a flat buffer gives same-shaped views instead. Above
    ``_EXPAND_MAX_NUMEL`` elements the temporary would cost more memory than the saved launches are worth.
    """
    like = list(like)
    values = values.to(like[0].dtype)
    numels = tuple(t.numel() for t in like)
    total = sum(numels)
    if total > _EXPAND_MAX_NUMEL:
        return list(values.unbind(0))
    flat = torch.repeat_interleave(values, _numel_tensor(numels, values.device), output_size=total)
    return [chunk.view(t.shape) for chunk, t in zip(flat.split(numels), like, strict=True)]


def _signed_sums(x: Sequence[Tensor]) -> Tensor:
    """Σx per tensor with one L1 norm over the positive and one over the negative parts (no per-tensor sum op)."""
    neg = torch._foreach_clamp_max(x, 0.0)
    pos = torch._foreach_clamp_min(x, 0.0)
    return torch.stack(torch._foreach_norm(pos, 1)) - torch.stack(torch._foreach_norm(neg, 1))


def _cast(tensors: Sequence[Tensor], dtypes: Sequence[torch.dtype]) -> list[Tensor]:
    """Tensors in the given dtypes: matching ones as they are, the others converted by one foreach copy."""
    out = list(tensors)
    idx = [i for i, (t, d) in enumerate(zip(tensors, dtypes, strict=True)) if t.dtype != d]
    if idx:
        bufs = [torch.empty(tensors[i].shape, dtype=dtypes[i], device=tensors[i].device) for i in idx]
        torch._foreach_copy_(bufs, [tensors[i] for i in idx])
        for i, buf in zip(idx, bufs, strict=True):
            out[i] = buf
    return out


def sinkgd_(x: Tensor, iters: int) -> Tensor:
    """SinkGD normalisation in place on (..., n, m): K times, rows to norm √m, then columns to norm √n.

    After it every entry has unit RMS on average, so the lr means the same for every matrix shape; all-zero
    rows/columns stay zero.
    """
    n, m = x.shape[-2], x.shape[-1]
    for _ in range(iters):
        x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(_TINY).mul_(1.0 / math.sqrt(m)))
        x.div_(torch.linalg.vector_norm(x, dim=-2, keepdim=True).clamp_min_(_TINY).mul_(1.0 / math.sqrt(n)))
    return x


def _sinkgd_batched(tensors: Sequence[Tensor], iters: int) -> list[Tensor]:
    """SinkGD of each tensor viewed as (shape[0], rest), one [k, n, m] batch per shape; returns new tensors."""
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for (n, m), idx in _bucket_plan(tuple(t.shape for t in tensors)):
        batch = sinkgd_(_stack(tensors, idx, n, m), iters)
        for i, b in zip(idx, batch.unbind(0), strict=True):
            out[i] = b.view(tensors[i].shape)
    return out


def sinkgd_many_(updates: Sequence[Tensor], iters: int) -> None:
    """SinkGD on each tensor viewed as (shape[0], rest) in place; same-shaped tensors are normalised as one batch."""
    if updates:
        torch._foreach_copy_(list(updates), _sinkgd_batched(updates, iters))


def rms_normalize_(updates: Sequence[Tensor]) -> None:
    """Elementwise path for tensors with fewer than 2 dims: scale to unit RMS, the scale SinkGD gives matrices."""
    if not updates:
        return
    updates = list(updates)
    inv_norms = torch.stack(torch._foreach_norm(updates)).clamp_min_(_TINY).reciprocal_()
    torch._foreach_mul_(updates, _per_tensor(inv_norms, updates))
    torch._foreach_mul_(updates, [math.sqrt(u.numel()) for u in updates])


def vradam_factor(momenta: Sequence[Tensor]) -> Tensor:
    """VRAdam per-tensor lr multiplier 1/(1 + min(3·Σm², 10)): large, volatile momentum damps the step."""
    sq = torch.stack(torch._foreach_norm(list(momenta))).square()
    return 1.0 / (1.0 + (3.0 * sq).clamp_max(10.0))


def lr_mask_update_(
    masks: Sequence[Tensor],
    signs: Sequence[Tensor],
    prev_signs: Sequence[Tensor],
    grow: Tensor | Sequence[Tensor] | float,
    shrink: Tensor | Sequence[Tensor] | float,
    min_lr: float,
    max_lr: float,
) -> None:
    """Prodigy-style mask step per element: +grow where the sign repeats, −shrink where it flips, then clamp.

    ``signs``/``prev_signs`` hold −1/0/+1 (any dtype); a zero on either side leaves that element unchanged.
    ``grow``/``shrink`` are one value for all tensors, or one value per tensor (a 1-D tensor or 0-d tensors).
    """
    masks = list(masks)
    dtypes = [mask.dtype for mask in masks]
    agree = torch._foreach_mul(_cast(prev_signs, dtypes), _cast(signs, dtypes))
    up = torch._foreach_clamp_min(agree, 0.0)  # 1 where the sign repeats, else 0
    torch._foreach_clamp_max_(agree, 0.0)  # −1 where it flips, else 0
    for part, rate in ((up, grow), (agree, shrink)):
        if isinstance(rate, Tensor):
            rate = _per_tensor(rate, part)
        elif not isinstance(rate, float) and isinstance(rate[0], Tensor):
            rate = _per_tensor(torch.stack(list(rate)), part)
        torch._foreach_mul_(part, rate if isinstance(rate, float) else list(rate))
    torch._foreach_add_(masks, up)
    torch._foreach_add_(masks, agree)
    torch._foreach_clamp_min_(masks, min_lr)
    torch._foreach_clamp_max_(masks, max_lr)


def prodigy_bumps(
    grads: Sequence[Tensor], params: Sequence[Tensor], starts: Sequence[Tensor], lr_bump: float, d_coef: float
) -> tuple[list[Tensor], list[Tensor]]:
    """(grow, shrink) per tensor from Prodigy's c = ⟨g, θ₀ − θ⟩: c > 0 scales growth, c < 0 scales shrinkage."""
    grow, shrink = _prodigy_rates(grads, params, starts, lr_bump, d_coef)
    return list(grow.unbind(0)), list(shrink.unbind(0))


def _prodigy_rates(
    grads: Sequence[Tensor], params: Sequence[Tensor], starts: Sequence[Tensor], lr_bump: float, d_coef: float
) -> tuple[Tensor, Tensor]:
    """:func:`prodigy_bumps` as two 1-D tensors (one entry per tensor)."""
    dtypes = [g.dtype for g in grads]
    diff = torch._foreach_sub(_cast(starts, dtypes), _cast(params, dtypes))
    torch._foreach_mul_(diff, list(grads))
    c = _signed_sums(diff)
    grow = (c > 0).to(c.dtype) * (lr_bump * (d_coef - 1.0)) + lr_bump
    shrink = (c < 0).to(c.dtype) * (lr_bump * (d_coef - 1.0)) + lr_bump
    return grow, shrink


def _orthograd_(params: Sequence[Tensor], grads: list[Tensor]) -> None:
    """OrthoGrad with batched per-tensor reductions (same definition as ``transforms.orthograd_``).

    ``grads`` is replaced element by element with new tensors (the caller's gradients stay untouched).
    """
    params = list(params)
    # ⟨θ,θ⟩ and ⟨θ,g⟩ by the same reduction, so g = θ gives coef = 1 and g⊥ = 0 exactly
    theta_sq = torch.stack(torch._foreach_norm(torch._foreach_mul(params, params), 1))
    prod = torch._foreach_mul(params, grads)
    coef = torch.where(theta_sq > _TINY, _signed_sums(prod) / theta_sq.clamp_min(_TINY), 0.0)
    g_norm = torch.stack(torch._foreach_norm(grads))
    perp = torch._foreach_mul(params, _per_tensor(-coef, params))
    torch._foreach_add_(perp, grads)
    perp_norm = torch.stack(torch._foreach_norm(perp))
    scale = torch.where(perp_norm > 0, g_norm / perp_norm.clamp_min(_TINY), 1.0)
    torch._foreach_mul_(perp, _per_tensor(scale, perp))
    grads[:] = perp


def _allora_scale_(updates: list[Tensor], params: Sequence[Tensor], eta: float) -> None:
    """ALLoRA rows 1/√(‖θ_i‖² + 1/η²) applied to ``updates`` (replaced by new tensors), one batch per shape."""
    inv_eta_sq = 1.0 / (eta * eta)
    for (n, m), idx in _bucket_plan(tuple(p.shape for p in params)):
        sq = torch.linalg.vector_norm(_stack(params, idx, n, m), dim=-1, keepdim=True).square_()
        scaled = _stack(updates, idx, n, m).mul_(sq.add_(inv_eta_sq).rsqrt_())
        for i, s in zip(idx, scaled.unbind(0), strict=True):
            updates[i] = s.view(updates[i].shape)


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


def _factored_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """rsqrt of the rank-1 estimate (row/mean(row)) ⊗ col of non-negative matrices, batched: [k, n], [k, m]."""
    inv_row = (row / row.mean(dim=-1, keepdim=True).clamp_min(_TINY)).rsqrt_()
    return inv_row.unsqueeze(-1) * col.rsqrt().unsqueeze(-2)


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


class _AutomagicBase(ExactStateLoad, torch.optim.Optimizer):
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
        torch._foreach_copy_([s["sign"] for s in states], torch._foreach_sign(grads))
        if self._needs_start(group):
            starts = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
            torch._foreach_copy_(starts, params)
            for state, start in zip(states, starts, strict=True):
                state["start"] = start
        self._seed_direction(group, params, grads, states)

    def _seed_direction(
        self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> None:
        raise NotImplementedError

    def _direction(
        self, group: dict, step: int, grads: list[Tensor], signs: list[Tensor], states: list[dict]
    ) -> tuple[list[Tensor], Tensor | None]:
        """Return the update direction per tensor (working dtype, new tensors) and an optional lr factor.

        ``signs`` is sign(g) in the working dtype, shared with the lr-mask update.
        """
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
        """One step of the tensors at step t; every op works on the whole list (foreach or per-shape batches)."""
        params = [p for _, p in members]
        states = [self.state[p] for p in params]
        dtypes = [_work_dtype(p) for p in params]
        grads = _cast([p.grad for p in params], dtypes)
        if t == 1:
            self._seed(group, params, grads, states)
            return
        warmup = group["warmup_steps"]
        early = t <= warmup / 2
        params_w = _cast(params, dtypes)  # read-only working-dtype view of θ (copies only for fp16/bf16)
        if group["orthograd"] and t > warmup:
            _orthograd_(params_w, grads)

        signs = torch._foreach_sign(grads)
        updates, lr_factor = self._direction(group, t, grads, signs, states)

        # lr mask
        lr_bump = group["lr_bump"]
        if early and "start" in states[0]:
            grow, shrink = _prodigy_rates(
                grads, params_w, [s["start"] for s in states], lr_bump, group["d_coef"]
            )
        else:
            grow = shrink = float(lr_bump)
            for state in states:
                state.pop("start", None)
        masks = [s["lr_mask"] for s in states]
        prev_signs = [s["sign"] for s in states]
        lr_mask_update_(masks, signs, prev_signs, grow, shrink, group["min_lr"], group["max_lr"])
        torch._foreach_copy_(prev_signs, signs)

        if (t - 2) % group["stats_update_freq"] == 0:
            means = torch._foreach_div(torch._foreach_norm(masks, 1), [m.numel() for m in masks])
            torch._foreach_copy_([s["avg_lr"] for s in states], means)
            if early and group["weight_decay"] > 0:
                torch._foreach_copy_(
                    [s["decay_factor"] for s in states], list(adaptive_decay_factor(grads).unbind(0))
                )

        # decoupled adaptive weight decay folded into the update: θ ← θ − η ⊙ (u + wd·a_p·θ)
        if early and group["weight_decay"] > 0:
            coef = torch.stack([s["decay_factor"] for s in states]) * group["weight_decay"]
            torch._foreach_add_(updates, torch._foreach_mul(params_w, _per_tensor(coef, params_w)))

        torch._foreach_mul_(updates, masks)
        ratio = group["lr"] / group["mask_init_lr"]
        if lr_factor is not None:
            torch._foreach_mul_(updates, _per_tensor(lr_factor * ratio, updates))
        elif ratio != 1.0:
            torch._foreach_mul_(updates, ratio)
        lora = [i for i, (index, p) in enumerate(members) if self._uses_allora(group, index, p)]
        if lora:
            lora_updates = [updates[i] for i in lora]
            _allora_scale_(lora_updates, [params_w[i] for i in lora], group["eta"])
            for i, u in zip(lora, lora_updates, strict=True):
                updates[i] = u

        same = [i for i, p in enumerate(params) if p.dtype == dtypes[i]]
        if same:
            torch._foreach_sub_([params[i] for i in same], [updates[i] for i in same])
        cast = [i for i, p in enumerate(params) if p.dtype != dtypes[i]]
        if cast:
            torch._foreach_sub_([params_w[i] for i in cast], [updates[i] for i in cast])
            torch._foreach_copy_([params[i] for i in cast], [params_w[i] for i in cast])

    # -- checkpointing and logging -----------------------------------------------------------------------------

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
        self, group: dict, step: int, grads: list[Tensor], signs: list[Tensor], states: list[dict]
    ) -> tuple[list[Tensor], Tensor | None]:
        momenta = [s["exp_avg"] for s in states]
        torch._foreach_lerp_(momenta, grads, 1.0 - group["beta1"])
        updates = list(torch._foreach_abs(momenta))  # Grams: |m| with the sign of g
        torch._foreach_mul_(updates, signs)
        mats = [i for i, u in enumerate(updates) if u.dim() >= 2]
        normalised = _sinkgd_batched([updates[i] for i in mats], 5 if group["full_finetune"] else 4)
        for i, u in zip(mats, normalised, strict=True):
            updates[i] = u
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
            n, m = _matrix_shape(p.shape)
            for key, size in (("v_row", n), ("v_col", m), ("r_row", n), ("r_col", m)):
                state[key] = torch.zeros(size, dtype=dtype, device=p.device)
        else:
            state["v"] = torch.zeros_like(p, dtype=dtype)
            state["r"] = torch.zeros_like(p, dtype=dtype)

    def _seed_direction(
        self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict]
    ) -> None:
        eps1 = group["eps"][0]
        mats = [i for i, g in enumerate(grads) if g.dim() >= 2]
        dst: list[Tensor] = []
        src: list[Tensor] = []
        for (n, m), idx in _bucket_plan(tuple(grads[i].shape for i in mats)):
            members = [mats[j] for j in idx]
            sq = _stack(grads, members, n, m).square_().add_(eps1)
            for key, stat in (("v_row", sq.mean(dim=-1)), ("v_col", sq.mean(dim=-2))):
                dst += [states[i][key] for i in members]
                src += list(stat.unbind(0))
        vecs = [i for i, g in enumerate(grads) if g.dim() < 2]
        if vecs:
            sq = torch._foreach_mul([grads[i] for i in vecs], [grads[i] for i in vecs])
            torch._foreach_add_(sq, eps1)
            dst += [states[i]["v"] for i in vecs]
            src += sq
        if dst:
            torch._foreach_copy_(dst, src)

    @staticmethod
    def _load_moment(
        states: list[dict], members: Sequence[int], n: int, m: int, dtype: torch.dtype
    ) -> Tensor:
        """First moments of a shape bucket as one [k, n, m] tensor (dequantised in one call when blocks align)."""
        first = states[members[0]]
        if not quant8.has_state(first, "exp_avg"):
            return torch.stack([states[i]["exp_avg"].view(n, m) for i in members])
        if (n * m) % quant8.BLOCKSIZE == 0:
            codes = torch.stack([states[i]["exp_avg_codes"].view(n, m) for i in members])
            absmax = torch.cat([states[i]["exp_avg_absmax"] for i in members])
            return quant8.dequantize(codes, absmax, signed=True, dtype=dtype)
        return torch.stack(
            [quant8.load(states[i], "exp_avg", signed=True, dtype=dtype).view(n, m) for i in members]
        )

    @staticmethod
    def _store_moment(
        states: list[dict], members: Sequence[int], moment: Tensor, dst: list[Tensor], src: list[Tensor]
    ) -> list[tuple[list[Tensor], list[Tensor]]]:
        """Queue the bucket's first moments for the step's final foreach copy (fp32 destinations into
        ``dst``/``src``); returns the uint8 code copies, which need a foreach call of their own dtype."""
        first = states[members[0]]
        if not quant8.has_state(first, "exp_avg"):
            dst += [states[i]["exp_avg"] for i in members]
            src += [x.view_as(states[i]["exp_avg"]) for i, x in zip(members, moment.unbind(0), strict=True)]
            return []
        k, n, m = moment.shape
        if (n * m) % quant8.BLOCKSIZE == 0:
            codes, absmax = quant8.quantize(moment, signed=True)
            code_dst = [states[i]["exp_avg_codes"] for i in members]
            code_src = [c.view_as(d) for c, d in zip(codes.unbind(0), code_dst, strict=True)]
            dst += [states[i]["exp_avg_absmax"] for i in members]
            src += list(absmax.view(k, -1).unbind(0))
            return [(code_dst, code_src)]
        for i, x in zip(members, moment.unbind(0), strict=True):
            quant8.store_(states[i], "exp_avg", x.view(states[i]["exp_avg_codes"].shape), signed=True)
        return []

    def _direction(
        self, group: dict, step: int, grads: list[Tensor], signs: list[Tensor], states: list[dict]
    ) -> tuple[list[Tensor], Tensor | None]:
        beta1, beta2, beta3 = group["betas"]
        eps1, eps2 = group["eps"]
        clip = group["clip_threshold"]
        k = step - 1  # CAME update count (step 1 only seeded v)
        correction = math.sqrt(1.0 - beta3**k)
        updates: list[Tensor] = [None] * len(grads)  # type: ignore[list-item]
        dst: list[Tensor] = []
        src: list[Tensor] = []
        extra: list[tuple[list[Tensor], list[Tensor]]] = []

        # matrices: factored moments, one [k, n, m] batch per shape
        mats = [i for i, g in enumerate(grads) if g.dim() >= 2]
        for (n, m), idx in _bucket_plan(tuple(grads[i].shape for i in mats)):
            members = [mats[j] for j in idx]
            moments = {
                key: torch.stack([states[i][key] for i in members])
                for key in ("v_row", "v_col", "r_row", "r_col")
            }
            grad = _stack(grads, members, n, m)
            sq = grad.square().add_(eps1)
            moments["v_row"].lerp_(sq.mean(dim=-1), 1.0 - beta2)
            moments["v_col"].lerp_(sq.mean(dim=-2), 1.0 - beta2)
            u = grad.mul_(_factored_rsqrt(moments["v_row"], moments["v_col"]))
            rms = torch.linalg.vector_norm(u, dim=(-2, -1), keepdim=True).div_(math.sqrt(n * m))
            u.div_(rms.div_(clip).clamp_min_(1.0))
            moment = self._load_moment(states, members, n, m, grad.dtype)
            moment.lerp_(u, 1.0 - beta1)
            extra += self._store_moment(states, members, moment, dst, src)
            instability = u.sub_(moment).square_().add_(eps2)
            moments["r_row"].lerp_(instability.mean(dim=-1), 1.0 - beta3)
            moments["r_col"].lerp_(instability.mean(dim=-2), 1.0 - beta3)
            direction = _factored_rsqrt(moments["r_row"], moments["r_col"]).mul_(moment).mul_(correction)
            for key, stacked in moments.items():
                dst += [states[i][key] for i in members]
                src += list(stacked.unbind(0))
            for i, d in zip(members, direction.unbind(0), strict=True):
                updates[i] = d.view(grads[i].shape)

        # tensors with < 2 dims: full moments, foreach over the list
        vecs = [i for i, g in enumerate(grads) if g.dim() < 2]
        if vecs:
            g = [grads[i] for i in vecs]
            v = [states[i]["v"] for i in vecs]
            r = [states[i]["r"] for i in vecs]
            sq = torch._foreach_mul(g, g)
            torch._foreach_add_(sq, eps1)
            torch._foreach_lerp_(v, sq, 1.0 - beta2)
            u = torch._foreach_rsqrt(v)
            torch._foreach_mul_(u, g)
            rms = torch.stack(torch._foreach_div(torch._foreach_norm(u), [math.sqrt(x.numel()) for x in u]))
            torch._foreach_div_(u, _per_tensor(rms.div_(clip).clamp_min_(1.0), u))
            quantised = [quant8.has_state(states[i], "exp_avg") for i in vecs]
            moment = [
                quant8.load(states[i], "exp_avg", signed=True, dtype=x.dtype) if q else states[i]["exp_avg"]
                for i, x, q in zip(vecs, g, quantised, strict=True)
            ]
            torch._foreach_lerp_(moment, u, 1.0 - beta1)
            for i, x, q in zip(vecs, moment, quantised, strict=True):
                if q:
                    quant8.store_(states[i], "exp_avg", x, signed=True)
            torch._foreach_sub_(u, moment)
            torch._foreach_mul_(u, u)
            torch._foreach_add_(u, eps2)
            torch._foreach_lerp_(r, u, 1.0 - beta3)
            direction = torch._foreach_rsqrt(r)
            torch._foreach_mul_(direction, moment)
            torch._foreach_mul_(direction, correction)
            for i, d in zip(vecs, direction, strict=True):
                updates[i] = d

        if dst:
            torch._foreach_copy_(dst, src)
        for code_dst, code_src in extra:
            torch._foreach_copy_(code_dst, code_src)
        return updates, None
