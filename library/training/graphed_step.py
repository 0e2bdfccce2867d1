"""``--cuda_graphs``: the U-Net forward, the loss and the backward recorded once as a CUDA graph, then replayed.

Why: an SDXL LoRA step at 1024² launches about 15,000 kernels whose GPU work adds up to about 115 ms on an H100,
while eager PyTorch spends about 800 ms of host time launching them (``bench/profile_step.py --model sdxl``): the
step is bound by the host, not the GPU. A replay launches the whole recorded step at once. torch.compile's
``reduce-overhead`` mode gets there through CUDA-graph trees, but compiling SDXL takes minutes and gradient
checkpointing adds its own constraints; recording the eager kernels costs three steps' time.

Contract for ``body(*inputs)``: it reads only its input tensors, the model, persistent optimizer tensors and the
random generator, writes the gradients of ``params`` by ``backward()`` (which accumulates in place into the buffers
this class keeps attached as ``.grad``), may go on to clip them, step a capturable optimizer (its step counts and
lr on the device, torch.optim's ``capturable`` convention) and reset them with :meth:`GraphedStep.zero_grads`,
returns a tuple of tensors, and never synchronises with the host. Each distinct signature of input shapes (one per
resolution bucket) is recorded once; all recordings share one memory pool, as they never run at the same time.
The first ``WARMUP_CALLS`` calls of a signature run the body eagerly on a side stream (cuDNN autotuning, cuBLAS
workspaces, lazy buffers and the optimizer's state are set up there): they are real steps, so nothing they do has
to be undone. The next call records the body, which runs no kernel, and replays it. Random draws inside the graph
advance the CUDA generator as eager code would, so a run with graphs consumes its random stream like one without.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from library.errors import ConfigError

logger = logging.getLogger("loraforge")

#: eager calls before capture: the first calls may allocate lazily (cuBLAS workspaces, caching-allocator blocks)
WARMUP_CALLS = 2


def on_side_stream(device: torch.device, fn: Callable[[], object]) -> object:
    """Warm-up as PyTorch recommends before capture: on a side stream, ordered after the current one."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn()
    current.wait_stream(side)
    return out


def release_warmup_cache() -> None:
    """Hand back the blocks the eager warm-ups left cached: once captured, a graph keeps its temporaries in its
    own pool, so those blocks would stay reserved unused. This lowers what stays reserved after a capture, not
    the peak (measured on SDXL LoRA + CustomAdamW: the same peak reserved with and without it)."""
    torch.cuda.empty_cache()

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class Recording:
    """One recorded signature: replay it after copying the step's inputs into ``inputs``."""

    replay: Callable[[], None]
    inputs: list[Tensor]
    outputs: tuple[Tensor, ...]


class GraphedStep:
    """``step(*inputs)`` runs ``body`` as a replayed CUDA graph and returns its (static) outputs.

    Read the outputs before the next call: every replay rewrites them. Gradients land in fixed flat buffers that
    are attached as ``p.grad`` before each replay; an optimizer's ``zero_grad(set_to_none=True)`` detaches them and
    the next call attaches and zeroes them again (one kernel per dtype), so gradient accumulation over several
    calls works as in eager code.
    """

    def __init__(self, body: Callable[..., tuple[Tensor, ...]], params: Sequence[Tensor],
                 device: torch.device) -> None:
        self.body = body
        self.params = list(params)
        self.device = device
        self.recordings: dict[Signature, Recording] = {}
        self.eager_calls: Counter[Signature] = Counter()
        self._pool = None
        self._flat: list[Tensor] = []
        self._grads: list[Tensor] = self._grad_buffers()

    def _grad_buffers(self) -> list[Tensor]:
        """One flat buffer per dtype; each parameter's gradient is a view of it."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(self.params):
            by_dtype.setdefault(p.dtype, []).append(i)
        views: list[Tensor] = [torch.empty(0)] * len(self.params)
        for dtype, members in by_dtype.items():
            flat = torch.zeros(sum(self.params[i].numel() for i in members), dtype=dtype, device=self.device)
            self._flat.append(flat)
            offset = 0
            for i in members:
                n = self.params[i].numel()
                views[i] = flat[offset : offset + n].view_as(self.params[i])
                offset += n
        return views

    def attach_grads(self) -> None:
        """Make the fixed buffers the parameters' ``.grad`` (zeroed when the optimizer had set them to None)."""
        grads = [p.grad for p in self.params]
        if all(map(operator.is_, grads, self._grads)):
            return  # accumulating: the buffers are still attached
        if all(g is None for g in grads):
            for flat in self._flat:
                flat.zero_()
        else:  # someone set other tensors (or a mix): carry their values over
            for view, g in zip(self._grads, grads, strict=True):
                if g is not view:
                    view.zero_() if g is None else view.copy_(g)
        for p, view in zip(self.params, self._grads, strict=True):
            p.grad = view

    def zero_grads(self) -> None:
        """Reset the gradient buffers in place (one kernel per dtype): the gradient reset a body may record."""
        for flat in self._flat:
            flat.zero_()

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        self.attach_grads()
        signature: Signature = tuple((tuple(x.shape), x.dtype) for x in inputs)
        recording = self.recordings.get(signature)
        if recording is None and self.eager_calls[signature] < WARMUP_CALLS:
            self.eager_calls[signature] += 1
            return self._run_eagerly(inputs)
        if recording is None:
            recording = self.recordings[signature] = self._record(inputs)
            logger.info("recorded the training step as a CUDA graph for inputs %s (%d recorded)",
                        [list(s) for s, _ in signature], len(self.recordings))
        for static, x in zip(recording.inputs, inputs, strict=True):
            static.copy_(x)
        recording.replay()
        return recording.outputs

    def _record(self, inputs: Sequence[Tensor]) -> Recording:
        """Record the body on static copies of the inputs (recording runs no kernel; the generator is put back in
        case recording moved it)."""
        static = [x.detach().clone() for x in inputs]
        saved_rng = self._rng_state()
        try:
            replay, outputs = self._capture(static)
        except Exception as exc:
            # no eager fallback: a failed capture leaves the CUDA generator in capture mode, so every later
            # random draw of the process fails ("Offset increment outside graph capture"; seen on an H100)
            raise ConfigError(f"--cuda_graphs: the training step could not be recorded as a CUDA graph for inputs "
                              f"{[list(x.shape) for x in static]} ({type(exc).__name__}: {str(exc).splitlines()[0]}"
                              "); train without --cuda_graphs") from exc
        self._set_rng_state(saved_rng)
        release_warmup_cache()
        return Recording(replay, static, outputs)

    # --- the CUDA parts; the CPU tests swap them for eager stand-ins -----------------------------------------------
    def _run_eagerly(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """One real step, eagerly, on a side stream as PyTorch recommends before a capture."""
        return on_side_stream(self.device, lambda: self.body(*inputs))

    def _capture(self, static: list[Tensor]) -> tuple[Callable[[], None], tuple[Tensor, ...]]:
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.body(*static)
        return graph.replay, outputs

    def _rng_state(self) -> Tensor:
        return torch.cuda.get_rng_state(self.device)

    def _set_rng_state(self, state: Tensor) -> None:
        torch.cuda.set_rng_state(state, self.device)


def checkpoint_without_rng_state(module: torch.nn.Module, *args):
    """diffusers' gradient-checkpointing call, minus the RNG-state save: reading the CUDA generator's state is not
    allowed while a graph is recorded. Safe because nothing random runs inside the U-Net's checkpointed blocks
    (dropout-free configs; LoRA dropout with checkpointing is refused with --cuda_graphs)."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)
