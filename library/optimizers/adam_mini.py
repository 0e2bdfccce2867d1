"""Adam-mini (Zhang et al. 2024, arXiv 2406.16793): Adam with one second moment per parameter block.

Adam's per-coordinate v mostly repeats itself inside blocks that share Hessian structure, so Adam-mini keeps one
v per block (the mean of g² over the block) and a full first moment m. Per block b of a tensor:

    m ← β₁m + (1−β₁)g;   v_b ← β₂v_b + (1−β₂)·mean_{i∈b}(g_i²)
    θ ← θ·(1 − lr·wd) − lr · m̂ / (√v̂_b + ε)           (m̂, v̂ bias-corrected; decoupled weight decay)

Blocks (the paper's partition, rows = slices along dim 0):
- query/key projections: one block per attention head. ``head_dim = dim // n_heads``; a tensor with ``dim`` rows
  has ``n_heads`` heads, one whose row count is a multiple of ``head_dim`` has rows/head_dim heads, otherwise
  it falls back to per-row. Recognised by name (``to_q``/``to_k``/``q_proj``/``k_proj``/``query``/``key``/
  ``wq``/``wk``); a LoRA ``lora_down``/``lora_A`` factor has rank directions as rows, not heads, so it is per-row.
- every other tensor with two or more dimensions: one block per row (per output neuron / token).
- 0-d and 1-D tensors (biases, norms): one block for the whole tensor.
Without ``names`` in the param groups every tensor follows the last two rules (per-row / per-tensor).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers.state import ExactStateLoad

_QK_NAME = re.compile(r"(?:^|[._])(?:to_q|to_k|q_proj|k_proj|query|key|wq|wk)(?:[._]|$)")
_QKV_NAME = re.compile(
    r"(?:^|[._])(?:to_q|to_k|to_v|q_proj|k_proj|v_proj|query|key|value|wq|wk|wv)(?:[._]|$)"
)
_LORA_DOWN = re.compile(r"lora_down|lora_A")


def head_count(rows: int, dim: int, n_heads: int) -> int | None:
    """Number of attention heads in a tensor with ``rows`` output rows, or None if rows do not split into heads."""
    head_dim = dim // n_heads
    if rows == dim:
        return n_heads
    if head_dim > 0 and rows % head_dim == 0:
        return rows // head_dim
    return None


def is_head_structured(name: str | None, pattern: re.Pattern[str] = _QK_NAME) -> bool:
    """True for attention projections whose rows are heads (LoRA down factors have rank rows, never heads)."""
    return name is not None and pattern.search(name) is not None and _LORA_DOWN.search(name) is None


def adam_mini_blocks(name: str | None, shape: torch.Size, dim: int, n_heads: int) -> int:
    """How many equal, contiguous blocks along dim 0 share one second moment (see the module docstring)."""
    if len(shape) < 2:
        return 1
    rows = shape[0]
    if is_head_structured(name):
        heads = head_count(rows, dim, n_heads)
        if heads is not None:
            return heads
    return rows


def group_names(group: dict[str, Any]) -> list[str | None]:
    """The group's parameter names (``names`` or torch's ``param_names``), or Nones when it has none."""
    names = group.get("names", group.get("param_names"))
    if names is None:
        return [None] * len(group["params"])
    return list(names)


def validate_names(cls: str, params: Iterable[Any]) -> None:
    """Reject param groups whose ``names`` list does not line up with ``params``."""
    for group in params:
        if isinstance(group, dict) and "names" in group:
            if len(group["names"]) != len(list(group["params"])):
                raise OptimizerError(
                    f"{cls} param group 'names' has {len(group['names'])} entries for {len(group['params'])} params; "
                    "valid: one name per parameter"
                )


def validate_common(cls: str, lr: float, betas: Sequence[float], eps: float, weight_decay: float) -> None:
    """Checks shared by every Adam-style optimizer here; messages name the class, key and bad value."""
    if not (isinstance(lr, (int, float)) and lr >= 0.0):
        raise OptimizerError(f"{cls} lr={lr!r} is invalid; valid: a number >= 0")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise OptimizerError(f"{cls} betas={tuple(betas)!r} is invalid; valid: two numbers in [0, 1)")
    if not (isinstance(eps, (int, float)) and eps >= 0.0):
        raise OptimizerError(f"{cls} eps={eps!r} is invalid; valid: a number >= 0")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0.0):
        raise OptimizerError(f"{cls} weight_decay={weight_decay!r} is invalid; valid: a number >= 0")


def validate_positive_int(cls: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptimizerError(f"{cls} {key}={value!r} is invalid; valid: an integer >= 1")


def working_grad(p: Tensor) -> Tensor:
    """The gradient in the working precision: fp32 for half-precision weights, the weight's dtype otherwise."""
    if p.grad.is_sparse:
        raise OptimizerError(
            f"sparse gradient for a {tuple(p.shape)} parameter is not supported; valid: dense gradients"
        )
    g = p.grad
    return g.float() if g.dtype in (torch.float16, torch.bfloat16) else g


