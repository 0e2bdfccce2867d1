"""8-bit block-wise quantised optimizer state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

A state tensor is stored as uint8 codes (same shape as the tensor) plus one fp32 absmax per block of
``BLOCKSIZE`` elements. Codes index bitsandbytes' dynamic (exponent-rich) quantisation map: the signed map for
first moments, the unsigned one for non-negative second moments, as bitsandbytes' own 8-bit optimizers do.
The quantisation itself is ``bitsandbytes.functional.quantize_blockwise`` / ``dequantize_blockwise``, which run
on CPU and CUDA. The state is two plain tensors, so ``state_dict()`` needs nothing special; an optimizer keeps
them under ``<name>_codes`` / ``<name>_absmax`` (see :func:`init_state` / :func:`load` / :func:`store_`).

Typical use inside a step: ``x = load(state, "exp_avg", signed=True)`` → update ``x`` in fp32 →
``store_(state, "exp_avg", x, signed=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from library.errors import OptimizerUnavailable

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


def quantize_into_(x: Tensor, codes: Tensor, absmax: Tensor, *, signed: bool) -> None:
    """Requantise ``x`` into existing buffers (no new state allocation per step)."""
    # bitsandbytes quantises 16/32-bit floats only; fp64 (reference tests) goes through fp32.
    src = x.detach().to(torch.float32) if x.dtype == torch.float64 else x.detach()
    _bnb_functional().quantize_blockwise(
        src.contiguous(), code=quant_map(signed, x.device), blocksize=BLOCKSIZE, out=codes, absmax=absmax
    )


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
