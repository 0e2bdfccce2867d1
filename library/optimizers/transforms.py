"""Gradient/update transforms of CustomAdamW, on flat buffers laid out by a :class:`FlatLayout`.

Each function takes a :class:`Segments` (a layout's per-tensor reductions) and flat 1-D buffers (all parameters of one device/dtype end to end, see
:mod:`library.optimizers.flat`), so one call is a fixed number of kernels whatever the number of tensors, and every
per-tensor reduction (sum, norm, dot product) stays a tensor: a step built from them never synchronises with the
host. Per-tensor results are 1-D tensors in layout order. Functions ending in ``_`` modify their first buffer in
place; the others return new buffers and leave their inputs alone. All math runs in the dtype of the buffers handed
in (fp32 for half-precision parameters, fp64 in the reference tests). Definitions follow the papers named in each
function (summarised in docs/optimizers.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from library.optimizers.flat import FlatLayout, reduce_stacks, segment_ids

# ‖θ‖² at or below this is treated as "no weight yet" (LoRA up at init) by OrthoGrad.
_ZERO_NORM_SQ = 1e-30
# Guards divisions by per-tensor sums/norms that are exactly zero (all-zero gradients).
_TINY = 1e-30


class Segments:
    """Per-tensor reductions and broadcasts over the flat buffers of one :class:`FlatLayout`, a kernel each.

    ``sum``/``max``/``mean`` are the layout's (``segment_reduce`` without its host-syncing length check).
    ``expand`` gathers with an int32 index (which tensor each element belongs to, 4 bytes per element) instead of
    ``repeat_interleave``, which builds an int64 index of the same length on every call. The index lives only
    inside ``with segments.indexed():`` (one step): between steps it would cost 4 bytes per parameter.
    """

    def __init__(self, layout: FlatLayout) -> None:
        self.lengths = layout.lengths
        self.numel = layout.numel
        self.index: Tensor | None = None
        self.sum = layout.sum
        self.max = layout.max
        self.mean = layout.mean

    @contextlib.contextmanager
    def indexed(self) -> Iterator[Segments]:
        """Build the element index for the block (one kernel) and drop it after."""
        self.index = segment_ids(self.lengths, self.numel)
        try:
            yield self
        finally:
            self.index = None

    def sums(self, *products: tuple[Tensor, Tensor]) -> Tensor:
        """Per-tensor sums of several products a⊙b as a [len(products), count] tensor.

        Each product is written into one shared scratch buffer and reduced before the next, so the step holds one
        product's worth of memory, not one per product; every result equals ``sum(a * b)`` for that pair.
        """
        a0 = products[0][0]
        scratch = torch.empty_like(a0)
        return torch.stack([self.sum(torch.mul(a, b, out=scratch)) for a, b in products])

    def expand(self, values: Tensor, out: Tensor | None = None) -> Tensor:
        """Per-tensor values (layout order) spread over each tensor's elements, into ``out`` when given (a spent
        buffer: no new temporary). Outside ``indexed()`` through ``repeat_interleave``: the same values."""
        if self.index is None:
            spread = torch.repeat_interleave(values, self.lengths, output_size=self.numel)
            return spread if out is None else out.copy_(spread)
        return torch.index_select(values, 0, self.index, out=out)

    def spread(self, value: float | Tensor) -> float | Tensor:
        """A step value as an operand: a scalar (Python float or 0-d tensor) as is, per-tensor values (tensors at
        different steps) spread over each tensor's elements."""
        return value if isinstance(value, float) or value.dim() == 0 else self.expand(value)


def dot(seg: Segments, a: Tensor, b: Tensor) -> Tensor:
    """⟨a_i, b_i⟩ per tensor (layout order)."""
    return seg.sum(a * b)


def sq_norm(seg: Segments, x: Tensor) -> Tensor:
    """‖x_i‖² per tensor (layout order)."""
    return seg.sum(x * x)


def cosine(seg: Segments, a: Tensor, b: Tensor, eps: float = 1e-16) -> Tensor:
    """⟨a_i, b_i⟩ / max(‖a_i‖·‖b_i‖, eps) per tensor: the cosine, and 0 where either side is all zero."""
    aa, bb, ab = seg.sums((a, a), (b, b), (a, b))
    return ab.div_(torch.mul(aa, bb).sqrt_().clamp_min_(eps))


