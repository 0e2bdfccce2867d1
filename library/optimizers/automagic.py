"""Automagic optimizers: ``Automagic_Sinkgd`` and its CAME-based sibling ``Automagic_CameAMP`` (Hina's).

Both share the "automagic" machinery: a per-element learning-rate mask adapted Prodigy-style from sign agreement
between consecutive steps, ALLoRA row scaling for LoRA matrices, an ADOPT-style seed step, adaptive weight decay
in the first half of warm-up and OrthoGrad after it. They differ in the update direction:

* ``Automagic_Sinkgd``: momentum → Grams → SinkGD (Scetbon et al. 2025, arXiv 2502.06742) → VRAdam factor.
* ``Automagic_CameAMP``: CAME (Luo et al. 2023, arXiv 2307.02047) with factored second moment and confidence
  factor; optional 8-bit block-wise first moment.

One step of parameter θ (t = the parameter's own step count, starting at 1; W = ``warmup_steps``):

* t = 1 (seed, ADOPT's "no update at step 0"): momentum/second moment are seeded from g, the sign of g is
  recorded, θ₀ = θ is kept if the d_coef condition will need it; θ does not move.
* t > W and ``use_orthogonal_grad``: g ← OrthoGrad(θ, g).
* direction u (see the classes).
* lr mask (per element, in fp32 or fp64, never fp16/bf16): s = sign(g); where s·s_prev > 0 the mask grows by
  ``lr_bump``, where s·s_prev < 0 it shrinks by ``lr_bump``, where either is 0 it stays; clamp to
  [``min_lr``, ``max_lr``]. The "condition" of Hina's usage guide is Prodigy's distance signal c = ⟨g, θ₀ − θ⟩ of the
  tensor: while t ≤ W/2, c > 0 (still descending away from the start) multiplies growth by ``d_coef`` and c < 0
  (the gradient points back to the start: overshoot) multiplies shrinkage by ``d_coef``. After W/2 θ₀ is freed.
  The mask keeps adapting after warm-up; there is no post-warm-up cut or decay (the original cut lr to 10%).
* step size η = mask · (group lr / the group's lr at construction) · ALLoRA row factor [· VRAdam factor]: an lr
  scheduler scales every element's step; with a constant schedule the factor is 1.
* t ≤ W/2 and ``weight_decay`` > 0: decoupled adaptive decay (Nakamura & Hong 2019, arXiv 1907.08931),
  θ ← θ − η·wd·a_p·θ with a_p = 2·sigmoid(4·(mean|g_p| − μ)/σ), μ/σ the mean/std of |g| over the group, refreshed
  every ``stats_update_freq`` steps.
* θ ← θ − η ⊙ u.

Tensors with 2+ dims are treated as matrices of shape (shape[0], rest): a conv weight out×in×kh×kw becomes
out×(in·kh·kw) for SinkGD, CAME's factored moments and ALLoRA rows. Math runs in fp32 for fp16/bf16 parameters
(fp64 parameters keep fp64), and states live in that working dtype. ``step()`` never synchronises with the host;
``log_metrics()`` returns the statistics (``avg_lr``, the mean of the mask) as tensors.

Performance. A LoRA step touches hundreds of small tensors, so on a GPU it is bound by kernel launches and host
time. The step runs on the flat engine (:mod:`library.optimizers.flat`, :mod:`~library.optimizers.transforms`,
:mod:`~library.optimizers.quant8`): per param group, device, working dtype and step count (a "bucket"),
gradients and weights are gathered into fresh flat buffers (one op each; nothing per element is kept between
steps besides the state), every elementwise op is one kernel over all tensors, and the weights go back with one
foreach copy. Per-element states are views of flat buffers (``FlatState``); the factored CAME moments and the
per-tensor statistics are packed the same way (``PackedState``), and 8-bit first moments live in one
``FlatQuantState`` next to the fp32 ones of small tensors, so ``state_dict()`` keeps its per-parameter format.
Row and column math runs on the layout's ``[rows, cols]`` / ``[k, rows, cols]`` stacks, one kernel per distinct row
length or shape (a ``segment_reduce`` over ~10⁵ rows of a few elements is slow on CUDA); per-tensor reductions are
one ``segment_reduce`` and per-tensor broadcasts one gather through the int32 element → tensor index of
``transforms.Segments``, built at the start of each step (above ``_INDEX_MAX_NUMEL`` elements
``repeat_interleave`` instead). Host work per step is O(1) per bucket: buckets and their resolved state buffers
are cached until the set of parameters with gradients changes or a state dict is loaded, and ``state["step"]`` is
written lazily from one counter per bucket (before ``state_dict()``). The number of ops per step does not depend
on the number of tensors, only on the number of distinct shapes.

Capturable mode, ``cuda_graphs=True`` (the default), is CustomAdamW's (:class:`~library.optimizers.state.Capturable`,
torch.optim's ``capturable`` convention): each bucket's step count is a float32 device counter that every
``state["step"]`` of the bucket is, each group's lr a persistent 0-d device tensor a scheduler fills, and what
depends on the step is computed on the device: CAME's bias correction, the statistics refresh every
``stats_update_freq`` steps, and the warm-up phases (the d_coef condition and adaptive decay up to W/2, OrthoGrad
after W) by ``torch.where`` on the counter. The host keeps a lower bound of the count (a replayed recording runs no
host code), so the seed step and a phase already over are decided on the host, for every later step too; θ₀ is
freed when the host sees W/2 passed, so a step recorded before then keeps it for the run. After its first calls
(the seed, then the first update that resolves the state buffers) step() is a fixed sequence of kernels with no
host sync, which the trainer records with the training step under ``--cuda_graphs``
(library/training/graphed_step.py). On the CPU both modes give the same bits; capturable mode dispatches ~25% more
small ops per step (the phases it cannot skip), which a recording replays at the cost of one launch.
``cuda_graphs=False`` keeps Python numbers.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers import quant8
from library.optimizers import transforms as T
from library.optimizers.flat import (
    FlatLayout,
    FlatState,
    PackedState,
    broadcast_stacks,
    column_stacks,
    matrix_shape,
    outer_into,
    partition,
    reduce_stacks,
)
from library.optimizers.names import group_names, lora_role
from library.optimizers.state import (
    Capturable,
    ExactStateLoad,
    closure_loss,
    dense_grad,
    step_numbers,
    work_dtype,
)
from library.optimizers.validate import require

logger = logging.getLogger(__name__)

# Guards divisions by norms/std that are exactly zero (all-zero gradients or rows).
_TINY = 1e-30
# Up to this many elements per layout, segment math uses cached int32 indices (4 bytes per element each).
_INDEX_MAX_NUMEL = 1 << 24
# Tensors smaller than this keep fp32 moments even with optim_bits=8 (bitsandbytes' min_8bit_size).
MIN_8BIT_NUMEL = 4096


class _Bucket:
    """One fixed list of parameters that step together (group, device, working dtype, step count) on the flat
    engine: their layout, segment tables and state stores, and Automagic's per-tensor constants.

    ``t`` is their step count (``state["step"]`` of each is written from it lazily, ``_sync_steps``); in capturable
    mode the count is ``counter`` on the device and ``t`` a lower bound the host keeps (a replayed recording skips
    the host), which decides only what holds for every later step (the seed step, warm-up phases passed); ``members``
    their positions in the group's params (None for all of them). Built when the set of parameters with
    gradients changes, dropped on a state-dict load; state buffers are resolved once (:meth:`cached`).
    """

    def __init__(self, shapes: Sequence[torch.Size], device: torch.device, dtype: torch.dtype,
                 lora: Sequence[bool] | None = None) -> None:  # fmt: skip
        self.layout = layout = FlatLayout(shapes, device)
        self.dtype = dtype
        self.store = FlatState(layout)  # states shaped like their parameter
        self.packed = PackedState()  # factored moments and per-tensor values
        self.t = 0
        self.members: list[int] | None = None
        self.params: list[Tensor] = []
        self.states: list[dict] = []
        arranged = [layout.shapes[i] for i in layout.order]
        mats = [matrix_shape(s) for s in arranged]
        self.is_matrix = [len(s) >= 2 for s in arranged]
        self.tensors = T.Segments(layout)
        # per-tensor math on per-row values (CAME's row means; a tensor with < 2 dims: rows of one element)
        self.row_tensors = T.Segments(layout.row_layout())
        self.numel = torch.tensor(layout.sizes, dtype=dtype, device=device)
        vector_cols = [
            not is_mat for is_mat, (_, m) in zip(self.is_matrix, mats, strict=True) for _ in range(m)
        ]
        self.vector_col = torch.tensor(vector_cols, device=device)
        self.vector_tensor = torch.tensor([not is_mat for is_mat in self.is_matrix], device=device)
        # SinkGD rows: matrix rows, and a tensor with < 2 dims as one row (unit-RMS scaling): its matrix rows
        # (single elements of a cols = 1 bucket) all take the norm of the whole tensor
        self.sink_row_scale = torch.tensor(
            [1.0 / math.sqrt(m if is_mat else n) for is_mat, (n, m) in zip(self.is_matrix, mats, strict=True)
             for _ in range(n)], dtype=dtype, device=device)  # fmt: skip
        self.sink_vectors: list[tuple[int, int, int, int, int, Tensor | None]] = []
        first_row = 0
        for b in layout.buckets:
            vector = [not self.is_matrix[j] for j in range(b.first, b.last)]
            if any(vector):
                mask = None if all(vector) else torch.tensor(vector, device=device).view(-1, 1)
                self.sink_vectors.append((b.start, b.stop, first_row, b.count, b.rows, mask))
            first_row += b.count * b.rows
        self.col_scale = torch.tensor(
            [1.0 / math.sqrt(n) for n, m in mats for _ in range(m)], dtype=dtype, device=device
        )
        self.lora = None if lora is None else [lora[i] for i in layout.order]
        self.lora_rows = None  # which rows get ALLoRA, when only some tensors do
        if self.lora is not None and any(self.lora) and not all(self.lora):
            flags = [flag for flag, (n, _) in zip(self.lora, mats, strict=True) for _ in range(n)]
            self.lora_rows = torch.tensor(flags, device=device)
        # capturable mode: the step count on the device (every state["step"] of the bucket is this tensor)
        self.counter: Tensor | None = None
        # resolved state buffers and step constants: looked up once, since load_state_dict drops every bucket
        self.resolved: dict[str, Any] = {}

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` on first use, then its result (a state buffer of this bucket's parameters)."""
        value = self.resolved.get(key)
        if value is None:
            value = self.resolved[key] = make()
        return value

    def state(self, states: list[dict], key: str, dtype: torch.dtype) -> Tensor:
        """The flat buffer behind ``states[i][key]`` (a :class:`FlatState` buffer, resolved once)."""
        return self.cached(key, lambda: self.store.buffer(states, key, dtype))

    def drop(self, key: str) -> None:
        self.store.drop(key)
        self.resolved.pop(key, None)

    def row_mean(self, x: Tensor) -> Tensor:
        """Mean of each matrix row of a flat buffer (flat row order): one kernel per run of equal row length."""
        return reduce_stacks(T.row_stacks(self.layout, x), torch.mean, -1)

    def col_mean(self, x: Tensor) -> Tensor:
        """Mean of each matrix column of a flat buffer ((tensor, column) order): one kernel per shape."""
        return reduce_stacks(column_stacks(self.layout, x), torch.mean, -2)


