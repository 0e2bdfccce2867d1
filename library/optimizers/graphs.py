"""Replay a fixed block of an optimizer step as one CUDA graph.

Why: the flat optimizers run a fixed sequence of small kernels on buffers that never move (per-shape loops such as
SinkGD's row/column passes are ~160 launches a step for the SD1.5 LoRA set). On a GPU that block is bound by the
host's launch cost, not by the kernels; a CUDA graph replays the whole block for the cost of one launch.
``torch.compile(mode="reduce-overhead")`` would do the same but compiles per shape set and guards every input on
each call; this block has no inputs that change, so plain capture is enough.

Contract for ``fn``: it reads and writes only tensors whose storage stays put between calls (persistent flat
buffers, plan constants), takes no per-step Python values, and never synchronises with the host. Temporaries it
allocates come from the graph's private pool. The caller drops the ``StepGraph`` when those buffers are rebuilt
(a new plan after ``load_state_dict`` or a changed parameter set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger("loraforge")

#: eager calls before capture: the first calls may allocate lazily (cuBLAS workspaces, caching-allocator blocks)
WARMUP_CALLS = 2


class StepGraph:
    """``fn()`` eagerly on CPU or for the first calls, then as a replayed CUDA graph on its device."""

    def __init__(self, fn: Callable[[], None], device: torch.device, enabled: bool = True) -> None:
        self.fn = fn
        self.enabled = enabled and device.type == "cuda"
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.enabled or torch.cuda.is_current_stream_capturing():
            self.fn()  # also inside a caller's own capture: their graph records these kernels
            return
        if self.calls < WARMUP_CALLS:
            self.calls += 1
            self._on_side_stream(self.fn)
            return
        self._capture()

    def _on_side_stream(self, fn: Callable[[], None]) -> None:
        """Warm-up as PyTorch recommends before capture: on a side stream, ordered after the current one."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.fn()
        except Exception as exc:  # noqa: BLE001 - any capture failure: the eager path is always correct
            self.enabled = False
            logger.warning("CUDA graph capture of the optimizer step failed (%s); running it eagerly", exc)
            self.fn()
            return
        self.graph = graph
        graph.replay()  # capture records the kernels without running them: this call's work
