"""Adam-mini (Zhang et al. 2024, arXiv 2406.16793): Adam with one second moment per parameter block.

Adam's per-coordinate v mostly repeats itself inside blocks that share Hessian structure, so Adam-mini keeps one
v per block (the mean of g² over the block) and a full first moment m. Per block b of a tensor:

    m ← β₁m + (1−β₁)g;   v_b ← β₂v_b + (1−β₂)·mean_{i∈b}(g_i²)
    θ ← θ·(1 − lr·wd) − lr · m̂ / (√v̂_b + ε)           (m̂, v̂ bias-corrected; decoupled weight decay)

Blocks (the paper's partition, rows = slices along dim 0):
- query/key projections: one block per attention head of ``head_dim = dim // n_heads`` rows (``n_heads`` must
  divide ``dim``); a tensor whose row count is no multiple of ``head_dim`` falls back to per-row. Recognised by
  name (:data:`~library.optimizers.names.QUERY_KEY`); a LoRA ``lora_down``/``lora_A`` factor has rank directions
  as rows, not heads, so it is per-row.
- every other tensor with two or more dimensions: one block per row (per output neuron / token).
- 0-d and 1-D tensors (biases, norms): one block for the whole tensor.
Without ``names`` in the param groups every tensor follows the last two rules (per-row / per-tensor).
The float64 definition, one tensor at a time: :class:`~library.optimizers.references.AdamMiniReference`.

Performance: the tensors of a param group (per device and dtype) are laid end to end in one flat buffer
(:class:`~library.optimizers.flat.FlatBucket`), so the blocks of all tensors are consecutive segments and every
block is whole rows: the block means are one ``segment_reduce``, and the block denominators, spread over rows
(not elements), divide the update one row stack at a time (:func:`~library.optimizers.transforms.divide_rows_`).
The step's only per-element temporary is the gathered gradient, which becomes the update.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers import transforms as T
from library.optimizers.flat import FlatBucket, FlatLayout, FlatOptimizer, FlatState, matrix_shape
from library.optimizers.names import head_count, is_head_structured
from library.optimizers.state import work_dtype
from library.optimizers.validate import validate_common, validate_heads, validate_names


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


class Blocks:
    """Adam-mini's blocks of one bucket's tensors, end to end in layout order (``counts``: blocks per tensor).

    Holds the store of the block second moments (``state["block_sq"]``, shape (blocks, 1)), each block's element
    count (the segment mean) and row count (spreading per-block values over rows): two int32 per block.
    """

    def __init__(self, layout: FlatLayout, counts: Sequence[int]) -> None:
        self.counts = list(counts)
        self.state = FlatState.in_order([(b, 1) for b in counts], layout.device)
        rows = [matrix_shape(layout.shapes[i])[0] for i in layout.order]
        for r, b in zip(rows, counts, strict=True):
            if r % b:
                raise OptimizerError(
                    f"Adam_mini block_sq of {b} blocks for a tensor of {r} rows is invalid; valid: a divisor of {r}"
                )
        self.total = sum(counts)
        self.total_rows = sum(rows)
        lengths = [n // b for n, b in zip(layout.sizes, counts, strict=True) for _ in range(b)]
        block_rows = [r // b for r, b in zip(rows, counts, strict=True) for _ in range(b)]
        self.lengths = torch.tensor(lengths, dtype=torch.int32, device=layout.device)
        self.rows = torch.tensor(block_rows, dtype=torch.int32, device=layout.device)

    def per_row(self, per_block: Tensor) -> Tensor:
        """Per-block values repeated over each block's rows, in flat row order."""
        return torch.repeat_interleave(per_block, self.rows, output_size=self.total_rows)

    def per_block(self, per_tensor: Tensor) -> Tensor:
        """Per-tensor values (layout order) repeated over each tensor's blocks."""
        return torch.repeat_interleave(per_tensor, self.state.layout.lengths, output_size=self.total)


