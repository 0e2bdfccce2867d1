"""Checks every capturable optimizer's tests share: no host read in a step, state saved in one mode and loaded in
the other, and the step recorded in a real CUDA graph."""

from __future__ import annotations

import io

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.optimization import get_cosine_schedule_with_warmup

from library.training.graphed_step import on_side_stream
from tests.optimizers.test_registry import assert_bitwise_equal


class HostReadCheck(TorchDispatchMode):
    """Every op of a block with its non-tensor arguments; fails on any read of a device value by the host."""

    READS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "tolist"})

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        assert name not in self.READS, f"step() read a value back from the device: {name}"
        leaves, _ = tree_flatten((args, kwargs or {}))
        constants = (a if isinstance(a, (int, float, str, torch.dtype)) else type(a).__name__ for a in leaves)
        self.ops.append((name, tuple(constants)))
        return func(*args, **(kwargs or {}))


def saved_state(opt) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return buffer


def load_in_other_mode(other, resumed, weights, buffer: io.BytesIO, saved: dict, saved_capturable: bool) -> None:
    """Load the state saved by a run in the other mode into ``other`` (its parameters ``resumed`` set to the saved
    ``weights``) and check that it holds the saved state bit for bit, in the loading run's mode."""
    with torch.no_grad():
        for p, w in zip(resumed, weights, strict=True):
            p.copy_(w)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    assert other.capturable is not saved_capturable  # the loading run's mode, not the saved one
    in_other_mode = [{**group, "cuda_graphs": not saved_capturable} for group in saved["param_groups"]]
    assert_bitwise_equal(other.state_dict(), {**saved, "param_groups": in_other_mode}, "loaded in the other mode")


def recorded_run(opt, params, grads, schedule, record: bool):
    """Eager steps, or 2 eager steps (on a side stream, as before a capture) then the step recorded once and
    replayed, the gradients in fixed buffers."""
    static = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static, strict=True):
        p.grad = g
    graph = None
    for k, gs in enumerate(grads):
        for s, g in zip(static, gs, strict=True):
            s.copy_(g)
        if not record:
            opt.step()
        elif k < 2:
            on_side_stream(params[0].device, opt.step)
        else:
            if graph is None:
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    opt.step()
            graph.replay()
        schedule.step()
    torch.cuda.synchronize()
    return [p.detach().cpu() for p in params]


def assert_recorded_matches_eager(build, grads: list[list[torch.Tensor]], warmup_steps: int) -> None:
    """``build()`` -> (params, optimizer) on CUDA, twice: eager steps, then the step recorded once and replayed,
    both under the same cosine schedule: the replays give the eager weights."""
    results = []
    for record in (False, True):
        params, opt = build()
        schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup_steps, num_training_steps=len(grads))
        results.append(recorded_run(opt, params, [[g.cuda() for g in gs] for gs in grads], schedule, record))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