def _indexed(seg: T.Segments) -> contextlib.AbstractContextManager:
    """``seg.indexed()`` up to ``_INDEX_MAX_NUMEL`` elements; above, broadcasts use ``repeat_interleave`` (an index
    of 4 bytes per element would outweigh the state of a large full fine-tune)."""
    return seg.indexed() if seg.numel <= _INDEX_MAX_NUMEL else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Plain functions: the math on flat buffers, testable against float64 references.
# ---------------------------------------------------------------------------------------------------------------


def _sinkgd_flat_(x: Tensor, b: _Bucket, iters: int) -> None:
    """SinkGD in place on every tensor of a flat buffer; tensors with < 2 dims are scaled to unit RMS.

    Each iteration scales rows to norm √cols, then columns to norm √rows. A tensor with < 2 dims is one row and
    one column, so both passes scale it to unit RMS, the scale SinkGD gives matrices. All-zero rows/columns stay 0.
    """
    rows, cols = T.row_stacks(b.layout, x), column_stacks(b.layout, x)
    for _ in range(iters):
        norms = reduce_stacks(rows, torch.linalg.vector_norm, -1)
        for start, stop, first, k, n, mask in b.sink_vectors:
            whole = torch.linalg.vector_norm(x[start:stop].view(k, n), dim=-1, keepdim=True)
            row = norms[first : first + k * n].view(k, n)
            row.copy_(whole.expand(k, n) if mask is None else torch.where(mask, whole, row))
        torch._foreach_div_(rows, broadcast_stacks(rows, norms.clamp_min_(_TINY).mul_(b.sink_row_scale), -1))
        col_norms = reduce_stacks(cols, torch.linalg.vector_norm, -2).clamp_min_(_TINY).mul_(b.col_scale)
        torch._foreach_div_(cols, broadcast_stacks(cols, col_norms, -2))


