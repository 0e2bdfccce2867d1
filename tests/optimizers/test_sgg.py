"""SGG family: clustering and scaling against float64 references, Adafactor's factored moment, loss, resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from library.errors import OptimizerError
from library.optimizers.references import AdamWSGGReference, kmeans_reference
from library.optimizers.sgg import (
    AdafactorSGG,
    AdamWSGG,
    AdamWSGG_v2,
    LambSGG_v2,
    ShampooSGG_v2,
    inverse_fourth_root,
    kmeans_1d,
    lamb_recluster_interval,
)
from tests.optimizers.op_counting import HOST_SYNC, step_ops

ALL = [AdamWSGG, AdamWSGG_v2, AdafactorSGG, LambSGG_v2, ShampooSGG_v2]


# ------------------------------------------------------------------------------------------------- helpers
def lora_problem(seed: int = 0):
    """Linear regression through LoRA-like factors (up zero-initialised) plus a bias."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 24, generator=gen)
    target = x @ torch.randn(24, 3, generator=gen) @ torch.randn(3, 16, generator=gen) + 0.5
    down = torch.nn.Parameter(torch.randn(4, 24, generator=gen) * 0.3)
    up = torch.nn.Parameter(torch.zeros(16, 4))
    bias = torch.nn.Parameter(torch.zeros(16))

    def loss_fn():
        return ((x @ down.T @ up.T + bias - target) ** 2).mean()

    return [down, up, bias], loss_fn


def run(opt, params, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def make(cls, params, **kw):
    kw.setdefault("lr", 3e-2)
    if cls is ShampooSGG_v2:
        kw.setdefault("lr_1d", 3e-2)
    return cls([{"params": params, "names": ["m.lora_down.weight", "m.lora_up.weight", "m.bias"]}], **kw)


# ---------------------------------------------------------------------------------------------------- tests
def test_kmeans_1d_matches_bruteforce_float64_lloyd():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(mu, 0.3, n) for mu, n in ((-9.0, 40), (-6.0, 90), (-2.0, 25), (1.0, 60))])
    rng.shuffle(x)
    centers, labels = kmeans_1d(torch.from_numpy(x), 4)
    ref_centers, ref_labels = kmeans_reference(x, 4)
    np.testing.assert_allclose(centers.numpy(), ref_centers, rtol=1e-12)
    np.testing.assert_array_equal(labels.numpy(), ref_labels)
    assert np.all(np.diff(centers.numpy()) > 0)


def test_kmeans_1d_constant_input_puts_everything_in_one_cluster():
    centers, labels = kmeans_1d(torch.full((50,), 3.0, dtype=torch.float64), 5)
    assert torch.all(centers == 3.0) and torch.all(labels == 0)


