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

from library.optimizers.flat import FlatLayout, segment_ids

# ‖θ‖² at or below this is treated as "no weight yet" (LoRA up at init) by OrthoGrad.
_ZERO_NORM_SQ = 1e-30
# Guards divisions by per-tensor sums/norms that are exactly zero (all-zero gradients).
_TINY = 1e-30


class Segments:
    """Per-tensor reductions and broadcasts over the flat buffers of one :class:`FlatLayout`, a kernel each.

    ``sum``/``max`` are the layout's (``segment_reduce`` without its host-syncing length check). ``expand`` gathers
    with an int32 index (which tensor each element belongs to, 4 bytes per element) instead of
    ``repeat_interleave``, which builds an int64 index of the same length on every call. The index lives only
    inside ``with segments.indexed():`` (one step): between steps it would cost 4 bytes per parameter.
    """

    def __init__(self, layout: FlatLayout) -> None:
        self.lengths = layout.lengths
        self.numel = layout.numel
        self.index: Tensor | None = None
        self.sum = layout.sum
        self.max = layout.max

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

    def expand(self, values: Tensor) -> Tensor:
        """Per-tensor values (layout order) spread over each tensor's elements (outside ``indexed()``, through
        ``repeat_interleave``: the same values, one more temporary)."""
        if self.index is None:
            return torch.repeat_interleave(values, self.lengths, output_size=self.numel)
        return values.index_select(0, self.index)


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
    if out is None:
        norms = [torch.linalg.vector_norm(stack, dim=-1).reshape(-1) for stack in stacks]
        rows = norms[0] if len(norms) == 1 else torch.cat(norms)
    else:  # each norm written in place: no cat
        rows, start = out, 0
        for stack in stacks:
            count = stack[..., 0].numel()
            torch.linalg.vector_norm(stack, dim=-1, out=out[start : start + count].view(stack.shape[:-1]))
            start += count
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
