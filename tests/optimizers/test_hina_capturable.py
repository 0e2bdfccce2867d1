"""CustomAdamW's capturable mode (``cuda_graphs=True``, the default): step counts and lr on the device.

The caller records step() (the trainer does under --cuda_graphs), so what matters is that after the first call a
step is a fixed sequence of kernels that reads the lr and the step count from device tensors, never reads a value
back, computes what the eager mode computes, and that its state loads in either mode. The tests marked gpu record
the step in a real CUDA graph.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.optimization import get_cosine_schedule_with_warmup

from library.optimizers.hina_adamw import HinaAdamWOptimizer
from library.optimizers.loop import LoopNeeds
from tests.optimizers.capturable_checks import (
    HostReadCheck,
    assert_recorded_matches_eager,
    load_in_other_mode,
    recorded_run,
    saved_state,
)
from tests.optimizers.op_counting import lora_set
from tests.optimizers.test_hina_adamw import DEFAULTS, LORA_SHAPES
from tests.optimizers.test_registry import assert_bitwise_equal

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs")

NO_SPD = {"use_spd": False}
# On the CPU the modes give the same bits, except that SPD's strength, a device scalar in capturable mode, scales
# the per-tensor coefficient before the fused update instead of the deviation inside it: one rounding apart.
CONFIGS = {
    "adopt": (NO_SPD, True),
    "adamw_decay": ({"use_adopt_stability": False, "use_grams": False, **NO_SPD}, True),
    "eight_bit": ({"optim_bits": 8, "min_8bit_size": 64, **NO_SPD}, True),
    "defaults_with_spd": ({}, False),
    "eight_bit_with_spd": ({"optim_bits": 8, "min_8bit_size": 64}, False),
}


def _build(capturable: bool, extra: dict, device: str = "cpu"):
    params, names = lora_set(4, LORA_SHAPES, "lora_unet_m{}", seed=0)
    params = [torch.nn.Parameter(p.detach().to(device)) for p in params]
    hp = {**DEFAULTS, "wd_transition_steps": 4, **extra}  # ρ(t) leaves 1 within the run
    opt = HinaAdamWOptimizer([{"params": params, "names": names}], cuda_graphs=capturable, **hp)
    return params, opt


def _grads(steps: int, params, seed: int = 1) -> list[list[torch.Tensor | None]]:
    """Seeded gradients; the first tensor has none for 3 steps, so the counts differ per tensor for a while."""
    gen = torch.Generator().manual_seed(seed)
    return [[None if (i == 0 and k < 3) else torch.randn(p.shape, generator=gen) for i, p in enumerate(params)]
            for k in range(steps)]


def _train(capturable: bool, extra: dict, steps: int = 12):
    params, opt = _build(capturable, extra)
    schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=steps)
    lrs = []
    for grads in _grads(steps, params):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
    return params, opt, lrs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_capturable_steps_compute_what_eager_steps_compute(name):
    """Under a scheduler that changes lr every step, with ADOPT or Adam's bias corrections, dynamic weight decay
    past its transition, 8-bit state, and tensors at different step counts."""
    extra, exact = CONFIGS[name]
    eager, eager_opt, _ = _train(False, extra)
    graphed, opt, lrs = _train(True, extra)
    assert all(lr is lrs[0] for lr in lrs) and lrs[0].dim() == 0  # one lr tensor, filled by the scheduler
    assert isinstance(eager_opt.param_groups[0]["lr"], float)
    assert [float(opt.state[p]["step"]) for p in graphed] == [eager_opt.state[p]["step"] for p in eager] == [9] + [12] * 7
    for a, b in zip(graphed, eager, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt.log_metrics() == pytest.approx(eager_opt.log_metrics())


@pytest.mark.parametrize("extra", [{}, {"use_adopt_stability": False, "use_grams": False},
                                   {"optim_bits": 8, "min_8bit_size": 64}])
def test_after_its_first_call_a_capturable_step_is_one_fixed_op_sequence_without_host_reads(extra):
    """What a recording needs: the same ops with the same constants every step while lr and step change, and no
    value read back; the eager mode, which takes them as Python numbers, would bake them in."""
    sequences = {}
    for capturable in (True, False):
        params, opt = _build(capturable, extra)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 + k)
        seen = []
        for k, grads in enumerate(_grads(5, params, seed=2)):
            for p, g in zip(params, grads, strict=True):
                p.grad = torch.zeros_like(p) if g is None else g
            log = HostReadCheck()
            with log if k else contextlib.nullcontext():
                opt.step()
            schedule.step()
            seen.append(log.ops)
        sequences[capturable] = seen[1:]
    with pytest.raises(AssertionError, match="_local_scalar_dense"), HostReadCheck():
        float(torch.ones(()))  # the check sees a read
    first, *rest = sequences[True]
    assert first and all(ops == first for ops in rest)
    assert any(ops != sequences[False][0] for ops in sequences[False][1:])  # the check sees a baked lr


@pytest.mark.parametrize("name", ["adopt", "eight_bit", "defaults_with_spd"])
@pytest.mark.parametrize("saved_capturable", [True, False])
def test_a_state_saved_in_one_mode_resumes_in_the_other(name, saved_capturable):
    """The state dict keeps ints for the step counts and a float lr in both modes: it loads bit for bit in the
    other mode, which continues as the saving mode would (to the bit where the modes compute the same bits)."""
    extra, exact = CONFIGS[name]
    params, opt = _build(saved_capturable, extra)
    grads = _grads(8, params, seed=3)

    def steps(optimizer, tensors, sequence):
        for gs in sequence:
            for p, g in zip(tensors, gs, strict=True):
                p.grad = g
            optimizer.step()

    steps(opt, params, grads[:4])
    buffer, weights = saved_state(opt), [p.detach().clone() for p in params]
    saved = torch.load(buffer, weights_only=False)  # a copy: state_dict() refers to the live state
    assert isinstance(saved["param_groups"][0]["lr"], float)
    assert all(isinstance(s["step"], int) for s in saved["state"].values())
    buffer.seek(0)
    steps(opt, params, grads[4:])

    resumed, other = _build(not saved_capturable, extra)
    load_in_other_mode(other, resumed, weights, buffer, saved, saved_capturable)
    steps(other, resumed, grads[4:])
    for a, b in zip(resumed, params, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if exact:
        assert_bitwise_equal(other.state_dict()["state"], opt.state_dict()["state"], "4 steps after the resume")


def test_the_loop_asks_the_optimizer_whether_it_is_capturable():
    assert LoopNeeds(_build(True, {})[1]).capturable
    assert not LoopNeeds(_build(False, {})[1]).capturable
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    assert not LoopNeeds(torch.optim.AdamW(params, foreach=True)).capturable
    assert not LoopNeeds(torch.optim.SGD(params, lr=0.1)).capturable


def test_torch_fused_adamw_is_made_capturable_with_a_device_lr_its_scheduler_fills():
    """torch's convention for capturing its AdamW: ``capturable=True`` and a 0-d tensor lr, set after the scheduler
    exists (its base learning rates stay numbers); it then steps as the float-lr AdamW does."""
    results = []
    for prepare in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))]
        opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
        schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
        needs = LoopNeeds(opt)
        assert needs.capturable
        if prepare:
            needs.prepare_capture()
            lr = opt.param_groups[0]["lr"]
            assert opt.param_groups[0]["capturable"] and isinstance(lr, torch.Tensor) and lr.dim() == 0
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            schedule.step()
        if prepare:
            assert opt.param_groups[0]["lr"] is lr and schedule.base_lrs == [1e-2]
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # lr rounded to float32 either way


# --- on a GPU: the step recorded in a real CUDA graph --------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("extra", [{}, {"use_adopt_stability": False, "use_grams": False},
                                   {"optim_bits": 8, "min_8bit_size": 64}])
def test_a_recorded_capturable_step_replays_what_eager_steps_do(extra):
    """Recorded once, replayed under a changing lr: the same kernels as the eager capturable steps."""
    params, _ = _build(True, extra)
    grads = _grads(10, params, seed=4)[3:]  # every tensor every step
    assert_recorded_matches_eager(lambda: _build(True, extra, device="cuda"), grads, warmup_steps=2)


@pytest.mark.gpu
@needs_cuda
def test_a_recorded_fused_adamw_step_replays_what_eager_steps_do():
    results = []
    for record in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 32, device="cuda")), torch.nn.Parameter(torch.randn(32, device="cuda"))]
        opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
        schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=7)
        LoopNeeds(opt).prepare_capture()
        gen = torch.Generator().manual_seed(1)
        grads = [[torch.randn(p.shape, generator=gen).cuda() for p in params] for _ in range(7)]
        results.append(recorded_run(opt, params, grads, schedule, record))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