@pytest.mark.parametrize("cls", [AdamWSGG, AdamWSGG_v2])
def test_adamw_sgg_matches_float64_reference_across_reclusterings(cls):
    rng = np.random.default_rng(1)
    theta0 = rng.normal(size=(6, 10))
    decays = (
        {"beta3": 0.8}
        if cls is AdamWSGG
        else {"beta3": 0.7, "ema_decay_clusters": 0.6, "ema_decay_scale": 0.5}
    )
    d = (0.8, 0.8, 0.8) if cls is AdamWSGG else (0.7, 0.6, 0.5)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, n_clusters=3, recluster_interval=3)
    p = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    opt = cls([p], scale_bound=(0.5, 4.0), **kw, **decays)
    ref = AdamWSGGReference(theta0, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"], 3, 3, (0.5, 4.0), *d)
    for _ in range(8):
        # per-element gradient magnitudes over four decades, so the clusters and scales differ
        g = rng.normal(size=theta0.shape) * 10.0 ** rng.integers(-4, 0, size=theta0.shape)
        p.grad = torch.from_numpy(g)
        opt.step()
        ref.step(g)
    np.testing.assert_allclose(p.detach().numpy(), ref.theta, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(opt.state[p]["sgg_scale"].numpy(), ref.scale, rtol=1e-10)
    assert ref.scale.max() > 1.0 + 1e-3  # the test exercises real scaling, not the identity


@pytest.mark.parametrize("cls", ALL)
def test_scales_move_and_stay_within_bounds(cls):
    params, loss_fn = lora_problem()
    opt = make(cls, params, scale_bound=(0.8, 3.0), recluster_interval=5)
    run(opt, params, loss_fn, 30)
    scales = torch.cat([opt.state[p]["sgg_scale"] for p in params])
    assert torch.all(scales >= 0.8) and torch.all(scales <= 3.0)
    assert torch.any(scales > 1.0 + 1e-3)
    metrics = opt.log_metrics()
    assert 0.8 <= float(metrics["sgg_scale_mean"]) <= 3.0
    assert float(metrics["sgg_scale_max"]) == pytest.approx(float(scales.max()))


def test_adafactor_step_uses_factored_second_moment_not_sign():
    torch.manual_seed(0)
    g = torch.randn(5, 7, dtype=torch.float64) * torch.logspace(-3, 0, 7, dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    opt = AdafactorSGG([p], lr=0.1, betas=(0.0, 0.999), scale_bound=(1.0, 1.0))
    p.grad = g.clone()
    opt.step()
    # float64 reference of step 1 (β̂₂ = 0): V = R Cᵀ / mean(R) from row/column means of g² + ε₁, RMS clip at 1
    g2 = g.numpy() ** 2 + 1e-30
    r, c = g2.mean(axis=1), g2.mean(axis=0)
    u = g.numpy() / np.sqrt(np.outer(r, c) / r.mean())
    u /= max(1.0, np.sqrt((u**2).mean()))
    delta = p.detach().numpy()
    np.testing.assert_allclose(delta, -0.1 * u, rtol=1e-12)
    assert not np.allclose(delta, -0.1 * np.sign(g.numpy()), rtol=1e-2)


def test_adafactor_keeps_factored_state_only():
    p = torch.nn.Parameter(torch.zeros(8, 3, 2, 2))
    opt = AdafactorSGG([p], betas=(0.0, 0.999))
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg_sq_row"].shape == (8,) and state["exp_avg_sq_col"].shape == (12,)
    assert "exp_avg_sq" not in state and "exp_avg" not in state


def test_shampoo_inverse_root_and_first_step_match_float64_reference():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(4, 6))
    p = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.float64))
    eps = 1e-4
    opt = ShampooSGG_v2([p], lr=1.0, betas=(0.5, 0.9), eps=eps, scale_bound=(1.0, 1.0))
    p.grad = torch.from_numpy(g)
    opt.step()

    def root(s):
        w, q = np.linalg.eigh(s)
        w = np.clip(w, 0, None)
        return (q * (w + eps * w.max()) ** -0.25) @ q.T

    expected = root(g @ g.T) @ g @ root(g.T @ g)  # bias corrections cancel on step 1
    np.testing.assert_allclose(p.detach().numpy(), -expected, rtol=1e-9, atol=1e-12)
    diag = torch.from_numpy(rng.random(5))
    np.testing.assert_allclose(
        inverse_fourth_root(diag, eps).numpy(), (diag.numpy() + eps * diag.numpy().max()) ** -0.25
    )


def test_shampoo_optimize_1d_uses_adam_at_lr_1d_following_the_schedule():
    b = torch.nn.Parameter(torch.zeros(3))
    opt = ShampooSGG_v2([b], lr=1e-2, lr_1d=1e-3, scale_bound=(1.0, 1.0), weight_decay=0.0)
    opt.param_groups[0]["lr"] = 5e-3  # a scheduler halved the lr
    b.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    # Adam's first step is ±1 per element, scaled by lr_1d · (5e-3 / 1e-2)
    torch.testing.assert_close(b.detach(), -5e-4 * torch.sign(b.grad), rtol=1e-5, atol=1e-9)
    assert "left_stat" not in opt.state[b]


def test_lamb_recluster_interval_grows_and_respects_base():
    intervals = [lamb_recluster_interval(s, 100, 11000) for s in (1, 5000, 11000, 50000)]
    assert intervals == [1100, 1600, 2200, 2200]
    assert lamb_recluster_interval(1, 5000, 11000) == 5000


def test_lamb_reclusters_on_its_schedule():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = LambSGG_v2([p], recluster_interval=2, t_total=40)
    seen = []
    for _ in range(12):
        p.grad = torch.randn(4, 4)
        opt.step()
        seen.append(opt.state[p]["next_recluster"])
    # reclusters at 1, 5, 9: interval max(2, round(4·(1 + t/40))) is 4, 4, then 5 at t = 9
    assert sorted(set(seen)) == [5, 9, 14]


@pytest.mark.parametrize("cls", ALL)
def test_reduces_loss_of_lora_regression(cls):
    params, loss_fn = lora_problem()
    opt = make(cls, params, recluster_interval=10)
    with torch.no_grad():
        start = loss_fn().item()
    run(opt, params, loss_fn, 120)
    with torch.no_grad():
        end = loss_fn().item()
    assert end < 0.3 * start


