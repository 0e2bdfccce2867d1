"""What every in-house optimizer shares with torch.optim's conventions: the closure of ``step``, dense gradients,
the precision of the state and exact state reload."""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The loss of torch.optim's optional ``step(closure)``, evaluated with gradients on (steps run under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def dense_grad(p: Tensor) -> Tensor:
    """``p.grad``, rejected when sparse (as torch.optim's Adam does: the flat steps need dense gradients)."""
    if p.grad.is_sparse:
        raise OptimizerError(
            f"sparse gradient for a {tuple(p.shape)} parameter is not supported; valid: dense gradients"
        )
    return p.grad


def work_dtype(p: Tensor) -> torch.dtype:
    """The precision the optimizer state and step maths of ``p`` use: fp32 for half-precision weights (their
    moments would lose the small updates), the weight's dtype otherwise."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class ExactStateLoad:
    """Reload state tensors with their saved dtypes (mix in before ``torch.optim.Optimizer``).

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to the parameter's dtype: fp32
    moments or lr masks of bf16/fp16 weights would lose precision (resume would no longer be exact), and uint8
    codes / integer cluster labels would turn into floats. This puts the saved tensors back as they were, copied
    (never aliasing the caller's dict) onto the parameter's device.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
