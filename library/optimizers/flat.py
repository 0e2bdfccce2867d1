"""Many small tensors as segments of one flat buffer: a LoRA optimizer step in a fixed, small number of kernels.

A LoRA step touches hundreds of tensors of a few thousand elements each, so on a GPU it is bound by kernel
launches, not by memory bandwidth. ``torch._foreach_*`` helps only for plain arithmetic: per-tensor scalars (lists
of 0-d tensors) and mixed shapes send CUDA foreach kernels down a per-tensor slow path, and per-tensor reductions
have no foreach form at all. Laying the tensors end to end in one 1-D buffer makes every elementwise op one
kernel, per-tensor reductions one ``segment_reduce``, and per-tensor scalars one ``repeat_interleave``. The same
idea as DDP's gradient buckets or apex's flat master weights; written here because neither is a public API that
an optimizer can use.

Tensors are ordered by matrix shape (dim 0 × the rest), so all tensors of one shape form one contiguous slice
that views as a [k, rows, cols] stack: row and column math (ALLoRA, SinkGD, factored moments) is one kernel per
distinct shape, not per tensor (:func:`reduce_stacks`, :func:`broadcast_stacks`, :func:`outer_into`). Every
per-tensor list a caller builds must be in ``layout.order``. Optimizer state stays per parameter, as torch.optim's
state_dict wants it, but as views of flat buffers (:class:`FlatState` for tensors shaped like their parameter,
:class:`PackedState` for any others), so the math updates all of it in one kernel.

The optimizer side: :func:`partition` is the one grouping of a param group's tensors into what can share flat
buffers (device, working dtype); a :class:`FlatBucket` is such a group laid out once and reused while the same
tensors step, and :class:`FlatOptimizer` is the torch.optim class that steps bucket by bucket, so an algorithm is
its per-bucket update over flat buffers and nothing else.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from library.optimizers.names import group_names
from library.optimizers.state import ExactStateLoad, closure_loss, dense_grad, work_dtype

_DTYPE = operator.attrgetter("dtype")


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of a tensor read as a matrix: dim 0 by the rest; 1-D as a column, 0-D as 1×1."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])



def segment_ids(lengths: Tensor, total: int) -> Tensor:
    """Index of each element's segment (segments of ``lengths`` end to end), int32: built once per step, so
    spreading per-segment values is one ``index_select`` (``repeat_interleave`` rebuilds this index per call)."""
    positions = torch.arange(lengths.numel(), dtype=torch.int32, device=lengths.device)
    return torch.repeat_interleave(positions, lengths, output_size=total)


def chunk_positions(shapes: Sequence[Sequence[int]], bound: int) -> list[list[int]]:
    """Positions of ``shapes`` split into runs of whole tensors of at most ``bound`` elements each (a tensor larger
    than ``bound`` alone), cut from the tensors sorted by matrix shape as :class:`FlatLayout` sorts them (so each
    run holds few shapes), each run in ascending position; balanced: the fewest runs the bound allows, of
    near-equal size. A step over one run at a time keeps its full-size temporaries at the
    size of a run instead of the whole set; the runs are fixed when laid out, so a captured step stays valid."""
    order = sorted(range(len(shapes)), key=lambda i: matrix_shape(shapes[i]))
    sizes = [math.prod(shapes[i]) for i in order]
    target = math.ceil(sum(sizes) / max(1, math.ceil(sum(sizes) / bound))) if sizes else bound
    runs: list[list[int]] = []
    filled = 0
    for i, size in zip(order, sizes, strict=True):
        if not runs or (filled and filled + size > target):
            runs.append([])
            filled = 0
        runs[-1].append(i)
        filled += size
    return [sorted(run) for run in runs]


@dataclass(frozen=True)
class ShapeBucket:
    """Layout positions [first, last) share the matrix shape (rows, cols); flat elements [start, stop)."""

    rows: int
    cols: int
    first: int
    last: int
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.last - self.first


class FlatLayout:
    """Where each of a list of tensors lives in a flat 1-D buffer (on one device).

    ``order[j]`` is the caller's index of the tensor at layout position j. Segment ops (``sum``, ``max``,
    ``mean``, ``expand``) work in layout order.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], device: torch.device | str) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        self.device = torch.device(device)
        self.order = self._ordering(self.shapes)
        self.sizes = [self.shapes[i].numel() for i in self.order]
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = sum(self.sizes)
        self.count = len(self.sizes)
        self.lengths = torch.tensor(self.sizes, dtype=torch.int64, device=self.device)
        # segment_reduce with offsets and unsafe=True: the checked form validates lengths with .item() (host syncs)
        self._segment_offsets = torch.tensor([*self.offsets, self.numel], dtype=torch.int64, device=self.device)
        self.buckets = self._buckets()

    @staticmethod
    def _ordering(shapes: Sequence[torch.Size]) -> list[int]:
        return sorted(range(len(shapes)), key=lambda i: matrix_shape(shapes[i]))

    def _buckets(self) -> list[ShapeBucket]:
        buckets: list[ShapeBucket] = []
        j = 0
        while j < self.count:
            key = matrix_shape(self.shapes[self.order[j]])
            last = j
            while last < self.count and matrix_shape(self.shapes[self.order[last]]) == key:
                last += 1
            start = self.offsets[j]
            stop = self.offsets[last - 1] + self.sizes[last - 1]
            buckets.append(ShapeBucket(key[0], key[1], j, last, start, stop))
            j = last
        return buckets

    def arrange(self, items: Sequence[Any]) -> list[Any]:
        """The caller's per-tensor list in layout order."""
        return [items[i] for i in self.order]

    def flatten(self, tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """One new buffer holding the tensors (caller's order) end to end, in `dtype` (one cat, maybe one cast)."""
        flat = torch.cat([tensors[i].reshape(-1) for i in self.order])
        return flat if dtype is None or flat.dtype == dtype else flat.to(dtype)

    @functools.cached_property
    def _arrange(self):
        """``arrange`` as one C-level call (an itemgetter), for per-step use."""
        if self.count == 1:
            return lambda items: (items[0],)
        return operator.itemgetter(*self.order)

    @functools.cached_property
    def _any_scalar(self) -> bool:
        return any(len(shape) == 0 for shape in self.shapes)

    def gather(self, tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """A new flat buffer of ``dtype`` holding the tensors (caller's order), never a view of them.

        ``_chunk_cat`` with one chunk is ``cat`` of the flattened tensors in one op (no per-tensor view to
        dispatch); it needs at least one dim and one dtype, hence a plain ``cat`` when a 0-d tensor is among
        them or dtypes are mixed. A step gathers its gradients and weights this way instead of keeping flat copies
        between steps.
        """
        ordered = list(self._arrange(tensors))
        if self._any_scalar or len(set(map(_DTYPE, ordered))) > 1:
            flat = torch.cat([t.reshape(-1).to(dtype) for t in ordered])
        else:
            flat = torch._chunk_cat(ordered, 0, 1).view(-1)
        return flat if flat.dtype == dtype else flat.to(dtype)

    def rows(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Targets for :meth:`scatter_` in layout order: 1-D views of the tensors (caller's order) when all are
        contiguous, else the tensors themselves."""
        ordered = [t.detach() for t in self._arrange(tensors)]
        if all(t.is_contiguous() for t in ordered):
            return [t.view(-1) for t in ordered]
        return ordered

    def scatter_(self, rows: list[Tensor], flat: Tensor) -> None:
        """Write `flat` into :meth:`rows` (one split and one foreach copy, cast to their dtype; per-tensor views
        of `flat` when the targets are not 1-D views)."""
        pieces = torch.split_with_sizes(flat, self.sizes)
        if not all(map((1).__eq__, map(Tensor.dim, rows))):
            pieces = [piece.view(t.shape) for piece, t in zip(pieces, rows, strict=True)]
        torch._foreach_copy_(rows, pieces)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of `flat` shaped like the tensors, in the caller's order."""
        views: list[Tensor] = [flat] * self.count
        for j, i in enumerate(self.order):
            views[i] = flat[self.offsets[j] : self.offsets[j] + self.sizes[j]].view(self.shapes[i])
        return views

    def copy_to_(self, tensors: Sequence[Tensor], flat: Tensor) -> None:
        """Write `flat` back into the caller's tensors (one foreach copy; casts to each tensor's dtype)."""
        torch._foreach_copy_(list(tensors), self.views(flat))

    def sum(self, x: Tensor) -> Tensor:
        """Per-tensor sums of a flat buffer, in layout order (one kernel, no host sync)."""
        return torch.segment_reduce(x, "sum", offsets=self._segment_offsets, unsafe=True)

    def max(self, x: Tensor) -> Tensor:
        """Per-tensor maxima of a flat buffer, in layout order (-inf for an empty tensor)."""
        return torch.segment_reduce(x, "max", offsets=self._segment_offsets, unsafe=True)

    def mean(self, x: Tensor) -> Tensor:
        """Per-tensor means of a flat buffer, in layout order."""
        return torch.segment_reduce(x, "mean", offsets=self._segment_offsets, unsafe=True)

    def norm(self, x: Tensor) -> Tensor:
        """Per-tensor L2 norms of a flat buffer, in layout order."""
        return self.sum(x * x).sqrt()

    def to_caller_order(self, values: Tensor) -> Tensor:
        """Per-tensor values (layout order) in the caller's order, for results handed back per tensor."""
        index = torch.tensor(self.order, device=values.device)
        return torch.empty_like(values).index_copy_(0, index, values)

    def row_layout(self) -> FlatLayout:
        """The layout of one value per matrix row of every tensor (row vectors shaped ``(rows,)``), in this
        layout's order: per-tensor math on per-row values (a factored moment's row mean, a row factor spread
        over its tensor's rows) is then this layout's segment math. The order is kept because tensors are
        already sorted by rows first, and sorting is stable."""
        rows = FlatLayout([(b.rows,) for b in self.buckets for _ in range(b.count)], self.device)
        assert rows.order == list(range(self.count))
        return rows

    def expand(self, values: Tensor) -> Tensor:
        """Per-tensor values (layout order) repeated over each tensor's elements: a flat buffer to multiply by."""
        return torch.repeat_interleave(values, self.lengths, output_size=self.numel)

    def bucket_view(self, flat: Tensor, bucket: ShapeBucket) -> Tensor:
        """The [count, rows, cols] stack of one shape bucket, a view of `flat`."""
        return flat[bucket.start : bucket.stop].view(bucket.count, bucket.rows, bucket.cols)


def reduce_stacks(stacks: Sequence[Tensor], reduce: Callable[..., Tensor], dim: int,
                  out: Tensor | None = None) -> Tensor:  # fmt: skip
    """``reduce(stack, dim=dim)`` of every stack, end to end in one 1-D tensor (``out`` or a new one): one
    kernel per stack, no cat.

    Stacks are views of a flat buffer whose last two dims are matrices: ``dim=-1`` gives one value per row
    (``row_stacks`` of :mod:`~library.optimizers.transforms`, flat row order), ``dim=-2`` one per column
    (:func:`column_stacks`, (tensor, column) order). ``reduce`` is ``torch.sum``/``mean``/``linalg.vector_norm``
    or any reduction taking ``dim`` and ``out``.
    """
    if out is None:
        out = torch.empty(sum(s.numel() // s.shape[dim] for s in stacks), dtype=stacks[0].dtype,
                          device=stacks[0].device)  # fmt: skip
    start = 0
    for stack in stacks:
        shape = list(stack.shape)
        del shape[dim]
        count = math.prod(shape)
        reduce(stack, dim=dim, out=out[start : start + count].view(shape))
        start += count
    return out


def broadcast_stacks(stacks: Sequence[Tensor], values: Tensor, dim: int) -> list[Tensor]:
    """Views of ``values`` (one per row or column, as :func:`reduce_stacks` lays them out) shaped to broadcast
    against each stack along ``dim``: ``torch._foreach_div_(stacks, broadcast_stacks(stacks, v, -1))`` divides
    every row by its value in place, with no per-element copy of ``values``."""
    views, start = [], 0
    for stack in stacks:
        shape = list(stack.shape)
        shape[dim] = 1
        count = math.prod(shape)
        views.append(values[start : start + count].view(shape))
        start += count
    return views


def column_stacks(layout: FlatLayout, flat: Tensor) -> list[Tensor]:
    """The [count, rows, cols] view of each shape bucket of `flat`: column math is one kernel per shape."""
    return [layout.bucket_view(flat, b) for b in layout.buckets]


def outer_into(stacks: Sequence[Tensor], rows: Tensor, cols: Tensor) -> None:
    """Write (row value) × (column value) into every element of the [count, rows, cols] ``stacks``
    (:func:`column_stacks`), one kernel per shape: a factored second moment (Adafactor, CAME) expanded in place."""
    for stack, row, col in zip(stacks, broadcast_stacks(stacks, rows, -1), broadcast_stacks(stacks, cols, -2),
                               strict=True):  # fmt: skip
        torch.mul(row, col, out=stack)


class PackedState:
    """Per-parameter state tensors of any shapes kept as views of one flat buffer per name.

    ``state[key]`` stays the per-parameter tensor torch.optim's state_dict expects (so checkpoints keep their
    format); it is a view of the flat buffer, which the math updates in one kernel. A buffer packs
    ``dicts[i][keys[i]]`` in the order given: tensors under different keys or not shaped like their parameter
    (factored row/column moments, per-tensor scalars) pack as well. When something replaced a per-parameter
    tensor (``load_state_dict``, a user), ``buffer`` notices by identity and gathers them again.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, tuple[Tensor, list[Tensor]]] = {}

    def buffer(self, name: str, dicts: Sequence[dict[str, Any]], keys: str | Sequence[str], dtype: torch.dtype,
               layout: Any = None) -> Tensor:  # fmt: skip
        """The flat buffer ``name`` behind ``dicts[i][keys[i]]`` (``keys``: one key for all, or one per dict),
        re-gathered if one was replaced; the identity test runs in C (``map``), as it runs every step. The
        tensors lie end to end in the order given, or where ``layout`` (its ``flatten``/``views``) puts them."""
        if isinstance(keys, str):
            keys = [keys] * len(dicts)
        cached = self._buffers.get(name)
        if cached is not None:
            flat, views = cached
            if flat.dtype == dtype and all(map(operator.is_, map(operator.getitem, dicts, keys), views)):
                return flat
        tensors = list(map(operator.getitem, dicts, keys))
        if layout is not None:
            flat = layout.flatten(tensors, dtype)
            views = layout.views(flat)
        else:
            flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
            pieces = flat.split_with_sizes([t.numel() for t in tensors])
            views = [piece.view(t.shape) for piece, t in zip(pieces, tensors, strict=True)]
        for d, k, view in zip(dicts, keys, views, strict=True):
            d[k] = view
        self._buffers[name] = (flat, views)
        return flat

    def keep(self, name: str, flat: Tensor, views: list[Tensor]) -> None:
        """Adopt ``flat`` as buffer ``name`` whose per-parameter ``views`` the caller has handed out."""
        self._buffers[name] = (flat, views)

    def drop(self, name: str) -> None:
        """Forget one buffer (its per-parameter views stay valid tensors)."""
        self._buffers.pop(name, None)


class FlatState:
    """Per-parameter optimizer state tensors shaped like their parameters, kept as views into flat buffers of one
    layout (a :class:`PackedState` placed by the layout), so a state buffer lines up with the flat gradients."""

    def __init__(self, layout: FlatLayout) -> None:
        self.layout = layout
        self._packed = PackedState()

    def buffer(self, states: Sequence[dict[str, Any]], key: str, dtype: torch.dtype) -> Tensor:
        """The flat buffer behind ``states[i][key]`` (caller's order), re-gathered if any of them was replaced."""
        return self._packed.buffer(key, states, key, dtype, self.layout)

    @classmethod
    def in_order(cls, shapes: Sequence[Sequence[int]], device: torch.device | str) -> FlatState:
        """A store of per-tensor state not shaped like its parameter, listed in a parameter layout's order
        (:class:`InOrderLayout`)."""
        return cls(InOrderLayout(shapes, device))

    def filled(self, states: Sequence[dict[str, Any]], key: str, dtype: torch.dtype, fill: float) -> Tensor:
        """:meth:`buffer`, after giving the states without ``key`` a tensor of their shape filled with ``fill``.

        For state an optimizer creates on first use (or for a tensor that joins later): when every state lacks it,
        the flat buffer is allocated filled and its views handed out, one allocation and no gather.
        """
        missing = [i for i, s in enumerate(states) if key not in s]
        if missing and len(missing) == len(states):
            flat = torch.full((self.layout.numel,), fill, dtype=dtype, device=self.layout.device)
            views = self.layout.views(flat)
            for s, v in zip(states, views, strict=True):
                s[key] = v
            self._packed.keep(key, flat, views)
            return flat
        for i in missing:
            states[i][key] = torch.full(self.layout.shapes[i], fill, dtype=dtype, device=self.layout.device)
        return self.buffer(states, key, dtype)

    def drop(self, key: str) -> None:
        """Forget one buffer (its per-parameter views stay valid tensors)."""
        self._packed.drop(key)


class InOrderLayout(FlatLayout):
    """A :class:`FlatLayout` that keeps the order it is given instead of sorting by matrix shape.

    For per-tensor state not shaped like its parameter (Adam-mini's block moments, SGG's cluster tables and
    labels, SAC's per-row scales) listed in a parameter layout's order: entry j belongs to the parameter at layout
    position j, so the state buffer lines up with the parameter buffer's segments.
    """

    @staticmethod
    def _ordering(shapes: Sequence[torch.Size]) -> list[int]:
        return list(range(len(shapes)))


def segment_sort(x: Tensor, segment: Tensor) -> Tensor:
    """Values of flat ``x`` sorted within each segment (``segment``: each element's segment, contiguous and
    ascending): two sorts, no loop over segments."""
    values, order = x.sort()
    _, regroup = segment.index_select(0, order).sort(stable=True)
    return values.index_select(0, regroup)


def partition(tensors: Sequence[Tensor], *keys: Sequence[Hashable]) -> dict[tuple, list[int]]:
    """Positions of ``tensors`` per (device, working dtype, *keys): the tensors that can share flat buffers.

    A flat buffer lives on one device and computes in one dtype (:func:`~library.optimizers.state.work_dtype`:
    fp16 and bf16 weights share fp32 buffers); ``keys`` are the caller's further per-tensor distinctions (the
    weights' own dtype, 8-bit state or not). Groups come in order of first appearance, positions ascending.
    """
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, work_dtype(t), *(k[i] for k in keys)), []).append(i)
    return groups


class FlatBucket:
    """Parameters of one param group, device and working dtype laid out flat: what their step reuses.

    Holds the :class:`FlatLayout`, the parameter-shaped :class:`FlatState`, 1-D views of the parameters (their own
    storage) that take a flat update back in one foreach op, and ``cache`` for the optimizer's own per-layout
    constants. Nothing per element besides the state: a step's flat gradients and updates are its temporaries.
    """

    def __init__(self, params: Sequence[Tensor], dtype: torch.dtype) -> None:
        self.params = tuple(params)
        self.dtype = dtype
        self.layout = FlatLayout([p.shape for p in params], params[0].device)
        self.state = FlatState(self.layout)
        self.cache: dict[Any, Any] = {}
        self.rows = self.layout.rows(self.params)
        self._flat_rows = all(t.dim() == 1 for t in self.rows)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for j, t in enumerate(self.rows):
            by_dtype.setdefault(t.dtype, []).append(j)
        self._by_dtype = by_dtype

    def matches(self, params: Sequence[Tensor]) -> bool:
        return len(params) == len(self.params) and all(map(operator.is_, params, self.params))

    def gather_grads(self) -> Tensor:
        """The gradients as one new flat buffer of the working dtype (layout order), the step's to spend."""
        return self.layout.gather([p.grad for p in self.params], self.dtype)

    def per_tensor(self, values: Sequence[float]) -> float | Tensor:
        """Host-computed per-tensor numbers (layout order): a Python float when all agree (the common case: every
        tensor at the same step), else one (count,) device tensor, copied once."""
        if all(v == values[0] for v in values):
            return values[0]
        return torch.tensor(values, dtype=self.dtype).to(self.layout.device, non_blocking=True)

    def per_element(self, values: Sequence[float]) -> float | Tensor:
        """:meth:`per_tensor`, spread over each tensor's elements when they differ."""
        value = self.per_tensor(values)
        return value if isinstance(value, float) else self.layout.expand(value)

    def apply_(self, update: Tensor, lr: float, weight_decay: float = 0.0) -> None:
        """θ ← θ·(1 − lr·wd) − lr·u from a flat update u (layout order): decoupled weight decay, as AdamW.

        Two foreach ops over the parameters' 1-D views. Weights of another dtype than the working one (bf16 in an
        fp32 bucket) take u rounded to their dtype, one cast per dtype.
        """
        if weight_decay != 0.0:
            torch._foreach_mul_(self.rows, 1.0 - lr * weight_decay)
        for dtype, positions in self._by_dtype.items():
            pieces = self._pieces(update if dtype == update.dtype else update.to(dtype))
            if len(positions) == len(self.rows):
                torch._foreach_add_(self.rows, pieces, alpha=-lr)
            else:
                torch._foreach_add_([self.rows[j] for j in positions], [pieces[j] for j in positions], alpha=-lr)

    def _pieces(self, flat: Tensor) -> list[Tensor] | tuple[Tensor, ...]:
        pieces = torch.split_with_sizes(flat, self.layout.sizes)
        if self._flat_rows:
            return pieces
        return [piece.view(t.shape) for piece, t in zip(pieces, self.rows, strict=True)]


def flat_buckets(cache: dict[Any, FlatBucket], key: Hashable, params: Sequence[Tensor]) -> list[FlatBucket]:
    """A :class:`FlatBucket` per (device, working dtype) of ``params``, reused from ``cache`` while it holds the
    same tensors (rebuilt when the set of tensors with gradients changes)."""
    buckets = []
    for (device, dtype), positions in partition(params).items():
        members = [params[i] for i in positions]
        bucket = cache.get((key, device, dtype))
        if bucket is None or not bucket.matches(members):
            bucket = cache[(key, device, dtype)] = FlatBucket(members, dtype)
        buckets.append(bucket)
    return buckets


class FlatOptimizer(ExactStateLoad, torch.optim.Optimizer):
    """A torch.optim optimizer whose step runs once per :class:`FlatBucket` of each param group.

    Subclasses define ``_init_state(p, name, state, group)`` (a tensor's first step, after ``state["step"] = 0``)
    and ``_step_bucket(group, bucket, states)`` (``states`` parallel to ``bucket.params``, every ``step``
    advanced). The buckets live in ``__dict__``: torch.optim's ``__getstate__`` drops them, so a copied or
    unpickled optimizer lays its tensors out again.
    """

    def _init_state(self, p: Tensor, name: str | None, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _step_bucket(self, group: dict[str, Any], bucket: FlatBucket, states: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        cache = self.__dict__.setdefault("_flat_buckets", {})
        for index, group in enumerate(self.param_groups):
            for bucket in flat_buckets(cache, index, self._advance(group)):
                self._step_bucket(group, bucket, [self.state[p] for p in bucket.params])
        return loss

    def _advance(self, group: dict[str, Any]) -> list[Tensor]:
        """The group's tensors that have a (dense) gradient, their states created on first use, steps advanced."""
        params = []
        for p, name in zip(group["params"], group_names(group), strict=True):
            if p.grad is None:
                continue
            dense_grad(p, type(self).__name__)
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                self._init_state(p, name, state, group)
            state["step"] += 1
            params.append(p)
        return params
