"""8-bit block-wise quantised optimizer state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

A state tensor is stored as uint8 codes (same shape as the tensor) plus one fp32 absmax per block of
``BLOCKSIZE`` elements. Codes index bitsandbytes' dynamic (exponent-rich) quantisation map: the signed map for
first moments, the unsigned one for non-negative second moments, as bitsandbytes' own 8-bit optimizers do.
Decoding is bitsandbytes' ``dequantize_blockwise`` kernel. Encoding is ours, five torch ops per buffer
(block absmax, scale, ``bucketize`` against the map's midpoints): bitsandbytes' CUDA quantize kernel launches on
the legacy default stream, so it is silently left out of a captured CUDA graph (a step recorded under
``--cuda_graphs``), and its binary search is not always the nearest code (0.2-0.3% of codes, one step off, measured on its CPU
kernel); ours is exactly the nearest code, ties to the lower one, on every device. The state is two plain
tensors, so ``state_dict()`` needs nothing special; an optimizer keeps them under ``<name>_codes`` /
``<name>_absmax`` (see :func:`init_state` / :func:`load` / :func:`store_`).

Typical use inside a step: ``x = load(state, "exp_avg", signed=True)`` → update ``x`` in fp32 →
``store_(state, "exp_avg", x, signed=True)``. For many tensors at once, :class:`FlatQuantState` keeps the codes
of a whole :class:`~library.optimizers.flat.FlatLayout` in one buffer: one dequantisation and one quantisation
call per step, bit-identical to quantising each tensor on its own.
"""

from __future__ import annotations

import operator
from operator import itemgetter

import torch
from torch import Tensor

from library.errors import OptimizerUnavailable
from library.optimizers.flat import FlatLayout, PackedState

# Small blocks keep outliers local; 256 is what bitsandbytes' blockwise 8-bit optimizers use.
BLOCKSIZE = 256

_maps: dict[tuple[bool, torch.device], Tensor] = {}


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a pinned requirement
        raise OptimizerUnavailable(
            f"optim_bits=8 needs bitsandbytes (import failed: {exc}); pip install bitsandbytes or use optim_bits=32"
        ) from exc
    return bnb_functional


def quant_map(signed: bool, device: torch.device) -> Tensor:
    """The 256-entry dynamic quantisation map (signed for moments, unsigned for squared moments)."""
    key = (signed, torch.device(device))
    if key not in _maps:
        _maps[key] = _bnb_functional().create_dynamic_map(signed=signed).to(device)
    return _maps[key]


def num_blocks(numel: int, blocksize: int = BLOCKSIZE) -> int:
    return (numel + blocksize - 1) // blocksize


def quantize(x: Tensor, *, signed: bool) -> tuple[Tensor, Tensor]:
    """Return (codes uint8 shaped like x, absmax fp32 per block)."""
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(x.numel()), dtype=torch.float32, device=x.device)
    quantize_into_(x, codes, absmax, signed=signed)
    return codes, absmax


_midpoints: dict[tuple[bool, torch.device], Tensor] = {}


def code_midpoints(signed: bool, device: torch.device) -> Tensor:
    """The 255 boundaries halfway between neighbouring map values (the map is sorted ascending)."""
    key = (signed, torch.device(device))
    if key not in _midpoints:
        code = quant_map(signed, device)
        _midpoints[key] = (code[1:] + code[:-1]).mul_(0.5)
    return _midpoints[key]


def quantize_into_(x: Tensor, codes: Tensor, absmax: Tensor, *, signed: bool, overwrite: bool = False) -> None:
    """Requantise ``x`` into existing buffers: per block of ``BLOCKSIZE``, absmax and the nearest map code of
    x / absmax. A fixed sequence of kernels with no host sync, so it can be captured in a CUDA graph.
    ``overwrite``: ``x`` is not needed afterwards and may hold the scaled values (one temporary less)."""
    src = x.detach().reshape(-1)
    owned = overwrite and src.dtype == torch.float32 and src.data_ptr() == x.data_ptr()
    src = src.to(torch.float32)
    n = src.numel()
    tail = -n % BLOCKSIZE
    if tail:  # zeros neither raise a block's absmax nor need a code of their own
        src = torch.nn.functional.pad(src, (0, tail))
        owned = True
    blocks = src.view(-1, BLOCKSIZE)
    low, high = torch.aminmax(blocks, dim=1)  # |x| at its largest, per block, without a |x| buffer
    torch.maximum(high, low.neg_(), out=absmax)
    # an all-zero block keeps absmax 0 and gets the map's exact zero (0 / tiny = 0)
    divisor = absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    scaled = blocks.div_(divisor) if owned else blocks / divisor
    nearest = torch.bucketize(scaled, code_midpoints(signed, x.device), out_int32=True)
    codes.view(-1).copy_(nearest.view(-1)[:n])


