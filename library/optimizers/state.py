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


def dense_grad(p: Tensor, optimizer: str) -> Tensor:
    """``p.grad``, rejected when sparse (as torch.optim's Adam does: the flat steps need dense gradients)."""
    if p.grad.is_sparse:
        raise OptimizerError(
            f"{optimizer}: sparse gradient for a {tuple(p.shape)} parameter is not supported; valid: dense gradients"
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


def step_numbers(states: list[dict[str, Any]]) -> list[int]:
    """Each ``state["step"]`` as an int: Python ints as they are, device counters (capturable mode) read back in
    one transfer. Only plan building, reporting and state_dict() call this, never a step."""
    steps = [state["step"] for state in states]
    tensors = [i for i, t in enumerate(steps) if isinstance(t, Tensor)]
    if tensors:
        values = torch.stack([steps[i].reshape(()).float() for i in tensors]).tolist()
        for i, value in zip(tensors, values, strict=True):
            steps[i] = int(value)
    return steps


class Capturable:
    """torch.optim's ``capturable`` convention for an in-house optimizer whose groups have a ``cuda_graphs``
    setting (mix in before :class:`ExactStateLoad`).

    In capturable mode what changes between steps lives on the device: the step counts are float32 device
    tensors the step advances, and each group's lr is a persistent 0-d device tensor (:meth:`device_lr`) that a
    scheduler ``fill_``s. After its first call, step() is then a fixed sequence of kernels with no host sync,
    which a caller may record in a CUDA graph (the trainer does under ``--cuda_graphs``). The state dict keeps
    int steps and a float lr in both modes, and a loaded state continues in the loading optimizer's mode: the mode
    chooses how the step runs, not what it computes.
    """

    @property
    def capturable(self) -> bool:
        """Whether a caller may record step() in a CUDA graph: every group keeps its step counts and lr on the
        device."""
        return all(group["cuda_graphs"] for group in self.param_groups)

    def device_lr(self, index: int, group: dict[str, Any], device: torch.device) -> Tensor:
        """``group["lr"]`` as this group's persistent 0-d device tensor (float64, float32 where the device has
        none): a scheduler then ``fill_``s it, as torch's schedulers do with a tensor lr, and a recorded step
        reads the new value. The tensor outlives state-dict loads, so a recording keeps pointing at it."""
        held_lrs = self.__dict__.setdefault("_device_lrs", {})
        lr = group["lr"]
        held = held_lrs.get(index)
        if lr is held:
            return held
        if held is None or held.device != device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            held = held_lrs[index] = torch.zeros((), dtype=dtype, device=device)
        held.fill_(lr)
        group["lr"] = held
        return held

    @staticmethod
    def host_lr(group: dict[str, Any]) -> float:
        """The eager mode's lr, a Python number again where a capturable run (or a loaded state) left a tensor."""
        if isinstance(group["lr"], Tensor):
            group["lr"] = group["lr"].item()
        return group["lr"]

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with every step count an int and every lr a float whatever the mode, so a state
        saved in capturable mode loads in eager mode and back (one read of the device counters)."""
        saved = super().state_dict()
        for group in saved["param_groups"]:  # torch's packed groups are copies: the live lr tensor stays
            if isinstance(group["lr"], Tensor):
                group["lr"] = group["lr"].item()
        counted = [i for i, s in saved["state"].items() if isinstance(s.get("step"), Tensor)]
        steps = step_numbers([saved["state"][i] for i in counted])
        for i, step in zip(counted, steps, strict=True):
            saved["state"][i] = {**saved["state"][i], "step": step}  # the live state keeps its device counters
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping each group's ``cuda_graphs`` (torch would take the saved groups' value)."""
        modes = [group["cuda_graphs"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mode in zip(self.param_groups, modes, strict=True):
            group["cuda_graphs"] = mode