def orthograd_(seg: Segments, theta: Tensor, grad: Tensor) -> None:
    """OrthoGrad (Prieto et al. 2025): drop the gradient component parallel to the weights, keep ‖g‖.

    g⊥ = g − (⟨θ,g⟩/⟨θ,θ⟩)·θ, then g⊥ is rescaled to ‖g‖. Tensors with ‖θ‖ ≈ 0 (LoRA up at init) have no
    direction to remove and are left unchanged; a g⊥ that is exactly 0 stays 0.
    """
    theta_sq = sq_norm(seg, theta)
    coef = torch.where(theta_sq > _ZERO_NORM_SQ, dot(seg, theta, grad) / theta_sq.clamp_min(_TINY), 0.0)
    g_norm = sq_norm(seg, grad).sqrt_()
    grad.addcmul_(theta, seg.expand(coef), value=-1.0)
    perp_norm = sq_norm(seg, grad).sqrt_()
    scale = torch.where(perp_norm > 0, g_norm / perp_norm.clamp_min(_TINY), 1.0)
    grad.mul_(seg.expand(scale))


def agr_(seg: Segments, grad: Tensor) -> None:
    """Adaptive gradient regularisation (Jiang et al. 2024): g ← g − α⊙g with α = |g| / Σ|g| per tensor.

    Large coordinates are shrunk most, relative to the tensor's total gradient mass. (Not the original Hina
    code's g·(1 + |Σg|/‖g‖), which only rescales the whole tensor.)
    """
    alpha = grad.abs()
    inv_mass = seg.sum(alpha).clamp_min_(_TINY).reciprocal_()
    alpha.mul_(seg.expand(inv_mass))
    grad.addcmul_(alpha, grad, value=-1.0)


def adopt_input(
    seg: Segments, exp_avg_sq: Tensor, grad: Tensor, eps: float, neg_clip: float | Tensor, clip: float | Tensor
) -> tuple[Tensor, Tensor]:
    """ADOPT (Taniguchi et al. 2024), the momentum's input: x = clip(g / max(√v_prev, ε), ±t^¼).

    ADOPT converges for any β₂ because the normaliser v_prev does not contain the current gradient; so x is
    computed from ``exp_avg_sq`` *before* :func:`adopt_moments_` updates it, and no v_prev buffer is needed. The
    t^¼ clip (``clip``, ``neg_clip`` = −clip: scalars or per-tensor values) bounds x while v is still small.
    Returns (x, ready): x a new buffer; ``ready`` per tensor (layout order, the buffers' dtype) 1 where v has
    seen a gradient and 0 where v is all zero, i.e. this step is the tensor's initialising step.
    """
    ready = seg.max(exp_avg_sq).gt_(0.0)
    x = exp_avg_sq.sqrt().clamp_min_(eps)
    torch.div(grad, x, out=x)
    x.clamp_(min=seg.spread(neg_clip), max=seg.spread(clip))
    return x, ready