@pytest.mark.parametrize("cls", ALL)
def test_resume_from_state_dict_is_bitwise_exact(cls):
    kw = dict(recluster_interval=3)
    if cls is LambSGG_v2:
        kw["t_total"] = 20
    params, loss_fn = lora_problem()
    opt = make(cls, params, **kw)
    run(opt, params, loss_fn, 4)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(opt, params, loss_fn, 7)
    straight = [p.detach().clone() for p in params]

    params2, loss_fn2 = lora_problem()
    with torch.no_grad():
        for p, s in zip(params2, saved_params, strict=True):
            p.copy_(s)
    opt2 = make(cls, params2, **kw)
    opt2.load_state_dict(saved_state)
    run(opt2, params2, loss_fn2, 7)
    for a, b in zip(straight, params2, strict=True):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"n_clusters": 0}, "n_clusters"),
        ({"n_clusters": 300}, "n_clusters"),
        ({"recluster_interval": 0}, "recluster_interval"),
        ({"scale_bound": (2.0, 1.0)}, "scale_bound"),
        ({"scale_bound": "big"}, "scale_bound"),
        ({"beta3": 1.0}, "beta3"),
        ({"ema_decay_clusters": -0.1}, "ema_decay_clusters"),
        ({"betas": (0.9, 1.5)}, "betas"),
    ],
)
def test_invalid_settings_raise_optimizer_error_naming_the_key(kwargs, key):
    with pytest.raises(OptimizerError, match=key):
        AdamWSGG_v2([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_class_specific_settings_are_validated():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(OptimizerError, match="t_total"):
        LambSGG_v2(p, t_total=0)
    with pytest.raises(OptimizerError, match="optimize_1d"):
        ShampooSGG_v2(p, optimize_1d="yes")
    with pytest.raises(OptimizerError, match="ema_decay_scale_factors"):
        AdafactorSGG(p, ema_decay_scale_factors=2.0)


@pytest.mark.parametrize("cls", [AdamWSGG_v2, AdafactorSGG, ShampooSGG_v2])
def test_resume_keeps_fp32_state_of_bf16_weights_and_uint8_labels(cls):
    p = torch.nn.Parameter(torch.randn(6, 5).to(torch.bfloat16))
    opt = cls([p], lr=1e-2)
    grads = [torch.randn(6, 5).to(torch.bfloat16) for _ in range(6)]
    for g in grads[:3]:
        p.grad = g
        opt.step()
    saved_p, saved_state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    for g in grads[3:]:
        p.grad = g
        opt.step()
    q = torch.nn.Parameter(saved_p)
    opt2 = cls([q], lr=1e-2)
    opt2.load_state_dict(saved_state)
    assert opt2.state[q]["sgg_labels"].dtype == torch.uint8
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    for g in grads[3:]:
        q.grad = g
        opt2.step()
    assert torch.equal(p.detach(), q.detach())


# ------------------------------------------------------------------------------------------------ flat step
FLAT_KW = {
    AdamWSGG: {},
    AdamWSGG_v2: {},
    AdafactorSGG: {},
    LambSGG_v2: {"t_total": 20},
    ShampooSGG_v2: {"precondition_frequency": 2},
}


@pytest.mark.parametrize("cls", ALL)
def test_step_ops_do_not_grow_with_tensor_count_and_never_sync(cls):
    # step 3 re-clusters (interval 2): k-means is batched over all tensors too
    def make_opt(groups):
        return cls(groups, lr=1e-3, recluster_interval=2, **FLAT_KW[cls])

    small, small_all = step_ops(make_opt, 12)  # 24 tensors
    large, large_all = step_ops(make_opt, 48)  # 96 tensors
    assert small == large
    assert HOST_SYNC not in small_all and HOST_SYNC not in large_all


@pytest.mark.parametrize("cls", ALL)
def test_joint_step_equals_separate_optimizers_with_uneven_steps(cls):
    """SGG is per tensor: one optimizer over mixed shapes (a 1-D and a 2-D tensor of one matrix shape, a 0-d
    tensor) whose tensors skip different steps (per-tensor bias corrections, partial re-clustering) must match
    one optimizer per tensor."""
    shapes = [(6, 5), (4,), (4, 1), (6, 5), (2, 3, 1, 1), ()]
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    kw = dict(lr=1e-2, recluster_interval=2, n_clusters=3, **FLAT_KW[cls])
    joint = [torch.nn.Parameter(t.clone()) for t in start]
    alone = [torch.nn.Parameter(t.clone()) for t in start]
    opt = cls(joint, **kw)
    opts = [cls([p], **kw) for p in alone]
    for step in range(9):
        for i, (p, q) in enumerate(zip(joint, alone, strict=True)):
            skip = i % 2 == 1 and step % 3 == i % 3
            g = None if skip else torch.randn(p.shape, generator=gen, dtype=torch.float64) * 10.0 ** -(i % 4)
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        for q, o in zip(alone, opts, strict=True):
            if q.grad is not None:
                o.step()
    for p, q, o in zip(joint, alone, opts, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["sgg_scale"], o.state[q]["sgg_scale"], rtol=1e-12, atol=0)
