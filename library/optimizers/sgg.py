"""SGG, scaling with gradient grouping (Li et al. 2025, "Taming LLMs by Scaling Learning Rates with Gradient
Grouping", arXiv 2506.01049), on AdamW, Adafactor, LAMB and Shampoo.

The base optimizer gives every element i of a tensor an adaptive step size a_i (AdamW/LAMB 1/(√v̂_i+ε),
Adafactor 1/√v̂_i with the factored v̂, Shampoo the Kronecker diagonal (L^-¼)_rr·(R^-¼)_cc). SGG groups the
elements of each tensor by a_i and rescales each group's step, so that groups whose adaptive learning rate fell
behind the layer's are pulled back towards it. With z_i = log a_i (step sizes span orders of magnitude, and the
log makes the statistics geometric means, robust to the 1/ε of coordinates that never saw a gradient):

- grouping, on a tensor's step 1, 1+T, 1+2T, ... (T = ``recluster_interval``): 1-D k-means of z into K =
  ``n_clusters`` clusters, centres initialised at the (k+½)/K quantiles, a fixed number of Lloyd iterations,
  clusters kept sorted by centre; the labels (uint8) are then fixed until the next grouping. All on the device,
  no host sync; the cost (a few passes over the tensor) is paid once per T steps.
- scaling, every step, from the cluster means μ_c = mean_{i∈c} z_i and the layer mean μ = mean_i z_i:
      μ̄_c ← d_c·μ̄_c + (1−d_c)·μ_c      (reset to μ_c when the clusters are rebuilt)
      μ̄   ← d_l·μ̄   + (1−d_l)·μ        (set to μ on the first step)
      s_c ← clamp(d_s·s_c + (1−d_s)·exp(μ̄ − μ̄_c), ``scale_bound``)     (s_c starts at 1, clamped)
  and the base update of element i is multiplied by s_{label(i)}. Empty clusters get μ_c = μ (ratio 1).
- decays: AdamWSGG uses ``beta3`` for all three; the v2 variants keep ``beta3`` for the layer mean and take
  d_c = ``ema_decay_clusters``, d_s = ``ema_decay_scale`` (AdafactorSGG: ``ema_decay_scale_factors``).

Fixes against the OpenToMe originals: no scikit-learn round-trip through the host at every re-clustering; env
names are read (elsewhere) with their ``SGG_`` prefix and never ``eval``-ed; AdafactorSGG keeps a real factored
second moment (row and column EMAs of g², Shazeer & Stern 2018), so its update is not sign(g)·lr;
ShampooSGG_v2 is Shampoo (Gupta et al. 2018: L ← β₂L + (1−β₂)GGᵀ, R likewise, update L^-¼ M R^-¼), where the
original ran a Newton-Schulz orthogonalisation; LambSGG_v2's ``t_total`` stretches the re-clustering interval
over training instead of mutating the group's ``recluster_interval``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers.adam_mini import (
    ExactStateLoad,
    apply_decoupled_,
    state_dtype,
    validate_common,
    validate_names,
    validate_positive_int,
    working_grad,
)
from library.optimizers.sac import adamw_denoms, adamw_moments_, adamw_updates, validate_scale_bound

# Lloyd iterations per re-clustering: 1-D k-means from quantile starts settles in a handful.
KMEANS_ITERS = 8
# At most this many (strided) elements feed the quantile initialisation (torch.quantile has a size limit).
_QUANTILE_SAMPLE = 1 << 20
# log step sizes are clamped to ±this, so all-zero moments (1/ε, or 1/0) stay finite.
_LOG_CAP = 80.0
_TINY = 1e-30


# ----------------------------------------------------------------------------------------------- grouping/scaling
def nearest_center(x: Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest (sorted) centre for each value of ``x``; ties go to the lower centre."""
    return torch.bucketize(x, (centers[1:] + centers[:-1]) * 0.5)


