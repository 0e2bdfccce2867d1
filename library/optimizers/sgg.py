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

The float64 definition of AdamWSGG, one tensor at a time: :class:`~library.optimizers.references.AdamWSGGReference`.

Performance: a LoRA step is bound by kernel launches (hundreds of small tensors), so each param group's tensors
of one device and dtype are laid end to end (:class:`~library.optimizers.flat.FlatBucket`): the gradients
are gathered with one op into a buffer that becomes the update, the moments live in flat buffers whose
per-parameter views are the state tensors, every elementwise op is one kernel, per-tensor statistics are segment
reductions and the per-cluster tables are flat (n·K,) buffers indexed by ``K·tensor + label`` (one int32 per
element, built for the step); Adafactor's row/column means run once per distinct matrix shape. Re-clustering is
one batched k-means over all tensors (segmented sort for the quantile starts, K−1 comparisons per Lloyd step).
The number of ops per step does not depend on the tensor count, and there is no host sync. ShampooSGG_v2 stays
per matrix shape (stacked matmuls; one batched eigh per shape and side every ``precondition_frequency`` steps,
which synchronises on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers.flat import (
    FlatBucket,
    FlatLayout,
    FlatOptimizer,
    FlatState,
    segment_ids,
    segment_sort,
)
from library.optimizers.sac import adamw_direction, init_adam_state, validate_scale_bound
from library.optimizers.state import work_dtype
from library.optimizers.validate import validate_common, validate_names, validate_positive_int

# Lloyd iterations per re-clustering: 1-D k-means from quantile starts settles in a handful.
KMEANS_ITERS = 8
# At most this many (strided) elements feed the quantile initialisation (torch.quantile has a size limit).
_QUANTILE_SAMPLE = 1 << 20
# log step sizes are clamped to ±this, so all-zero moments (1/ε, or 1/0) stay finite.
_LOG_CAP = 80.0
_TINY = 1e-30


# ----------------------------------------------------------------------------------------------- grouping/scaling
class Segmentation:
    """Which tensor each element of a flat buffer belongs to, for k-means and cluster tables of all tensors at once.

    ``base`` is K·(tensor position) per element, so ``base + label`` indexes a flat (n·K,) table of every tensor's
    clusters. ``sample`` picks the (strided) elements that feed each tensor's quantile start.
    """

    def __init__(self, sizes: Sequence[int], k: int, device: torch.device, dtype: torch.dtype) -> None:
        self.count = len(sizes)
        lengths = torch.tensor(sizes, dtype=torch.int64, device=device)
        self.segment = segment_ids(lengths, sum(sizes))
        self.base = cluster_slots(self.segment, self.count, k)
        strides = [max(1, -(-n // _QUANTILE_SAMPLE)) for n in sizes]
        self.sample: Tensor | None = None
        sample_sizes = list(sizes)
        if any(s > 1 for s in strides):
            offsets = [0]
            for n in sizes[:-1]:
                offsets.append(offsets[-1] + n)
            picks = [
                torch.arange(o, o + n, s, device=device)
                for o, n, s in zip(offsets, sizes, strides, strict=True)
            ]
            sample_sizes = [len(p) for p in picks]
            self.sample = torch.cat(picks)
        sample_lengths = torch.tensor(sample_sizes, dtype=torch.int64, device=device)
        self.sample_segment = segment_ids(sample_lengths, sum(sample_sizes))
        self.sample_start = (torch.cumsum(sample_lengths, 0) - sample_lengths)[:, None]
        self.sample_last = (sample_lengths - 1).to(dtype)[:, None]


def cluster_slots(segment: Tensor, count: int, k: int) -> Tensor:
    """K·(tensor position) per element (``segment``: each element's tensor among ``count``): where the tensor's
    clusters start in flat (count·K,) tables; int32, int64 once count·K outgrows it."""
    return segment * k if count * k < 2**31 else segment.long() * k


def _nearest(x: Tensor, centers: Tensor, segment: Tensor) -> Tensor:
    """Index of the nearest of each element's tensor's (sorted) centres; ties go to the lower centre."""
    mids = (centers[:, 1:] + centers[:, :-1]) * 0.5
    labels = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    for j in range(mids.shape[1]):  # K−1 boundaries, not a loop over tensors
        labels += x > mids[:, j].index_select(0, segment)
    return labels


def kmeans_segments(
    x: Tensor, seg: Segmentation, k: int, iters: int = KMEANS_ITERS
) -> tuple[Tensor, Tensor, Tensor]:
    """1-D k-means of every tensor of flat ``x`` together: (sorted centres (n, k), labels (numel,), counts (n, k)).

    Centres start at each tensor's (c+½)/K quantiles (linear interpolation, as torch.quantile) and take ``iters``
    Lloyd steps; an empty cluster keeps its centre. A fixed number of launches whatever the tensor count.
    """
    sample = x if seg.sample is None else x.index_select(0, seg.sample)
    ordered = segment_sort(sample, seg.sample_segment)
    ranks = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k * seg.sample_last
    below = ranks.long()
    weights = ranks - below
    above = ranks.ceil().long()
    centers = ordered[seg.sample_start + below].lerp_(ordered[seg.sample_start + above], weights)
    ones = torch.ones_like(x)
    n = seg.count
    for _ in range(iters):
        index = seg.base + _nearest(x, centers, seg.segment)
        sums = x.new_zeros(n * k).index_add_(0, index, x).view(n, k)
        counts = x.new_zeros(n * k).index_add_(0, index, ones).view(n, k)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1.0), centers).sort(dim=1).values
    labels = _nearest(x, centers, seg.segment)
    counts = x.new_zeros(n * k).index_add_(0, seg.base + labels, ones).view(n, k)
    return centers, labels, counts


def kmeans_1d(x: Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[Tensor, Tensor]:
    """1-D k-means of flat ``x``: (sorted centres (k,), labels (n,) int64). Quantile start, ``iters`` Lloyd steps."""
    centers, labels, _ = kmeans_segments(x, Segmentation([x.numel()], k, x.device, x.dtype), k, iters)
    return centers[0], labels


def log_step_(inv_step: Tensor) -> Tensor:
    """z = −log(inv_step) clamped to a finite range, in place (inv_step is √v̂+ε or another denominator)."""
    return inv_step.log_().neg_().clamp_(-_LOG_CAP, _LOG_CAP)


def _arguments(local_vars: dict[str, Any]) -> dict[str, Any]:
    """A constructor's keyword arguments from its ``locals()`` taken before it binds any other name: every setting
    of its signature, passed on to :class:`_SGGOptimizer` without naming each one again."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "params", "__class__")}


def _column(weight: float | Tensor) -> float | Tensor:
    return weight[:, None] if isinstance(weight, Tensor) else weight


# ------------------------------------------------------------------------------------------------------ base class
class _SGGOptimizer(FlatOptimizer):
    """Flattens each (device, dtype) bucket, asks the subclass for flat (updates, z), applies SGG scaling, steps."""

    def __init__(self, params: Iterable[Any], settings: dict[str, Any]) -> None:
        """``settings``: the subclass constructor's keyword arguments (:func:`_arguments`). The decays of the SGG
        statistics (layer mean, cluster means, scales) come from ``beta3`` and, where the subclass has them,
        ``ema_decay_clusters`` and ``ema_decay_scale`` / ``ema_decay_scale_factors``; they become ``sgg_decays``."""
        cls = type(self).__name__
        settings = dict(settings)
        validate_common(cls, settings["lr"], settings["betas"], settings["eps"], settings["weight_decay"])
        n_clusters = settings["n_clusters"]
        validate_positive_int(cls, "n_clusters", n_clusters)
        if n_clusters > 255:
            raise OptimizerError(f"{cls} n_clusters={n_clusters} is invalid; valid: 1..255")
        validate_positive_int(cls, "recluster_interval", settings["recluster_interval"])
        bound = validate_scale_bound(cls, settings["scale_bound"])
        for key in ("beta3", "ema_decay_clusters", "ema_decay_scale", "ema_decay_scale_factors"):
            value = settings.get(key, 0.0)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise OptimizerError(f"{cls} {key}={value!r} is invalid; valid: a number in [0, 1)")
        beta3 = settings.pop("beta3")
        d_cluster = settings.pop("ema_decay_clusters", beta3)
        d_scale = settings.pop("ema_decay_scale", settings.pop("ema_decay_scale_factors", beta3))
        params = list(params)
        validate_names(cls, params)
        defaults = dict(
            settings,
            betas=tuple(settings["betas"]),
            scale_bound=bound,
            sgg_decays=(float(beta3), float(d_cluster), float(d_scale)),
        )
        super().__init__(params, defaults)

    # subclasses -------------------------------------------------------------------------------------------------
    def _directions(
        self, group: dict[str, Any], bucket: FlatBucket, states: list[dict], ordered: list[dict]
    ) -> tuple[Tensor, Tensor]:
        """Advance the base optimizer's state; return flat updates u and log step sizes z (layout order), both
        the step's own buffers. ``states`` are in the bucket's caller order, ``ordered`` in layout order."""
        raise NotImplementedError

    def _apply(self, group: dict[str, Any], bucket: FlatBucket, update: Tensor) -> None:
        bucket.apply_(update, group["lr"], group["weight_decay"])

    def _recluster_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        return (state["step"] - 1) % group["recluster_interval"] == 0

    # SGG -------------------------------------------------------------------------------------------------------
    def _step_bucket(self, group: dict[str, Any], bucket: FlatBucket, states: list[dict[str, Any]]) -> None:
        layout = bucket.layout
        ordered = layout.arrange(states)
        # the cluster slots first, while no other per-element buffer is alive (building them peaks at 12 B/element)
        slots = cluster_slots(segment_ids(layout.lengths, layout.numel), layout.count, group["n_clusters"])
        update, z = self._directions(group, bucket, states, ordered)
        self._sgg_scale_(group, bucket, ordered, update, z, slots)
        del z, slots
        self._apply(group, bucket, update)

    def _sgg_scale_(
        self,
        group: dict[str, Any],
        bucket: FlatBucket,
        ordered: list[dict],
        update: Tensor,
        z: Tensor,
        slots: Tensor,
    ) -> None:
        """One SGG scale step (module docstring) for every tensor of the bucket at once, in place on ``update``.

        Tensor j's cluster c is slot j·K + c of flat (n·K,) tables whose rows are the per-tensor state views, so
        one index_add gives every cluster sum and one index_select spreads the scales back. ``slots`` (j·K per
        element) becomes each element's slot; ``z`` is spent (it takes the spread scales). Re-clustering runs
        :func:`kmeans_segments` over all tensors at once, and only for the tensors that are due.
        """
        k = group["n_clusters"]
        lo, hi = group["scale_bound"]
        d_layer, d_cluster, d_scale = group["sgg_decays"]
        layout, n, dtype = bucket.layout, bucket.layout.count, z.dtype
        firsts = ["sgg_scale" not in s for s in ordered]
        resets = [self._recluster_due(s, group) or first for s, first in zip(ordered, firsts, strict=True)]
        stores = bucket.cache.get(("sgg", k))
        if stores is None:
            stores = bucket.cache[("sgg", k)] = _SGGStores(layout, k)
        centers, cluster_stat, counts, scale = (
            stores.tables.filled(ordered, key, dtype, fill).view(n, k)
            for key, fill in (
                ("sgg_centers", 0.0),
                ("sgg_cluster_stat", 0.0),
                ("sgg_counts", 0.0),
                ("sgg_scale", min(max(1.0, lo), hi)),
            )
        )
        layer_stat = stores.layer.filled(ordered, "sgg_layer_stat", dtype, 0.0)
        labels = stores.labels.filled(ordered, "sgg_labels", torch.uint8, 0)
        if any(resets):
            fresh_centers, fresh_labels, fresh_counts = kmeans_segments(
                z, Segmentation(layout.sizes, k, layout.device, dtype), k
            )
            if not all(resets):
                due = torch.tensor(resets, device=layout.device)
                fresh_centers = torch.where(due[:, None], fresh_centers, centers)
                fresh_counts = torch.where(due[:, None], fresh_counts, counts)
                fresh_labels = torch.where(layout.expand(due), fresh_labels, labels)
            centers.copy_(fresh_centers)
            labels.copy_(fresh_labels)
            counts.copy_(fresh_counts)
        index = slots.add_(labels)
        sums = z.new_zeros(n * k).index_add_(0, index, z).view(n, k)
        layer_mean = sums.sum(dim=1) / layout.lengths  # the element counts, promoted to the sums' dtype
        cluster_mean = torch.where(counts > 0, sums / counts.clamp_min(1.0), layer_mean[:, None])
        cluster_stat.lerp_(
            cluster_mean, _column(bucket.per_tensor([1.0 if r else 1.0 - d_cluster for r in resets]))
        )
        layer_stat.lerp_(layer_mean, bucket.per_tensor([1.0 if f else 1.0 - d_layer for f in firsts]))
        scale.lerp_(torch.exp(layer_stat[:, None] - cluster_stat), 1.0 - d_scale).clamp_(lo, hi)
        update.mul_(torch.index_select(scale.view(-1), 0, index, out=z))

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


class _SGGStores:
    """The stores of one bucket's SGG state (layout order): K-entry cluster tables, the layer statistic and the
    uint8 labels per element."""

    def __init__(self, layout: FlatLayout, k: int) -> None:
        self.tables = FlatState.in_order([(k,)] * layout.count, layout.device)
        self.layer = FlatState.in_order([()] * layout.count, layout.device)
        self.labels = FlatState.in_order([(n,) for n in layout.sizes], layout.device)


def _adam_directions(
    group: dict[str, Any], bucket: FlatBucket, states: list[dict], ordered: list[dict]
) -> tuple[Tensor, Tensor]:
    """AdamW's m̂/(√v̂+ε) and z = −log(√v̂+ε), flat."""
    update, denom = adamw_direction(group, bucket, states, ordered)
    return update, log_step_(denom)


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
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.01, n_clusters: int = 5, recluster_interval: int = 1000,
        scale_bound: tuple[float, float] = (1.0, 10.0), beta3: float = 0.9,
    ) -> None:  # fmt: skip
        super().__init__(params, _arguments(locals()))

    def _init_state(self, p: Tensor, _name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        init_adam_state(p, state)

    def _directions(self, group, bucket, states, ordered):
        return _adam_directions(group, bucket, states, ordered)


class AdamWSGG_v2(AdamWSGG):  # noqa: N801 - the name users type (OpenToMe's)
    """AdamW + SGG with separate decays: ``beta3`` (layer mean), ``ema_decay_clusters``, ``ema_decay_scale``."""

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.01, n_clusters: int = 5, recluster_interval: int = 1000,
        scale_bound: tuple[float, float] = (1.0, 10.0), beta3: float = 0.9, ema_decay_clusters: float = 0.95,
        ema_decay_scale: float = 0.9,
    ) -> None:  # fmt: skip
        _SGGOptimizer.__init__(self, params, _arguments(locals()))


# ----------------------------------------------------------------------------------------------------- Adafactor
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
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-30, weight_decay: float = 0.0, clip_threshold: float = 1.0, decay_rate: float = -0.8,
        n_clusters: int = 5, recluster_interval: int = 1000, scale_bound: tuple[float, float] = (1.0, 10.0),
        beta3: float = 0.9, ema_decay_clusters: float = 0.95, ema_decay_scale_factors: float = 0.9,
    ) -> None:  # fmt: skip
        if not (isinstance(clip_threshold, (int, float)) and clip_threshold > 0):
            raise OptimizerError(
                f"AdafactorSGG clip_threshold={clip_threshold!r} is invalid; valid: a number > 0"
            )
        if not (isinstance(decay_rate, (int, float)) and decay_rate < 0):
            raise OptimizerError(f"AdafactorSGG decay_rate={decay_rate!r} is invalid; valid: a number < 0")
        super().__init__(params, _arguments(locals()))

    def _init_state(self, p: Tensor, _name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        dtype = work_dtype(p)
        if p.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(p.shape[0], dtype=dtype, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(p[0].numel(), dtype=dtype, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)

    @staticmethod
    def _factored(bucket: FlatBucket) -> dict[str, Any]:
        """Per-layout index maps: which tensors keep a full v and, per matrix shape, the factored tensors' rows."""
        cached = bucket.cache.get("adafactor")
        if cached is not None:
            return cached
        layout, device = bucket.layout, bucket.layout.device
        shapes = layout.arrange(layout.shapes)
        factored = [len(s) >= 2 for s in shapes]
        full = [j for j, f in enumerate(factored) if not f]
        fact = [j for j, f in enumerate(factored) if f]
        buckets, row_at, col_at = [], 0, 0
        for b in layout.buckets:
            members = [j for j in range(b.first, b.last) if factored[j]]
            if not members:
                continue
            local = None
            if len(members) < b.count:
                local = torch.tensor([j - b.first for j in members], dtype=torch.int64, device=device)
            where = torch.tensor(members, dtype=torch.int64, device=device)
            buckets.append((b, len(members), row_at, col_at, local, where))
            row_at += len(members) * b.rows
            col_at += len(members) * b.cols
        full_index = [i for j in full for i in range(layout.offsets[j], layout.offsets[j] + layout.sizes[j])]
        cached = bucket.cache["adafactor"] = {
            "full": full,
            "fact": fact,
            "buckets": buckets,
            "full_state": FlatState.in_order([shapes[j] for j in full], device),
            "rows": FlatState.in_order([(shapes[j][0],) for j in fact], device),
            "cols": FlatState.in_order([(layout.sizes[j] // shapes[j][0],) for j in fact], device),
            "full_index": torch.tensor(full_index, dtype=torch.int64, device=device),
            "full_at": torch.tensor(full, dtype=torch.int64, device=device),
            "full_lengths": torch.tensor([layout.sizes[j] for j in full], dtype=torch.int64, device=device),
            "sqrt_numel": torch.tensor(layout.sizes, dtype=bucket.dtype, device=device).sqrt(),
        }
        return cached

    def _directions(self, group, bucket, states, ordered):
        """Elementwise math on the flat buffer; the row/column means per matrix shape on [k, rows, cols] views."""
        beta1, beta2_cap = group["betas"]
        layout, f, dtype = bucket.layout, self._factored(bucket), bucket.dtype
        steps = [s["step"] for s in ordered]
        # weight of the new g² (1 at t=1)
        w = bucket.per_tensor([1.0 - min(beta2_cap, 1.0 - t ** group["decay_rate"]) for t in steps])
        grad = bucket.gather_grads()
        g2 = grad * grad
        g2.add_(group["eps"])
        v = torch.empty_like(g2)
        if f["full"]:
            full_v = f["full_state"].buffer([ordered[j] for j in f["full"]], "exp_avg_sq", dtype)
            full_w = w
            if isinstance(w, Tensor):
                full_w = torch.repeat_interleave(
                    w.index_select(0, f["full_at"]), f["full_lengths"], output_size=full_v.numel()
                )
            full_v.lerp_(g2.index_select(0, f["full_index"]), full_w)
            v.index_copy_(0, f["full_index"], full_v)
        if f["fact"]:
            fact_states = [ordered[j] for j in f["fact"]]
            rows = f["rows"].buffer(fact_states, "exp_avg_sq_row", dtype)
            cols = f["cols"].buffer(fact_states, "exp_avg_sq_col", dtype)
        for shape, count, row_at, col_at, local, where in f["buckets"]:
            g2m = layout.bucket_view(g2, shape)
            if local is not None:
                g2m = g2m.index_select(0, local)
            row = rows[row_at : row_at + count * shape.rows].view(count, shape.rows)
            col = cols[col_at : col_at + count * shape.cols].view(count, shape.cols)
            wb = _column(w.index_select(0, where)) if isinstance(w, Tensor) else w
            row.lerp_(g2m.mean(dim=2), wb)
            col.lerp_(g2m.mean(dim=1), wb)
            factor = (row / row.mean(dim=1, keepdim=True).clamp_min(_TINY))[:, :, None]
            vb = layout.bucket_view(v, shape)
            if local is None:
                torch.mul(factor, col[:, None, :], out=vb)
            else:
                vb.index_copy_(0, local, factor * col[:, None, :])
        del g2
        update = grad.mul_(v.clamp_min(_TINY).rsqrt_())
        rms = layout.norm(update) / f["sqrt_numel"]
        update.div_(layout.expand((rms / group["clip_threshold"]).clamp_min(1.0)))
        if any("exp_avg" in s for s in states):
            exp_avg = bucket.state.filled(states, "exp_avg", dtype, 0.0)
            exp_avg.lerp_(update, 1.0 - beta1)
            torch.div(exp_avg, bucket.per_element([1.0 - beta1**t for t in steps]), out=update)
        return update, log_step_(v.sqrt_())


# ---------------------------------------------------------------------------------------------------------- LAMB
def lamb_recluster_interval(step: int, base: int, t_total: int) -> int:
    """Re-clustering interval at ``step``: t_total/10 growing linearly to t_total/5 at t_total, never below base."""
    return max(base, round(t_total / 10 * (1.0 + min(1.0, step / t_total))))


class LambSGG_v2(_SGGOptimizer):  # noqa: N801 - the name users type (OpenToMe's)
    """LAMB (You et al. 2020) + SGG: r = s⊙m̂/(√v̂+ε) + wd·θ, θ ← θ − lr·(‖θ‖/‖r‖)·r (trust ratio 1 if a norm is 0).

    Args: as AdamWSGG_v2 plus ``t_total`` (``SGG_T_TOTAL``): expected training length; the tensor is re-clustered
    on step 1 and then every :func:`lamb_recluster_interval` steps (sparser late in training).
    """

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6, weight_decay: float = 0.01, n_clusters: int = 5, recluster_interval: int = 1000,
        scale_bound: tuple[float, float] = (1.0, 10.0), beta3: float = 0.9, ema_decay_clusters: float = 0.95,
        ema_decay_scale: float = 0.9, t_total: int = 11000,
    ) -> None:  # fmt: skip
        validate_positive_int("LambSGG_v2", "t_total", t_total)
        super().__init__(params, _arguments(locals()))

    def _init_state(self, p: Tensor, _name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        init_adam_state(p, state)
        state["next_recluster"] = 1

    def _recluster_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        step = state["step"]
        if step != state["next_recluster"]:
            return False
        state["next_recluster"] = step + lamb_recluster_interval(
            step, group["recluster_interval"], group["t_total"]
        )
        return True

    def _directions(self, group, bucket, states, ordered):
        return _adam_directions(group, bucket, states, ordered)

    def _apply(self, group, bucket, update):
        weights = bucket.layout.gather(bucket.params, bucket.dtype)
        if group["weight_decay"] != 0.0:
            update.add_(weights, alpha=group["weight_decay"])
        p_norms, u_norms = bucket.layout.norm(weights), bucket.layout.norm(update)
        del weights
        trust = torch.where((p_norms > 0) & (u_norms > 0), p_norms / u_norms.clamp_min(_TINY), 1.0)
        update.mul_(bucket.layout.expand(trust))
        bucket.apply_(update, group["lr"], 0.0)


# ------------------------------------------------------------------------------------------------------- Shampoo
def inverse_fourth_root(stat: Tensor, eps: float, diagonal: bool | None = None) -> Tensor:
    """(S + ε·λ_max·I)^-¼ of PSD matrices [..., n, n] or diagonals [..., n]; zero where S carries no information.

    ``diagonal`` defaults to "1-D input". A stack of matrices takes one batched eigh.
    """
    if diagonal is None:
        diagonal = stat.dim() == 1
    if diagonal:
        top = stat.amax(dim=-1, keepdim=True)
        root = (stat + eps * top).clamp_min(_TINY).pow(-0.25)
        return torch.where(top > 0, root, torch.zeros_like(root))
    evals, evecs = torch.linalg.eigh(stat.double())
    evals = evals.clamp_min(0.0)
    top = evals.amax(dim=-1, keepdim=True)
    root = torch.where(top > 0, (evals + eps * top).clamp_min(_TINY).pow(-0.25), torch.zeros_like(evals))
    return ((evecs * root.unsqueeze(-2)) @ evecs.mT).to(stat.dtype)


def _per_matrix(values: list[float], like: Tensor) -> float | Tensor:
    """One number per stacked matrix: a float when all agree, else a tensor broadcasting over ``like``'s stack."""
    if all(v == values[0] for v in values):
        return values[0]
    column = torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)
    return column.view(-1, *([1] * (like.dim() - 1)))


class ShampooSGG_v2(_SGGOptimizer):  # noqa: N801 - the name users type (OpenToMe's)
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
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6, weight_decay: float = 0.0, n_clusters: int = 5, recluster_interval: int = 1000,
        scale_bound: tuple[float, float] = (1.0, 10.0), beta3: float = 0.9, ema_decay_clusters: float = 0.95,
        ema_decay_scale: float = 0.9, optimize_1d: bool = True, lr_1d: float = 3e-4,
        precondition_frequency: int = 10, max_precond_dim: int = 1024,
    ) -> None:  # fmt: skip
        if not isinstance(optimize_1d, bool):
            raise OptimizerError(
                f"ShampooSGG_v2 optimize_1d={optimize_1d!r} is invalid; valid: True or False"
            )
        if not (isinstance(lr_1d, (int, float)) and lr_1d >= 0):
            raise OptimizerError(f"ShampooSGG_v2 lr_1d={lr_1d!r} is invalid; valid: a number >= 0")
        validate_positive_int("ShampooSGG_v2", "precondition_frequency", precondition_frequency)
        validate_positive_int("ShampooSGG_v2", "max_precond_dim", max_precond_dim)
        super().__init__(params, _arguments(locals()))
        for group in self.param_groups:
            group.setdefault("lr_at_construction", group["lr"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("lr_at_construction", self.param_groups[-1]["lr"])

    @staticmethod
    def _uses_adam(shape: torch.Size, group: dict[str, Any]) -> bool:
        return group["optimize_1d"] and len(shape) < 2

    def _init_state(self, p: Tensor, _name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        dtype = work_dtype(p)
        if self._uses_adam(p.shape, group):
            init_adam_state(p, state)
            return
        rows, cols = (p.shape[0], p[0].numel()) if p.dim() >= 2 else (1, p.numel())
        state["exp_avg"] = torch.zeros(rows, cols, dtype=dtype, device=p.device)
        for side, n in (("left", rows), ("right", cols)):
            shape = (n, n) if n <= group["max_precond_dim"] else (n,)
            state[f"{side}_stat"] = torch.zeros(shape, dtype=dtype, device=p.device)
            state[f"{side}_root"] = torch.zeros(shape, dtype=dtype, device=p.device)

    def _directions(self, group, bucket, states, ordered):
        """Per matrix shape, stacked; the optimize_1d tensors as flat AdamW; both gathered into one flat buffer."""
        grads = bucket.layout.views(bucket.gather_grads())
        shapes = bucket.layout.shapes
        n = len(shapes)
        adam = [i for i in range(n) if self._uses_adam(shapes[i], group)]
        updates: list[Tensor | None] = [None] * n
        zs: list[Tensor | None] = [None] * n
        if adam:
            sub = bucket.cache.get(("adam_1d", tuple(adam)))
            if sub is None:
                sub = bucket.cache[("adam_1d", tuple(adam))] = FlatBucket([bucket.params[i] for i in adam], bucket.dtype)
            sub_states = [states[i] for i in adam]
            u, z = _adam_directions(group, sub, sub_states, sub.layout.arrange(sub_states))
            base = group["lr_at_construction"]
            u.mul_(group["lr_1d"] / base if base > 0 else 0.0)  # lr_1d·lr/lr₀ after the common lr multiplication
            for i, ui, zi in zip(adam, sub.layout.views(u), sub.layout.views(z), strict=True):
                updates[i], zs[i] = ui, zi
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[int]] = {}
        for i, state in enumerate(states):
            if updates[i] is None:
                key = (tuple(state["exp_avg"].shape), state["left_stat"].dim(), state["right_stat"].dim())
                buckets.setdefault(key, []).append(i)
        for idx in buckets.values():
            self._shampoo_bucket(group, idx, grads, states, updates, zs, beta1, beta2)
        del grads
        # one flat copy at a time, each list dropped once copied: the peak holds one per-shape set besides
        update = bucket.layout.flatten(updates)
        del updates
        return update, bucket.layout.flatten(zs)

    @staticmethod
    def _shampoo_bucket(group, idx, grads, states, updates, zs, beta1, beta2) -> None:
        """Shampoo for tensors of one matrix shape, stacked: batched matmuls, and one batched eigh per side."""
        sts = [states[i] for i in idx]
        exp_avgs = [s["exp_avg"] for s in sts]
        lefts, rights = [s["left_stat"] for s in sts], [s["right_stat"] for s in sts]
        gm = torch.stack([grads[i].reshape(m.shape) for i, m in zip(idx, exp_avgs, strict=True)])
        # the statistics are advanced where they live (foreach): no stacked copy of them unless roots are due
        left_new = gm @ gm.mT if lefts[0].dim() == 2 else gm.square().sum(dim=2)
        torch._foreach_lerp_(lefts, list(left_new.unbind(0)), 1.0 - beta2)
        del left_new
        right_new = gm.mT @ gm if rights[0].dim() == 2 else gm.square().sum(dim=1)
        torch._foreach_lerp_(rights, list(right_new.unbind(0)), 1.0 - beta2)
        del right_new
        torch._foreach_lerp_(exp_avgs, list(gm.unbind(0)), 1.0 - beta1)
        del gm
        due = [j for j, s in enumerate(sts) if (s["step"] - 1) % group["precondition_frequency"] == 0]
        for side, stats in (("left", lefts), ("right", rights)) if due else ():
            stat = torch.stack([stats[j] for j in due])
            bc2 = _per_matrix([1.0 - beta2 ** sts[j]["step"] for j in due], stat)
            roots = inverse_fourth_root(stat.div_(bc2), group["eps"], diagonal=stat.dim() == 2)
            torch._foreach_copy_([sts[j][f"{side}_root"] for j in due], list(roots.unbind(0)))
            del stat, roots
        m = torch.stack(exp_avgs)
        m.div_(_per_matrix([1.0 - beta1 ** s["step"] for s in sts], m))
        lroot = torch.stack([s["left_root"] for s in sts])
        rroot = torch.stack([s["right_root"] for s in sts])
        u = lroot @ m if lroot.dim() == 3 else lroot[:, :, None] * m
        u = u @ rroot if rroot.dim() == 3 else u * rroot[:, None, :]
        ldiag = lroot.diagonal(dim1=1, dim2=2) if lroot.dim() == 3 else lroot
        rdiag = rroot.diagonal(dim1=1, dim2=2) if rroot.dim() == 3 else rroot
        z = (
            log_step_(ldiag.clamp_min(_TINY).reciprocal())[:, :, None]
            + log_step_(rdiag.clamp_min(_TINY).reciprocal())[:, None, :]
        )
        for i, ui, zi in zip(idx, u.unbind(0), z.unbind(0), strict=True):
            updates[i], zs[i] = ui.view(grads[i].shape), zi.view(grads[i].shape)
