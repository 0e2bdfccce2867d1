"""StepGraph: eager on CPU, captured once and replayed on a GPU with the same results as eager."""

from __future__ import annotations

import pytest
import torch

from library.optimizers.automagic import Automagic_CameAMP, Automagic_Sinkgd
from library.optimizers.graphs import WARMUP_CALLS, StepGraph
from library.optimizers.hina_adamw import HinaAdamWOptimizer
from tests.optimizers.op_counting import lora_set

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _counting_block(device: str) -> tuple[StepGraph, torch.Tensor, list[int]]:
    x = torch.zeros(4, device=device)
    python_calls = [0]

    def block() -> None:
        python_calls[0] += 1
        x.add_(1.0).mul_(2.0)

    return StepGraph(block, torch.device(device)), x, python_calls


def test_on_cpu_the_block_runs_eagerly_every_call():
    graph, x, calls = _counting_block("cpu")
    for _ in range(5):
        graph()
    assert calls[0] == 5 and not graph.captured
    assert torch.equal(x, torch.full((4,), 62.0))  # ((((0+1)2+1)2+1)2+1)2+1)2


@pytest.mark.gpu
@needs_cuda
def test_on_a_gpu_the_block_is_captured_once_then_replayed():
    graph, x, calls = _counting_block("cuda")
    for _ in range(6):
        graph()
    torch.cuda.synchronize()
    assert graph.captured
    assert calls[0] == WARMUP_CALLS + 1  # warm-up calls, then the capture; replays run no Python
    assert torch.equal(x.cpu(), torch.full((4,), 126.0))  # six applications, as eagerly


def _train(cuda_graph: bool, steps: int, reload_at: int, cls=Automagic_Sinkgd, lr_decay: float = 1.0, **extra):
    """``steps`` steps on CUDA with random gradients; a state-dict reload after step ``reload_at``; the lr
    multiplied by ``lr_decay`` each step, as a scheduler would."""
    params, names = lora_set(6, seed=0)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    gen = torch.Generator(device="cuda").manual_seed(1)
    opt = cls([{"params": params, "names": names}], lr=1e-3, cuda_graphs=cuda_graph, **extra)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
        opt.param_groups[0]["lr"] = 1e-3 * lr_decay**step
        opt.step()
        if step == reload_at:  # new plans and buffers: the graph must be rebuilt, not replayed on stale memory
            opt.load_state_dict(opt.state_dict())
    torch.cuda.synchronize()
    return [p.detach().clone() for p in params], opt


@pytest.mark.gpu
@needs_cuda
def test_graphed_sinkgd_matches_eager_through_a_state_dict_reload():
    eager, _ = _train(False, 12, reload_at=6, warmup_steps=4)
    graphed, opt = _train(True, 12, reload_at=6, warmup_steps=4)
    graphs = [bucket.graph.graph for bucket in opt._buckets.values()]
    assert graphs and all(g.captured for g in graphs)
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [32, 8])
def test_graphed_cameamp_matches_eager_across_warmup_and_a_reload(bits):
    """OrthoGrad turns on after warm-up (step 5): g then reaches the graph through a copy."""
    extra = dict(use_orthogonal_grad=True, optim_bits=bits, warmup_steps=4)
    eager, _ = _train(False, 14, reload_at=7, cls=Automagic_CameAMP, **extra)
    graphed, opt = _train(True, 14, reload_at=7, cls=Automagic_CameAMP, **extra)
    graphs = [bucket.graph.graph for bucket in opt._buckets.values()]
    assert graphs and all(g.captured for g in graphs)  # the warm-up graph was replaced, not kept
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)  # R's correction: a device scalar, not an argument


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [32, 8])
def test_graphed_custom_adamw_matches_eager(bits):
    """Same kernels; only the scalars differ in form (device tensors instead of kernel arguments)."""
    extra = dict(cls=HinaAdamWOptimizer, lr_decay=0.9, optim_bits=bits, min_8bit_size=32, wd_transition_steps=3,
                 use_orthogonal_grad=True)
    eager, _ = _train(False, 12, reload_at=6, **extra)
    graphed, opt = _train(True, 12, reload_at=6, **extra)
    buckets = [b for plan in opt._plans.values() for b, _, _ in plan.buckets]
    assert buckets and all(b.graph.graph is not None and b.graph.graph.captured for b in buckets)
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_a_failed_capture_is_one_line_that_names_cuda_graph_false(monkeypatch):
    """No eager fallback: a failed capture leaves the CUDA generator unusable for the rest of the process."""
    import contextlib

    from library.errors import OptimizerError
    from library.optimizers import graphs

    @contextlib.contextmanager
    def refusing_capture(graph):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        yield

    monkeypatch.setattr(graphs.torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(graphs.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(graphs.torch.cuda, "graph", refusing_capture)
    block = StepGraph(lambda: None, torch.device("cpu"))
    block.enabled, block.calls = True, WARMUP_CALLS  # as on a GPU after the warm-ups
    with pytest.raises(OptimizerError, match=r"^recording the optimizer step as a CUDA graph failed \(RuntimeError: "
                                             r"operation not permitted when stream is capturing\); run it eagerly "
                                             r"with --optimizer_args cuda_graphs=False$"):
        block()
