"""Automagic_Sinkgd / Automagic_CameAMP against their float64 references (library/optimizers/references.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from library.errors import OptimizerError
from library.optimizers import automagic
from library.optimizers.automagic import (
    Automagic_CameAMP,
    Automagic_Sinkgd,
    adaptive_decay_factor,
    lr_mask_update_,
    prodigy_bumps,
    sinkgd_,
    sinkgd_many_,
    vradam_factor,
)
from library.optimizers.references import (
    RefCameDirection,
    RefSinkgdDirection,
    ref_sinkgd,
    reference_run,
)
from tests.optimizers.op_counting import HOST_SYNC, observed_steps

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ helpers

SHAPES = {
    "lora_unet_a.lora_down.weight": (4, 6),
    "lora_unet_a.lora_up.weight": (5, 4),
    "conv_in.weight": (3, 2, 3, 3),
    "norm.bias": (5,),
}


def make_problem(seed=0, steps=13):
    gen = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(s, generator=gen, dtype=F64) * 0.5 for s in SHAPES.values()]
    thetas[1].zero_()  # lora_up starts at zero, as in kohya networks
    drift = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES.values()]
    scales = [0.05, 0.6, 0.2, 0.02]  # VRAdam factor from ~1 to its 1/11 floor
    grads = [
        [
            (d + 0.8 * torch.randn(d.shape, generator=gen, dtype=F64)) * c
            for d, c in zip(drift, scales, strict=True)
        ]
        for _ in range(steps)
    ]
    return thetas, grads


def run_optimizer(cls, thetas, grad_seq, lrs, names, **hp):
    params = [torch.nn.Parameter(t.clone()) for t in thetas]
    group = {"params": params}
    if names:
        group["names"] = list(SHAPES)
    opt = cls([group], **hp)
    traj = []
    for t, grads in enumerate(grad_seq, start=1):
        opt.param_groups[0]["lr"] = lrs[t]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in params])
    return traj, opt


BASE_HP = dict(
    lr=1e-2, min_lr=2e-3, max_lr=2.2e-2, lr_bump=2e-3, alora_eta=2.0, d_coef=2.0, weight_decay=0.2,
    warmup_steps=8, use_orthogonal_grad=True, stats_update_freq=3,
)  # fmt: skip


def schedule(steps):
    # a scheduler halves the lr from step 10 on: the masks are scaled by lr / initial lr
    return {t: (1e-2 if t < 10 else 5e-3) for t in range(1, steps + 1)}


# ------------------------------------------------------------------------------------------------ building blocks


def test_sinkgd_matches_row_column_definition():
    x = torch.randn(
        5, 7, dtype=F64, generator=torch.Generator().manual_seed(0)
    )  # some draws need >5 iterations
    for iters in (1, 4):
        torch.testing.assert_close(sinkgd_(x.clone(), iters), ref_sinkgd(x, iters), rtol=1e-12, atol=1e-12)
    out = sinkgd_(x.clone(), 5)
    torch.testing.assert_close(out.norm(dim=0), torch.full((7,), math.sqrt(5), dtype=F64))  # columns exact
    torch.testing.assert_close(out.norm(dim=1), torch.full((5,), math.sqrt(7), dtype=F64), rtol=2e-2, atol=0)


def test_sinkgd_batches_same_shapes_without_changing_results():
    xs = [torch.randn(3, 4, dtype=F64) for _ in range(3)] + [
        torch.randn(2, 3, 2, 2, dtype=F64),
        torch.zeros(3, 4, dtype=F64),
    ]
    expected = [ref_sinkgd(x.reshape(x.shape[0], -1), 4).reshape(x.shape) for x in xs]
    sinkgd_many_(xs, 4)
    for got, want in zip(xs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lr_mask_grows_on_repeat_shrinks_on_flip_and_clamps():
    mask = torch.tensor([1e-3, 1e-3, 1e-3, 9.995e-3, 1.5e-6, 1e-3], dtype=F64)
    prev = torch.tensor([1, 1, 0, 1, -1, -1], dtype=torch.int8)
    cur = torch.tensor([1, -1, 1, 1, 1, -1], dtype=torch.int8)
    expected = [1e-3 + 2e-5, 1e-3 - 1e-5, 1e-3, 1e-2, 1e-6, 1e-3 + 2e-5]
    lr_mask_update_([mask], [cur], [prev], [2e-5], [1e-5], 1e-6, 1e-2)
    torch.testing.assert_close(mask, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)


def test_prodigy_condition_scales_growth_when_descending_away_from_start():
    start = torch.zeros(4, dtype=F64)
    theta = torch.tensor([-1.0, -1.0, 0.0, 0.0], dtype=F64)  # moved along −g so far
    grow, shrink = prodigy_bumps(
        [torch.ones(4, dtype=F64), -torch.ones(4, dtype=F64)], [theta, theta], [start, start], 1e-5, 3.0
    )
    assert [float(x) for x in grow] == pytest.approx([3e-5, 1e-5])  # c = ⟨g, θ₀−θ⟩ = +2 → faster growth
    assert [float(x) for x in shrink] == pytest.approx([1e-5, 3e-5])  # c = −2 (overshoot) → faster shrinkage


def test_vradam_factor_matches_definition():
    ms = [torch.full((3,), 0.1, dtype=F64), torch.full((2, 2), 1.0, dtype=F64), torch.zeros(4, dtype=F64)]
    want = [1 / (1 + min(3 * 0.03, 10)), 1 / (1 + min(3 * 4.0, 10)), 1.0]
    torch.testing.assert_close(vradam_factor(ms), torch.tensor(want, dtype=F64), rtol=1e-12, atol=0)


def test_adaptive_decay_factor_matches_definition():
    grads = [torch.randn(4, 3, dtype=F64), 3 * torch.randn(5, dtype=F64)]
    flat = torch.cat([g.abs().reshape(-1) for g in grads])
    mu, sigma = flat.mean(), flat.std(unbiased=False)
    want = torch.stack([2 / (1 + torch.exp(-4 * (g.abs().mean() - mu) / sigma)) for g in grads])
    torch.testing.assert_close(adaptive_decay_factor(grads), want, rtol=1e-12, atol=0)
    assert torch.equal(adaptive_decay_factor([torch.zeros(3, dtype=F64)]), torch.ones(1, dtype=F64))


# ------------------------------------------------------------------------------------------------ full-step references


@pytest.mark.parametrize(("names", "full_finetune"), [(True, False), (False, False), (False, True)])
def test_sinkgd_trajectory_matches_float64_reference(names, full_finetune):
    thetas, grads = make_problem()
    lrs = schedule(len(grads))
    hp = dict(BASE_HP, beta1=0.85, full_finetune=full_finetune)
    got, opt = run_optimizer(Automagic_Sinkgd, thetas, grads, lrs, names, **hp)
    if names:
        allora = [True, True, False, False]  # LoRA names only
    else:
        allora = [t.dim() >= 2 and not full_finetune for t in thetas]
    want, avg_lr = reference_run(
        thetas, grads, lrs, allora, hp, RefSinkgdDirection(0.85, 5 if full_finetune else 4)
    )
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True), start=1):
        for g, w in zip(g_step, w_step, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"step {t}")
    torch.testing.assert_close(
        opt.log_metrics()["avg_lr"].double(), torch.tensor(avg_lr, dtype=F64), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("names", [True, False])
def test_cameamp_trajectory_matches_float64_reference(names):
    thetas, grads = make_problem(seed=1)
    lrs = schedule(len(grads))
    hp = dict(BASE_HP, full_finetune=False, betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-16), clip_threshold=1.0)
    got, opt = run_optimizer(Automagic_CameAMP, thetas, grads, lrs, names, **hp)
    allora = [True, True, False, False] if names else [t.dim() >= 2 for t in thetas]
    want, avg_lr = reference_run(
        thetas, grads, lrs, allora, hp, RefCameDirection(hp["betas"], hp["eps"], 1.0)
    )
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True), start=1):
        for g, w in zip(g_step, w_step, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"step {t}")
    torch.testing.assert_close(
        opt.log_metrics()["avg_lr"].double(), torch.tensor(avg_lr, dtype=F64), rtol=1e-12, atol=0
    )


# ------------------------------------------------------------------------------------------------ warm-up phases

CLASSES = [Automagic_Sinkgd, Automagic_CameAMP]


@pytest.mark.parametrize("cls", CLASSES)
def test_weight_decay_acts_only_in_first_half_of_warmup(cls):
    p = torch.nn.Parameter(torch.ones(3, 4))
    opt = cls([p], lr=1e-2, weight_decay=0.5, warmup_steps=10)
    norms = []
    for _ in range(14):
        p.grad = torch.zeros_like(p)  # only decay can move θ
        opt.step()
        norms.append(float(p.detach().norm()))
    assert norms[0] == pytest.approx(math.sqrt(12))  # seed step: no update
    assert all(b < a for a, b in zip(norms[:4], norms[1:5], strict=True))  # t = 2..5 ≤ W/2 shrink
    assert norms[5:] == [norms[4]] * 9  # t ≥ 6: no decay (and no other movement)


@pytest.mark.parametrize("cls", CLASSES)
def test_orthograd_only_after_warmup(cls):
    thetas, grads = make_problem(seed=2, steps=12)
    lrs = dict.fromkeys(range(1, 13), 1e-2)
    base = dict(lr=1e-2, warmup_steps=6, weight_decay=0.0)
    with_ortho, _ = run_optimizer(cls, thetas, grads, lrs, True, use_orthogonal_grad=True, **base)
    without, _ = run_optimizer(cls, thetas, grads, lrs, True, use_orthogonal_grad=False, **base)
    for t in range(6):  # steps 1..6: identical
        for a, b in zip(with_ortho[t], without[t], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(with_ortho[6][0], without[6][0])  # step 7 > W: the projection acts


def test_gradient_along_weights_stops_moving_after_warmup_with_orthograd():
    p = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    opt = Automagic_Sinkgd([p], lr=1e-2, warmup_steps=4, weight_decay=0.0, use_orthogonal_grad=True)
    history = []
    for _ in range(7):
        p.grad = p.detach().clone()  # g ∥ θ: OrthoGrad removes all of it
        opt.step()
        history.append(p.detach().clone())
    assert not torch.equal(history[3], history[2])  # t = 4 (inside warm-up) still moves
    assert torch.equal(history[6], history[4])  # t > 4: no movement


def test_step_size_keeps_growing_through_warmup_end_without_cut():
    # constant gradient: every element repeats its sign, so the mask grows by lr_bump per step until max_lr;
    # unit-RMS direction and VRAdam factor 1/11 (3·Σm² = 24 > 10) make |Δθ| = mask/11 exactly
    p = torch.nn.Parameter(torch.zeros(8, dtype=F64))
    lr, bump = 1e-3, 1e-4
    opt = Automagic_Sinkgd(
        [p], lr=lr, lr_bump=bump, max_lr=1.5e-3, warmup_steps=6, weight_decay=0.0, d_coef=1.0
    )
    previous = p.detach().clone()
    for t in range(1, 15):
        p.grad = torch.ones_like(p)
        opt.step()
        delta = previous - p.detach()
        previous = p.detach().clone()
        want = 0.0 if t == 1 else min(lr + (t - 1) * bump, 1.5e-3) / 11
        torch.testing.assert_close(delta, torch.full_like(delta, want), rtol=1e-12, atol=0, msg=f"step {t}")


# ------------------------------------------------------------------------------------------------ shapes, dtypes


class AllShapes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.conv = torch.nn.Conv2d(6, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.lin = torch.nn.Linear(4 * 4 * 4, 3)
        self.gain = torch.nn.Parameter(torch.tensor(1.0))  # 0-D

    def forward(self, idx):
        x = self.emb(idx).permute(0, 3, 1, 2)
        return self.gain * self.lin(torch.nn.functional.silu(self.norm(self.conv(x))).flatten(1))


@pytest.mark.parametrize(
    ("cls", "extra"),
    [(Automagic_Sinkgd, {}), (Automagic_CameAMP, {}), (Automagic_CameAMP, {"optim_bits": 8})],
)
def test_full_finetune_updates_every_tensor_shape(cls, extra):
    torch.manual_seed(0)
    model = AllShapes()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert {p.dim() for p in before.values()} == {0, 1, 2, 4}
    idx, target = torch.randint(0, 10, (4, 4, 4)), torch.randn(4, 3)
    opt = cls(model.parameters(), lr=1e-3, warmup_steps=4, full_finetune=True, use_orthogonal_grad=True, **extra)
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(idx), target).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p.detach(), before[name]), name


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(
        {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (32, 64),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        }  # fmt: skip
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_full_finetune_of_tiny_unet_lowers_loss(cls):
    torch.manual_seed(0)
    unet = tiny_unet()
    assert {p.dim() for p in unet.parameters()} == {1, 2, 4}
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    timesteps, noise = torch.tensor([10, 500]), torch.randn(2, 4, 8, 8)
    opt = cls(
        unet.parameters(),
        lr=1e-3,
        max_lr=1e-2,
        lr_bump=1e-4,
        warmup_steps=8,
        full_finetune=True,
        use_orthogonal_grad=True,
    )
    losses = []
    for _ in range(14):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(unet(latents, timesteps, context).sample, noise)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_lr_mask_is_fp32_for_bf16_params_and_resolves_bumps_near_max_lr():
    max_lr, bump = 1e-2, 1e-5
    near = torch.tensor(max_lr - bump, dtype=torch.bfloat16)
    assert near + bump == near  # the original's 16-bit masks lose the bump here (bf16) or round it (fp16)
    half = torch.tensor(max_lr - 2 * bump, dtype=torch.float16)
    assert abs(float(half + bump) - float(half) - bump) > 0.2 * bump
    for cls in CLASSES:
        p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
        opt = cls([p], lr=max_lr - 4 * bump, max_lr=max_lr, lr_bump=bump, d_coef=1.0, warmup_steps=0)
        expected = torch.tensor(max_lr - 4 * bump, dtype=torch.float32)
        for t in range(1, 7):
            p.grad = torch.ones_like(p)
            opt.step()
            mask = opt.state[p]["lr_mask"]
            assert mask.dtype == torch.float32
            if t > 1:
                expected = torch.clamp(expected + bump, max=max_lr)
            assert torch.equal(mask, torch.full_like(mask, expected.item())), (cls.__name__, t)
        assert expected.item() == pytest.approx(max_lr)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        clone = cls([torch.nn.Parameter(p.detach().clone())], lr=max_lr - 4 * bump, max_lr=max_lr)
        clone.load_state_dict(torch.load(buffer))
        assert next(iter(clone.state.values()))["lr_mask"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------ checkpoints


def lora_model(seed=0):
    torch.manual_seed(seed)
    down = torch.nn.Parameter(torch.randn(4, 1024) * 0.03)  # 4096 elements: 8-bit eligible
    up = torch.nn.Parameter(torch.zeros(48, 4))
    conv_down = torch.nn.Parameter(torch.randn(4, 8, 3, 3) * 0.1)
    half = torch.nn.Parameter(torch.randn(16, 8).to(torch.bfloat16))  # fp32 states for a bf16 tensor
    bias = torch.nn.Parameter(torch.zeros(48))
    return {
        "lora_unet_q.lora_down.weight": down, "lora_unet_q.lora_up.weight": up,
        "lora_unet_conv.lora_down.weight": conv_down, "te.half.weight": half, "te.bias": bias,
    }  # fmt: skip


def lora_loss(params, x):
    h = (
        x @ params["lora_unet_q.lora_down.weight"].T @ params["lora_unet_q.lora_up.weight"].T
        + params["te.bias"]
    )
    conv = params["lora_unet_conv.lora_down.weight"].reshape(4, -1)
    half = params["te.half.weight"].float()
    return (h - 1.0).square().mean() + (conv.sum(0) - 0.5).square().mean() + (half - 0.3).square().mean()


def make_opt(cls, params, **kw):
    names = list(params)
    groups = [
        {"params": [params[n] for n in names[:3]], "names": names[:3]},
        {"params": [params[n] for n in names[3:]], "names": names[3:], "lr": 5e-4},
    ]
    return cls(groups, **kw)


def train(opt, params, x, steps, start, lr):
    losses = []
    for t in range(start, start + steps):
        opt.param_groups[0]["lr"] = lr if t < 12 else 0.6 * lr  # a scheduler changing lr mid-run
        opt.zero_grad()
        loss = lora_loss(params, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


RESUME_CASES = [
    (Automagic_Sinkgd, {}),
    (Automagic_Sinkgd, {"use_orthogonal_grad": True, "full_finetune": True}),
    (Automagic_CameAMP, {"use_orthogonal_grad": True}),
    (Automagic_CameAMP, {"optim_bits": 8}),
]


@pytest.mark.parametrize(("cls", "extra"), RESUME_CASES)
def test_state_dict_resume_is_bitwise_exact(cls, extra):
    kw = dict(lr=1e-3, warmup_steps=10, stats_update_freq=3, **extra)
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(3))
    ref_params = lora_model()
    ref_opt = make_opt(cls, ref_params, **kw)
    train(ref_opt, ref_params, x, 16, start=1, lr=1e-3)

    params = lora_model()
    opt = make_opt(cls, params, **kw)
    train(opt, params, x, 7, start=1, lr=1e-3)  # stop inside warm-up (decay and θ₀ still live)
    buffer = io.BytesIO()
    torch.save({"model": {n: p.detach() for n, p in params.items()}, "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = {n: torch.nn.Parameter(t.clone()) for n, t in saved["model"].items()}
    opt2 = make_opt(cls, resumed, **kw)
    opt2.load_state_dict(saved["opt"])
    train(opt2, resumed, x, 9, start=8, lr=1e-3)
    for name in ref_params:
        assert torch.equal(resumed[name], ref_params[name]), name
    for a, b in zip(ref_opt.log_metrics().values(), opt2.log_metrics().values(), strict=True):
        assert torch.equal(a, b)


def test_cameamp_8bit_quantises_large_first_moments_only():
    params = lora_model()
    opt = make_opt(Automagic_CameAMP, params, optim_bits=8)
    train(opt, params, torch.randn(8, 1024), 2, start=1, lr=1e-4)
    large = opt.state[params["lora_unet_q.lora_down.weight"]]  # 4×1024 = 4096 elements
    assert large["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in large
    assert large["v_row"].shape == (4,) and large["v_col"].shape == (1024,)
    assert large["lr_mask"].dtype == torch.float32
    small = opt.state[params["te.bias"]]
    assert small["exp_avg"].dtype == torch.float32 and small["v"].shape == (48,)


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize(
    ("cls", "extra"),
    [(Automagic_Sinkgd, {}), (Automagic_CameAMP, {}), (Automagic_CameAMP, {"optim_bits": 8})],
)
def test_lora_problem_loss_falls(cls, extra):
    params = lora_model()
    # a large lr_bump lets the masks climb from lr towards max_lr where signs stay consistent
    opt = make_opt(cls, params, lr=3e-3, lr_bump=1e-3, max_lr=5e-2, warmup_steps=20, **extra)
    losses = train(
        opt, params, torch.randn(32, 1024, generator=torch.Generator().manual_seed(4)), 60, start=1, lr=3e-3
    )
    assert losses[-1] < 0.1 * losses[0]


def test_allora_follows_lora_names_and_plain_lists_use_matrices():
    def first_step(names, full_finetune=False):
        p = torch.nn.Parameter(torch.full((2, 3), 0.5, dtype=F64))
        group = {"params": [p], **({"names": names} if names else {})}
        opt = Automagic_Sinkgd([group], lr=1e-2, weight_decay=0.0, full_finetune=full_finetune)
        for _ in range(2):
            p.grad = torch.ones_like(p)
            opt.step()
        return float(0.5 - p.detach()[0, 0])

    plain = first_step(["unet.proj.weight"])
    scale = 1 / math.sqrt(3 * 0.25 + 0.25)  # ALLoRA row factor with η = 2
    assert first_step(["lora_unet_proj.lora_up.weight"]) == pytest.approx(plain * scale, rel=1e-12)
    assert first_step(None) == pytest.approx(plain * scale, rel=1e-12)
    assert first_step(None, full_finetune=True) == pytest.approx(plain, rel=1e-12)


def test_log_metrics_refresh_every_stats_update_freq_steps():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = Automagic_Sinkgd([p], lr=1e-3, lr_bump=1e-4, stats_update_freq=3, weight_decay=0.0)
    seen = []
    for t in range(1, 9):
        p.grad = torch.ones_like(p)
        opt.step()
        seen.append(opt.log_metrics()["avg_lr"])
        if t in (2, 5, 8):  # refresh steps: (t − 2) % 3 == 0
            assert torch.equal(seen[-1], opt.state[p]["lr_mask"].mean())
    assert torch.equal(seen[2], seen[1]) and torch.equal(seen[3], seen[1])  # stale between refreshes
    assert seen[4] > seen[1]


@pytest.mark.parametrize("cls", CLASSES)
def test_step_makes_no_host_syncs(cls, monkeypatch):
    params = lora_model()
    opt = make_opt(cls, params, warmup_steps=4, use_orthogonal_grad=True, stats_update_freq=1)
    x = torch.randn(8, 1024)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in step()")

    for _ in range(8):
        opt.zero_grad()
        lora_loss(params, x).backward()
        with monkeypatch.context() as m:
            for attr in ("item", "__bool__", "__float__", "__int__", "tolist"):
                m.setattr(torch.Tensor, attr, refuse)
            opt.step()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"lr": 0.0}, "lr=0.0"),
        ({"min_lr": 1e-2, "max_lr": 1e-3}, "max_lr=0.001"),
        ({"lr_bump": -1.0}, "lr_bump=-1.0"),
        ({"warmup_steps": 2.5}, "warmup_steps=2.5"),
        ({"stats_update_freq": 0}, "stats_update_freq=0"),
        ({"beta1": 1.0}, "beta1=1.0"),
    ],
)
def test_invalid_hyperparameters_name_the_value(kwargs, fragment):
    with pytest.raises(OptimizerError, match=fragment.replace(".", r"\.")):
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_cameamp_rejects_bad_bits_and_names_mismatch():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(OptimizerError, match="optim_bits=4"):
        Automagic_CameAMP([p], optim_bits=4)
    with pytest.raises(OptimizerError, match="names"):
        Automagic_CameAMP([{"params": [p], "names": ["a", "b"]}])


def test_compat_import_path():
    from library.automagic_sinkgd import Automagic_Sinkgd as compat

    assert compat is Automagic_Sinkgd
    assert Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))]).defaults["lr"] == 1e-5


# ------------------------------------------------------------------------------------------------ flat step


FLAT_SHAPES = [
    ("lora_unet_a.lora_down.weight", (4, 32)), ("lora_unet_a.lora_up.weight", (24, 4)),
    ("lora_unet_c.lora_down.weight", (4, 8, 1, 1)), ("lora_unet_c.lora_up.weight", (16, 4, 1, 1)),
    ("te.norm.bias", (24,)), ("te.big.weight", (8, 520)),  # 4160 elements: 8-bit, padded to 17 blocks
]  # fmt: skip


def flat_params(copies, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, names = [], []
    for c in range(copies):
        for name, shape in FLAT_SHAPES:
            params.append(torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1))
            names.append(f"{name}{c}")
    return params, names


def ops_per_step(cls, copies, steps=7, **kw):
    params, names = flat_params(copies)
    opt = cls([{"params": params, "names": names}], warmup_steps=4, use_orthogonal_grad=True, stats_update_freq=1, **kw)
    counts = []
    for log in observed_steps(opt, params, steps, seed=1):
        assert HOST_SYNC not in log.counts
        assert all(kw.get("unsafe") for name, kw in log.ops if name == "segment_reduce")  # safe form syncs
        counts.append(len(log.ops))
    return counts[2:]  # steps 1-2 build the plan and gather the states once


@pytest.mark.parametrize(
    ("cls", "extra"),
    [(Automagic_Sinkgd, {}), (Automagic_CameAMP, {}), (Automagic_CameAMP, {"optim_bits": 8})],
)
def test_ops_per_step_do_not_grow_with_tensor_count_and_never_sync(cls, extra):
    # step 3: Prodigy condition and adaptive decay; step 4: neither; steps 5-7: OrthoGrad
    small, large = ops_per_step(cls, 4, **extra), ops_per_step(cls, 16, **extra)  # 24 vs 96 tensors
    assert small == large
    # rows and columns cost one kernel per distinct shape (6 here) per reduction or broadcast
    assert max(small) < 200


@pytest.mark.parametrize("cls", CLASSES)
def test_per_shape_column_path_matches_reference(cls, monkeypatch):
    # above _INDEX_MAX_NUMEL elements per-tensor values are broadcast by repeat_interleave, not a cached index
    monkeypatch.setattr(automagic, "_INDEX_MAX_NUMEL", 0)
    thetas, grads = make_problem(seed=3)
    lrs = schedule(len(grads))
    if cls is Automagic_Sinkgd:
        hp = dict(BASE_HP, beta1=0.85, full_finetune=False)
        direction = RefSinkgdDirection(0.85, 4)
    else:
        hp = dict(
            BASE_HP, full_finetune=False, betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-16), clip_threshold=1.0
        )
        direction = RefCameDirection(hp["betas"], hp["eps"], 1.0)
    got, opt = run_optimizer(cls, thetas, grads, lrs, True, **hp)
    assert next(iter(opt._buckets.values())).tensors.index is None
    want, _ = reference_run(thetas, grads, lrs, [True, True, False, False], hp, direction)
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True), start=1):
        for g, w in zip(g_step, w_step, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"step {t}")


def test_cameamp_8bit_flat_moments_equal_per_tensor_quantisation():
    # with no weight decay every tensor's trajectory is independent of the others, so one flat group (codes
    # padded per tensor to whole blocks, fp32 and 8-bit regions interleaved) must equal each tensor alone
    params, names = flat_params(2, seed=5)
    kw = dict(lr=1e-3, weight_decay=0.0, warmup_steps=6, optim_bits=8, stats_update_freq=2)
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    together = Automagic_CameAMP([{"params": params, "names": names}], **kw)
    singles = [
        Automagic_CameAMP([{"params": [p], "names": [n]}], **kw) for p, n in zip(alone, names, strict=True)
    ]
    gen = torch.Generator().manual_seed(6)
    for _ in range(5):
        for p, q in zip(params, alone, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        together.step()
        for opt in singles:
            opt.step()
    big = [i for i, n in enumerate(names) if n.startswith("te.big")]
    assert big and all(together.state[params[i]]["exp_avg_codes"].dtype == torch.uint8 for i in big)
    for p, q, opt in zip(params, alone, singles, strict=True):
        assert torch.equal(p, q)
        for key, value in opt.state[q].items():
            assert torch.equal(torch.as_tensor(together.state[p][key]), torch.as_tensor(value)), key


@pytest.mark.parametrize("cls", [Automagic_Sinkgd, Automagic_CameAMP])
def test_eager_mode_matches_float64_reference(cls):
    """cuda_graphs=False (step and lr as Python numbers) against the reference; the tests above run the default,
    capturable mode (step count, lr and the step-dependent choices on the device)."""
    thetas, grads = make_problem(seed=1)
    lrs = schedule(len(grads))
    if cls is Automagic_Sinkgd:
        hp = dict(BASE_HP, beta1=0.85, full_finetune=False)
        direction = RefSinkgdDirection(0.85, 4)
    else:
        hp = dict(BASE_HP, full_finetune=False, betas=(0.8, 0.99, 0.999), eps=(1e-30, 1e-16), clip_threshold=1.0)
        direction = RefCameDirection(hp["betas"], hp["eps"], 1.0)
    got, opt = run_optimizer(cls, thetas, grads, lrs, True, cuda_graphs=False, **hp)
    assert not opt.capturable and isinstance(opt.param_groups[0]["lr"], float)
    want, _ = reference_run(thetas, grads, lrs, [True, True, False, False], hp, direction)
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True), start=1):
        for g, w in zip(g_step, w_step, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"step {t}")
