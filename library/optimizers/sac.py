"""SAC, scaling with architectural constraints (OpenToMe; "SAC: an optimizer wrapper ... hierarchical optimization
states estimation and equalization scaling"), on AdamW and on Adam-mini.

The base optimizer proposes an update u per tensor. SAC splits the model into architectural units and multiplies
each unit's update by one scale, so that units whose updates are weak and scattered are pushed towards the
typical unit and over-eager ones are held back. Every ``scale_update_freq`` steps (on a tensor's step 1,
1+F, 1+2F, ...), from the base updates of that step:

    d_u = median_{i∈u} |u_i − mean_{j∈u}(u_j)|          (median deviation to average, MDA, of unit u)
    D   = median over all units refreshed this step of d_u (units with d_u = 0 carry no signal and are left out)
    s_u = clamp(D / d_u, scale_bound)                    (s_u = clamp(1, scale_bound) when d_u = 0 or no D)

and between refreshes every step uses θ ← θ·(1 − lr·wd) − lr·s_u·u. "Median" is the lower median (the ⌈n/2⌉-th
smallest value), which torch computes without interpolation. Units:
- attention q/k/v projections (recognised by name, see :mod:`library.optimizers.adam_mini`): one unit per head,
  ``head_dim = dim // n_heads`` rows each (a tensor that does not split into heads is one unit);
- every other tensor, and every tensor of a param group without ``names``: one unit.
The scales are plain state tensors (one value per row, so they broadcast onto the update), so ``state_dict``
round-trips them. The original kept them in Python dicts and, through a log1p/median product, pinned them at the
lower bound; here half of the units sit at or above 1 by construction and they move within the bounds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers.adam_mini import (
    _QKV_NAME,
    Adam_mini,
    apply_decoupled_,
    group_names,
    head_count,
    is_head_structured,
    state_dtype,
    validate_common,
    validate_names,
    validate_positive_int,
    working_grad,
)
from library.optimizers.state import ExactStateLoad


def validate_scale_bound(cls: str, scale_bound: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in scale_bound)
    except (TypeError, ValueError):
        raise OptimizerError(
            f"{cls} scale_bound={scale_bound!r} is invalid; valid: (min, max) numbers"
        ) from None
    if not 0.0 < lo <= hi:
        raise OptimizerError(
            f"{cls} scale_bound={scale_bound!r} is invalid; valid: (min, max) with 0 < min <= max"
        )
    return lo, hi


def sac_units(name: str | None, shape: torch.Size, dim: int, n_heads: int) -> int:
    """How many SAC units (contiguous row blocks along dim 0) a tensor has: heads of q/k/v, else one."""
    if len(shape) >= 2 and is_head_structured(name, _QKV_NAME):
        return head_count(shape[0], dim, n_heads) or 1
    return 1


def unit_mda(update: Tensor, units: int) -> Tensor:
    """Median (lower) deviation to the average of each unit's update entries; shape (units,)."""
    x = update.reshape(units, -1)
    return (x - x.mean(dim=1, keepdim=True)).abs().median(dim=1).values


def sac_scales(mdas: list[Tensor], lo: float, hi: float) -> list[Tensor]:
    """s_u = clamp(D / d_u, lo, hi) with D the median of the non-zero d_u over every unit given (module docstring)."""
    all_mda = torch.cat(mdas)
    reference = torch.where(all_mda > 0, all_mda, torch.nan).nanmedian()
    scales = []
    for d in mdas:
        s = torch.where(d > 0, reference / d, 1.0)
        scales.append(torch.nan_to_num(s, nan=1.0).clamp_(lo, hi))
    return scales


