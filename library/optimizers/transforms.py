"""Gradient/update transforms shared by the in-house optimizers (CustomAdamW, Automagic).

Each function works on a list of tensors (one per parameter) and keeps every per-tensor reduction (norms, dot
products) as a tensor, so an optimizer step built from them never synchronises with the host. Functions ending in
``_`` modify their first list in place. All math runs in the dtype of the tensors handed in: the caller decides the
working precision (fp32 for half-precision parameters, fp64 in the reference tests). Definitions follow the
papers named in each function (summarised in docs/optimizers.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# ‖θ‖² at or below this is treated as "no weight yet" (LoRA up at init) by OrthoGrad.
_ZERO_NORM_SQ = 1e-30
# Guards divisions by per-tensor sums/norms that are exactly zero (all-zero gradients).
_TINY = 1e-30


def _norms(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """Per-tensor norms as one 1-D tensor: one ``_foreach_norm`` launch for the whole list."""
    return torch.stack(torch._foreach_norm(list(tensors), ord))


def _polarised_cosines(a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(cos(a_i, b_i), ‖a_i‖, ‖b_i‖) as 1-D tensors (dtype of ``b``), without a launch per tensor.

    Polarisation on the unit vectors: cos = (‖â+b̂‖² − ‖â−b̂‖²)/4. Normalising first keeps the cancellation
    error at ε however different the two norms are; an all-zero side gives â = 0 and so exactly 0.
    """
    b = list(b)
    a = [x.to(y.dtype) for x, y in zip(a, b, strict=True)]
    norm_a, norm_b = _norms(a), _norms(b)
    unit_a = torch._foreach_mul(a, list(1.0 / norm_a.clamp_min(_TINY)))
    unit_b = torch._foreach_mul(b, list(1.0 / norm_b.clamp_min(_TINY)))
    plus = _norms(torch._foreach_add(unit_a, unit_b))
    torch._foreach_sub_(unit_a, unit_b)
    return _polarise(plus, _norms(unit_a)), norm_a, norm_b


def dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """⟨a_i, b_i⟩ = ‖a‖‖b‖·cos for every pair as one 1-D tensor (dtype of ``b``); error bound of a plain dot."""
    cos, norm_a, norm_b = _polarised_cosines(a, b)
    return norm_a * norm_b * cos


def _polarise(plus: Tensor, minus: Tensor) -> Tensor:
    return (plus - minus) * (plus + minus) * 0.25