def adam_mini_update_(
    g: Tensor,
    m: Tensor,
    v: Tensor,
    layout: FlatLayout,
    blocks: Blocks,
    bc1: float | Tensor,
    bc2: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> Tensor:
    """Advance flat m (per element) and v (per block); overwrite g with m̂/(√v̂_b + ε) and return it.

    ``g`` is the step's own gathered gradient, spent once m and v have taken it. bc1 = 1−β₁ᵗ per element and
    bc2 = 1−β₂ᵗ per block (Python floats when every tensor is at the same step).
    """
    m.lerp_(g, 1.0 - beta1)
    v.lerp_(torch.segment_reduce(g.mul_(g), "mean", lengths=blocks.lengths, unsafe=True), 1.0 - beta2)
    denom = (v / bc2).sqrt_().add_(eps)
    torch.div(m, bc1, out=g)
    T.divide_rows_(T.row_stacks(layout, g), blocks.per_row(denom))
    return g


def init_adam_mini_state(p: Tensor, name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Adam-mini's zero moments for ``p``: m like ``p`` (contiguous, the buckets gather it), v per block."""
    blocks = adam_mini_blocks(name, p.shape, group["dim"], group["n_heads"])
    state["exp_avg"] = torch.zeros_like(p, dtype=work_dtype(p), memory_format=torch.contiguous_format)
    state["block_sq"] = torch.zeros(blocks, 1, dtype=work_dtype(p), device=p.device)


def adam_mini_direction(group: dict[str, Any], bucket: FlatBucket, states: list[dict[str, Any]]) -> Tensor:
    """:func:`adam_mini_update_` on a bucket: its gathered gradients, m and block v buffers and per-tensor bias
    corrections (``states`` parallel to ``bucket.params``). The flat update m̂/(√v̂_b + ε), layout order."""
    ordered = bucket.layout.arrange(states)
    counts = [s["block_sq"].shape[0] for s in ordered]
    blocks = bucket.cache.get("adam_mini")
    if blocks is None or blocks.counts != counts:
        blocks = bucket.cache["adam_mini"] = Blocks(bucket.layout, counts)
    beta1, beta2 = group["betas"]
    steps = [s["step"] for s in ordered]
    bc2 = bucket.per_tensor([1.0 - beta2**t for t in steps])
    return adam_mini_update_(
        bucket.gather_grads(),
        bucket.state.buffer(states, "exp_avg", bucket.dtype),
        blocks.state.buffer(ordered, "block_sq", bucket.dtype),
        bucket.layout,
        blocks,
        bucket.per_element([1.0 - beta1**t for t in steps]),
        blocks.per_block(bc2) if isinstance(bc2, Tensor) else bc2,
        beta1,
        beta2,
        group["eps"],
    )


class Adam_mini(FlatOptimizer):  # noqa: N801 - the name users type (OpenToMe's)
    """Adam-mini: full first moment, one second moment per head/row/tensor block (module docstring).

    Args:
        params: tensors or param groups; groups may carry ``names`` parallel to ``params`` (finds q/k heads).
        lr: learning rate.
        betas: (β₁, β₂) for m and the block second moments.
        eps: added to √v̂_b.
        weight_decay: decoupled (AdamW-style) weight decay.
        dim: model width used to split query/key projections into heads (``ADAM_MINI_DIM``).
        n_heads: number of attention heads (``ADAM_MINI_N_HEADS``), a divisor of ``dim``.
    """

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0, dim: int = 4096, n_heads: int = 32,
    ) -> None:  # fmt: skip
        cls = type(self).__name__
        validate_common(cls, lr, betas, eps, weight_decay)
        validate_heads(cls, dim, n_heads)
        params = list(params)
        validate_names(cls, params)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, dim=dim, n_heads=n_heads
        )
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        init_adam_mini_state(p, name, state, group)

    def _step_bucket(self, group: dict[str, Any], bucket: FlatBucket, states: list[dict[str, Any]]) -> None:
        bucket.apply_(adam_mini_direction(group, bucket, states), group["lr"], group["weight_decay"])

    def log_metrics(self) -> dict[str, Tensor | float]:
        """Block count (how much smaller v is than Adam's) and the mean raw block second moment."""
        block_sqs = [s["block_sq"] for s in self.state.values() if "block_sq" in s]
        if not block_sqs:
            return {}
        return {
            "adam_mini_blocks": float(sum(v.shape[0] for v in block_sqs)),
            "adam_mini_v_mean": torch.stack([v.float().mean() for v in block_sqs]).mean(),
        }