def sinkgd_many_(updates: Sequence[Tensor], iters: int) -> None:
    """In place on each tensor: SinkGD of it viewed as (shape[0], rest), or unit RMS for tensors with < 2 dims."""
    updates = list(updates)
    if not updates:
        return
    b = _Bucket([u.shape for u in updates], updates[0].device, updates[0].dtype)
    flat = b.layout.flatten(updates)
    _sinkgd_flat_(flat, b, iters)
    b.layout.copy_to_(updates, flat)


def sinkgd_(x: Tensor, iters: int) -> Tensor:
    """SinkGD in place on (..., n, m): K times, rows to norm √m, then columns to norm √n.

    After it every entry has unit RMS on average, so the lr means the same for every matrix shape; all-zero
    rows/columns stay zero.
    """
    n, m = x.shape[-2], x.shape[-1]
    sinkgd_many_(list(x.view(-1, n, m).unbind(0)), iters)
    return x


def _vradam(m: Tensor, b: _Bucket) -> Tensor:
    """VRAdam per-tensor lr multiplier 1/(1 + min(3·Σm², 10)) (layout order): large, volatile momentum damps it."""
    return (3.0 * b.tensors.sum(m * m)).clamp_max_(10.0).add_(1.0).reciprocal_()


def vradam_factor(momenta: Sequence[Tensor]) -> Tensor:
    """:func:`_vradam` of a list of tensors, in the list's order."""
    momenta = list(momenta)
    b = _Bucket([m.shape for m in momenta], momenta[0].device, momenta[0].dtype)
    return b.layout.to_caller_order(_vradam(b.layout.flatten(momenta), b))


def _mask_step_(mask: Tensor, agree: Tensor, grow: Tensor | float, shrink: Tensor | float, min_lr: float,
                max_lr: float) -> None:  # fmt: skip
    """Prodigy-style mask step per element: +grow where the sign repeats (agree > 0), −shrink where it flips.

    ``agree`` = s·s_prev holds −1/0/+1; ``grow``/``shrink`` are one Python number for both, or tensors (0-d or
    flat buffers like ``mask``).
    """
    if isinstance(grow, float) and isinstance(shrink, float) and grow == shrink:
        mask.add_(agree, alpha=grow)
    else:
        mask.add_(torch.where(agree > 0, grow, shrink).mul_(agree))
    mask.clamp_(min_lr, max_lr)


def lr_mask_update_(
    masks: Sequence[Tensor],
    signs: Sequence[Tensor],
    prev_signs: Sequence[Tensor],
    grow: Tensor | Sequence[Tensor] | Sequence[float] | float,
    shrink: Tensor | Sequence[Tensor] | Sequence[float] | float,
    min_lr: float,
    max_lr: float,
) -> None:
    """:func:`_mask_step_` on a list of masks in place.

    ``signs``/``prev_signs`` hold −1/0/+1 (any dtype); a zero on either side leaves that element unchanged.
    ``grow``/``shrink`` are one value for all tensors, or one value per tensor (a 1-D tensor or a list).
    """
    masks = list(masks)
    b = _Bucket([m.shape for m in masks], masks[0].device, masks[0].dtype)
    layout = b.layout
    flat = layout.flatten(masks)
    agree = layout.flatten(prev_signs, flat.dtype).mul_(layout.flatten(signs, flat.dtype))

    def per_element(rate: Any) -> Tensor | float:
        if isinstance(rate, (int, float)):
            return float(rate)
        if isinstance(rate, Tensor):
            values = rate
        elif isinstance(rate[0], Tensor):
            values = torch.stack(list(rate))
        else:
            values = torch.tensor([float(r) for r in rate], dtype=flat.dtype)
        return b.tensors.expand(values.to(device=flat.device, dtype=flat.dtype)[layout.order])

    grow, shrink = per_element(grow), per_element(shrink)
    if isinstance(grow, float) and grow != shrink:
        grow = torch.tensor(grow, dtype=flat.dtype, device=flat.device)
    _mask_step_(flat, agree, grow, shrink, min_lr, max_lr)
    layout.copy_to_(masks, flat)


