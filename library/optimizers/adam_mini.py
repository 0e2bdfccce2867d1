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

Performance: the tensors of a param group (per device and dtype) are laid end to end in one flat buffer
(:class:`FlatPlan`, on :mod:`library.optimizers.flat`), so the blocks of all tensors are consecutive segments:
the block means are one ``segment_reduce``, the block denominators are spread back with one gather (cached
element-to-block index) and the weights are written with two foreach launches. This module also holds the
flat helpers the SGG and SAC optimizers share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers.flat import FlatLayout, FlatState, segment_ids
from library.optimizers.flat import work_dtype as state_dtype
from library.optimizers.state import LORA_DOWN as _LORA_DOWN
from library.optimizers.state import ExactStateLoad, closure_loss, group_names
from library.optimizers.validate import validate_common, validate_heads, validate_names

_QK_NAME = re.compile(r"(?:^|[._])(?:to_q|to_k|q_proj|k_proj|query|key|wq|wk)(?:[._]|$)")
_QKV_NAME = re.compile(
    r"(?:^|[._])(?:to_q|to_k|to_v|q_proj|k_proj|v_proj|query|key|value|wq|wk|wv)(?:[._]|$)"
)


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


def advance_group(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    init_state: Callable[[Tensor, str | None, dict[str, Any], dict[str, Any]], None],
) -> tuple[list[Tensor], list[str | None], list[Tensor], list[dict[str, Any]]]:
    """(params, names, dense grads, states) of the group's tensors that have gradients, each state's step advanced.

    A tensor's first step creates its state with ``init_state(p, name, state, group)`` after ``state["step"] = 0``.
    """
    params, names, grads, states = [], [], [], []
    for p, name in zip(group["params"], group_names(group), strict=True):
        if p.grad is None:
            continue
        state = optimizer.state[p]
        if "step" not in state:
            state["step"] = 0
            init_state(p, name, state, group)
        state["step"] += 1
        params.append(p)
        names.append(name)
        grads.append(dense_grad(p))
        states.append(state)
    return params, names, grads, states


def dense_grad(p: Tensor) -> Tensor:
    """``p.grad``, rejected when sparse (the flat gather casts it to the working precision)."""
    if p.grad.is_sparse:
        raise OptimizerError(
            f"sparse gradient for a {tuple(p.shape)} parameter is not supported; valid: dense gradients"
        )
    return p.grad


