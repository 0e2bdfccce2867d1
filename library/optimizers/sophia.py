"""Sophia-G (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer", arXiv 2305.14342).

Per coordinate, with momentum m and an EMA h of a diagonal Hessian estimate:

    m ← β₁·m + (1−β₁)·g                          every step
    θ ← θ·(1 − lr·λ)                              decoupled weight decay
    θ ← θ − lr·clip(m / max(ρ·h, ε), −1, 1)       the clip bounds the step where curvature is tiny or negative
    h ← β₂·h + (1−β₂)·B·ĝ⊙ĝ                      every k steps (Gauss-Newton-Bartlett estimator)

ĝ is the gradient of the loss on labels *sampled from the model's own prediction* over a batch of B: its
square times B is an unbiased estimate of the Gauss-Newton diagonal. Computing ĝ needs an extra forward and
backward, so the training loop does it: every ``hessian_update_interval`` steps it runs that backward and
calls ``update_hessian()``, which reads ``p.grad`` as ĝ. Until the first call h = 0 and the step is
``lr·sign(m)`` wherever |m| ≥ ε (clipped sign momentum), as in the paper's algorithm.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from library.optimizers.state import closure_loss


class SophiaG(torch.optim.Optimizer):
    """Sophia with the Gauss-Newton-Bartlett Hessian estimator.

    Args:
        lr: peak step; a step never moves a coordinate by more than ``lr`` (plus decay).
        betas: (β₁ momentum, β₂ Hessian EMA); the paper uses (0.965, 0.99).
        rho: γ in the paper; scales h before the division, so larger ρ means more coordinates are unclipped.
        weight_decay: decoupled, multiplied by lr.
        eps: floor of the denominator ρ·h (the paper's ε).
        hessian_update_interval: k, steps between Hessian updates; read by the training loop.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        eps: float = 1e-15,
        hessian_update_interval: int = 10,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"SophiaG: invalid lr {lr}, must be >= 0")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"SophiaG: invalid betas {betas}, need two values in [0, 1)")
        if not rho > 0.0:
            raise ValueError(f"SophiaG: invalid rho {rho}, must be > 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"SophiaG: invalid weight_decay {weight_decay}, must be >= 0")
        if not eps > 0.0:
            raise ValueError(f"SophiaG: invalid eps {eps}, must be > 0")
        if isinstance(hessian_update_interval, bool) or not (
            isinstance(hessian_update_interval, int) and hessian_update_interval >= 1
        ):
            raise ValueError(
                f"SophiaG: invalid hessian_update_interval {hessian_update_interval}, need an int >= 1"
            )
        self.hessian_update_interval = hessian_update_interval
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults)

    def _state_lists(self, group: dict) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        params, grads, exp_avgs, hessians = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SophiaG does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            hessians.append(state["hessian"])
        return params, grads, exp_avgs, hessians

    @torch.no_grad()
    def update_hessian(self, batch_size: int = 1) -> None:
        """h ← β₂·h + (1−β₂)·B·ĝ², with ĝ = ``p.grad`` from the sampled-label backward over a batch of B."""
        for group in self.param_groups:
            _, grads, _, hessians = self._state_lists(group)
            if hessians:
                _update_hessian(hessians, grads, beta2=group["betas"][1], batch_size=batch_size)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:
        loss = closure_loss(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, hessians = self._state_lists(group)
            if not params:
                continue
            _sophia_step(
                params,
                grads,
                exp_avgs,
                hessians,
                lr=group["lr"],
                beta1=group["betas"][0],
                rho=group["rho"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
            )
        return loss


def _update_hessian(hessians: list[Tensor], grads: list[Tensor], *, beta2: float, batch_size: int) -> None:
    torch._foreach_mul_(hessians, beta2)
    torch._foreach_addcmul_(hessians, grads, grads, value=(1.0 - beta2) * batch_size)


def _sophia_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    *,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
) -> None:
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    denom = torch._foreach_mul(hessians, rho)
    torch._foreach_clamp_min_(denom, eps)
    ratio = torch._foreach_div(exp_avgs, denom)
    torch._foreach_clamp_min_(ratio, -1.0)
    torch._foreach_clamp_max_(ratio, 1.0)
    torch._foreach_add_(params, ratio, alpha=-lr)
