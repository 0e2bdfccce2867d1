"""Automagic's capturable mode (``cuda_graphs=True``, the default): step count and lr on the device.

As for CustomAdamW (test_hina_capturable.py): after its first call a step reads the lr and the step count from
device tensors, never reads a value back, computes what the eager mode computes, across the warm-up phases (the
Prodigy condition and adaptive decay up to W/2, OrthoGrad after W) chosen on the device, and its state loads in
either mode. The tests marked gpu record the step in a real CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import get_cosine_schedule_with_warmup

from library.optimizers.automagic import Automagic_CameAMP, Automagic_Sinkgd
from library.optimizers.loop import LoopNeeds
from tests.optimizers.capturable_checks import (
    HostReadCheck,
    assert_recorded_matches_eager,
    load_in_other_mode,
    saved_state,
)
from tests.optimizers.test_registry import assert_bitwise_equal

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs")

# LoRA pairs, a conv weight and a bias; (64, 80) has enough elements for an 8-bit first moment
SHAPES = {
    "lora_unet_a.lora_down.weight": (4, 6),
    "lora_unet_a.lora_up.weight": (5, 4),
    "lora_unet_b.lora_down.weight": (4, 80),
    "lora_unet_b.lora_up.weight": (64, 4),
    "conv_in.weight": (3, 2, 3, 3),
    "norm.bias": (5,),
    "big.weight": (64, 80),
}
# warm-up W = 6: the Prodigy condition and adaptive decay stop after step 3, OrthoGrad starts at step 7
WARMUP = dict(warmup_steps=6, use_orthogonal_grad=True, stats_update_freq=2, weight_decay=0.1, lr_bump=2e-4)
CONFIGS = {
    "sinkgd": (Automagic_Sinkgd, {}),
    "cameamp": (Automagic_CameAMP, {}),
    "cameamp_8bit": (Automagic_CameAMP, {"optim_bits": 8}),
}


def _build(config: str, capturable: bool, device: str = "cpu", **extra):
    cls, kw = CONFIGS[config]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device)) for s in SHAPES.values()]
    with torch.no_grad():
        params[1].zero_()  # lora_up starts at zero
    opt = cls([{"params": params, "names": list(SHAPES)}], lr=1e-3, cuda_graphs=capturable, **{**WARMUP, **kw, **extra})
    return params, opt


def _grads(steps: int, params, seed: int = 1) -> list[list[torch.Tensor | None]]:
    """Seeded gradients; the first tensor has none for 3 steps, so its count lags the others' (its own bucket)."""
    gen = torch.Generator().manual_seed(seed)
    return [[None if (i == 0 and k < 3) else torch.randn(p.shape, generator=gen) * 0.1 for i, p in enumerate(params)]
            for k in range(steps)]


def _steps(opt, params, grads, schedule=None) -> None:
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g
        opt.step()
        if schedule is not None:
            schedule.step()


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_capturable_steps_compute_what_eager_steps_compute(config):
    """12 steps under a scheduler that changes lr every step, through both warm-up boundaries, with one tensor
    three steps behind the others: the same bits in both modes."""
    runs = {}
    for capturable in (True, False):
        params, opt = _build(config, capturable)
        schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=12)
        lrs = []
        for gs in _grads(12, params):
            _steps(opt, params, [gs], schedule)
            lrs.append(opt.param_groups[0]["lr"])
        runs[capturable] = params, opt, lrs
    (graphed, opt, lrs), (eager, eager_opt, _) = runs[True], runs[False]
    assert all(lr is lrs[0] for lr in lrs) and lrs[0].dim() == 0  # one device lr, filled by the scheduler
    assert isinstance(eager_opt.param_groups[0]["lr"], float)
    assert opt.capturable and not eager_opt.capturable
    assert [float(opt.state[p]["step"]) for p in graphed] == [9] + [12] * 6  # the device counters themselves
    saved = eager_opt.state_dict()["state"]
    assert [saved[i]["step"] for i in range(len(SHAPES))] == [9] + [12] * 6
    assert "start" not in opt.state[graphed[2]]  # θ₀ freed after W/2, as eagerly
    if config == "cameamp_8bit":
        assert opt.state[graphed[-1]]["exp_avg_codes"].dtype == torch.uint8
    for a, b in zip(graphed, eager, strict=True):
        assert torch.equal(a, b)
    assert_bitwise_equal(opt.state_dict()["state"], eager_opt.state_dict()["state"], "after 12 steps")
    assert torch.equal(opt.log_metrics()["avg_lr"], eager_opt.log_metrics()["avg_lr"])


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_a_capturable_step_is_one_fixed_op_sequence_without_host_reads(config):
    """What a recording needs: no value read back while lr and step change, and from the third call on the same
    ops with the same constants every step while the host cannot know the phase (W = 500); through W = 6 no read
    either."""
    for warmup, fixed in ((500, True), (6, False)):
        params, opt = _build(config, True, warmup_steps=warmup)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 + k)
        grads = [[torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True)]
                 for gs in _grads(9, params, seed=2)]
        _steps(opt, params, grads[:2], schedule)  # the seed step, then the first update resolves the state buffers
        seen = []
        for gs in grads[2:]:
            for p, g in zip(params, gs, strict=True):
                p.grad = g
            with HostReadCheck() as log:
                opt.step()
            schedule.step()
            seen.append(log.ops)
        if fixed:  # (the trainer records the third call)
            assert seen[0] and all(ops == seen[0] for ops in seen[1:])


@pytest.mark.parametrize("config", ["sinkgd", "cameamp_8bit"])
@pytest.mark.parametrize("saved_capturable", [True, False])
def test_a_state_saved_in_one_mode_resumes_in_the_other(config, saved_capturable):
    """Saved at step 2 (θ₀ still kept), with int steps and a float lr: it loads bit for bit in the other mode,
    which then crosses both warm-up boundaries as the saving mode does."""
    params, opt = _build(config, saved_capturable)
    grads = _grads(10, params, seed=3)
    _steps(opt, params, grads[:5])  # the first tensor is at step 2, the others at 5
    buffer, weights = saved_state(opt), [p.detach().clone() for p in params]
    saved = torch.load(buffer, weights_only=False)
    assert isinstance(saved["param_groups"][0]["lr"], float)
    assert all(isinstance(s["step"], int) for s in saved["state"].values())
    assert "start" in saved["state"][0] and "start" not in saved["state"][1]
    buffer.seek(0)
    _steps(opt, params, grads[5:])

    resumed, other = _build(config, not saved_capturable)
    load_in_other_mode(other, resumed, weights, buffer, saved, saved_capturable)
    _steps(other, resumed, grads[5:])
    for a, b in zip(resumed, params, strict=True):
        assert torch.equal(a, b)
    assert_bitwise_equal(other.state_dict()["state"], opt.state_dict()["state"], "5 steps after the resume")


def test_the_loop_records_automagic_only_in_capturable_mode():
    assert LoopNeeds(_build("sinkgd", True)[1]).capturable
    assert not LoopNeeds(_build("cameamp", False)[1]).capturable


# --- on a GPU: the step recorded in a real CUDA graph --------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_a_recorded_capturable_step_replays_what_eager_steps_do(config):
    """Recorded at step 3 and replayed to step 10 under a changing lr: across W/2 (θ₀'s condition and the decay
    end) and W (OrthoGrad starts), chosen on the device, the same kernels as the eager capturable steps."""
    params, _ = _build(config, True)
    grads = _grads(13, params, seed=4)[3:]  # every tensor every step
    assert_recorded_matches_eager(lambda: _build(config, True, device="cuda"), grads, warmup_steps=2)
