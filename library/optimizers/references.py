"""Float64 references of the in-house optimizers: the maths of one step, one tensor at a time, without the flat
engine, foreach ops or caches. A reader sees the definition here; the tests hold each optimizer to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
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
                x, ready = adopt_input_reference(self.v[i], g, hp["eps"], t)
            else:
                x = g
            if hp["use_tam"]:
                nm, nx = float(self.m[i].norm()), float(x.norm())
                cos = float((self.m[i] * x).sum()) / (nm * nx) if nm > 0 and nx > 0 else 0.0
                self.s[i] = hp["tam_beta"] * self.s[i] + (1 - hp["tam_beta"]) * cos
                x = (1 + self.s[i]) / 2 * x
            if hp["use_adopt_stability"]:
                self.m[i], self.v[i] = adopt_moments_reference(self.m[i], self.v[i], x, g, ready, b1, b2)
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
                u = u * ref_allora(theta, hp["alora_eta"])
            lr = hp["lr"] * (hp["alora_ratio"] if role == "up" else 1.0)
            if hp["use_spd"]:
                new = spd_reference(theta, theta - lr * u, self.theta0[i], g, hp["spd_lambda"] * rho)
            else:
                new = theta * (1 - lr * hp["weight_decay"] * rho) - lr * u
            self.p[i] = new


def adopt_input_reference(v: Tensor, g: Tensor, eps: float, t: int) -> tuple[Tensor, bool]:
    """ADOPT (Taniguchi et al. 2024, Algorithm 1) for one tensor at step t: the momentum's input
    x = clip(g / max(√v_prev, ε), ±t^¼) from the second moment *before* this step's g enters it, and whether
    v has seen a gradient (False: this step is the initialising one)."""
    x = (g / torch.clamp(v.sqrt(), min=eps)).clamp(-(t**0.25), t**0.25)
    return x, float(v.max()) > 0


def adopt_moments_reference(
    m: Tensor, v: Tensor, x: Tensor, g: Tensor, ready: bool, b1: float, b2: float
) -> tuple[Tensor, Tensor]:
    """ADOPT's moments: m ← β₁m + (1−β₁)x, v ← β₂v + (1−β₂)g²; the initialising step only sets v₀ = g²."""
    if not ready:
        return m, g * g
    return b1 * m + (1 - b1) * x, b2 * v + (1 - b2) * g * g


def spd_reference(theta: Tensor, new: Tensor, theta0: Tensor, g: Tensor, strength: float) -> Tensor:
    """Selective Projection Decay (Tian et al. 2024) for one tensor: the stepped weights ``new`` pulled towards
    θ₀ by strength·r·(new − θ₀) when the step moves the tensor away from θ₀ (⟨g, θ−θ₀⟩ < 0), with
    r = max(0, ‖new−θ₀‖ − ‖θ−θ₀‖)/‖new−θ₀‖; otherwise ``new`` unchanged."""
    if float((g * (theta - theta0)).sum()) >= 0:
        return new
    before = float((theta - theta0).norm())
    after = float((new - theta0).norm())
    r = max(0.0, after - before) / after if after > 0 else 0.0
    return new - strength * r * (new - theta0)