def adopt_lerp_coefs(beta1: float, beta2: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Constants (scale, base), each [2, 1], for :func:`adopt_moments_`: base + scale·ready gives both moments'
    lerp weights in one op. Built once per (β₁, β₂) by the caller: inside a captured step nothing is copied in."""
    scale = torch.tensor([[1.0 - beta1], [-beta2]], dtype=dtype, device=device)
    base = torch.tensor([[0.0], [1.0]], dtype=dtype, device=device)
    return scale, base


def adopt_moments_(
    seg: Segments,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    inputs: Tensor,
    grad: Tensor,
    ready: Tensor,
    coefs: tuple[Tensor, Tensor],
) -> None:
    """ADOPT's moments, in place: m ← β₁m + (1−β₁)x and v ← β₂v + (1−β₂)g² where ``ready``; on a tensor's
    initialising step (ready = 0) only v₀ = g², m unchanged (ADOPT's first step records g² and does not move).

    Both as lerps with per-tensor weights [ready·(1−β₁), 1 − ready·β₂] (``coefs`` from :func:`adopt_lerp_coefs`),
    so tensors at their first and later steps share the kernels. ``inputs`` (x from :func:`adopt_input`) is
    spent: its buffer holds g² after, so the step needs no new buffer for it.
    """
    scale, base = coefs
    weights = torch.addcmul(base, scale, ready)
    exp_avg.lerp_(inputs, seg.expand(weights[0]))
    exp_avg_sq.lerp_(torch.mul(grad, grad, out=inputs), seg.expand(weights[1]))


def grams(update: Tensor, grad: Tensor) -> Tensor:
    """Grams (Cao et al. 2024): sign(g)·|u|, direction from the current gradient, magnitude from the update."""
    return update.abs().mul_(grad.sign())


def cautious(seg: Segments, update: Tensor, grad: Tensor, min_fraction: float = 1e-3) -> Tensor:
    """Cautious masking (Liang et al. 2024): u·mask / max(mean(mask), min_fraction) with mask = (u·g > 0).

    The mean is per tensor. After Grams every coordinate already agrees with g, so callers skip this there (it
    would only rescale by the fraction of non-zero gradients).
    """
    mask = torch.mul(update, grad).clamp_min_(0.0).sign_()  # ∈ {0, 1}
    fractions = (seg.sum(mask) / seg.lengths.clamp_min(1)).clamp_min_(min_fraction)
    return mask.mul_(update).div_(seg.expand(fractions))


def tam_damping_(seg: Segments, momentum: Tensor, inputs: Tensor, smoothed: Tensor, beta: float) -> Tensor:
    """Torque-aware momentum (Malviya et al. 2024): per-tensor damping factor for the momentum input.

    s = cos(m_prev, x); s̄ ← β·s̄ + (1−β)·s (``smoothed``: one value per tensor in layout order, updated in
    place); returns d = (1 + s̄)/2 per tensor, to be used as m ← β₁m + (1−β₁)·d·x. A zero momentum (first
    step) gives s = 0.
    """
    smoothed.lerp_(cosine(seg, momentum, inputs).to(smoothed.dtype), 1.0 - beta)
    return (smoothed + 1.0) * 0.5


def allora_row_scale(stacks: list[Tensor], eta: float, out: Tensor | None = None) -> Tensor:
    """ALLoRA (Huang et al. 2024) per-row factor 1/√(‖θ_r‖² + 1/η²) for every row, in flat order.

    ``stacks`` are views of the weights whose last dim is a row, covering the flat buffer in order: the
    [count, rows, cols] shape-bucket views (``FlatLayout.bucket_view``) or, fewer, [rows, cols] views of
    consecutive buckets sharing ``cols`` (:func:`row_stacks`). A row is a slice along dim 0 (for lora_down: one rank direction; for lora_up: one output feature).
    Rows at zero get the largest factor η, so zero-initialised LoRA up learns without waiting for its own norm to
    grow. One batched norm per stack (written into ``out``, one value per row, when given).
    """
    rows = reduce_stacks(stacks, torch.linalg.vector_norm, -1, out)
    return rows.mul_(rows).add_(1.0 / (eta * eta)).rsqrt_()


def scale_rows_(stacks: list[Tensor], rows: Tensor) -> None:
    """Multiply every row of ``stacks`` (:func:`row_stacks` views) by its factor in ``rows`` (flat row order), in
    place: one kernel per stack and no per-element index or factor buffer."""
    factors = rows.unsqueeze(1).split_with_sizes([stack.shape[0] for stack in stacks])
    torch._foreach_mul_(stacks, factors)


def divide_rows_(stacks: list[Tensor], rows: Tensor) -> None:
    """Divide every row of ``stacks`` (:func:`row_stacks` views) by its value in ``rows`` (flat row order), in
    place: :func:`scale_rows_` for per-row denominators (Adam-mini's), exact where a reciprocal would round."""
    torch._foreach_div_(stacks, rows.unsqueeze(1).split_with_sizes([stack.shape[0] for stack in stacks]))


def row_stacks(layout: FlatLayout, flat: Tensor) -> list[Tensor]:
    """[rows, cols] views of `flat` for :func:`allora_row_scale`, one per run of consecutive shape buckets with
    the same ``cols`` (LoRA up tensors all have cols = rank): fewer norm kernels than one per distinct shape."""
    runs: list[list[int]] = []  # [start, stop, rows, cols]
    for b in layout.buckets:
        if runs and runs[-1][3] == b.cols:
            runs[-1][1] = b.stop
            runs[-1][2] += b.count * b.rows
        else:
            runs.append([b.start, b.stop, b.count * b.rows, b.cols])
    return [flat[start:stop].view(rows, cols) for start, stop, rows, cols in runs]


def allora_(
    layout: FlatLayout,
    theta: Tensor,
    update: Tensor,
    eta: float,
    lora_rows: Tensor | None = None,
    row_lr: Tensor | float | None = None,
) -> None:
    """ALLoRA (Huang et al. 2024) on the update, in place: each row divided by √(‖θ_r‖² + 1/η²).

    ALLoRA replaces dropout and the LoRA scaling factor by this row-wise normalisation, which speeds up the
    start of LoRA training (rows at zero learn at η times the rate). ``lora_rows`` (one bool per row, flat row
    order) keeps factor 1 on rows of non-LoRA tensors; ``row_lr`` (per row, or one number) multiplies the same
    factors, so a per-tensor lr ratio (LoRA+) or an lr schedule's factor costs no extra pass over the elements.
    """
    rows = allora_row_scale(row_stacks(layout, theta), eta)
    if lora_rows is not None:
        rows = torch.where(lora_rows, rows, 1.0)
    if row_lr is not None:
        rows.mul_(row_lr)
    scale_rows_(row_stacks(layout, update), rows)  # in place: no element→row index


def descend_(target: Tensor, update: Tensor, neg_lr: float | Tensor) -> None:
    """target ← target − lr·u in one fused kernel (no δ buffer); ``neg_lr`` = −lr, a float or a 0-d tensor."""
    if isinstance(neg_lr, float):
        target.add_(update, alpha=neg_lr)
    else:
        target.addcmul_(update, neg_lr)


def weight_decay_ratio(step: int, transition_steps: int, decay_factor: float, min_ratio: float) -> float:
    """Dynamic weight decay's ρ(t): 1 up to T, then decay_factor^((t−T)/T) floored at min_ratio.

    Strong decay early keeps a fresh LoRA near its start; later it would fight the fit, so it falls
    geometrically per transition length until it reaches ``min_ratio`` (it scales decay and SPD's λ alike).
    """
    if step <= transition_steps:
        return 1.0
    return max(min_ratio, decay_factor ** ((step - transition_steps) / transition_steps))


def weight_decay_ratio_tensor(step: Tensor, transition_steps: int, decay_factor: float, min_ratio: float) -> Tensor:
    """:func:`weight_decay_ratio` of step counts held in a tensor, computed on their device (capturable steps)."""
    decayed = torch.pow(decay_factor, (step - transition_steps) / transition_steps).clamp_min_(min_ratio)
    return torch.where(step <= transition_steps, 1.0, decayed)


def decoupled_decay_(seg: Segments, theta: Tensor, lr_decay: float | Tensor) -> None:
    """Decoupled weight decay (Loshchilov & Hutter 2019), θ ← θ·(1 − lr·wd): ``lr_decay`` = lr·wd, a scalar or
    per-tensor values (a per-tensor lr ratio or step)."""
    theta.mul_(seg.spread(1.0 - lr_decay))


def spd_step_(
    seg: Segments,
    theta: Tensor,
    anchor: Tensor,
    grad: Tensor,
    update: Tensor,
    neg_lr: float | Tensor,
    neg_strength: float | Tensor,
) -> None:
    """The step θ̃ = θ − lr·u with Selective Projection Decay (Tian et al. 2024) instead of weight decay.

    Weight decay pulls every weight towards zero, which for fine-tuning means away from what the base model
    knows; SPD pulls towards the starting weights θ₀ (``anchor``) instead, and only on tensors whose step moves
    them away from it (⟨g, θ−θ₀⟩ < 0), in proportion to how much the step grew the distance:
    θ ← θ̃ − λ·r·(θ̃−θ₀), r = max(0, ‖θ̃−θ₀‖ − ‖θ−θ₀‖)/‖θ̃−θ₀‖ per tensor. ``neg_strength`` = −λ (a scalar or
    per-tensor values). ``grad`` is spent: its buffer holds the products whose per-tensor sums SPD needs and
    then the spread factors, so the step needs one new buffer (θ−θ₀), not four.
    """
    deviation = theta - anchor
    pushes_away = seg.sum(grad.mul_(deviation)) < 0
    dev_before = seg.sum(torch.mul(deviation, deviation, out=grad)).sqrt_()
    descend_(theta, update, neg_lr)
    descend_(deviation, update, neg_lr)  # now θ̃ − θ₀
    dev_after = seg.sum(torch.mul(deviation, deviation, out=grad)).sqrt_()
    coef = (dev_after - dev_before).clamp_min_(0.0).div_(dev_after.clamp_min(_TINY))
    coef.mul_(pushes_away)
    if isinstance(neg_strength, float):
        theta.addcmul_(deviation, seg.expand(coef, out=grad), value=neg_strength)
    else:
        theta.addcmul_(deviation, seg.expand(coef.mul_(neg_strength), out=grad))