# ------------------------------------------------------------------------------------------------ flat buffers
class Segments:
    """Tensors of any shapes end to end in the order given: a :class:`FlatLayout` that does not reorder.

    For :class:`FlatState` buffers of per-tensor state not shaped like its parameter (block moments, cluster
    tables, per-row scales, labels): listed in the parameter layout's order, row j belongs to layout position j.
    """

    def __init__(self, shapes: Sequence[Sequence[int]]) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [s.numel() for s in self.shapes]
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = sum(self.sizes)

    def flatten(self, tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return flat if dtype is None or flat.dtype == dtype else flat.to(dtype)

    def views(self, flat: Tensor) -> list[Tensor]:
        return [
            flat[o : o + n].view(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes, strict=True)
        ]


def init_missing_(
    states: Sequence[dict[str, Any]],
    key: str,
    shapes: Sequence[Sequence[int]],
    fill: float,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Give ``states[i][key]`` (where absent) a tensor of ``shapes[i]`` filled with ``fill``: one allocation."""
    missing = [(s, shape) for s, shape in zip(states, shapes, strict=True) if key not in s]
    if not missing:
        return
    segments = Segments([shape for _, shape in missing])
    flat = torch.full((segments.numel,), fill, dtype=dtype, device=device)
    for (s, _), view in zip(missing, segments.views(flat), strict=True):
        s[key] = view


class FlatPlan:
    """One (param group, device, working dtype) bucket of parameters laid out flat, cached across steps.

    Holds the :class:`FlatLayout`, the param-shaped :class:`FlatState`, ``cache`` for derived per-tensor values an
    optimizer needs (segment lengths, small index maps), and for the step in progress its scratch buffers (flat
    gradients, updates) and per-element indices in ``transient``. :meth:`release` drops those after the step:
    between steps a plan holds the state and nothing per element besides it.
    """

    def __init__(self, params: Sequence[Tensor], dtype: torch.dtype) -> None:
        self.params = tuple(params)
        self.dtype = dtype
        self.layout = FlatLayout([p.shape for p in params], params[0].device)
        self.state = FlatState(self.layout)
        self.cache: dict[Any, Any] = {}
        self._scratch: dict[Any, tuple[Tensor, list[Tensor] | None]] = {}
        self.transient: dict[Any, Any] = {}
        # 1-D views of the parameters (their own storage): updates go back with one split, no per-tensor views
        self.param_rows = self.layout.rows(self.params)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        self.param_dtypes = by_dtype

    def matches(self, params: Sequence[Tensor]) -> bool:
        return len(params) == len(self.params) and all(
            a is b for a, b in zip(params, self.params, strict=True)
        )

    def scratch(self, key: Any, dtype: torch.dtype | None = None) -> tuple[Tensor, list[Tensor]]:
        """A flat buffer for this step (the same one for every use of ``key`` until :meth:`release`) and its
        per-parameter views in the caller's order."""
        dtype = dtype or self.dtype
        flat, views = self._scratch.get((key, dtype), (None, None))
        if flat is None:
            flat = torch.empty(self.layout.numel, dtype=dtype, device=self.layout.device)
        if views is None:
            views = self.layout.views(flat)
        self._scratch[(key, dtype)] = (flat, views)
        return flat, views

    def gather(self, key: str, tensors: Sequence[Tensor]) -> Tensor:
        """``tensors`` (the caller's order) as scratch ``key`` in the working dtype: one gather op."""
        flat = self.layout.gather(tensors, self.dtype)
        self._scratch[(key, self.dtype)] = (flat, None)
        return flat

    def release(self) -> None:
        """Drop the step's scratch buffers and per-element indices (also of plans in ``cache``)."""
        self._scratch.clear()
        self.transient.clear()
        for value in self.cache.values():
            if isinstance(value, FlatPlan):
                value.release()

    def per_tensor(self, values: Sequence[float]) -> float | Tensor:
        """Per-tensor numbers (layout order): a Python float when all agree, else a (count,) device tensor."""
        if all(v == values[0] for v in values):
            return values[0]
        return torch.tensor(values, dtype=self.dtype).to(self.layout.device, non_blocking=True)

    def per_element(self, values: Sequence[float]) -> float | Tensor:
        """:meth:`per_tensor` spread over each tensor's elements (a flat buffer) when they differ."""
        value = self.per_tensor(values)
        return value if isinstance(value, float) else self.spread(value)

    def spread(self, values: Tensor) -> Tensor:
        """Per-tensor values (layout order) repeated over each tensor's elements: one gather by an index built
        once per step."""
        index = self.transient.get("element_ids")
        if index is None:
            index = self.transient["element_ids"] = segment_ids(self.layout.lengths, self.layout.numel)
        return values.index_select(0, index)


def flat_plans(
    cache: dict[Any, FlatPlan], group_index: int, params: list[Tensor]
) -> list[tuple[FlatPlan, list[int]]]:
    """(plan, positions in ``params``) per (device, working dtype); plans are rebuilt when the tensors change.

    Optimizers keep ``cache`` in ``__dict__`` via setdefault: torch.optim's ``__getstate__`` drops other attributes,
    so a copied or unpickled optimizer starts a fresh cache.
    """
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, state_dtype(p)), []).append(i)
    plans = []
    for (device, dtype), idx in buckets.items():
        members = params if len(idx) == len(params) else [params[i] for i in idx]
        plan = cache.get((group_index, device, dtype))
        if plan is None or not plan.matches(members):
            plan = cache[(group_index, device, dtype)] = FlatPlan(members, dtype)
        plans.append((plan, idx))
    return plans


def release_plans(optimizer: torch.optim.Optimizer) -> None:
    """End of a step: every flat plan of ``optimizer`` drops its scratch buffers (see :meth:`FlatPlan.release`)."""
    for plan in optimizer.__dict__.get("_flat_plans", {}).values():
        plan.release()


def pick(items: list[Any], idx: list[int]) -> list[Any]:
    return items if len(idx) == len(items) else [items[i] for i in idx]


def apply_decoupled_(
    plan: FlatPlan, params: Sequence[Tensor], update: Tensor, lr: float, weight_decay: float
) -> None:
    """θ ← θ·(1 − lr·wd) − lr·u, the AdamW way (decay not scaled by the adaptive step), from a flat u.

    Two foreach launches with uniform scalars over the parameters: when they all have the working dtype, their
    1-D views take u's split directly; otherwise u goes through the plan's "update" scratch, cast once per weight
    dtype.
    """
    params = list(params)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    if list(plan.param_dtypes) == [plan.dtype]:  # one dtype: the parameters' 1-D views take u's split directly
        torch._foreach_add_(plan.param_rows, torch.split_with_sizes(update, plan.layout.sizes), alpha=-lr)
        return
    flat, views = plan.scratch("update")
    if update is not flat:
        flat.copy_(update)
    for dtype, idx in plan.param_dtypes.items():
        if dtype == plan.dtype:
            torch._foreach_add_(pick(params, idx), pick(views, idx), alpha=-lr)
        else:
            cast, cast_views = plan.scratch("update", dtype)
            cast.copy_(flat)
            torch._foreach_add_(pick(params, idx), pick(cast_views, idx), alpha=-lr)


