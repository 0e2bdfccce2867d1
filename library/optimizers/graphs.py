"""Replay a fixed block of an optimizer step as one CUDA graph (Automagic's own blocks), and the warm-up helpers the
trainer's recorder shares.

Why: Automagic runs a fixed sequence of small kernels on buffers that never move (per-shape loops such as
SinkGD's row/column passes are ~160 launches a step for the SD1.5 LoRA set). On a GPU that block is bound by the
host's launch cost, not by the kernels; a CUDA graph replays the whole block for the cost of one launch.
``torch.compile(mode="reduce-overhead")`` would do the same but compiles per shape set and guards every input on
each call; this block has no inputs that change, so plain capture is enough.

Contract for ``fn``: it reads and writes only tensors whose storage stays put between calls (persistent flat
buffers, plan constants), takes no per-step Python values, and never synchronises with the host. Temporaries it
allocates come from the graph's private pool. A ``GraphSlot`` keyed on what the block bakes in (settings, the
buffers it points at) replaces the graph when that changes; a new plan (after ``load_state_dict`` or a changed
parameter set) starts with an empty slot.

An optimizer that keeps its step counts and lr on the device instead (torch.optim's ``capturable`` convention,
e.g. CustomAdamW) needs none of this: the caller records its whole step (library/training/graphed_step.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from library.errors import OptimizerError

#: eager calls before capture: the first calls may allocate lazily (cuBLAS workspaces, caching-allocator blocks)
WARMUP_CALLS = 2


def can_capture(device: torch.device) -> bool:
    """Whether a block on ``device`` can become a CUDA graph (the optimizers' graph paths ask this first)."""
    return device.type == "cuda"


def on_side_stream(device: torch.device, fn: Callable[[], Any]) -> Any:
    """Warm-up as PyTorch recommends before capture: on a side stream, ordered after the current one."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn()
    current.wait_stream(side)
    return out


class StepGraph:
    """``fn()`` eagerly on CPU or for the first calls, then as a replayed CUDA graph on its device.

    A call returns what ``fn`` returns; once captured, the tensors it returned at capture, which every replay
    rewrites (read them before the next call).
    """

    def __init__(self, fn: Callable[[], Any], device: torch.device, enabled: bool = True) -> None:
        self.fn = fn
        self.enabled = enabled and can_capture(device)
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Any = None
        self.calls = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> Any:
        if self.graph is not None:
            self.graph.replay()
            return self.output
        if not self.enabled or torch.cuda.is_current_stream_capturing():
            return self.fn()  # also inside a caller's own capture: their graph records these kernels
        if self.calls < WARMUP_CALLS:
            self.calls += 1
            return on_side_stream(self.device, self.fn)
        return self._capture()

    def _capture(self) -> Any:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.fn()
        except Exception as exc:
            # no eager fallback: a failed capture leaves the CUDA generator in capture mode, so the training
            # step's next random draw would fail with an unrelated message ("Offset increment outside graph
            # capture"; seen on an H100)
            raise OptimizerError(f"recording the optimizer step as a CUDA graph failed ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0]}); run it eagerly with --optimizer_args "
                                 "cuda_graphs=False") from exc
        self.graph, self.output = graph, output
        release_warmup_cache()
        graph.replay()  # capture records the kernels without running them: this call's work
        return output


def release_warmup_cache() -> None:
    """Hand back the blocks the eager warm-ups left cached: once captured, a graph keeps its temporaries in its
    own pool, so those blocks would stay reserved unused. This lowers what stays reserved after a capture, not
    the peak (measured on SDXL LoRA + CustomAdamW: the same peak reserved with and without it)."""
    torch.cuda.empty_cache()


class GraphSlot:
    """The one StepGraph of an owner (a bucket, a plan) and the key it was captured for.

    A call with another key builds a new graph and drops the old one with its private memory pool, so a change
    of what the block bakes in (settings, the state buffers it points at) never replays stale kernels nor keeps
    a dead graph's temporaries alive. Key items that are tensors compare by identity (a re-gathered buffer has a
    new address), the others by equality.
    """

    def __init__(self) -> None:
        self.graph: StepGraph | None = None
        self.key: tuple | None = None

    def __call__(self, key: tuple, make: Callable[[], StepGraph]) -> Any:
        if self.graph is None or not _same(self.key, key):
            self.graph, self.key = make(), key
        return self.graph()


def _same(old: tuple | None, new: tuple) -> bool:
    return old is not None and len(old) == len(new) and all(
        a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b
        for a, b in zip(old, new, strict=True)
    )