def dequantize(codes: Tensor, absmax: Tensor, *, signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode to a new tensor of ``dtype`` shaped like ``codes``."""
    out = _bnb_functional().dequantize_blockwise(
        codes, absmax=absmax, code=quant_map(signed, codes.device), blocksize=BLOCKSIZE
    )
    return out.to(dtype).reshape(codes.shape)


def init_state(state: dict, name: str, like: Tensor, *, signed: bool) -> None:
    """Zero-valued quantised state ``name`` for a tensor shaped like ``like``."""
    codes, absmax = quantize(torch.zeros_like(like, dtype=torch.float32), signed=signed)
    state[f"{name}_codes"], state[f"{name}_absmax"] = codes, absmax


def has_state(state: dict, name: str) -> bool:
    return f"{name}_codes" in state


def load(state: dict, name: str, *, signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    return dequantize(state[f"{name}_codes"], state[f"{name}_absmax"], signed=signed, dtype=dtype)


def store_(state: dict, name: str, x: Tensor, *, signed: bool) -> None:
    quantize_into_(x, state[f"{name}_codes"], state[f"{name}_absmax"], signed=signed)


def state_nbytes(state: dict) -> int:
    """Bytes held by every tensor of one parameter's optimizer state (quantised or not)."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))


_ZERO_CODES: dict[bool, int] = {}


def zero_code(signed: bool) -> int:
    """Index of 0.0 in the quantisation map, read once from the CPU copy as a list (no device read, and no tensor
    read a step's host-sync check would see)."""
    if signed not in _ZERO_CODES:
        values = quant_map(signed, torch.device("cpu")).tolist()
        _ZERO_CODES[signed] = min(range(len(values)), key=lambda i: abs(values[i]))
    return _ZERO_CODES[signed]


_ops = []


def _bnb_ops():
    """torch.ops.bitsandbytes, checked once: importing bitsandbytes registers them (or raises OptimizerUnavailable)."""
    if not _ops:
        _bnb_functional()
        _ops.append(torch.ops.bitsandbytes)
    return _ops[0]


def _picker(indices: list[int]):
    """``items`` → ``[items[i] for i in indices]`` as one C-level call (an itemgetter), for per-step use."""
    if not indices:
        return lambda items: []
    get = itemgetter(*indices)
    return (lambda items: [get(items)]) if len(indices) == 1 else (lambda items: list(get(items)))


class FlatQuantState:
    """The 8-bit states of the tensors of one layout as one code buffer and one absmax buffer.

    Each tensor (in layout order) owns a slot of ``num_blocks(n)·BLOCKSIZE`` codes, so no quantisation block
    straddles two tensors; the slot's tail holds the map's exact zero, which changes neither a block's absmax nor
    any code. Quantising the whole padded buffer therefore gives bit-for-bit the codes and absmax of quantising
    each tensor on its own. ``state[f"{name}_codes"]`` / ``state[f"{name}_absmax"]`` stay per-parameter tensors (so
    checkpoints keep their format) as views of the two buffers; when something replaced them (a state_dict load)
    they are gathered again. When every size is a multiple of ``BLOCKSIZE`` (LoRA shapes usually are) the padded
    buffer is the layout's flat buffer itself; otherwise one split moves values between the two.

    ``quantised`` (caller's order; default all) leaves some tensors at full precision, as bitsandbytes does below
    its ``min_8bit_size``: their ``state[name]`` is a view of one flat buffer of the working dtype, and
    :meth:`load` / :meth:`store_` move both kinds in one flat buffer in layout order, so a step's math does not
    care which tensors are 8-bit (tensors of both kinds alternate in a layout sorted by shape).
    """

    def __init__(self, layout: FlatLayout, quantised: list[bool] | None = None) -> None:
        self.layout = layout
        flags = [True] * layout.count if quantised is None else layout.arrange(quantised)  # layout order
        self.quantised = flags
        self.mixed = not all(flags)
        blocks = [num_blocks(n) if q else 0 for n, q in zip(layout.sizes, flags, strict=True)]
        self.block_starts = [0]
        for b in blocks[:-1]:
            self.block_starts.append(self.block_starts[-1] + b)
        self.blocks = blocks
        self.total_blocks = sum(blocks)
        self.padded = self.total_blocks * BLOCKSIZE
        self.aligned = not self.mixed and all(n % BLOCKSIZE == 0 for n in layout.sizes)
        # value and padding lengths, alternating, in layout order (0 and 0 for a full-precision tensor)
        slots = [(n, b * BLOCKSIZE - n) if b else (0, 0) for n, b in zip(layout.sizes, blocks, strict=True)]
        self._slot_sizes = [k for slot in slots for k in slot]
        q_at = [j for j, q in enumerate(flags) if q]
        f_at = [j for j, q in enumerate(flags) if not q]
        self._q_at, self._f_at = _picker(q_at), _picker(f_at)  # layout order → quantised / full-precision ones
        self._q_states = _picker(sorted(layout.order[j] for j in q_at))  # caller's order → quantised ones
        self._f_states = _picker([layout.order[j] for j in f_at])  # caller's order → full-precision, layout order
        self._f_sizes = [layout.sizes[j] for j in f_at]
        self._full = PackedState()
        self._full_flat: dict[str, Tensor] = {}
        self._buffers: dict[str, tuple[Tensor, Tensor, list[Tensor], list[Tensor]]] = {}

    def _slots(self, padded: Tensor) -> list[Tensor]:
        """Each quantised tensor's values inside a padded buffer (layout order), one split: for layouts with
        unaligned or full-precision tensors, values move between the flat and the padded buffer by one foreach
        copy (no position index)."""
        pieces = padded.split_with_sizes(self._slot_sizes)
        return self._q_at(pieces[::2])

    def _views(self, codes: Tensor, absmax: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per-tensor views of the two buffers, quantised tensors in the caller's order."""
        layout = self.layout
        code_views: list[Tensor] = [codes] * layout.count
        absmax_views: list[Tensor] = [absmax] * layout.count
        for j, i in enumerate(layout.order):
            if not self.quantised[j]:
                continue
            start = self.block_starts[j] * BLOCKSIZE
            code_views[i] = codes[start : start + layout.sizes[j]].view(layout.shapes[i])
            absmax_views[i] = absmax[self.block_starts[j] : self.block_starts[j] + self.blocks[j]]
        return self._q_states(code_views), self._q_states(absmax_views)

    def buffers(self, states: list[dict], name: str, signed: bool) -> tuple[Tensor, Tensor]:
        """(codes, absmax) flat buffers of state ``name``: the cached ones while ``states`` still hold their views."""
        states = self._q_states(states)
        cached = self._buffers.get(name)
        codes_key, absmax_key = f"{name}_codes", f"{name}_absmax"
        if cached is not None:
            codes, absmax, code_views, absmax_views = cached
            # map/operator.is_ run in C: a Python-level loop here costs more host time than the step's kernels
            if all(map(operator.is_, map(itemgetter(codes_key), states), code_views)) and all(
                map(operator.is_, map(itemgetter(absmax_key), states), absmax_views)
            ):
                return codes, absmax
        device = self.layout.device
        codes = torch.full((self.padded,), zero_code(signed), dtype=torch.uint8, device=device)
        absmax = torch.empty(self.total_blocks, dtype=torch.float32, device=device)
        code_views, absmax_views = self._views(codes, absmax)
        torch._foreach_copy_(
            code_views + absmax_views, [s[codes_key] for s in states] + [s[absmax_key] for s in states]
        )
        for s, c, a in zip(states, code_views, absmax_views, strict=True):
            s[codes_key], s[absmax_key] = c, a
        self._buffers[name] = (codes, absmax, code_views, absmax_views)
        return codes, absmax

    def load(
        self, states: list[dict], name: str, *, signed: bool, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The decoded state of every tensor as one new flat buffer in layout order (``states`` in caller's order)."""
        codes, absmax = self.buffers(states, name, signed)
        flat = _bnb_ops().dequantize_blockwise(
            codes, absmax, quant_map(signed, codes.device), BLOCKSIZE, torch.float32
        )
        if not self.aligned:
            padded, flat = flat, flat.new_empty(self.layout.numel, dtype=dtype if self.mixed else flat.dtype)
            targets = flat.split_with_sizes(self.layout.sizes)
            sources = self._slots(padded)
            if self.mixed:  # the full-precision tensors' values, in their own dtype
                full = self._full_flat[name] = self._full.buffer(name, self._f_states(states), name, dtype)
                sources += full.split_with_sizes(self._f_sizes)
            torch._foreach_copy_(self._q_at(targets) + self._f_at(targets), sources)
            del padded
        return flat if flat.dtype == dtype else flat.to(dtype)

    def store_(self, name: str, flat: Tensor, *, signed: bool) -> None:
        """Write a flat buffer (layout order) back into the state of ``name`` (after :meth:`load`): full-precision
        tensors by one copy, the others requantised; ``flat`` is used as scratch: its values are gone afterwards."""
        codes, absmax, _, _ = self._buffers[name]
        if not self.aligned:
            pieces = flat.split_with_sizes(self.layout.sizes)
            if self.mixed:
                torch._foreach_copy_(list(self._full_flat[name].split_with_sizes(self._f_sizes)), self._f_at(pieces))
            padded = flat.new_zeros(self.padded)
            torch._foreach_copy_(self._slots(padded), self._q_at(pieces))
            flat = padded
        quantize_into_(flat, codes, absmax, signed=signed, overwrite=True)
