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


def _dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """⟨a_i, b_i⟩ for every pair, stacked into one 1-D tensor (dtype of ``b``)."""
    return torch.stack(
        [torch.dot(x.reshape(-1).to(y.dtype), y.reshape(-1)) for x, y in zip(a, b, strict=True)]
    )


def _norms(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    return torch.stack(torch._foreach_norm(list(tensors), ord))


def orthograd_(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """OrthoGrad (Prieto et al. 2025): drop the gradient component parallel to the weights, keep ‖g‖.

    g⊥ = g − (⟨θ,g⟩/⟨θ,θ⟩)·θ, then g⊥ is rescaled to ‖g‖. Tensors with ‖θ‖ ≈ 0 (LoRA up at init) have no
    direction to remove and are left unchanged; so are gradients parallel to θ only in that g⊥ = 0 stays 0.
    """
    if not grads:
        return
    grads = list(grads)
    theta_sq = _dots(params, params).to(grads[0].dtype)
    coef = torch.where(theta_sq > _ZERO_NORM_SQ, _dots(params, grads) / theta_sq.clamp_min(_TINY), 0.0)
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
    masks = [(u * g.to(u.dtype) > 0).to(u.dtype) for u, g in zip(updates, grads, strict=True)]
    fractions = torch.stack([m.mean() for m in masks]).clamp_min(min_fraction)
    torch._foreach_mul_(updates, masks)
    torch._foreach_div_(updates, list(fractions))


def cosine_similarity(a: Sequence[Tensor], b: Sequence[Tensor], eps: float = 1e-16) -> Tensor:
    """cos(a_i, b_i) per pair as a 1-D tensor; 0 where either side is all zero."""
    b = list(b)
    denom = (_norms(a).to(b[0].dtype) * _norms(b)).clamp_min(eps)
    return _dots(a, b) / denom


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
    return [(1.0 + s) * 0.5 for s in smoothed]


def allora_row_scale(params: Sequence[Tensor], eta: float) -> list[Tensor]:
    """ALLoRA (Huang et al. 2024) per-row factor 1/√(‖θ_i‖² + 1/η²), shaped to broadcast against θ.

    A row is a slice along dim 0 (for lora_down: one rank direction; for lora_up: one output feature). Rows at
    zero get the largest factor η, so zero-initialised LoRA up learns without waiting for its own norm to grow.
    """
    inv_eta_sq = 1.0 / (eta * eta)
    scales = []
    for p in params:
        rows = p.reshape(p.shape[0], -1) if p.dim() > 0 else p.reshape(1, 1)
        sq = torch.linalg.vector_norm(rows, dim=1).square()
        scales.append(torch.rsqrt(sq + inv_eta_sq).reshape((-1,) + (1,) * max(p.dim() - 1, 0)))
    return scales


def allora_scale_(updates: Sequence[Tensor], params: Sequence[Tensor], eta: float) -> None:
    """Multiply each update row-wise by :func:`allora_row_scale` of its parameter."""
    if not updates:
        return
    updates = list(updates)
    scales = [s.to(u.dtype) for s, u in zip(allora_row_scale(params, eta), updates, strict=True)]
    torch._foreach_mul_(updates, scales)