def kmeans_1d(x: Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[Tensor, Tensor]:
    """1-D k-means of flat ``x``: (sorted centres (k,), labels (n,) int64). Quantile start, ``iters`` Lloyd steps."""
    stride = max(1, -(-x.numel() // _QUANTILE_SAMPLE))
    q = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k
    centers = torch.quantile(x[::stride], q)
    ones = torch.ones_like(x)
    for _ in range(iters):
        labels = nearest_center(x, centers)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.zeros_like(centers).index_add_(0, labels, ones)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1.0), centers).sort().values
    return centers, nearest_center(x, centers)


def cluster_means(z: Tensor, labels: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(μ_c per cluster, μ of the layer); an empty cluster gets μ."""
    layer = z.mean()
    sums = torch.zeros_like(counts).index_add_(0, labels, z)
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), layer), layer


def update_scales_(
    cluster_stat: Tensor,
    layer_stat: Tensor,
    scale: Tensor,
    cluster_mean: Tensor,
    layer_mean: Tensor,
    w_cluster: float,
    w_layer: float,
    w_scale: float,
    lo: float,
    hi: float,
) -> None:
    """One SGG scale step (module docstring); w_* = 1 − decay, or 1 to reset a statistic."""
    cluster_stat.lerp_(cluster_mean, w_cluster)
    layer_stat.lerp_(layer_mean, w_layer)
    scale.lerp_(torch.exp(layer_stat - cluster_stat), w_scale).clamp_(lo, hi)


def log_step(inv_step: Tensor) -> Tensor:
    """z = −log(inv_step) clamped to a finite range (inv_step is √v̂+ε or another denominator)."""
    return inv_step.log().neg_().clamp_(-_LOG_CAP, _LOG_CAP)


# ------------------------------------------------------------------------------------------------------ base class
class _SGGOptimizer(ExactStateLoad, torch.optim.Optimizer):
    """Gathers per-tensor state, asks the subclass for (updates, z), applies SGG scaling, then the step."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        n_clusters: int,
        recluster_interval: int,
        scale_bound: Any,
        decays: tuple[float, float, float],
        decay_names: tuple[str, str, str],
    ) -> None:
        cls = type(self).__name__
        validate_common(cls, defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        validate_positive_int(cls, "n_clusters", n_clusters)
        if n_clusters > 255:
            raise OptimizerError(f"{cls} n_clusters={n_clusters} is invalid; valid: 1..255")
        validate_positive_int(cls, "recluster_interval", recluster_interval)
        bound = validate_scale_bound(cls, scale_bound)
        for key, value in zip(decay_names, decays, strict=True):
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise OptimizerError(f"{cls} {key}={value!r} is invalid; valid: a number in [0, 1)")
        params = list(params)
        validate_names(cls, params)
        defaults = dict(
            defaults,
            betas=tuple(defaults["betas"]),
            n_clusters=n_clusters,
            recluster_interval=recluster_interval,
            scale_bound=bound,
            sgg_decays=tuple(float(d) for d in decays),
        )
        super().__init__(params, defaults)

    # subclasses -------------------------------------------------------------------------------------------------
    def _init_base_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _directions(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Advance the base optimizer's state; return (updates u, log step sizes z), both shaped like the params."""
        raise NotImplementedError

    def _apply(
        self, group: dict[str, Any], params: list[Tensor], updates: list[Tensor], states: list[dict]
    ) -> None:
        apply_decoupled_(params, updates, group["lr"], group["weight_decay"])

    def _recluster_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return (state["step"] - 1) % group["recluster_interval"] == 0

    # SGG -------------------------------------------------------------------------------------------------------
    def _sgg_scale_(
        self, group: dict[str, Any], states: list[dict], updates: list[Tensor], zs: list[Tensor]
    ) -> None:
        k = group["n_clusters"]
        lo, hi = group["scale_bound"]
        d_layer, d_cluster, d_scale = group["sgg_decays"]
        for state, u, z in zip(states, updates, zs, strict=True):
            z = z.reshape(-1)
            first = "sgg_scale" not in state
            recluster = self._recluster_due(state, group)
            if first:
                state["sgg_centers"] = torch.zeros(k, dtype=z.dtype, device=z.device)
                state["sgg_counts"] = torch.zeros(k, dtype=z.dtype, device=z.device)
                state["sgg_cluster_stat"] = torch.zeros(k, dtype=z.dtype, device=z.device)
                state["sgg_layer_stat"] = torch.zeros((), dtype=z.dtype, device=z.device)
                state["sgg_scale"] = torch.ones(k, dtype=z.dtype, device=z.device).clamp_(lo, hi)
            if first or recluster:
                centers, labels = kmeans_1d(z, k)
                state["sgg_centers"].copy_(centers)
                state["sgg_labels"] = labels.to(torch.uint8)
                state["sgg_counts"].zero_().index_add_(0, labels, torch.ones_like(z))
            labels = state["sgg_labels"].int()
            cluster_mean, layer_mean = cluster_means(z, labels, state["sgg_counts"])
            update_scales_(
                state["sgg_cluster_stat"],
                state["sgg_layer_stat"],
                state["sgg_scale"],
                cluster_mean,
                layer_mean,
                1.0 if first or recluster else 1.0 - d_cluster,
                1.0 if first else 1.0 - d_layer,
                1.0 - d_scale,
                lo,
                hi,
            )
            u.reshape(-1).mul_(state["sgg_scale"].to(u.dtype).index_select(0, labels))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    self._init_base_state(p, state, group)
                state["step"] += 1
                params.append(p)
                grads.append(working_grad(p))
                states.append(state)
            if not params:
                continue
            updates, zs = self._directions(group, params, grads, states)
            self._sgg_scale_(group, states, updates, zs)
            self._apply(group, params, updates, states)
        return loss

    def log_metrics(self) -> dict[str, Tensor | float]:
        """Element-weighted mean scale (the average lr multiplier) and the smallest/largest cluster scale."""
        scales = [(s["sgg_scale"], s["sgg_counts"]) for s in self.state.values() if "sgg_scale" in s]
        if not scales:
            return {}
        scale = torch.cat([s for s, _ in scales]).float()
        counts = torch.cat([c for _, c in scales]).float()
        return {
            "sgg_scale_mean": (scale * counts).sum() / counts.sum().clamp_min(1.0),
            "sgg_scale_min": scale.min(),
            "sgg_scale_max": scale.max(),
        }


def _adam_state(p: Tensor, state: dict[str, Any]) -> None:
    state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.contiguous_format)
    state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])