def _prodigy_rates(g: Tensor, theta: Tensor, start: Tensor, b: _Bucket, lr_bump: float,
                   d_coef: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(grow, shrink) per tensor (layout order) from c = ⟨g, θ₀ − θ⟩: c > 0 scales growth, c < 0 shrinkage."""
    c = b.tensors.sum((start - theta).mul_(g))
    fast = lr_bump * d_coef
    base = torch.full_like(c, lr_bump)
    return base.masked_fill(c > 0, fast), base.masked_fill_(c < 0, fast)


def prodigy_bumps(
    grads: Sequence[Tensor], params: Sequence[Tensor], starts: Sequence[Tensor], lr_bump: float, d_coef: float
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`_prodigy_rates` of lists of tensors: (grow, shrink) lists in the lists' order."""
    grads = list(grads)
    b = _Bucket([g.shape for g in grads], grads[0].device, grads[0].dtype)
    flat = [b.layout.flatten(x, grads[0].dtype) for x in (grads, params, starts)]
    grow, shrink = _prodigy_rates(*flat, b, lr_bump, d_coef)
    return list(b.layout.to_caller_order(grow).unbind(0)), list(b.layout.to_caller_order(shrink).unbind(0))


def _adaptive_decay(g: Tensor, b: _Bucket) -> Tensor:
    """Per-tensor a_p = 2·sigmoid(4·(mean|g_p| − μ)/σ) (layout order), μ/σ = mean/std of |g| over the buffer.

    Tensors whose gradients are larger than the group's typical gradient are decayed more (up to 2×).
    """
    total = b.layout.numel
    abs_sums = b.tensors.sum(g.abs())
    mu = abs_sums.sum() / total
    sigma = (torch.dot(g, g) / total - mu * mu).clamp_min_(0).sqrt_().clamp_min_(_TINY)
    return torch.sigmoid((abs_sums / b.numel - mu).mul_(4.0).div_(sigma)).mul_(2.0)


def adaptive_decay_factor(grads: Sequence[Tensor]) -> Tensor:
    """:func:`_adaptive_decay` of a list of tensors, in the list's order."""
    grads = list(grads)
    b = _Bucket([g.shape for g in grads], grads[0].device, grads[0].dtype)
    return b.layout.to_caller_order(_adaptive_decay(b.layout.flatten(grads), b))


def _factored_rsqrt(row: Tensor, col: Tensor, b: _Bucket, scale: float | Tensor = 1.0) -> Tensor:
    """scale / √V̂ per element: V̂ = (row/mean(row)) ⊗ col for matrices, V̂ = row (the full moment) otherwise.

    ``row`` has one entry per matrix row (every element of a tensor with < 2 dims), ``col`` one per column (the
    entry of a tensor with < 2 dims is unused).
    """
    row_mean = b.row_tensors.mean(row).clamp_min_(_TINY).masked_fill_(b.vector_tensor, 1.0)
    inv_row = (row / b.row_tensors.expand(row_mean)).rsqrt_()
    if isinstance(scale, Tensor) or scale != 1.0:  # a tensor is never compared: that would sync with the host
        inv_row.mul_(scale)
    inv_col = col.rsqrt().masked_fill_(b.vector_col, 1.0)
    out = torch.empty(b.layout.numel, dtype=row.dtype, device=row.device)
    outer_into(column_stacks(b.layout, out), inv_row, inv_col)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Shared optimizer machinery.
# ---------------------------------------------------------------------------------------------------------------


class _AutomagicBase(Capturable, ExactStateLoad, torch.optim.Optimizer):
    """Gathers state and runs the common part of the step; subclasses supply the update direction."""

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        name = type(self).__name__
        lr, min_lr, max_lr = defaults["lr"], defaults["min_lr"], defaults["max_lr"]
        require(name, "lr", lr, lr > 0, "> 0")
        require(name, "min_lr", min_lr, min_lr >= 0, ">= 0")
        require(name, "max_lr", max_lr, max_lr >= min_lr, f">= min_lr ({min_lr})")
        require(name, "lr_bump", defaults["lr_bump"], defaults["lr_bump"] >= 0, ">= 0")
        require(name, "alora_eta", defaults["alora_eta"], defaults["alora_eta"] > 0, "> 0")
        require(name, "d_coef", defaults["d_coef"], defaults["d_coef"] > 0, "> 0")
        require(
            name, "weight_decay", defaults["weight_decay"], defaults["weight_decay"] >= 0, ">= 0"
        )
        warmup = defaults["warmup_steps"]
        require(
            name, "warmup_steps", warmup, isinstance(warmup, int) and warmup >= 0, "an integer >= 0"
        )
        freq = defaults["stats_update_freq"]
        require(
            name, "stats_update_freq", freq, isinstance(freq, int) and freq >= 1, "an integer >= 1"
        )
        self._logged_plain_params = False
        # flat buckets by the parameter tuple they cover (buckets over overlapping parameters never coexist)
        self._buckets: dict[tuple, _Bucket] = {}
        # per group index: (parameter ids, which have grads, buckets) of the last step
        self._bucket_cache: dict[int, tuple[tuple, tuple, list[_Bucket]]] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # The lr the masks start from; a scheduler's later changes of group["lr"] scale the masks by lr / this.
        group.setdefault("mask_init_lr", group["lr"])
        names = group_names(group)
        if len(names) != len(group["params"]):
            raise OptimizerError(
                f"{type(self).__name__}: param group has {len(group['params'])} params but {len(names)} names; "
                "'names' must be parallel to 'params'"
            )
        if None in names and not group["full_finetune"] and not self._logged_plain_params:
            logger.info(
                "%s: parameters come without names; ALLoRA row scaling applies to every tensor with 2+ dims",
                type(self).__name__,
            )
            self._logged_plain_params = True

    # -- state -------------------------------------------------------------------------------------------------

    @staticmethod
    def _uses_allora(group: dict, index: int, p: Tensor, names: list[str | None] | None = None) -> bool:
        """Whether ALLoRA scales the rows of the group's ``index``-th parameter (``names``: the group's, if at
        hand)."""
        name = (group_names(group) if names is None else names)[index]
        if name is not None:
            return lora_role(name) is not None
        return p.dim() >= 2 and not group["full_finetune"]

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        dtype = work_dtype(p)
        init_lr = min(max(group["mask_init_lr"], group["min_lr"]), group["max_lr"])
        state["step"] = 0
        state["lr_mask"] = torch.full_like(p, init_lr, dtype=dtype, memory_format=torch.contiguous_format)
        state["avg_lr"] = torch.tensor(init_lr, dtype=dtype, device=p.device)
        state["decay_factor"] = torch.ones((), dtype=dtype, device=p.device)
        state["sign"] = torch.zeros_like(p, dtype=torch.int8)

    @staticmethod
    def _needs_start(group: dict) -> bool:
        """θ₀ is kept only while the d_coef condition can act (t ≤ W/2 with t ≥ 2)."""
        return group["d_coef"] != 1 and group["warmup_steps"] >= 4

    def _bucket(self, group: dict, members: list[tuple[int, Tensor]], dtype: torch.dtype) -> _Bucket:
        """The cached flat bucket of these parameters (built on first use or when the member list changes)."""
        ids = tuple(id(p) for _, p in members)
        device = members[0][1].device
        key = (ids, tuple(p.shape for _, p in members), device, dtype)
        bucket = self._buckets.get(key)
        if bucket is None:
            covered = set(ids)
            for other in [k for k in self._buckets if covered.intersection(k[0])]:
                del self._buckets[other]  # its buffers would hold stale copies of these parameters' states
            names = group_names(group)
            lora = [self._uses_allora(group, index, p, names) for index, p in members]
            bucket = _Bucket([p.shape for _, p in members], device, dtype, lora)
            self._buckets[key] = bucket
        return bucket

    @staticmethod
    def _per_tensor_state(b: _Bucket, states: list[dict], key: str) -> Tensor:
        """Flat buffer of a 0-d per-tensor state (``avg_lr``, ``decay_factor``), layout order."""
        return b.cached(key, lambda: b.packed.buffer(key, b.layout.arrange(states), key, b.dtype))

    def _seed_direction(self, group: dict, b: _Bucket, g: Tensor, states: list[dict]) -> None:
        raise NotImplementedError

    def _direction(
        self, group: dict, b: _Bucket, step: int | Tensor, g: Tensor, sign: Tensor, states: list[dict]
    ) -> tuple[Tensor, Tensor | None]:
        """Return the update direction (``step``: an int, or the device counter in capturable mode) (a new flat buffer) and an optional per-tensor lr factor (layout order)."""
        raise NotImplementedError

    # -- step --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        for index, group in enumerate(self.param_groups):
            grads = [p.grad for p in group["params"]]
            buckets = self._step_buckets(index, group, grads)
            if not buckets:
                continue
            if group["cuda_graphs"]:
                self.device_lr(index, group, buckets[0].layout.device)
            else:
                self.host_lr(group)
            for bucket in buckets:
                bucket.t += 1
                if bucket.counter is not None:
                    bucket.counter.add_(1.0)
                self._step_bucket(group, bucket, grads)
        return loss

    def _step_buckets(self, index: int, group: dict, grads: list[Tensor | None]) -> list[_Bucket]:
        """The group's buckets for this step: cached while its parameters and which of them have grads stay put."""
        params = group["params"]
        ids = tuple(map(id, params))
        has_grad = tuple(map(operator.is_not, grads, itertools.repeat(None)))
        capturable = group["cuda_graphs"]
        cached = self._bucket_cache.get(index)
        if cached is not None and cached[0] == ids and cached[1] == has_grad and cached[3] == capturable:
            return cached[2]
        self._sync_steps()
        present = []
        for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
            if grad is None:
                continue
            dense_grad(p, type(self).__name__)
            state = self.state[p]
            if not state:
                self._init_state(group, p, state)
            present.append((i, p))
        steps = step_numbers([self.state[p] for _, p in present])  # device counters: one read, here only
        buckets = []
        for (_, dtype, t), positions in partition([p for _, p in present], steps).items():
            members = [present[j] for j in positions]
            bucket = self._bucket(group, members, dtype)
            bucket.t = t
            bucket.members = None if len(members) == len(params) else [i for i, _ in members]
            bucket.params = [p for _, p in members]
            bucket.states = [self.state[p] for _, p in members]
            bucket.counter = None
            if capturable:  # every state["step"] of the bucket is its device counter
                bucket.counter = torch.tensor(float(t), dtype=torch.float32, device=bucket.layout.device)
            for state in bucket.states:
                state["step"] = t if bucket.counter is None else bucket.counter
            buckets.append(bucket)
        self._bucket_cache[index] = (ids, has_grad, buckets, capturable)
        return buckets

    def _sync_steps(self) -> None:
        """Write each bucket's step count into its parameters' ``state["step"]`` (kept lazily during eager steps;
        in capturable mode they are the bucket's device counter)."""
        for _, _, buckets, _ in self._bucket_cache.values():
            for bucket in buckets:
                if bucket.counter is None:
                    for state in bucket.states:
                        state["step"] = bucket.t

    def state_dict(self) -> dict[str, Any]:
        self._sync_steps()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # new state tensors and dicts: buckets re-gather them on the next step
        self._bucket_cache.clear()
        self._buckets.clear()

    def _step_bucket(self, group: dict, b: _Bucket, grads: list[Tensor | None]) -> None:
        """One step of a bucket's tensors, on flat buffers: a fixed number of kernels for any tensor count."""
        with _indexed(b.tensors), _indexed(b.row_tensors):
            self._step_indexed(group, b, grads if b.members is None else [grads[i] for i in b.members])

    def _step_indexed(self, group: dict, b: _Bucket, grads: list[Tensor]) -> None:
        t, params, states, dtype = b.t, b.params, b.states, b.dtype
        # fresh flat copies: kept between steps they would cost 8 bytes per parameter
        g, theta = b.layout.gather(grads, dtype), b.layout.gather(params, dtype)
        warmup = group["warmup_steps"]
        if t == 1:
            b.state(states, "sign", torch.int8).copy_(g.sign())
            if self._needs_start(group):
                for state, p in zip(states, params, strict=True):
                    state["start"] = torch.empty(p.shape, dtype=dtype, device=p.device)
                b.state(states, "start", dtype).copy_(theta)
            self._seed_direction(group, b, g, states)
            return
        # eager: t is the step; capturable: ``steps`` is, on the device, and t a lower bound, so a phase the host
        # sees as passed stays passed and the others are chosen per step on the device
        steps = b.counter
        early = t <= warmup / 2  # capturable: warm-up's first half may still be on
        early_now = early if steps is None else steps <= warmup / 2
        if group["use_orthogonal_grad"]:
            if t > warmup:
                T.orthograd_(b.tensors, theta, g)  # g is this step's own gathered copy
            elif steps is not None:
                orthogonal = g.clone()
                T.orthograd_(b.tensors, theta, orthogonal)
                g = torch.where(steps > warmup, orthogonal, g)
                del orthogonal

        sign = g.sign().to(torch.int8)  # −1/0/+1 exactly, a quarter of an fp32 buffer
        update, lr_factor = self._direction(group, b, t if steps is None else steps, g, sign, states)

        # lr mask: grow where the sign repeats, shrink where it flips
        lr_bump = float(group["lr_bump"])
        mask = b.state(states, "lr_mask", dtype)
        prev_sign = b.state(states, "sign", torch.int8)
        agree = prev_sign * sign
        prev_sign.copy_(sign)
        del sign
        if early and "start" in states[0]:
            start = b.state(states, "start", dtype)
            grow, shrink = _prodigy_rates(g, theta, start, b, lr_bump, group["d_coef"])
            if steps is not None:  # the plain bump once the first half of warm-up is over
                grow, shrink = torch.where(early_now, grow, lr_bump), torch.where(early_now, shrink, lr_bump)
            _mask_step_(mask, agree, b.tensors.expand(grow), b.tensors.expand(shrink),
                        group["min_lr"], group["max_lr"])  # fmt: skip
        else:
            if "start" in states[0]:
                for state in states:
                    state.pop("start", None)
                b.drop("start")
            _mask_step_(mask, agree, lr_bump, lr_bump, group["min_lr"], group["max_lr"])
        del agree

        decays = early and group["weight_decay"] > 0
        avg_lr = self._per_tensor_state(b, states, "avg_lr")
        decay = self._per_tensor_state(b, states, "decay_factor") if decays else None
        freq = group["stats_update_freq"]
        if steps is None:
            if (t - 2) % freq == 0:
                avg_lr.copy_(b.tensors.mean(mask))
                if decays:
                    decay.copy_(_adaptive_decay(g, b))
        else:
            refresh = torch.remainder(steps - 2, freq) == 0
            avg_lr.copy_(torch.where(refresh, b.tensors.mean(mask), avg_lr))
            if decays:
                decay.copy_(torch.where(refresh & early_now, _adaptive_decay(g, b), decay))

        # decoupled adaptive weight decay folded into the update: θ ← θ − η ⊙ (u + wd·a_p·θ)
        if decays:
            coef = decay * group["weight_decay"]
            if steps is not None:
                coef = torch.where(early_now, coef, 0.0)
            update.addcmul_(theta, b.tensors.expand(coef))
        update.mul_(mask)

        # per-tensor factors (lr schedule, VRAdam) and ALLoRA rows, folded into one per-row factor; a device lr
        # (capturable mode) always multiplies: comparing it with 1 would read it back
        ratio = group["lr"] / group["mask_init_lr"]
        scales = isinstance(ratio, Tensor) or ratio != 1.0
        if lr_factor is not None and scales:
            lr_factor = lr_factor * ratio
        if b.lora is not None and any(b.lora):
            if lr_factor is not None:
                row_lr = b.row_tensors.expand(lr_factor)
            else:
                row_lr = ratio if scales else None
            T.allora_(b.layout, theta, update, group["alora_eta"], lora_rows=b.lora_rows, row_lr=row_lr)
        elif lr_factor is not None:
            update.mul_(b.tensors.expand(lr_factor))
        elif scales:
            update.mul_(ratio)

        theta.sub_(update)
        b.layout.scatter_(b.cached("param_rows", lambda: b.layout.rows(params)), theta)

    # -- checkpointing and logging -----------------------------------------------------------------------------

    def log_metrics(self) -> dict[str, Tensor]:
        """``avg_lr`` (element-weighted mean of the lr masks, as of the last statistics refresh), per group too."""
        metrics: dict[str, Tensor] = {}
        group_avgs, group_sizes = [], []
        for index, group in enumerate(self.param_groups):
            entries = [
                (self.state[p]["avg_lr"], p.numel()) for p in group["params"] if "avg_lr" in self.state[p]
            ]
            if not entries:
                continue
            size = sum(n for _, n in entries)
            dtype = functools.reduce(torch.promote_types, [a.dtype for a, _ in entries])
            avg = torch.stack([a.to(dtype) * (n / size) for a, n in entries]).sum()
            group_avgs.append(avg)
            group_sizes.append(size)
            if len(self.param_groups) > 1:
                metrics[f"avg_lr/group{index}"] = avg
        if group_avgs:
            total = sum(group_sizes)
            dtype = functools.reduce(torch.promote_types, [a.dtype for a in group_avgs])
            metrics["avg_lr"] = torch.stack(
                [a.to(dtype) * (n / total) for a, n in zip(group_avgs, group_sizes, strict=True)]
            ).sum()
        return metrics


# ---------------------------------------------------------------------------------------------------------------
# Automagic_Sinkgd
# ---------------------------------------------------------------------------------------------------------------


class Automagic_Sinkgd(_AutomagicBase):  # noqa: N801 - the name users type (Hina's)
    """Automagic with a SinkGD-normalised Grams update.

    Direction: m ← β₁m + (1−β₁)g (m seeded with g at step 1, no update then: ADOPT's rule, which also means a
    zero first gradient, as for lora_down under a zero lora_up, cannot blow up step 2); u = sign(g)·|m| (Grams);
    matrices: K SinkGD iterations (K = 4, 5 with ``full_finetune``); tensors with < 2 dims: scaled to unit RMS.
    The step is additionally scaled by the VRAdam factor 1/(1 + min(3·Σm², 10)) of the tensor.

    ``full_finetune`` means "not a LoRA": 5 SinkGD iterations and, for parameters without names, no ALLoRA.
    ALLoRA applies to parameters whose group ``names`` mark them as LoRA matrices (``lora_down``/``lora_up``),
    or, without names, to every tensor with 2+ dims unless ``full_finetune``.

    ``cuda_graphs=True`` (the default): capturable mode (the module docstring), so the trainer records the whole
    step, SinkGD's row/column passes included, under ``--cuda_graphs``; ``cuda_graphs=False`` keeps Python numbers.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-5,
        min_lr: float = 1e-6,
        max_lr: float = 1e-2,
        lr_bump: float = 1e-5,
        alora_eta: float = 2.0,
        beta1: float = 0.9,
        d_coef: float = 2.0,
        weight_decay: float = 5e-4,
        warmup_steps: int = 500,
        full_finetune: bool = False,
        use_orthogonal_grad: bool = False,
        stats_update_freq: int = 5,
        cuda_graphs: bool = True,
    ) -> None:
        require(type(self).__name__, "beta1", beta1, 0.0 <= beta1 < 1.0, "in [0, 1)")
        defaults = dict(lr=lr, min_lr=min_lr, max_lr=max_lr, lr_bump=lr_bump, alora_eta=alora_eta,
                        beta1=beta1, d_coef=d_coef, weight_decay=weight_decay, warmup_steps=warmup_steps,
                        full_finetune=full_finetune, use_orthogonal_grad=use_orthogonal_grad,
                        stats_update_freq=stats_update_freq, cuda_graphs=cuda_graphs)  # fmt: skip
        super().__init__(params, defaults)

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        super()._init_state(group, p, state)
        state["exp_avg"] = torch.zeros_like(p, dtype=work_dtype(p), memory_format=torch.contiguous_format)

    def _seed_direction(self, group: dict, b: _Bucket, g: Tensor, states: list[dict]) -> None:
        b.state(states, "exp_avg", b.dtype).copy_(g)

    def _direction(
        self, group: dict, b: _Bucket, step: int, g: Tensor, sign: Tensor, states: list[dict]
    ) -> tuple[Tensor, Tensor | None]:
        momentum = b.state(states, "exp_avg", b.dtype)
        momentum.lerp_(g, 1.0 - group["beta1"])
        update = torch.abs(momentum).mul_(sign)  # Grams: |m| with the sign of g
        _sinkgd_flat_(update, b, 5 if group["full_finetune"] else 4)
        return update, _vradam(momentum, b)


# ---------------------------------------------------------------------------------------------------------------
# Automagic_CameAMP
# ---------------------------------------------------------------------------------------------------------------


class Automagic_CameAMP(_AutomagicBase):  # noqa: N801 - the name users type (Hina's)
    """Automagic with a CAME update (Hina's "Automagic CameAMP"), optionally with an 8-bit first moment.

    CAME (Luo et al. 2023): v (factored into row/column means for matrices, full for < 2 dims) tracks g² + ε₁;
    u = g/√v, clipped to RMS ≤ ``clip_threshold``; m ← β₁m + (1−β₁)u; the instability U = (u − m)² + ε₂ is
    tracked the same way as R (β₃) and the direction is m/√R̂. Two choices of ours: the seed step sets v to
    g² + ε₁ (ADOPT's v₀ = g₀², so step 2 is not inflated by a v that starts at zero), and R is bias-corrected,
    R̂ = R/(1−β₃^k) for the k-th update — without it CAME's first steps are up to 100/√k times larger, for
    thousands of steps with β₃ = 0.9999.

    Defaults: ``lr=1e-4`` and ``max_lr=1e-3`` because CAME's direction has Adam-like unit scale and Adam-family
    LoRA training of SD runs at ~1e-4 (the original CameAMP capped its mask at 1e-3 too); the other mask/warm-up
    arguments mean the same as in :class:`Automagic_Sinkgd`. ``optim_bits=8`` stores m block-wise quantised (uint8
    codes + fp32 absmax per 256 elements) for tensors of ≥ 4096 elements; the factored moments are already tiny
    and the lr mask stays fp32 (8-bit or 16-bit masks cannot represent ``lr_bump`` steps).

    ``cuda_graphs=True`` (the default): capturable mode (the module docstring); R's bias correction is then
    computed on the device from the step counter.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        min_lr: float = 1e-6,
        max_lr: float = 1e-3,
        lr_bump: float = 1e-5,
        alora_eta: float = 2.0,
        d_coef: float = 2.0,
        weight_decay: float = 5e-4,
        warmup_steps: int = 500,
        full_finetune: bool = False,
        use_orthogonal_grad: bool = False,
        stats_update_freq: int = 5,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        optim_bits: int = 32,
        cuda_graphs: bool = True,
    ) -> None:
        name = type(self).__name__
        require(
            name,
            "betas",
            betas,
            len(betas) == 3 and all(0.0 <= b < 1.0 for b in betas),
            "3 values in [0, 1)",
        )
        require(name, "eps", eps, len(eps) == 2 and all(e > 0 for e in eps), "2 values > 0")
        require(name, "clip_threshold", clip_threshold, clip_threshold > 0, "> 0")
        require(name, "optim_bits", optim_bits, optim_bits in (8, 32), "8 or 32")
        defaults = dict(lr=lr, min_lr=min_lr, max_lr=max_lr, lr_bump=lr_bump, alora_eta=alora_eta, d_coef=d_coef,
                        weight_decay=weight_decay, warmup_steps=warmup_steps, full_finetune=full_finetune,
                        use_orthogonal_grad=use_orthogonal_grad, stats_update_freq=stats_update_freq,
                        betas=tuple(betas), eps=tuple(eps), clip_threshold=clip_threshold, optim_bits=optim_bits,
                        cuda_graphs=cuda_graphs)  # fmt: skip
        super().__init__(params, defaults)

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        super()._init_state(group, p, state)
        dtype = work_dtype(p)
        if group["optim_bits"] == 8 and p.numel() >= MIN_8BIT_NUMEL:
            quant8.init_state(state, "exp_avg", p, signed=True)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        if p.dim() >= 2:
            n, m = matrix_shape(p.shape)
            for key, size in (("v_row", n), ("v_col", m), ("r_row", n), ("r_col", m)):
                state[key] = torch.zeros(size, dtype=dtype, device=p.device)
        else:
            state["v"] = torch.zeros_like(p, dtype=dtype)
            state["r"] = torch.zeros_like(p, dtype=dtype)

    @staticmethod
    def _factored(b: _Bucket, states: list[dict], name: str) -> tuple[Tensor, Tensor]:
        """Flat (row, column) buffers of moment ``name`` ("v" or "r"), layout order, resolved once.

        Rows: a matrix's ``{name}_row``, or the full ``{name}`` of a tensor with < 2 dims (its rows have one
        element). Columns: a matrix's ``{name}_col``; a tensor with < 2 dims has a private unused slot there, so
        the column buffer lines up with the layout's column stacks.
        """

        def gather() -> tuple[Tensor, Tensor]:
            arranged = b.layout.arrange(states)
            spare = b.cached("spare", lambda: [{f"{n}_col": torch.ones(1, dtype=b.dtype, device=b.layout.device)
                                                for n in ("v", "r")} for _ in arranged])  # fmt: skip
            row_keys = [f"{name}_row" if is_mat else name for is_mat in b.is_matrix]
            col_dicts = [s if is_mat else own for is_mat, s, own in zip(b.is_matrix, arranged, spare, strict=True)]
            rows = b.packed.buffer(f"{name}_row", arranged, row_keys, b.dtype)
            return rows, b.packed.buffer(f"{name}_col", col_dicts, f"{name}_col", b.dtype)

        return b.cached(name + "_factored", gather)

    def _seed_direction(self, group: dict, b: _Bucket, g: Tensor, states: list[dict]) -> None:
        v_row, v_col = self._factored(b, states, "v")
        sq = (g * g).add_(group["eps"][0])
        v_row.copy_(b.row_mean(sq))
        v_col.copy_(b.col_mean(sq))

    def _direction(
        self, group: dict, b: _Bucket, step: int | Tensor, g: Tensor, sign: Tensor, states: list[dict]
    ) -> tuple[Tensor, Tensor | None]:
        beta3 = group["betas"][2]
        # R's bias correction (step 1 only seeded v); capturable: from the device counter, in the lr's precision
        if isinstance(step, Tensor):
            bias = torch.pow(beta3, step.to(group["lr"].dtype) - 1.0).neg_().add_(1.0).sqrt_()
        else:
            bias = math.sqrt(1.0 - beta3 ** (step - 1))
        return self._came(group, b, g, states, bias), None

    @staticmethod
    def _moment(b: _Bucket, states: list[dict]) -> quant8.FlatQuantState | None:
        """The 8-bit store of the first moments when some are 8-bit (tensors of ≥ ``MIN_8BIT_NUMEL``), else None."""

        def make() -> tuple[quant8.FlatQuantState | None]:
            quantised = [quant8.has_state(s, "exp_avg") for s in states]
            return (quant8.FlatQuantState(b.layout, quantised) if any(quantised) else None,)

        return b.cached("moment8", make)[0]

    def _came(self, group: dict, b: _Bucket, g: Tensor, states: list[dict], bias: float | Tensor) -> Tensor:
        """CAME's direction m/√R̂ (``bias`` = √(1−β₃ᵏ), a float or a 0-d device tensor)."""
        beta1, beta2, beta3 = group["betas"]
        eps1, eps2 = group["eps"]
        v_row, v_col = self._factored(b, states, "v")
        r_row, r_col = self._factored(b, states, "r")

        sq = (g * g).add_(eps1)
        v_row.lerp_(b.row_mean(sq), 1.0 - beta2)
        v_col.lerp_(b.col_mean(sq), 1.0 - beta2)
        update = _factored_rsqrt(v_row, v_col, b).mul_(g)
        rms = b.tensors.sum(update * update).div_(b.numel).sqrt_()
        update.div_(b.tensors.expand(rms.div_(group["clip_threshold"]).clamp_min_(1.0)))

        store8 = self._moment(b, states)
        if store8 is None:
            moment = b.state(states, "exp_avg", b.dtype)
        else:
            moment = store8.load(states, "exp_avg", signed=True, dtype=b.dtype)
        moment.lerp_(update, 1.0 - beta1)

        instability = update.sub_(moment).square_().add_(eps2)
        r_row.lerp_(b.row_mean(instability), 1.0 - beta3)
        r_col.lerp_(b.col_mean(instability), 1.0 - beta3)
        direction = _factored_rsqrt(r_row, r_col, b, bias).mul_(moment)
        if store8 is not None:
            store8.store_("exp_avg", moment, signed=True)  # last: storing may use the buffer as scratch
        return direction
