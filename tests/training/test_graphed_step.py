"""--cuda_graphs' recorder (library/training/graphed_step.py): what a replayed step must leave behind.

On CPU the three CUDA calls (side-stream eager run, capture, RNG state) are swapped for eager stand-ins that keep
the same contract (a capture returns fixed output tensors that each replay rewrites, and leaves no trace: a real
capture runs no kernel); the bookkeeping around them (gradient buffers across zero_grad and accumulation, eager
first calls, one recording per input signature) is what runs here. The tests marked gpu record real graphs, alone
and in the trainer.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.errors import ConfigError
from library.training.entry import main
from library.training.graphed_step import WARMUP_CALLS, GraphedStep
from tests.training.conftest import train_argv

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs")


class EagerRecorder(GraphedStep):
    """GraphedStep whose 'graph' reruns the body and copies its outputs into the tensors returned at capture.

    Its capture runs the body once to get the outputs, then puts back the gradients, the parameters and the
    tensors ``written()`` returns (an optimizer's state, when the body steps one), as a real capture runs no kernel.
    """

    def __init__(self, *args, written=lambda: [], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.body_runs = 0
        self.written = written
        body = self.body

        def counted(*inputs):
            self.body_runs += 1
            return body(*inputs)

        self.body = counted

    def _run_eagerly(self, inputs):
        return self.body(*inputs)

    def _capture(self, static):
        touched = [*self._flat, *(p.detach() for p in self.params), *self.written()]
        saved = [t.clone() for t in touched]
        outputs = tuple(o.clone() for o in self.body(*static))
        with torch.no_grad():
            for t, before in zip(touched, saved, strict=True):
                t.copy_(before)

        def replay():
            for out, new in zip(outputs, self.body(*static), strict=True):
                out.copy_(new)

        return replay, outputs

    def _rng_state(self):
        return torch.get_rng_state()

    def _set_rng_state(self, state):
        torch.set_rng_state(state)


def _model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double().to(device)


def _body(model, accumulation):
    """Like the trainer's: a random draw inside (the noise), a weighted loss, backward of loss / accumulation."""

    def body(x, weights):
        noise = torch.randn(x.shape[0], 3, dtype=x.dtype, device=x.device)
        loss = ((model(x) - noise) ** 2).mean(1).mul(weights).mean()
        (loss / accumulation).backward()
        return loss.detach(), noise

    return body


def _batches(device="cpu"):
    g = torch.Generator().manual_seed(1)
    sizes = [4, 4, 2, 2, 4, 4, 2, 2, 4, 4]  # two "resolution buckets", alternating per optimizer step
    return [(torch.randn(n, 6, generator=g, dtype=torch.float64).to(device),
             torch.rand(n, generator=g, dtype=torch.float64).to(device)) for n in sizes]


def _train(graphed: bool, accumulation: int = 2, device: str = "cpu"):
    model = _model(device)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    body = _body(model, accumulation)
    recorder = GraphedStep if device == "cuda" else EagerRecorder
    step = recorder(body, params, torch.device(device)) if graphed else None
    torch.manual_seed(123)
    losses, grads = [], []
    for i, (x, w) in enumerate(_batches(device)):
        if step is None:
            loss, _ = body(x, w)
        else:
            loss, _ = step(x, w)
        losses.append(loss.clone())
        if (i + 1) % accumulation == 0:
            grads.append([p.grad.clone() for p in params])
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses, grads, [p.detach().clone() for p in params], step


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_replayed_steps_equal_eager_steps_across_buckets_and_accumulation(device):
    """On CUDA also: random draws inside a replay are the ones eager code would draw at that point."""
    eager_losses, eager_grads, eager_weights, _ = _train(False, device=device)
    losses, grads, weights, step = _train(True, device=device)
    assert len(step.recordings) == 2  # one per input signature, each recorded once
    if device == "cpu":
        assert step.body_runs == 10 + 2  # 10 calls (the first WARMUP_CALLS of a signature eager); 2 captures
    for a, b in zip(losses, eager_losses, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(grads, eager_grads, strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    for a, b in zip(weights, eager_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_are_views_of_fixed_buffers_and_a_foreign_grad_is_carried_over():
    model = _model()
    params = list(model.parameters())
    step = EagerRecorder(_body(model, 1), params, torch.device("cpu"))
    x, w = _batches()[0]
    torch.manual_seed(5)
    step(x, w)
    first = [p.grad for p in params]
    assert all(g._base is not None for g in first)  # views of one flat buffer per dtype
    once = [g.clone() for g in first]
    params[0].grad = torch.ones_like(params[0])  # e.g. a hook or an optimizer replaced one gradient
    torch.manual_seed(5)  # the same noise: the second call adds the same gradient
    step(x, w)
    assert all(p.grad is g for p, g in zip(params, first, strict=True))
    torch.testing.assert_close(params[0].grad, 1.0 + once[0], rtol=1e-12, atol=1e-12)
    for p, g in zip(params[1:], once[1:], strict=True):
        torch.testing.assert_close(p.grad, 2.0 * g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_mixed_dtype_parameters_get_one_buffer_each(accumulation):
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(2, dtype=torch.float32))

    def body(x):
        loss = (a * x).sum() + (b * x[:2].float()).sum().double()
        (loss / accumulation).backward()
        return (loss.detach(),)

    step = EagerRecorder(body, [a, b], torch.device("cpu"))
    x = torch.arange(3, dtype=torch.float64)
    for _ in range(accumulation):
        step(x)
    assert len(step._flat) == 2
    torch.testing.assert_close(a.grad, x, rtol=0, atol=0)
    torch.testing.assert_close(b.grad, x[:2].float(), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("extra", [[], ["--gradient_checkpointing", "--gradient_accumulation_steps", "2"],
                                   ["--full_bf16", "--optimizer_type", "CustomAdamW"]])
def test_cuda_graphs_train_the_lora_that_eager_trains(tiny_dataset, tmp_path, extra):
    """Same seed, same kernels: the LoRA trained with --cuda_graphs is the eager one up to kernel-choice rounding."""
    weights = {}
    for label, flags in (("eager", []), ("graphs", ["--cuda_graphs"])):
        out = tmp_path / label
        argv = train_argv(tiny_dataset, out, "--mixed_precision", "bf16", "--network_train_unet_only", *extra, *flags,
                          steps=4)
        assert main(argv) == 0
        weights[label] = load_file(out / "t.safetensors")
    ups = sorted(k for k in weights["eager"] if "lora_up" in k)  # zero at init: they hold only what training did
    eager, graphs = (torch.cat([weights[run][k].float().flatten() for k in ups]) for run in ("eager", "graphs"))
    assert graphs.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(eager, graphs, dim=0) > 0.999


class FailingCapture(EagerRecorder):
    """A body with an op that cannot be recorded: capture raises."""

    def _capture(self, static):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_stops_with_a_line_that_names_the_flag():
    model = _model()
    step = FailingCapture(_body(model, 1), list(model.parameters()), torch.device("cpu"))
    x, w = _batches()[0]
    for _ in range(WARMUP_CALLS):  # eager calls: nothing is recorded yet
        step(x, w)
    with pytest.raises(ConfigError, match=r"^--cuda_graphs: the training step could not be recorded .*\[4, 6\].*"
                                          r"operation not permitted.*train without --cuda_graphs$"):
        step(x, w)