def _adam_directions(
    group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]]
) -> tuple[list[Tensor], list[Tensor]]:
    """AdamW's m̂/(√v̂+ε) and z = −log(√v̂+ε) per tensor."""
    beta1, beta2 = group["betas"]
    steps = [s["step"] for s in states]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    adamw_moments_(grads, exp_avgs, exp_avg_sqs, beta1, beta2)
    denoms = adamw_denoms(exp_avg_sqs, steps, beta2, group["eps"])
    updates = adamw_updates(exp_avgs, denoms, steps, beta1)
    return updates, [log_step(d) for d in denoms]


# --------------------------------------------------------------------------------------------------------- AdamW
class AdamWSGG(_SGGOptimizer):
    """AdamW + SGG with one decay ``beta3`` for every SGG statistic (module docstring).

    Args:
        params: tensors or param groups (``names`` are accepted and not needed: SGG works per tensor).
        lr, betas, eps, weight_decay: AdamW's (decoupled decay).
        n_clusters: K groups per tensor (``SGG_N_CLUSTERS``).
        recluster_interval: steps between re-clusterings (``SGG_RECLUSTER_INTERVAL``).
        scale_bound: (min, max) of the group scales (``SGG_SCALE_BOUND``).
        beta3: EMA decay of the SGG statistics (``SGG_BETA3``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        n_clusters: int = 5,
        recluster_interval: int = 1000,
        scale_bound: tuple[float, float] = (1.0, 10.0),
        beta3: float = 0.9,
    ) -> None:
        super().__init__(
            params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
            n_clusters=n_clusters,
            recluster_interval=recluster_interval,
            scale_bound=scale_bound,
            decays=(beta3, beta3, beta3),
            decay_names=("beta3", "beta3", "beta3"),
        )

    def _init_base_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        _adam_state(p, state)

    def _directions(self, group, params, grads, states):
        return _adam_directions(group, grads, states)


class AdamWSGG_v2(AdamWSGG):  # noqa: N801 - the name users type (seed doc 000)
    """AdamW + SGG with separate decays: ``beta3`` (layer mean), ``ema_decay_clusters``, ``ema_decay_scale``."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        n_clusters: int = 5,
        recluster_interval: int = 1000,
        scale_bound: tuple[float, float] = (1.0, 10.0),
        beta3: float = 0.9,
        ema_decay_clusters: float = 0.95,
        ema_decay_scale: float = 0.9,
    ) -> None:
        _SGGOptimizer.__init__(
            self,
            params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
            n_clusters=n_clusters,
            recluster_interval=recluster_interval,
            scale_bound=scale_bound,
            decays=(beta3, ema_decay_clusters, ema_decay_scale),
            decay_names=("beta3", "ema_decay_clusters", "ema_decay_scale"),
        )


# ----------------------------------------------------------------------------------------------------- Adafactor
def _as_matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


