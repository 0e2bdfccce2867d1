"""What every in-house optimizer shares with torch.optim's conventions: the closure of ``step``, exact state reload
and the parameter names a param group may carry."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The loss of torch.optim's optional ``step(closure)``, evaluated with gradients on (steps run under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# Name fragments of LoRA factors in kohya's and PEFT's spellings: down/A project into the rank, up/B back out.
LORA_DOWN_MARKERS = ("lora_down", "lora_A")
LORA_UP_MARKERS = ("lora_up", "lora_B")
LORA_DOWN = re.compile("|".join(LORA_DOWN_MARKERS))


def is_lora_factor(name: str) -> bool:
    """Whether a parameter name marks a LoRA down or up factor (either spelling, anywhere in the name)."""
    return any(marker in name for marker in LORA_DOWN_MARKERS + LORA_UP_MARKERS)


def group_names(group: dict[str, Any]) -> list[str | None]:
    """The group's parameter names (``names``, or torch's ``param_names``), or Nones when it has none."""
    names = group.get("names", group.get("param_names"))
    if names is None:
        return [None] * len(group["params"])
    return list(names)


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
