"""Float64 references of the in-house optimizers: the maths of one step, one tensor at a time, without the flat
engine, foreach ops or caches. A reader sees the definition here; the tests hold each optimizer to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

F64 = torch.float64


class CustomAdamWReference:
    """CustomAdamW's step in float64, one tensor at a time, as docs/optimizers.md and the module docstring of
    :mod:`library.optimizers.hina_adamw` define it (its steps 1-12). ``roles`` per tensor: "down", "up" or None;
    ``hp`` the constructor's settings. ``step(grads)`` moves ``self.p``."""

    def __init__(self, params: Sequence[Tensor], roles: Sequence[str | None], hp: dict[str, Any]) -> None:
        self.p = [p.detach().clone().to(F64) for p in params]
        self.roles, self.hp = roles, hp
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.s = [0.0 for _ in self.p]
        self.theta0 = [p.clone() for p in self.p]
        self.t = 0

    def step(self, grads: Sequence[Tensor]) -> None:
        hp = self.hp
        b1, b2 = hp["betas"]
        self.t += 1
        t = self.t
        rho = 1.0
        if hp["dynamic_weight_decay"] and t > hp["wd_transition_steps"]:
            transition = hp["wd_transition_steps"]
            rho = max(hp["wd_min_ratio"], hp["wd_decay_factor"] ** ((t - transition) / transition))
        for i, g_raw in enumerate(grads):
            theta, g = self.p[i], g_raw.clone().to(F64)
            role = self.roles[i] if hp["use_alora"] else None
            if hp["use_orthogonal_grad"] and float((theta * theta).sum()) > 1e-30:
                perp = g - (theta * g).sum() / (theta * theta).sum() * theta
                if float(perp.norm()) > 0:
                    g = perp * (g.norm() / perp.norm())
            if hp["use_agr"] and float(g.abs().sum()) > 0:
                g = g - g.abs() / g.abs().sum() * g
            if hp["use_adopt_stability"]:
                ready = float(self.v[i].max()) > 0
                x = (g / torch.clamp(self.v[i].sqrt(), min=hp["eps"])).clamp(-(t**0.25), t**0.25)
            else:
                x = g
            if hp["use_tam"]:
                nm, nx = float(self.m[i].norm()), float(x.norm())
                cos = float((self.m[i] * x).sum()) / (nm * nx) if nm > 0 and nx > 0 else 0.0
                self.s[i] = hp["tam_beta"] * self.s[i] + (1 - hp["tam_beta"]) * cos
                x = (1 + self.s[i]) / 2 * x
            if hp["use_adopt_stability"]:
                if ready:
                    self.m[i] = b1 * self.m[i] + (1 - b1) * x
                    self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                else:
                    self.v[i] = g * g
                u = self.m[i].clone()
            else:
                self.m[i] = b1 * self.m[i] + (1 - b1) * x
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                u = (self.m[i] / (1 - b1**t)) / ((self.v[i] / (1 - b2**t)).sqrt() + hp["eps"])
            if hp["use_grams"]:
                u = torch.sign(g) * u.abs()
            elif hp["use_cautious"]:
                mask = (u * g > 0).to(F64)
                u = u * mask / max(float(mask.mean()), 1e-3)
            if role is not None:
                rows = theta.reshape(theta.shape[0], -1)
                scale = 1 / torch.sqrt((rows * rows).sum(1) + 1 / hp["alora_eta"] ** 2)
                u = u * scale.reshape(-1, *([1] * (theta.dim() - 1)))
            lr = hp["lr"] * (hp["alora_ratio"] if role == "up" else 1.0)
            if hp["use_spd"]:
                new = theta - lr * u
                c = float((g * (theta - self.theta0[i])).sum())
                if c < 0:
                    before = float((theta - self.theta0[i]).norm())
                    after = float((new - self.theta0[i]).norm())
                    r = max(0.0, after - before) / after if after > 0 else 0.0
                    new = new - hp["spd_lambda"] * rho * r * (new - self.theta0[i])
            else:
                new = theta * (1 - lr * hp["weight_decay"] * rho) - lr * u
            self.p[i] = new
