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
    apply_decoupled_,
    state_dtype,
    validate_common,
    validate_names,
    validate_positive_int,
    working_grad,
)
from library.optimizers.sac import adamw_denoms, adamw_moments_, adamw_updates, validate_scale_bound
from library.optimizers.state import ExactStateLoad

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


def log_step(inv_step: Tensor) -> Tensor:
    """z = −log(inv_step) clamped to a finite range (inv_step is √v̂+ε or another denominator)."""
    return inv_step.log().neg_().clamp_(-_LOG_CAP, _LOG_CAP)


def log_steps_(inv_steps: list[Tensor]) -> list[Tensor]:
    """:func:`log_step` in place over a list of tensors, four foreach launches in all."""
    torch._foreach_log_(inv_steps)
    torch._foreach_neg_(inv_steps)
    torch._foreach_clamp_min_(inv_steps, -_LOG_CAP)
    torch._foreach_clamp_max_(inv_steps, _LOG_CAP)
    return inv_steps


def _weights(values: list[float], like: Tensor) -> float | Tensor:
    """EMA weights per tensor: one float when they agree (the usual case), else a (n,) tensor."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)


def _column(weight: float | Tensor) -> float | Tensor:
    return weight[:, None] if isinstance(weight, Tensor) else weight


def _lerp_by_weight_(dst: list[Tensor], src: list[Tensor], weights: list[float]) -> None:
    """dst_i ← lerp(dst_i, src_i, w_i), one foreach call per distinct weight (usually one)."""
    by_weight: dict[float, list[int]] = {}
    for i, w in enumerate(weights):
        by_weight.setdefault(w, []).append(i)
    for w, idx in by_weight.items():
        torch._foreach_lerp_([dst[i] for i in idx], [src[i] for i in idx], w)


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
        """Scale the updates in place; tensors sharing a device and dtype are handled together (flat, batched)."""
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, z in enumerate(zs):
            buckets.setdefault((z.device, z.dtype), []).append(i)
        group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
        for key, idx in buckets.items():
            self._sgg_scale_bucket_(
                group,
                (group_index, *key),
                [states[i] for i in idx],
                [updates[i] for i in idx],
                [zs[i] for i in idx],
            )

    def _sgg_scale_bucket_(
        self, group: dict[str, Any], key: tuple, states: list[dict], updates: list[Tensor], zs: list[Tensor]
    ) -> None:
        """One batched SGG scale step (module docstring) over tensors flattened into one vector.

        Tensor j's cluster c is slot j·K + c of a flat (n·K,) table, so one index_add gives every cluster sum and
        one index_select spreads the scales back; the per-tensor statistics are stacked, updated and copied back
        with a fixed number of launches whatever the tensor count. Only re-clustering (every T steps) is per tensor.
        """
        k = group["n_clusters"]
        lo, hi = group["scale_bound"]
        d_layer, d_cluster, d_scale = group["sgg_decays"]
        numels = [z.numel() for z in zs]
        z_flat = torch.cat([z.reshape(-1) for z in zs])
        firsts, resets = [], []
        for state, z in zip(states, z_flat.split(numels), strict=True):
            first = "sgg_scale" not in state
            recluster = self._recluster_due(state, group)
            if first:
                state["sgg_centers"] = torch.zeros(k, dtype=z.dtype, device=z.device)
                state["sgg_cluster_stat"] = torch.zeros(k, dtype=z.dtype, device=z.device)
                state["sgg_layer_stat"] = torch.zeros((), dtype=z.dtype, device=z.device)
                state["sgg_scale"] = torch.ones(k, dtype=z.dtype, device=z.device).clamp_(lo, hi)
            if first or recluster:
                centers, labels = kmeans_1d(z, k)
                state["sgg_centers"].copy_(centers)
                state["sgg_labels"] = labels.to(torch.uint8)
                state["sgg_counts"] = torch.zeros(k, dtype=z.dtype, device=z.device).index_add_(
                    0, labels, torch.ones_like(z)
                )
            firsts.append(first)
            resets.append(first or recluster)
        labels, numel_t = self._flat_labels(key, states, numels, k, z_flat.dtype)
        n = len(states)
        counts = torch.cat([s["sgg_counts"] for s in states]).view(n, k)
        sums = (
            torch.zeros(n * k, dtype=z_flat.dtype, device=z_flat.device)
            .index_add_(0, labels, z_flat)
            .view(n, k)
        )
        layer_mean = sums.sum(dim=1) / numel_t
        cluster_mean = torch.where(counts > 0, sums / counts.clamp_min(1.0), layer_mean[:, None])

        cluster_stats = [s["sgg_cluster_stat"] for s in states]
        layer_stats = [s["sgg_layer_stat"] for s in states]
        scales = [s["sgg_scale"] for s in states]
        cluster_stat = torch.stack(cluster_stats)
        layer_stat = torch.stack(layer_stats)
        scale = torch.stack(scales)
        cluster_stat.lerp_(
            cluster_mean, _column(_weights([1.0 if r else 1.0 - d_cluster for r in resets], z_flat))
        )
        layer_stat.lerp_(layer_mean, _weights([1.0 if f else 1.0 - d_layer for f in firsts], z_flat))
        scale.lerp_(torch.exp(layer_stat[:, None] - cluster_stat), 1.0 - d_scale).clamp_(lo, hi)
        torch._foreach_copy_(cluster_stats, cluster_stat.unbind(0))
        torch._foreach_copy_(layer_stats, layer_stat.unbind(0))
        torch._foreach_copy_(scales, scale.unbind(0))

        per_element = scale.view(-1).index_select(0, labels)
        if updates[0].dtype != per_element.dtype:
            per_element = per_element.to(updates[0].dtype)
        torch._foreach_mul_(
            updates, [s.view(u.shape) for s, u in zip(per_element.split(numels), updates, strict=True)]
        )

    def _flat_labels(
        self, key: tuple, states: list[dict], numels: list[int], k: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """(all labels as one index vector, label + K·(tensor position); element counts as ``dtype``), cached.

        Labels only change when a tensor is re-clustered or state is loaded, and both put new tensor objects in
        the state, so comparing identities is enough (the cache holds them, so their ids cannot be reused).
        """
        plans = self.__dict__.setdefault("_sgg_plans", {})
        labels = [s["sgg_labels"] for s in states]
        cached = plans.get(key)
        if (
            cached is not None
            and len(cached[0]) == len(labels)
            and all(a is b for a, b in zip(cached[0], labels, strict=True))
        ):
            return cached[1], cached[2]
        device = labels[0].device
        sizes = torch.tensor(numels, device=device)
        offsets = torch.repeat_interleave(torch.arange(len(labels), device=device) * k, sizes)
        index_dtype = torch.int32 if len(labels) * k < 2**31 else torch.int64
        flat = (torch.cat(labels).long() + offsets).to(index_dtype)
        plans[key] = (labels, flat, sizes.to(dtype))
        return flat, plans[key][2]

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
    return updates, log_steps_(denoms)


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
        """Elementwise math over the whole list (foreach); the row/column means stacked per matrix shape."""
        beta1, beta2_cap = group["betas"]
        steps = [s["step"] for s in states]
        ws = [
            1.0 - min(beta2_cap, 1.0 - t ** group["decay_rate"]) for t in steps
        ]  # weight of the new g² (1 at t=1)
        g2s = torch._foreach_mul(grads, grads)
        torch._foreach_add_(g2s, group["eps"])
        vs: list[Tensor | None] = [None] * len(grads)
        full = [i for i, s in enumerate(states) if "exp_avg_sq" in s]
        _lerp_by_weight_(
            [states[i]["exp_avg_sq"] for i in full], [g2s[i] for i in full], [ws[i] for i in full]
        )
        for i in full:
            vs[i] = states[i]["exp_avg_sq"]
        shapes: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(states):
            if "exp_avg_sq_row" in s:
                shapes.setdefault((s["exp_avg_sq_row"].numel(), s["exp_avg_sq_col"].numel()), []).append(i)
        for idx in shapes.values():
            rows = [states[i]["exp_avg_sq_row"] for i in idx]
            cols = [states[i]["exp_avg_sq_col"] for i in idx]
            g2m = torch.stack([_as_matrix(g2s[i]) for i in idx])
            row, col = torch.stack(rows), torch.stack(cols)
            w = _weights([ws[i] for i in idx], row)
            row.lerp_(g2m.mean(dim=2), _column(w))
            col.lerp_(g2m.mean(dim=1), _column(w))
            torch._foreach_copy_(rows, row.unbind(0))
            torch._foreach_copy_(cols, col.unbind(0))
            v = (row / row.mean(dim=1, keepdim=True).clamp_min(_TINY))[:, :, None] * col[:, None, :]
            for i, vi in zip(idx, v.unbind(0), strict=True):
                vs[i] = vi.view(grads[i].shape)
        rsqrt_vs = torch._foreach_clamp_min(vs, _TINY)
        torch._foreach_rsqrt_(rsqrt_vs)
        updates = list(torch._foreach_mul(grads, rsqrt_vs))
        numels = torch.tensor([u.numel() for u in updates], dtype=updates[0].dtype).to(updates[0].device)
        rms = torch.stack(torch._foreach_norm(updates)) / numels.sqrt()
        torch._foreach_div_(updates, (rms / group["clip_threshold"]).clamp_min(1.0).unbind(0))
        momentum = [i for i, s in enumerate(states) if "exp_avg" in s]
        if momentum:
            exp_avgs = [states[i]["exp_avg"] for i in momentum]
            torch._foreach_lerp_(exp_avgs, [updates[i] for i in momentum], 1.0 - beta1)
            averaged = torch._foreach_div(exp_avgs, [1.0 - beta1 ** steps[i] for i in momentum])
            for i, u in zip(momentum, averaged, strict=True):
                updates[i] = u
        return updates, log_steps_(torch._foreach_sqrt(vs))


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
        p_norms = torch.stack(
            torch._foreach_norm([p.to(u.dtype) for p, u in zip(params, updates, strict=True)])
        )
        u_norms = torch.stack(torch._foreach_norm(updates))
        trust = torch.where((p_norms > 0) & (u_norms > 0), p_norms / u_norms.clamp_min(_TINY), 1.0)
        torch._foreach_mul_(updates, trust.unbind(0))
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
            torch._foreach_mul_(adam_u, ratio)
            for i, u, z in zip(adam, adam_u, adam_z, strict=True):
                updates[i], zs[i] = u, z
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[int]] = {}
        for i, state in enumerate(states):
            if updates[i] is None:
                key = (tuple(state["exp_avg"].shape), state["left_stat"].dim(), state["right_stat"].dim())
                buckets.setdefault(key, []).append(i)
        for idx in buckets.values():
            self._shampoo_bucket(group, idx, grads, states, updates, zs, beta1, beta2)
        return updates, zs

    @staticmethod
    def _shampoo_bucket(group, idx, grads, states, updates, zs, beta1, beta2) -> None:
        """Shampoo for tensors of one matrix shape, stacked: batched matmuls; only the inverse roots per tensor."""
        sts = [states[i] for i in idx]
        exp_avgs = [s["exp_avg"] for s in sts]
        lefts, rights = [s["left_stat"] for s in sts], [s["right_stat"] for s in sts]
        gm = torch.stack([grads[i].reshape(m.shape) for i, m in zip(idx, exp_avgs, strict=True)])
        left, right, m = torch.stack(lefts), torch.stack(rights), torch.stack(exp_avgs)
        left.lerp_(gm @ gm.mT if left.dim() == 3 else gm.square().sum(dim=2), 1.0 - beta2)
        right.lerp_(gm.mT @ gm if right.dim() == 3 else gm.square().sum(dim=1), 1.0 - beta2)
        m.lerp_(gm, 1.0 - beta1)
        torch._foreach_copy_(lefts, left.unbind(0))
        torch._foreach_copy_(rights, right.unbind(0))
        torch._foreach_copy_(exp_avgs, m.unbind(0))
        for state in sts:
            t = state["step"]
            if (t - 1) % group["precondition_frequency"] == 0:
                bc2 = 1.0 - beta2**t
                state["left_root"].copy_(inverse_fourth_root(state["left_stat"] / bc2, group["eps"]))
                state["right_root"].copy_(inverse_fourth_root(state["right_stat"] / bc2, group["eps"]))
        bc1 = _weights([1.0 - beta1 ** s["step"] for s in sts], m)
        m = m / (bc1[:, None, None] if isinstance(bc1, Tensor) else bc1)
        lroot = torch.stack([s["left_root"] for s in sts])
        rroot = torch.stack([s["right_root"] for s in sts])
        u = lroot @ m if lroot.dim() == 3 else lroot[:, :, None] * m
        u = u @ rroot if rroot.dim() == 3 else u * rroot[:, None, :]
        ldiag = lroot.diagonal(dim1=1, dim2=2) if lroot.dim() == 3 else lroot
        rdiag = rroot.diagonal(dim1=1, dim2=2) if rroot.dim() == 3 else rroot
        z = (
            log_step(ldiag.clamp_min(_TINY).reciprocal())[:, :, None]
            + log_step(rdiag.clamp_min(_TINY).reciprocal())[:, None, :]
        )
        for i, ui, zi in zip(idx, u.unbind(0), z.unbind(0), strict=True):
            updates[i], zs[i] = ui.view(grads[i].shape), zi.view(grads[i].shape)