class AdafactorSGG(_SGGOptimizer):
    """Adafactor (Shazeer & Stern 2018) + SGG.

    Tensors with two or more dimensions keep row and column EMAs of g²+ε₁ (viewed as shape[0] × rest) and use
    v̂ = R·Cᵀ / mean(R); smaller ones keep the full v. β̂₂(t) = min(β₂, 1 − t^decay_rate). The step is
    u = g/√v̂, clipped to RMS ``clip_threshold``, then (β₁ > 0) averaged with momentum m ← β₁m + (1−β₁)u
    (bias-corrected), θ ← θ(1 − lr·wd) − lr·s·u. z = −½·log v̂.

    Args:
        lr, weight_decay: as AdamW (decoupled decay, no relative step / parameter scaling).
        betas: (β₁ momentum, 0 disables; β₂ cap of the second-moment decay).
        eps: ε₁ added to g².
        clip_threshold, decay_rate: Adafactor's d and the exponent of β̂₂(t).
        n_clusters, recluster_interval, scale_bound, beta3, ema_decay_clusters: as AdamWSGG_v2.
        ema_decay_scale_factors: decay of the group scales (``SGG_EMA_DECAY_SCALE_FACTORS``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-30,
        weight_decay: float = 0.0,
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        n_clusters: int = 5,
        recluster_interval: int = 1000,
        scale_bound: tuple[float, float] = (1.0, 10.0),
        beta3: float = 0.9,
        ema_decay_clusters: float = 0.95,
        ema_decay_scale_factors: float = 0.9,
    ) -> None:
        if not (isinstance(clip_threshold, (int, float)) and clip_threshold > 0):
            raise OptimizerError(
                f"AdafactorSGG clip_threshold={clip_threshold!r} is invalid; valid: a number > 0"
            )
        if not (isinstance(decay_rate, (int, float)) and decay_rate < 0):
            raise OptimizerError(f"AdafactorSGG decay_rate={decay_rate!r} is invalid; valid: a number < 0")
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                clip_threshold=clip_threshold,
                decay_rate=decay_rate,
            ),
            n_clusters=n_clusters,
            recluster_interval=recluster_interval,
            scale_bound=scale_bound,
            decays=(beta3, ema_decay_clusters, ema_decay_scale_factors),
            decay_names=("beta3", "ema_decay_clusters", "ema_decay_scale_factors"),
        )

    def _init_base_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        dtype = state_dtype(p)
        if p.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(p.shape[0], dtype=dtype, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(p[0].numel(), dtype=dtype, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)

    def _directions(self, group, params, grads, states):
        beta1, beta2_cap = group["betas"]
        updates, zs = [], []
        for g, state in zip(grads, states, strict=True):
            t = state["step"]
            w = 1.0 - min(beta2_cap, 1.0 - t ** group["decay_rate"])  # weight of the new g² (1 at t = 1)
            g2 = g.square().add_(group["eps"])
            if "exp_avg_sq_row" in state:
                row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                g2m = _as_matrix(g2)
                row.lerp_(g2m.mean(dim=1), w)
                col.lerp_(g2m.mean(dim=0), w)
                v = torch.outer(row / row.mean().clamp_min(_TINY), col).reshape(g.shape)
            else:
                v = state["exp_avg_sq"].lerp_(g2, w)
            rsqrt_v = v.clamp_min(_TINY).rsqrt()
            u = g * rsqrt_v
            rms = u.square().mean().sqrt()
            u.div_((rms / group["clip_threshold"]).clamp_min(1.0))
            if "exp_avg" in state:
                state["exp_avg"].lerp_(u, 1.0 - beta1)
                u = state["exp_avg"] / (1.0 - beta1**t)
            updates.append(u)
            zs.append(log_step(v.sqrt()))
        return updates, zs


# ---------------------------------------------------------------------------------------------------------- LAMB
def lamb_recluster_interval(step: int, base: int, t_total: int) -> int:
    """Re-clustering interval at ``step``: t_total/10 growing linearly to t_total/5 at t_total, never below base."""
    return max(base, round(t_total / 10 * (1.0 + min(1.0, step / t_total))))


class LambSGG_v2(_SGGOptimizer):  # noqa: N801 - the name users type (seed doc 000)
    """LAMB (You et al. 2020) + SGG: r = s⊙m̂/(√v̂+ε) + wd·θ, θ ← θ − lr·(‖θ‖/‖r‖)·r (trust ratio 1 if a norm is 0).

    Args: as AdamWSGG_v2 plus ``t_total`` (``SGG_T_TOTAL``): expected training length; the tensor is re-clustered
    on step 1 and then every :func:`lamb_recluster_interval` steps (sparser late in training).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        n_clusters: int = 5,
        recluster_interval: int = 1000,
        scale_bound: tuple[float, float] = (1.0, 10.0),
        beta3: float = 0.9,
        ema_decay_clusters: float = 0.95,
        ema_decay_scale: float = 0.9,
        t_total: int = 11000,
    ) -> None:
        validate_positive_int("LambSGG_v2", "t_total", t_total)
        super().__init__(
            params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, t_total=t_total),
            n_clusters=n_clusters,
            recluster_interval=recluster_interval,
            scale_bound=scale_bound,
            decays=(beta3, ema_decay_clusters, ema_decay_scale),
            decay_names=("beta3", "ema_decay_clusters", "ema_decay_scale"),
        )

    def _init_base_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        _adam_state(p, state)
        state["next_recluster"] = 1

    def _recluster_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        step = state["step"]
        if step != state["next_recluster"]:
            return False
        state["next_recluster"] = step + lamb_recluster_interval(
            step, group["recluster_interval"], group["t_total"]
        )
        return True

    def _directions(self, group, params, grads, states):
        return _adam_directions(group, grads, states)

    def _apply(self, group, params, updates, states):
        if group["weight_decay"] != 0.0:
            torch._foreach_add_(
                updates,
                [p.to(u.dtype) for p, u in zip(params, updates, strict=True)],
                alpha=group["weight_decay"],
            )
        p_norms = torch._foreach_norm([p.to(u.dtype) for p, u in zip(params, updates, strict=True)])
        u_norms = torch._foreach_norm(updates)
        trust = [
            torch.where((pn > 0) & (un > 0), pn / un.clamp_min(_TINY), 1.0)
            for pn, un in zip(p_norms, u_norms, strict=True)
        ]
        torch._foreach_mul_(updates, trust)
        apply_decoupled_(params, updates, group["lr"], 0.0)