def sophia_reference(
    theta: Tensor, grads: Sequence[Tensor], gnb_grads: dict[int, Tensor], *, lr: float, beta1: float, beta2: float,
    rho: float, wd: float, eps: float, k: int, batch: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """SophiaG (Liu et al. 2023, arXiv 2305.14342, Algorithm 3) on one tensor: (θ, m, h) after ``grads``.

    h is refreshed with B·ĝ² (``gnb_grads[t]``, the Gauss-Newton-Bartlett gradient) after steps t ≡ 0 (mod k);
    the step is the clipped preconditioned momentum, after decoupled decay."""
    theta = theta.clone()
    m = torch.zeros_like(theta)
    h = torch.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        theta = theta - lr * wd * theta
        step = m / torch.maximum(rho * h, torch.full_like(h, eps))
        theta = theta - lr * torch.clamp(step, -1.0, 1.0)
        if t % k == 0:
            h = beta2 * h + (1 - beta2) * batch * gnb_grads[t] ** 2
    return theta, m, h


def kmeans_reference(x: np.ndarray, k: int, iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm by brute force: quantile start, argmin assignment, empty clusters keep their centre."""
    centers = np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        labels = np.argmin(np.abs(x[:, None] - centers[None, :]), axis=1)
        new = centers.copy()
        for c in range(k):
            if np.any(labels == c):
                new[c] = x[labels == c].mean()
        centers = np.sort(new)
    return centers, np.argmin(np.abs(x[:, None] - centers[None, :]), axis=1)


class AdamWSGGReference:
    """AdamW + SGG (Li et al. 2025, arXiv 2506.01049) for one tensor, from the definition in
    :mod:`library.optimizers.sgg`, in float64 numpy. ``step(g)`` moves ``self.theta``."""

    def __init__(
        self, theta: np.ndarray, lr: float, betas: tuple[float, float], eps: float, wd: float, k: int, interval: int,
        bound: tuple[float, float], d_layer: float, d_cluster: float, d_scale: float,
    ) -> None:
        self.theta = theta.copy()
        self.m = np.zeros_like(theta)
        self.v = np.zeros_like(theta)
        self.t = 0
        self.__dict__.update(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=wd, k=k, interval=interval)
        self.lo, self.hi = bound
        self.d = (d_layer, d_cluster, d_scale)
        self.scale = np.clip(np.ones(k), self.lo, self.hi)

    def step(self, g: np.ndarray) -> None:
        self.t += 1
        t = self.t
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        mhat = self.m / (1 - self.b1**t)
        denom = np.sqrt(self.v / (1 - self.b2**t)) + self.eps
        z = np.clip(-np.log(denom), -80, 80).ravel()
        recluster = (t - 1) % self.interval == 0
        if recluster:
            _, self.labels = kmeans_reference(z, self.k)
        layer = z.mean()
        cluster = np.array(
            [z[self.labels == c].mean() if np.any(self.labels == c) else layer for c in range(self.k)]
        )
        d_layer, d_cluster, d_scale = self.d
        self.layer_stat = layer if t == 1 else d_layer * self.layer_stat + (1 - d_layer) * layer
        self.cluster_stat = (
            cluster if recluster else d_cluster * self.cluster_stat + (1 - d_cluster) * cluster
        )
        raw = np.exp(self.layer_stat - self.cluster_stat)
        self.scale = np.clip(d_scale * self.scale + (1 - d_scale) * raw, self.lo, self.hi)
        u = (mhat / denom).ravel() * self.scale[self.labels]
        self.theta = self.theta * (1 - self.lr * self.wd) - self.lr * u.reshape(self.theta.shape)


# Automagic (Sinkgd, CameAMP): the composition of the module docstring of library.optimizers.automagic


def ref_sinkgd(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Row i scaled to norm √m, then column j to norm √n, K times, element by element."""
    x = x.clone()
    n, m = x.shape
    for _ in range(iters):
        for i in range(n):
            norm = math.sqrt(sum(float(v) ** 2 for v in x[i]))
            if norm > 0:
                x[i] = x[i] * (math.sqrt(m) / norm)
        for j in range(m):
            norm = math.sqrt(sum(float(v) ** 2 for v in x[:, j]))
            if norm > 0:
                x[:, j] = x[:, j] * (math.sqrt(n) / norm)
    return x


def ref_orthograd(theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    w, v = theta.reshape(-1), g.reshape(-1)
    if float(w @ w) <= 1e-30:
        return g.clone()
    perp = v - (w @ v) / (w @ w) * w
    if float(perp.norm()) == 0:
        return perp.reshape(g.shape)
    return (perp * (v.norm() / perp.norm())).reshape(g.shape)


def ref_allora(theta: torch.Tensor, eta: float) -> torch.Tensor:
    rows = theta.reshape(theta.shape[0], -1)
    scale = torch.tensor([1.0 / math.sqrt(float((r * r).sum()) + 1.0 / eta**2) for r in rows], dtype=F64)
    return scale.reshape((-1,) + (1,) * (theta.dim() - 1))


def ref_factored(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mat = x.reshape(x.shape[0], -1)
    return mat.mean(dim=1), mat.mean(dim=0)


def ref_factored_estimate(row: torch.Tensor, col: torch.Tensor, shape) -> torch.Tensor:
    return (row[:, None] / row.mean() * col[None, :]).reshape(shape)


class RefSinkgdDirection:
    """Momentum → Grams → SinkGD (matrices) / unit RMS (vectors); returns (u, VRAdam factor)."""

    def __init__(self, beta1: float, iters: int):
        self.beta1, self.iters, self.m = beta1, iters, {}

    def seed(self, i, g):
        self.m[i] = g.clone()

    def __call__(self, i, g, t):
        self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * g
        u = torch.sign(g) * self.m[i].abs()
        if g.dim() >= 2:
            u = ref_sinkgd(u.reshape(u.shape[0], -1), self.iters).reshape(g.shape)
        else:
            u = u / math.sqrt(float((u * u).sum()) / u.numel())
        vr = 1.0 / (1.0 + min(3.0 * float((self.m[i] ** 2).sum()), 10.0))
        return u, vr


class RefCameDirection:
    """CAME with v seeded at step 1 and the confidence EMA R bias-corrected by 1/(1 − β₃^k)."""

    def __init__(self, betas, eps, clip):
        self.b1, self.b2, self.b3 = betas
        self.e1, self.e2 = eps
        self.clip, self.v, self.m, self.r = clip, {}, {}, {}

    def _ema(self, store, i, x, beta):
        if x.dim() >= 2:
            row, col = ref_factored(x)
            old_row, old_col = store.get(i, (torch.zeros_like(row), torch.zeros_like(col)))
            store[i] = (beta * old_row + (1 - beta) * row, beta * old_col + (1 - beta) * col)
            return ref_factored_estimate(*store[i], x.shape)
        store[i] = beta * store.get(i, torch.zeros_like(x)) + (1 - beta) * x
        return store[i]

    def seed(self, i, g):
        sq = g * g + self.e1
        self.v[i] = ref_factored(sq) if g.dim() >= 2 else sq

    def __call__(self, i, g, t):
        k = t - 1
        u = g / torch.sqrt(self._ema(self.v, i, g * g + self.e1, self.b2))
        rms = math.sqrt(float((u * u).sum()) / u.numel())
        u = u / max(1.0, rms / self.clip)
        self.m[i] = self.b1 * self.m.get(i, torch.zeros_like(g)) + (1 - self.b1) * u
        r_hat = self._ema(self.r, i, (u - self.m[i]) ** 2 + self.e2, self.b3) / (1 - self.b3**k)
        return self.m[i] / torch.sqrt(r_hat), 1.0


def reference_run(thetas, grad_seq, lrs, allora, hp, direction):
    """Automagic composition, per tensor in float64: returns the parameter trajectory and the final avg_lr."""
    thetas = [t.clone() for t in thetas]
    n = len(thetas)
    mask = [torch.full_like(t, min(max(hp["lr"], hp["min_lr"]), hp["max_lr"])) for t in thetas]
    prev_sign, start = [None] * n, [None] * n
    avg_lr = [hp["lr"]] * n
    decay = [1.0] * n
    warm = hp["warmup_steps"]
    traj = []
    for t, grads in enumerate(grad_seq, start=1):
        if t == 1:
            for i in range(n):
                direction.seed(i, grads[i])
                prev_sign[i] = torch.sign(grads[i])
                start[i] = thetas[i].clone()
            traj.append([x.clone() for x in thetas])
            continue
        early, post = t <= warm / 2, t > warm
        if hp["use_orthogonal_grad"] and post:
            grads = [ref_orthograd(thetas[i], grads[i]) for i in range(n)]
        if (t - 2) % hp["stats_update_freq"] == 0 and early:
            flat = torch.cat([g.abs().reshape(-1) for g in grads])
            mu, sigma = float(flat.mean()), float(flat.std(unbiased=False))
            decay = [2.0 / (1.0 + math.exp(-4.0 * (float(g.abs().mean()) - mu) / sigma)) for g in grads]
        new = []
        for i in range(n):
            g, theta = grads[i], thetas[i]
            u, vr = direction(i, g, t)
            grow = shrink = hp["lr_bump"]
            if early and hp["d_coef"] != 1:
                c = float((g * (start[i] - theta)).sum())
                grow = hp["lr_bump"] * (hp["d_coef"] if c > 0 else 1.0)
                shrink = hp["lr_bump"] * (hp["d_coef"] if c < 0 else 1.0)
            s = torch.sign(g)
            for idx in range(mask[i].numel()):
                agree = float(s.reshape(-1)[idx] * prev_sign[i].reshape(-1)[idx])
                value = float(mask[i].reshape(-1)[idx]) + (
                    grow if agree > 0 else -shrink if agree < 0 else 0.0
                )
                mask[i].reshape(-1)[idx] = min(max(value, hp["min_lr"]), hp["max_lr"])
            prev_sign[i] = s
            if (t - 2) % hp["stats_update_freq"] == 0:
                avg_lr[i] = float(mask[i].mean())
            eta = mask[i] * (lrs[t] / hp["lr"]) * vr
            if allora[i]:
                eta = eta * ref_allora(theta, hp["alora_eta"])
            step = u + (hp["weight_decay"] * decay[i] * theta if early else 0.0)
            new.append(theta - eta * step)
        thetas = new
        traj.append([x.clone() for x in thetas])
    numel = [t.numel() for t in thetas]
    return traj, sum(a * k for a, k in zip(avg_lr, numel, strict=True)) / sum(numel)
