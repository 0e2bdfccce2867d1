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
- attention q/k/v projections (recognised by name, :data:`~library.optimizers.names.QUERY_KEY_VALUE`): one unit
  per head, ``head_dim = dim // n_heads`` rows each (a tensor that does not split into heads is one unit);
- every other tensor, and every tensor of a param group without ``names``: one unit.
The scales are plain state tensors (one value per row, so they broadcast onto the update), so ``state_dict``
round-trips them. The original kept them in Python dicts and, through a log1p/median product, pinned them at the
lower bound; here half of the units sit at or above 1 by construction and they move within the bounds.

The float64 definition, one tensor at a time: :class:`~library.optimizers.references.SACReference`.

Performance: the base update is computed flat over all tensors of a (device, dtype) bucket
(:class:`~library.optimizers.flat.FlatBucket`); the per-row scales form one flat buffer that multiplies the update
one row stack at a time (:func:`~library.optimizers.transforms.scale_rows_`, no per-element index), and a refresh
computes every unit's MDA with one segment mean and one segmented sort (:func:`unit_mdas`). Ops per step do not
depend on the tensor count; no host sync. The step's only per-element temporaries are the gathered gradient
(which becomes the update) and AdamW's denominator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers import transforms as T
from library.optimizers.adam_mini import adam_mini_direction, init_adam_mini_state
from library.optimizers.flat import FlatBucket, FlatOptimizer, FlatState, segment_ids, segment_sort
from library.optimizers.names import QUERY_KEY_VALUE, head_count, is_head_structured
from library.optimizers.state import work_dtype
from library.optimizers.validate import validate_common, validate_heads, validate_names, validate_positive_int


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
    if len(shape) >= 2 and is_head_structured(name, QUERY_KEY_VALUE):
        return head_count(shape[0], dim, n_heads) or 1
    return 1


