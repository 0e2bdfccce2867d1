"""Bytes an optimizer holds on the CPU, counted exactly: every storage created while it is built and stepped.

Used by bench/optimizer_step.py (its CPU memory columns) and tests/optimizers/test_memory.py.

torch's CPU allocator keeps no statistics, so :class:`StorageLedger` watches from the dispatcher instead. Every
ATen op's outputs (factory functions included: ``empty``, ``zeros``, ``torch.tensor``'s ``lift_fresh``, custom ops
such as bitsandbytes') pass through a ``TorchDispatchMode``; each new storage is recorded with its size and a
weak reference, and storages that died are dropped before every op. So ``live`` is the bytes of storages created
inside the ledger and still alive; ``peak`` its maximum right after any op (when the op's outputs and its inputs
are alive together). Views share their base's storage and are counted once; in-place and ``out=`` ops create
nothing. What is not seen: scratch memory an op allocates and frees inside its own kernel, which is why "peak" is
the peak over op boundaries.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.device.type != "meta"]


class StorageLedger(TorchDispatchMode):
    """Live and peak bytes of the storages created inside the block (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = 0
        self.peak = 0

    def _prune(self) -> None:
        for key, (ref, nbytes) in list(self._alive.items()):
            if ref.expired():
                del self._alive[key]
                self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._prune()
        kwargs = kwargs or {}
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        for t in _tensors(out):
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            # an output on an input's storage (in-place, out=, a view) is no new memory
            if ref.cdata not in inputs and ref.cdata not in self._alive:
                self._alive[ref.cdata] = (ref, storage.nbytes())
                self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out

    def settle(self) -> int:
        """Live bytes after garbage collection (what is still held, not merely not yet freed)."""
        gc.collect()
        self._prune()
        return self.live

    def reset_peak(self) -> None:
        self.peak = self.live


def optimizer_bytes(
    make_opt: Callable[[], torch.optim.Optimizer], params: Sequence[torch.Tensor], steps: int = 3, seed: int = 0
) -> tuple[float, float]:
    """(kept, peak) bytes per parameter of the optimizer ``make_opt()`` builds over ``params``.

    kept: storages created while building it and taking ``steps`` steps that are alive after the last step (its
    state, flat buffers, indices, caches). peak: the most alive at any point of the last step, kept included.
    Gradients are made outside the ledger, so they count as the parameters do: not at all.
    """
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(p.shape, generator=gen) * 1e-3 for p in params] for _ in range(steps)]
    n = sum(p.numel() for p in params)
    ledger = StorageLedger()
    with ledger:
        opt = make_opt()
        for k in range(steps):
            for p, g in zip(params, grads[k], strict=True):
                p.grad = g
            if k == steps - 1:
                ledger.settle()
                ledger.reset_peak()
            opt.step()
        peak = ledger.peak
        kept = ledger.settle()
    del opt
    return kept / n, peak / n
