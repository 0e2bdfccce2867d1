"""Shared helpers of the flat-step tests: which ATen ops an optimizer step dispatches, on LoRA-shaped tensors.

A step whose op count does not grow with the tensor count launches a fixed number of kernels; a step that
dispatches no ``_local_scalar_dense`` (``.item()``, ``bool()``, ``float()`` on a tensor) never waits for the GPU.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Metadata-only ops: no kernel on a GPU.
METADATA_OPS = frozenset({
    "view", "_unsafe_view", "as_strided", "detach", "t", "expand", "alias", "unsqueeze", "squeeze", "select", "slice",
    "permute", "transpose", "_reshape_alias", "unbind", "split", "split_with_sizes", "lift_fresh", "empty",
    "empty_like", "is_same_size",
})  # fmt: skip
HOST_SYNC = "_local_scalar_dense"

ShapePair = tuple[tuple[int, ...], tuple[int, ...]]
LORA_PAIRS: list[ShapePair] = [((4, 24), (16, 4)), ((4, 32, 1, 1), (8, 4, 1, 1)), ((4, 12), (20, 4))]


class OpLog(TorchDispatchMode):
    """The ATen ops dispatched inside the block, with their kwargs; ops named in `skip` are not logged."""

    def __init__(self, skip: Iterable[str] = METADATA_OPS) -> None:
        super().__init__()
        self.skip = frozenset(skip)
        self.ops: list[tuple[str, dict[str, Any]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.skip:
            self.ops.append((name, dict(kwargs or {})))
        return func(*args, **(kwargs or {}))

    @property
    def counts(self) -> collections.Counter[str]:
        return collections.Counter(name for name, _ in self.ops)


def lora_set(
    blocks: int, pairs: Sequence[ShapePair] = LORA_PAIRS, module: str = "m{}_to_q", seed: int | None = None
) -> tuple[list[torch.nn.Parameter], list[str]]:
    """`blocks` LoRA modules cycling through `pairs` of (down, up) shapes: random down, zero up (as LoRA starts).

    `module` formats the block index into the module name; the seed defaults to `blocks`.
    """
    gen = torch.Generator().manual_seed(blocks if seed is None else seed)
    params, names = [], []
    for b in range(blocks):
        down, up = pairs[b % len(pairs)]
        params += [torch.nn.Parameter(torch.randn(down, generator=gen)), torch.nn.Parameter(torch.zeros(up))]
        names += [f"{module.format(b)}.lora_down.weight", f"{module.format(b)}.lora_up.weight"]
    return params, names


def observed_steps(
    opt: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    steps: int,
    observe: Callable[[], Any] = OpLog,
    seed: int = 0,
) -> list[Any]:
    """`steps` optimizer steps on seeded random gradients, each inside `observe()`; what each step's block yields."""
    gen = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with observe() as watcher:
            opt.step()
        seen.append(watcher)
    return seen


def step_ops(make_opt: Callable[[list[dict]], torch.optim.Optimizer], blocks: int, steps: int = 3):
    """(op counts of the last step, op counts of all steps) for `steps` steps on `lora_set(blocks)`."""
    params, names = lora_set(blocks)
    logs = observed_steps(make_opt([{"params": params, "names": names}]), params, steps)
    return logs[-1].counts, sum((log.counts for log in logs), collections.Counter())