def unit_mdas(flat: Tensor, unit_lengths: Tensor) -> Tensor:
    """Median (lower) deviation to the average of each unit of a flat buffer (units end to end, ``unit_lengths``).

    One segment mean, one segmented sort and one gather for every unit of every tensor together.
    """
    n = flat.numel()
    ids = segment_ids(unit_lengths, n)
    mean = torch.segment_reduce(flat, "mean", lengths=unit_lengths)
    deviation = (flat - torch.repeat_interleave(mean, unit_lengths, output_size=n)).abs_()
    starts = torch.cumsum(unit_lengths, 0) - unit_lengths
    return segment_sort(deviation, ids).index_select(0, starts + (unit_lengths - 1) // 2)


def unit_mda(update: Tensor, units: int) -> Tensor:
    """:func:`unit_mdas` of one tensor split into ``units`` equal row blocks; shape (units,)."""
    lengths = torch.full((units,), update.numel() // units, dtype=torch.int64, device=update.device)
    return unit_mdas(update.reshape(-1), lengths)


def sac_scales_flat(mda: Tensor, lo: float, hi: float, include: Tensor | None = None) -> Tensor:
    """s_u = clamp(D / d_u, lo, hi), D the median of the non-zero d_u among ``include`` (all units if None)."""
    valid = mda > 0 if include is None else (mda > 0) & include
    reference = torch.where(valid, mda, torch.nan).nanmedian()
    scales = torch.where(mda > 0, reference / mda, 1.0)
    return torch.nan_to_num(scales, nan=1.0).clamp_(lo, hi)


def sac_scales(mdas: list[Tensor], lo: float, hi: float) -> list[Tensor]:
    """:func:`sac_scales_flat` over every unit of a list of per-tensor MDA vectors (module docstring)."""
    flat = sac_scales_flat(torch.cat(mdas), lo, hi)
    return list(flat.split([d.numel() for d in mdas]))


def _scale_shape(shape: torch.Size) -> tuple[int, ...]:
    """One scale per row, shaped to broadcast against the tensor."""
    return (shape[0],) + (1,) * (len(shape) - 1) if len(shape) else ()


class Units:
    """SAC's units of a bucket's tensors, end to end in layout order (``counts``: units per tensor).

    Holds the store of the per-row scales (``state["sac_scale"]``) and, per unit, its element count (its MDA
    segment) and row count (spreading unit scales over rows).
    """

    def __init__(self, bucket: FlatBucket, counts: Sequence[int]) -> None:
        self.counts = list(counts)
        layout = bucket.layout
        shapes = layout.arrange(layout.shapes)
        self.scales = FlatState.in_order([_scale_shape(s) for s in shapes], layout.device)
        rows = self.scales.layout.sizes
        self.total = sum(counts)
        self.total_rows = sum(rows)

        def lengths(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=layout.device)

        self.lengths = lengths([n // u for n, u in zip(layout.sizes, counts, strict=True) for _ in range(u)])
        self.rows = lengths([r // u for r, u in zip(rows, counts, strict=True) for _ in range(u)])
        self.per_tensor = lengths(self.counts)


class _SACScaling:
    """Keeps ``sac_units``/``sac_scale`` in each tensor's state and applies them to flat base updates."""

    def _init_units(self, p: Tensor, name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["sac_units"] = sac_units(name, p.shape, group["dim"], group["n_heads"])

    def _sac_scale_(
        self, group: dict[str, Any], bucket: FlatBucket, states: list[dict[str, Any]], update: Tensor
    ) -> None:
        """Multiply the flat update (layout order) by each row's unit scale, refreshing the scales when due.

        The per-row scales of all tensors form one flat buffer that multiplies the update one row stack at a time
        (no per-element index); a refresh computes every unit's MDA and scale at once (:func:`unit_mdas`).
        """
        layout = bucket.layout
        ordered = layout.arrange(states)
        counts = [s["sac_units"] for s in ordered]
        units = bucket.cache.get("sac")
        if units is None or units.counts != counts:
            units = bucket.cache["sac"] = Units(bucket, counts)
        scale = units.scales.filled(ordered, "sac_scale", bucket.dtype, 1.0)
        due = [(s["step"] - 1) % group["scale_update_freq"] == 0 for s in ordered]
        if any(due):
            lo, hi = group["scale_bound"]
            include = None
            if not all(due):
                flags = torch.tensor(due, device=layout.device)
                include = torch.repeat_interleave(flags, units.per_tensor, output_size=units.total)
            fresh = torch.repeat_interleave(
                sac_scales_flat(unit_mdas(update, units.lengths), lo, hi, include),
                units.rows,
                output_size=units.total_rows,
            )
            if include is not None:
                fresh = torch.where(
                    torch.repeat_interleave(include, units.rows, output_size=units.total_rows), fresh, scale
                )
            scale.copy_(fresh)
        T.scale_rows_(T.row_stacks(layout, update), scale)

    def log_metrics(self) -> dict[str, Tensor | float]:
        """Row-averaged scale statistics; tensors, so logging costs no extra host sync until printed."""
        scales = [s["sac_scale"].reshape(-1) for s in self.state.values() if "sac_scale" in s]
        if not scales:
            return {}
        flat = torch.cat(scales).float()
        return {"sac_scale_mean": flat.mean(), "sac_scale_min": flat.min(), "sac_scale_max": flat.max()}


def adamw_update_(
    g: Tensor,
    m: Tensor,
    v: Tensor,
    bc1: float | Tensor,
    bc2_sqrt: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Advance flat m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g²; overwrite g with m̂/(√v̂+ε); return (g, √v̂+ε).

    ``g`` is the step's own gathered gradient, spent once m and v have taken it. bc1 = 1−β₁ᵗ and
    bc2_sqrt = √(1−β₂ᵗ) are Python floats, or per-element buffers when tensors' steps differ.
    """
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = v.sqrt().div_(bc2_sqrt).add_(eps)
    torch.div(m, denom, out=g)
    return g.div_(bc1), denom


def adamw_direction(
    group: dict[str, Any], bucket: FlatBucket, states: list[dict], ordered: list[dict]
) -> tuple[Tensor, Tensor]:
    """:func:`adamw_update_` on a bucket: its gathered gradients, exp_avg / exp_avg_sq buffers and per-tensor
    bias corrections (``ordered``: the states in layout order). Returns (m̂/(√v̂+ε), √v̂+ε), flat."""
    beta1, beta2 = group["betas"]
    steps = [s["step"] for s in ordered]
    return adamw_update_(
        bucket.gather_grads(),
        bucket.state.buffer(states, "exp_avg", bucket.dtype),
        bucket.state.buffer(states, "exp_avg_sq", bucket.dtype),
        bucket.per_element([1.0 - beta1**t for t in steps]),
        bucket.per_element([(1.0 - beta2**t) ** 0.5 for t in steps]),
        beta1,
        beta2,
        group["eps"],
    )


def init_adam_state(p: Tensor, state: dict[str, Any]) -> None:
    """AdamW's zero moments for ``p``, contiguous (the flat buckets gather them), in the state precision."""
    state["exp_avg"] = torch.zeros_like(p, dtype=work_dtype(p), memory_format=torch.contiguous_format)
    state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])


class _SACOptimizer(_SACScaling, FlatOptimizer):
    """SAC on a base update (:meth:`_direction`, a flat update in layout order): the settings both share.

    Args:
        params: tensors or param groups; groups may carry ``names`` parallel to ``params`` (finds q/k/v heads).
        lr, betas, eps, weight_decay: the base optimizer's (decoupled decay). betas default to (0.9, 0.99) and eps
            to 1e-8, OpenToMe's defaults.
        scale_update_freq: steps between scale refreshes (``SAC_SCALE_UPDATE_FREQ``).
        scale_bound: (min, max) of the unit scales (``SAC_SCALE_BOUND``).
        dim, n_heads: model width and head count that split q/k/v projections into heads (``SAC_DIM``,
            ``SAC_N_HEADS``; Adam_miniSAC's block partition uses them too).
    """

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8, weight_decay: float = 0.01, scale_update_freq: int = 1000,
        scale_bound: tuple[float, float] = (0.5, 10.0), dim: int = 4096, n_heads: int = 32,
    ) -> None:  # fmt: skip
        cls = type(self).__name__
        validate_common(cls, lr, betas, eps, weight_decay)
        validate_positive_int(cls, "scale_update_freq", scale_update_freq)
        validate_heads(cls, dim, n_heads)
        params = list(params)
        validate_names(cls, params)
        bound = validate_scale_bound(cls, scale_bound)
        settings = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, dim=dim, n_heads=n_heads)
        super().__init__(params, dict(settings, scale_update_freq=scale_update_freq, scale_bound=bound))

    def _direction(self, group: dict[str, Any], bucket: FlatBucket, states: list[dict[str, Any]]) -> Tensor:
        raise NotImplementedError

    def _step_bucket(self, group: dict[str, Any], bucket: FlatBucket, states: list[dict[str, Any]]) -> None:
        update = self._direction(group, bucket, states)
        self._sac_scale_(group, bucket, states, update)
        bucket.apply_(update, group["lr"], group["weight_decay"])


class AdamWSAC(_SACOptimizer):
    """AdamW with SAC unit scaling (module docstring); settings as :class:`_SACOptimizer`."""

    def _init_state(self, p: Tensor, name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        init_adam_state(p, state)
        self._init_units(p, name, state, group)

    def _direction(self, group: dict[str, Any], bucket: FlatBucket, states: list[dict[str, Any]]) -> Tensor:
        return adamw_direction(group, bucket, states, bucket.layout.arrange(states))[0]


class Adam_miniSAC(_SACOptimizer):  # noqa: N801 - the name users type (OpenToMe's)
    """Adam-mini with SAC unit scaling: Adam-mini's block second moments (:mod:`library.optimizers.adam_mini`),
    SAC's per-head/per-tensor step scales; settings as :class:`_SACOptimizer`."""

    def _init_state(self, p: Tensor, name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        init_adam_mini_state(p, name, state, group)
        self._init_units(p, name, state, group)

    def _direction(self, group: dict[str, Any], bucket: FlatBucket, states: list[dict[str, Any]]) -> Tensor:
        return adam_mini_direction(group, bucket, states)