def segment_sort(x: Tensor, segment_ids: Tensor) -> Tensor:
    """Values of flat ``x`` sorted within each segment (segments contiguous, ids ascending): two sorts, no loop."""
    values, order = x.sort()
    _, regroup = segment_ids.index_select(0, order).sort(stable=True)
    return values.index_select(0, regroup)


def adam_mini_update(
    g: Tensor,
    m: Tensor,
    v: Tensor,
    block_lengths: Tensor,
    block_ids: Tensor,
    bc1: float | Tensor,
    bc2: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    out: Tensor,
) -> Tensor:
    """Advance flat m (per element) and v (per block) and write m̂/(√v̂_b + ε) into ``out``.

    ``block_lengths`` are the element counts of the blocks, end to end, ``block_ids`` each element's block
    (:func:`segment_ids`); bc1 per element, bc2 per block
    (Python floats when every tensor is at the same step).
    """
    m.lerp_(g, 1.0 - beta1)
    v.lerp_(torch.segment_reduce(g * g, "mean", lengths=block_lengths), 1.0 - beta2)
    denom = (v / bc2).sqrt_().add_(eps)
    torch.div(m, bc1, out=out)
    return out.div_(denom.index_select(0, block_ids))


class Adam_mini(ExactStateLoad, torch.optim.Optimizer):  # noqa: N801 - the name users type (OpenToMe's)
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
        validate_heads(cls, dim, n_heads)
        params = list(params)
        validate_names(cls, params)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, dim=dim, n_heads=n_heads
        )
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        blocks = adam_mini_blocks(name, p.shape, group["dim"], group["n_heads"])
        state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.contiguous_format)
        state["block_sq"] = torch.zeros(blocks, 1, dtype=state_dtype(p), device=p.device)

    def _adam_mini_updates(
        self, group_index: int, group: dict[str, Any]
    ) -> list[tuple[FlatPlan, list[Tensor], list[str | None], list[dict[str, Any]], Tensor]]:
        """Advance the states of the group's tensors that have gradients, flat per (device, dtype) bucket.

        Returns (plan, params, names, states, flat update in layout order) per bucket.
        """
        params, names, grads, states = advance_group(self, group, self._init_state)
        beta1, beta2 = group["betas"]
        out = []
        for plan, idx in flat_plans(self.__dict__.setdefault("_flat_plans", {}), group_index, params):
            sts = pick(states, idx)
            ordered = plan.layout.arrange(sts)
            blocks = [s["block_sq"].shape[0] for s in ordered]
            cache = plan.cache.get("adam_mini")
            if cache is None or cache[0] != blocks:
                lengths = [n // b for n, b in zip(plan.layout.sizes, blocks, strict=True) for _ in range(b)]
                device = plan.layout.device
                block_lengths = torch.tensor(lengths, dtype=torch.int64, device=device)
                cache = plan.cache["adam_mini"] = (
                    blocks,
                    FlatState(Segments([(b, 1) for b in blocks])),
                    block_lengths,
                    torch.tensor(blocks, dtype=torch.int64, device=device),
                )
            _, block_state, block_lengths, block_counts = cache
            block_ids = plan.transient.get("block_ids")
            if block_ids is None:  # per element: built for the step, not kept
                block_ids = plan.transient["block_ids"] = segment_ids(block_lengths, plan.layout.numel)
            steps = [s["step"] for s in ordered]
            bc2 = plan.per_tensor([1.0 - beta2**t for t in steps])
            if isinstance(bc2, Tensor):
                bc2 = torch.repeat_interleave(bc2, block_counts, output_size=block_lengths.numel())
            update = adam_mini_update(
                plan.gather("grad", pick(grads, idx)),
                plan.state.buffer(sts, "exp_avg", plan.dtype),
                block_state.buffer(ordered, "block_sq", plan.dtype),
                block_lengths,
                block_ids,
                plan.per_element([1.0 - beta1**t for t in steps]),
                bc2,
                beta1,
                beta2,
                group["eps"],
                plan.scratch("update")[0],
            )
            out.append((plan, pick(params, idx), pick(names, idx), sts, update))
        return out

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group_index, group in enumerate(self.param_groups):
            for plan, params, _, _, update in self._adam_mini_updates(group_index, group):
                apply_decoupled_(plan, params, update, group["lr"], group["weight_decay"])
        release_plans(self)
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