def state_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def apply_decoupled_(params: list[Tensor], updates: list[Tensor], lr: float, weight_decay: float) -> None:
    """θ ← θ·(1 − lr·wd) − lr·u, the AdamW way (decay not scaled by the adaptive step)."""
    if not params:
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    if all(u.dtype == p.dtype for p, u in zip(params, updates, strict=True)):
        torch._foreach_add_(params, updates, alpha=-lr)
    else:
        torch._foreach_add_(params, [u.to(p.dtype) for p, u in zip(params, updates, strict=True)], alpha=-lr)


def adam_mini_updates(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    block_sqs: list[Tensor],
    steps: list[int],
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """Advance m (per element) and v (per block, shape (blocks, 1)) and return m̂/(√v̂_b + ε) per tensor."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    block_means = [
        g.reshape(v.shape[0], -1).square().mean(dim=1, keepdim=True)
        for g, v in zip(grads, block_sqs, strict=True)
    ]
    torch._foreach_lerp_(block_sqs, block_means, 1.0 - beta2)
    updates = []
    for m, v, t in zip(exp_avgs, block_sqs, steps, strict=True):
        bc1 = 1.0 - beta1**t
        bc2 = 1.0 - beta2**t
        denom = (v / bc2).sqrt_().add_(eps)
        updates.append((m.reshape(v.shape[0], -1) / bc1).div_(denom).reshape(m.shape))
    return updates


class Adam_mini(ExactStateLoad, torch.optim.Optimizer):  # noqa: N801 - the name users type (seed doc 000)
    """Adam-mini: full first moment, one second moment per head/row/tensor block (module docstring).

    Args:
        params: tensors or param groups; groups may carry ``names`` parallel to ``params`` (finds q/k heads).
        lr: learning rate.
        betas: (β₁, β₂) for m and the block second moments.
        eps: added to √v̂_b.
        weight_decay: decoupled (AdamW-style) weight decay.
        dim: model width used to split query/key projections into heads (``ADAM_MINI_DIM``).
        n_heads: number of attention heads (``ADAM_MINI_N_HEADS``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dim: int = 4096,
        n_heads: int = 32,
    ) -> None:
        cls = type(self).__name__
        validate_common(cls, lr, betas, eps, weight_decay)
        validate_positive_int(cls, "dim", dim)
        validate_positive_int(cls, "n_heads", n_heads)
        if n_heads > dim:
            raise OptimizerError(f"{cls} n_heads={n_heads} is invalid for dim={dim}; valid: n_heads <= dim")
        params = list(params)
        validate_names(cls, params)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, dim=dim, n_heads=n_heads
        )
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, name: str | None, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            blocks = adam_mini_blocks(name, p.shape, group["dim"], group["n_heads"])
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(
                p, dtype=state_dtype(p), memory_format=torch.contiguous_format
            )
            state["block_sq"] = torch.zeros(blocks, 1, dtype=state_dtype(p), device=p.device)
        return state

    def _adam_mini_updates(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[str | None], list[Tensor]]:
        """Advance the states of the group's tensors that have gradients; return (params, names, updates)."""
        params, names, grads, exp_avgs, block_sqs, steps = [], [], [], [], [], []
        for p, name in zip(group["params"], group_names(group), strict=True):
            if p.grad is None:
                continue
            state = self._init_state(p, name, group)
            state["step"] += 1
            params.append(p)
            names.append(name)
            grads.append(working_grad(p))
            exp_avgs.append(state["exp_avg"])
            block_sqs.append(state["block_sq"])
            steps.append(state["step"])
        if not params:
            return [], [], []
        beta1, beta2 = group["betas"]
        updates = adam_mini_updates(grads, exp_avgs, block_sqs, steps, beta1, beta2, group["eps"])
        return params, names, updates

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, _, updates = self._adam_mini_updates(group)
            apply_decoupled_(params, updates, group["lr"], group["weight_decay"])
        return loss

    def log_metrics(self) -> dict[str, Tensor | float]:
        """Block count (how much smaller v is than Adam's) and the mean raw block second moment."""
        block_sqs = [s["block_sq"] for s in self.state.values() if "block_sq" in s]
        if not block_sqs:
            return {}
        return {
            "adam_mini_blocks": float(sum(v.shape[0] for v in block_sqs)),
            "adam_mini_v_mean": torch.stack([v.float().mean() for v in block_sqs]).mean(),
        }