def shape_buckets(tensors: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """{(shape, dtype, device): indices}: the groups that can be stacked into one batched tensor."""
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
    return buckets


def orthograd_(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """OrthoGrad (Prieto et al. 2025): drop the gradient component parallel to the weights, keep ‖g‖.

    g⊥ = g − (⟨θ,g⟩/⟨θ,θ⟩)·θ, then g⊥ is rescaled to ‖g‖. Tensors with ‖θ‖ ≈ 0 (LoRA up at init) have no
    direction to remove and are left unchanged; so are gradients parallel to θ only in that g⊥ = 0 stays 0.
    """
    if not grads:
        return
    grads = list(grads)
    theta_sq = _norms([p.to(g.dtype) for p, g in zip(params, grads, strict=True)]).square()
    coef = torch.where(theta_sq > _ZERO_NORM_SQ, dots(params, grads) / theta_sq.clamp_min(_TINY), 0.0)
    g_norm = _norms(grads)
    torch._foreach_add_(
        grads, torch._foreach_mul([p.to(g.dtype) for p, g in zip(params, grads, strict=True)], list(-coef))
    )
    perp_norm = _norms(grads)
    scale = torch.where(perp_norm > 0, g_norm / perp_norm.clamp_min(_TINY), 1.0)
    torch._foreach_mul_(grads, list(scale))


def agr_(grads: Sequence[Tensor]) -> None:
    """Adaptive gradient regularisation (Jiang et al. 2024): g ← g − α⊙g with α = |g| / Σ|g| per tensor.

    Large coordinates are shrunk most, relative to the tensor's total gradient mass. (Not the original Hina
    code's g·(1 + |Σg|/‖g‖), which only rescales the whole tensor.)
    """
    if not grads:
        return
    grads = list(grads)
    inv_mass = list(1.0 / _norms(grads, 1.0).clamp_min(_TINY))
    alpha = torch._foreach_mul(torch._foreach_abs(grads), inv_mass)
    torch._foreach_mul_(alpha, grads)
    torch._foreach_sub_(grads, alpha)


def grams_(updates: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Grams (Cao et al. 2024): u ← sign(g)·|u|, direction from the current gradient, magnitude from the update."""
    if not updates:
        return
    updates = list(updates)
    torch._foreach_abs_(updates)
    torch._foreach_mul_(updates, torch._foreach_sign(list(grads)))


def cautious_(updates: Sequence[Tensor], grads: Sequence[Tensor], min_fraction: float = 1e-3) -> None:
    """Cautious masking (Liang et al. 2024): zero the coordinates where u and g disagree, rescale the rest.

    mask = (u·g > 0); u ← u·mask / max(mean(mask), min_fraction). After Grams every coordinate already agrees
    with g, so callers skip this there (it would only rescale by the fraction of non-zero gradients).
    """
    if not updates:
        return
    updates = list(updates)
    # mask = sign(max(u·g, 0)) ∈ {0, 1}; mean(mask) = ‖mask‖₁ / n.
    masks = torch._foreach_mul(updates, [g.to(u.dtype) for u, g in zip(updates, grads, strict=True)])
    torch._foreach_clamp_min_(masks, 0.0)
    torch._foreach_sign_(masks)
    sizes = torch.tensor([max(u.numel(), 1) for u in updates], dtype=updates[0].dtype, device=updates[0].device)
    fractions = (_norms(masks, 1.0) / sizes).clamp_min(min_fraction)
    torch._foreach_mul_(updates, masks)
    torch._foreach_div_(updates, list(fractions))


def cosine_similarity(a: Sequence[Tensor], b: Sequence[Tensor], eps: float = 1e-16) -> Tensor:
    """cos(a_i, b_i) per pair as a 1-D tensor; 0 where either side is all zero."""
    cos, norm_a, norm_b = _polarised_cosines(a, b)
    norm_ab = norm_a * norm_b
    return cos * (norm_ab / norm_ab.clamp_min(eps))


def tam_damping_(
    momenta: Sequence[Tensor], inputs: Sequence[Tensor], smoothed: Sequence[Tensor], beta: float
) -> list[Tensor]:
    """Torque-aware momentum (Malviya et al. 2024): per-tensor damping factor for the momentum input.

    s = cos(m_prev, x); s̄ ← β·s̄ + (1−β)·s (``smoothed`` holds one 0-d tensor per parameter and is updated in
    place); returns d = (1 + s̄)/2 per tensor, to be used as m ← β₁m + (1−β₁)·d·x. A zero momentum (first step)
    gives s = 0.
    """
    if not momenta:
        return []
    smoothed = list(smoothed)
    cos = cosine_similarity(momenta, inputs).to(smoothed[0].dtype)
    torch._foreach_lerp_(smoothed, list(cos), 1.0 - beta)
    return list((torch.stack(smoothed) + 1.0) * 0.5)


def allora_row_scale(params: Sequence[Tensor], eta: float) -> list[Tensor]:
    """ALLoRA (Huang et al. 2024) per-row factor 1/√(‖θ_i‖² + 1/η²), shaped to broadcast against θ.

    A row is a slice along dim 0 (for lora_down: one rank direction; for lora_up: one output feature). Rows at
    zero get the largest factor η, so zero-initialised LoRA up learns without waiting for its own norm to grow.
    Row norms are taken per shape bucket (one stack and one batched norm each), so the launch count grows with
    the number of distinct shapes, not of tensors.
    """
    params = list(params)
    row_norms: list[Tensor] = []
    position: dict[int, tuple[int, int]] = {}  # params[i] -> (bucket, index in bucket)
    for b, indices in enumerate(shape_buckets(params).values()):
        shape = params[indices[0]].shape
        rows = torch.stack([params[i] for i in indices]).reshape(len(indices), shape[0] if shape else 1, -1)
        row_norms.append(torch.linalg.vector_norm(rows, dim=2))
        position.update({i: (b, k) for k, i in enumerate(indices)})
    if not row_norms:
        return []
    torch._foreach_mul_(row_norms, row_norms)
    torch._foreach_add_(row_norms, 1.0 / (eta * eta))
    torch._foreach_rsqrt_(row_norms)
    scales = []
    for i, p in enumerate(params):
        b, k = position[i]
        scales.append(row_norms[b][k].reshape((-1,) + (1,) * max(p.dim() - 1, 0)))
    return scales


def allora_scale_(updates: Sequence[Tensor], params: Sequence[Tensor], eta: float) -> None:
    """Multiply each update row-wise by :func:`allora_row_scale` of its parameter."""
    if not updates:
        return
    updates = list(updates)
    scales = [s.to(u.dtype) for s, u in zip(allora_row_scale(params, eta), updates, strict=True)]
    torch._foreach_mul_(updates, scales)