def rows_scale(unit_scale: Tensor, shape: torch.Size) -> Tensor:
    """Expand per-unit scales to one per row, shaped to broadcast against a tensor of ``shape``."""
    if len(shape) == 0:
        return unit_scale.reshape(())
    per_row = unit_scale.repeat_interleave(shape[0] // unit_scale.shape[0])
    return per_row.reshape((shape[0],) + (1,) * (len(shape) - 1))


class _SACMixin:
    """Keeps ``sac_units``/``sac_scale`` in each tensor's state and applies them to the base updates."""

    def _sac_scale_updates_(
        self, group: dict[str, Any], params: list[Tensor], names: list[str | None], updates: list[Tensor]
    ) -> None:
        refresh = []
        for p, name, u in zip(params, names, updates, strict=True):
            state = self.state[p]
            if "sac_scale" not in state:
                state["sac_units"] = sac_units(name, p.shape, group["dim"], group["n_heads"])
                state["sac_scale"] = torch.ones(
                    (p.shape[0],) + (1,) * (p.dim() - 1) if p.dim() else (), dtype=u.dtype, device=p.device
                )
            if (state["step"] - 1) % group["scale_update_freq"] == 0:
                refresh.append((state, u))
        if refresh:
            lo, hi = group["scale_bound"]
            mdas = [unit_mda(u, state["sac_units"]) for state, u in refresh]
            for (state, u), s in zip(refresh, sac_scales(mdas, lo, hi), strict=True):
                state["sac_scale"].copy_(rows_scale(s, u.shape))
        torch._foreach_mul_(updates, [self.state[p]["sac_scale"] for p in params])

    def log_metrics(self) -> dict[str, Tensor | float]:
        """Row-averaged scale statistics; tensors, so logging costs no extra host sync until printed."""
        scales = [s["sac_scale"].reshape(-1) for s in self.state.values() if "sac_scale" in s]
        if not scales:
            return {}
        flat = torch.cat(scales).float()
        return {"sac_scale_mean": flat.mean(), "sac_scale_min": flat.min(), "sac_scale_max": flat.max()}


def _validate_sac(
    cls: str, scale_update_freq: int, scale_bound: Any, dim: int, n_heads: int
) -> tuple[float, float]:
    validate_positive_int(cls, "scale_update_freq", scale_update_freq)
    validate_positive_int(cls, "dim", dim)
    validate_positive_int(cls, "n_heads", n_heads)
    if n_heads > dim:
        raise OptimizerError(f"{cls} n_heads={n_heads} is invalid for dim={dim}; valid: n_heads <= dim")
    return validate_scale_bound(cls, scale_bound)


def adamw_moments_(
    grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], beta1: float, beta2: float
) -> None:
    """m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)


def adamw_denoms(exp_avg_sqs: list[Tensor], steps: list[int], beta2: float, eps: float) -> list[Tensor]:
    """√v̂ + ε per tensor (v̂ bias-corrected with each tensor's own step)."""
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1.0 - beta2**t) ** 0.5 for t in steps])
    torch._foreach_add_(denoms, eps)
    return denoms


def adamw_updates(
    exp_avgs: list[Tensor], denoms: list[Tensor], steps: list[int], beta1: float
) -> list[Tensor]:
    """m̂ / (√v̂ + ε) per tensor."""
    updates = torch._foreach_div(exp_avgs, denoms)
    torch._foreach_div_(updates, [1.0 - beta1**t for t in steps])
    return updates


class AdamWSAC(_SACMixin, ExactStateLoad, torch.optim.Optimizer):
    """AdamW with SAC unit scaling (module docstring).

    Args:
        params: tensors or param groups; groups may carry ``names`` parallel to ``params`` (finds q/k/v heads).
        lr, betas, eps, weight_decay: AdamW's (decoupled decay). betas default to (0.9, 0.99) as the seed doc says.
        scale_update_freq: steps between scale refreshes (``SAC_SCALE_UPDATE_FREQ``).
        scale_bound: (min, max) of the unit scales (``SAC_SCALE_BOUND``).
        dim, n_heads: model width and head count used to split q/k/v projections into heads.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        scale_update_freq: int = 1000,
        scale_bound: tuple[float, float] = (0.5, 10.0),
        dim: int = 4096,
        n_heads: int = 32,
    ) -> None:
        cls = type(self).__name__
        validate_common(cls, lr, betas, eps, weight_decay)
        bound = _validate_sac(cls, scale_update_freq, scale_bound, dim, n_heads)
        params = list(params)
        validate_names(cls, params)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            scale_update_freq=scale_update_freq,
            scale_bound=bound,
            dim=dim,
            n_heads=n_heads,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, names, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for p, name in zip(group["params"], group_names(group), strict=True):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(
                        p, dtype=state_dtype(p), memory_format=torch.contiguous_format
                    )
                    state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                state["step"] += 1
                params.append(p)
                names.append(name)
                grads.append(working_grad(p))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adamw_moments_(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
            updates = adamw_updates(
                exp_avgs, adamw_denoms(exp_avg_sqs, steps, beta2, group["eps"]), steps, beta1
            )
            self._sac_scale_updates_(group, params, names, updates)
            apply_decoupled_(params, updates, group["lr"], group["weight_decay"])
        return loss


class Adam_miniSAC(_SACMixin, Adam_mini):  # noqa: N801 - the name users type (seed doc 000)
    """Adam-mini with SAC unit scaling: Adam-mini's block second moments, SAC's per-head/per-tensor step scales.

    Args: as :class:`Adam_mini` (``dim``/``n_heads`` from ``SAC_DIM``/``SAC_N_HEADS``) plus ``scale_update_freq``
    and ``scale_bound`` as :class:`AdamWSAC`. betas default to (0.9, 0.99) and eps to 1e-8 as the seed doc says.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        dim: int = 4096,
        n_heads: int = 32,
        scale_update_freq: int = 1000,
        scale_bound: tuple[float, float] = (0.5, 10.0),
    ) -> None:
        bound = _validate_sac(type(self).__name__, scale_update_freq, scale_bound, dim, n_heads)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, dim=dim, n_heads=n_heads
        )
        for group in self.param_groups:
            group.setdefault("scale_update_freq", scale_update_freq)
            group.setdefault("scale_bound", bound)
        self.defaults.update(scale_update_freq=scale_update_freq, scale_bound=bound)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, names, updates = self._adam_mini_updates(group)
            if not params:
                continue
            self._sac_scale_updates_(group, params, names, updates)
            apply_decoupled_(params, updates, group["lr"], group["weight_decay"])
        return loss