# ------------------------------------------------------------------------------------------------------- Shampoo
def inverse_fourth_root(stat: Tensor, eps: float) -> Tensor:
    """(S + ε·λ_max·I)^-¼ of a PSD matrix (2-D) or diagonal (1-D); zero where S carries no information."""
    if stat.dim() == 1:
        top = stat.max()
        root = (stat + eps * top).clamp_min(_TINY).pow(-0.25)
        return torch.where(top > 0, root, torch.zeros_like(root))
    evals, evecs = torch.linalg.eigh(stat.double())
    evals = evals.clamp_min(0.0)
    top = evals.max()
    root = torch.where(top > 0, (evals + eps * top).clamp_min(_TINY).pow(-0.25), torch.zeros_like(evals))
    return ((evecs * root) @ evecs.T).to(stat.dtype)


class ShampooSGG_v2(_SGGOptimizer):  # noqa: N801 - the name users type (seed doc 000)
    """Shampoo (Gupta et al. 2018) + SGG.

    A tensor is viewed as G = shape[0] × rest (vectors as 1 × n). L ← β₂L + (1−β₂)GGᵀ, R ← β₂R + (1−β₂)GᵀG
    (a side longer than ``max_precond_dim`` keeps only its diagonal), M ← β₁M + (1−β₁)G, and
    u = L̂^-¼ M̂ R̂^-¼ with bias-corrected statistics; the inverse roots are recomputed on step 1 and every
    ``precondition_frequency`` steps (eigh, which synchronises on CUDA, so it is amortised) with ε relative to the largest eigenvalue, so the step does
    not depend on the gradient's scale. z_rc = log (L̂^-¼)_rr + log (R̂^-¼)_cc.

    With ``optimize_1d`` (``SGG_OPTIMIZE_1D``) tensors of fewer than two dimensions use AdamW (+SGG) at
    ``lr_1d`` (``SGG_LR_1D``), which follows the group's lr schedule (lr_1d·lr/lr_at_construction); otherwise they
    get Shampoo as 1 × n matrices at the group's lr.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        n_clusters: int = 5,
        recluster_interval: int = 1000,
        scale_bound: tuple[float, float] = (1.0, 10.0),
        beta3: float = 0.9,
        ema_decay_clusters: float = 0.95,
        ema_decay_scale: float = 0.9,
        optimize_1d: bool = True,
        lr_1d: float = 3e-4,
        precondition_frequency: int = 10,
        max_precond_dim: int = 1024,
    ) -> None:
        if not isinstance(optimize_1d, bool):
            raise OptimizerError(
                f"ShampooSGG_v2 optimize_1d={optimize_1d!r} is invalid; valid: True or False"
            )
        if not (isinstance(lr_1d, (int, float)) and lr_1d >= 0):
            raise OptimizerError(f"ShampooSGG_v2 lr_1d={lr_1d!r} is invalid; valid: a number >= 0")
        validate_positive_int("ShampooSGG_v2", "precondition_frequency", precondition_frequency)
        validate_positive_int("ShampooSGG_v2", "max_precond_dim", max_precond_dim)
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                optimize_1d=optimize_1d,
                lr_1d=lr_1d,
                precondition_frequency=precondition_frequency,
                max_precond_dim=max_precond_dim,
            ),
            n_clusters=n_clusters,
            recluster_interval=recluster_interval,
            scale_bound=scale_bound,
            decays=(beta3, ema_decay_clusters, ema_decay_scale),
            decay_names=("beta3", "ema_decay_clusters", "ema_decay_scale"),
        )
        for group in self.param_groups:
            group.setdefault("lr_at_construction", group["lr"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("lr_at_construction", self.param_groups[-1]["lr"])

    @staticmethod
    def _uses_adam(p: Tensor, group: dict[str, Any]) -> bool:
        return group["optimize_1d"] and p.dim() < 2

    def _init_base_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        dtype = state_dtype(p)
        if self._uses_adam(p, group):
            _adam_state(p, state)
            return
        rows, cols = (p.shape[0], p[0].numel()) if p.dim() >= 2 else (1, p.numel())
        state["exp_avg"] = torch.zeros(rows, cols, dtype=dtype, device=p.device)
        for side, n in (("left", rows), ("right", cols)):
            shape = (n, n) if n <= group["max_precond_dim"] else (n,)
            state[f"{side}_stat"] = torch.zeros(shape, dtype=dtype, device=p.device)
            state[f"{side}_root"] = torch.zeros(shape, dtype=dtype, device=p.device)

    def _directions(self, group, params, grads, states):
        adam = [i for i, p in enumerate(params) if self._uses_adam(p, group)]
        updates: list[Tensor | None] = [None] * len(params)
        zs: list[Tensor | None] = [None] * len(params)
        if adam:
            adam_u, adam_z = _adam_directions(group, [grads[i] for i in adam], [states[i] for i in adam])
            base = group["lr_at_construction"]
            ratio = (
                group["lr_1d"] / base if base > 0 else 0.0
            )  # lr_1d·lr/lr₀ after the common lr multiplication
            for i, u, z in zip(adam, adam_u, adam_z, strict=True):
                updates[i], zs[i] = u.mul_(ratio), z
        beta1, beta2 = group["betas"]
        for i, (p, g, state) in enumerate(zip(params, grads, states, strict=True)):
            if updates[i] is not None:
                continue
            t = state["step"]
            gm = g.reshape(state["exp_avg"].shape)
            left, right = state["left_stat"], state["right_stat"]
            left.lerp_(gm @ gm.T if left.dim() == 2 else gm.square().sum(dim=1), 1.0 - beta2)
            right.lerp_(gm.T @ gm if right.dim() == 2 else gm.square().sum(dim=0), 1.0 - beta2)
            if (t - 1) % group["precondition_frequency"] == 0:
                bc2 = 1.0 - beta2**t
                state["left_root"].copy_(inverse_fourth_root(left / bc2, group["eps"]))
                state["right_root"].copy_(inverse_fourth_root(right / bc2, group["eps"]))
            m = state["exp_avg"].lerp_(gm, 1.0 - beta1) / (1.0 - beta1**t)
            lroot, rroot = state["left_root"], state["right_root"]
            u = lroot @ m if lroot.dim() == 2 else lroot[:, None] * m
            u = u @ rroot if rroot.dim() == 2 else u * rroot[None, :]
            ldiag = lroot.diagonal() if lroot.dim() == 2 else lroot
            rdiag = rroot.diagonal() if rroot.dim() == 2 else rroot
            z = log_step(ldiag.clamp_min(_TINY).reciprocal()[:, None]) + log_step(
                rdiag.clamp_min(_TINY).reciprocal()
            )
            updates[i], zs[i] = u.reshape(p.shape), z.reshape(p.shape)
        return updates, zs
