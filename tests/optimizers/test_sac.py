"""SAC (AdamWSAC, Adam_miniSAC) and Adam_mini: float64 references, scale bounds, partitions, loss, resume."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from library.errors import OptimizerError
from library.optimizers.adam_mini import Adam_mini, adam_mini_blocks
from library.optimizers.names import QUERY_KEY_VALUE, head_count, is_head_structured, lora_role
from library.optimizers.references import AdamMiniReference, SACReference, lower_median
from library.optimizers.sac import Adam_miniSAC, AdamWSAC, sac_scales, sac_units, unit_mda
from tests.optimizers.op_counting import HOST_SYNC, step_ops

NAMES = ["attn_to_q.lora_down.weight", "attn_to_q.lora_up.weight", "attn_to_v.lora_up.weight", "ff.bias"]


def lora_problem(seed: int = 0):
    """Regression through q/v-style LoRA factors: up tensors have dim=16 rows = 4 heads of 4."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 24, generator=gen)
    target = x @ torch.randn(24, 3, generator=gen) @ torch.randn(3, 16, generator=gen) * 0.5
    down = torch.nn.Parameter(torch.randn(4, 24, generator=gen) * 0.3)
    up_q = torch.nn.Parameter(torch.zeros(16, 4))
    up_v = torch.nn.Parameter(torch.randn(16, 4, generator=gen) * 0.1)
    bias = torch.nn.Parameter(torch.zeros(16))

    def loss_fn():
        h = x @ down.T
        return ((h @ up_q.T + torch.tanh(h @ up_v.T) + bias - target) ** 2).mean()

    return [down, up_q, up_v, bias], loss_fn


def make(cls, params, **kw):
    kw.setdefault("lr", 3e-2)
    kw.setdefault("dim", 16)
    kw.setdefault("n_heads", 4)
    return cls([{"params": params, "names": NAMES}], **kw)


def run(opt, params, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def test_unit_mda_and_scales_match_float64_reference():
    rng = np.random.default_rng(0)
    updates = [
        rng.normal(size=(8, 3)) * 10.0 ** rng.uniform(-2, 1, size=(8, 1)),
        rng.normal(size=(5,)),
        np.zeros(4),
    ]
    units = [4, 1, 1]
    mdas = [unit_mda(torch.from_numpy(u), n) for u, n in zip(updates, units, strict=True)]
    ref_mdas = []
    for u, n in zip(updates, units, strict=True):
        blocks = u.reshape(n, -1)
        ref_mdas.append(np.array([lower_median(torch.from_numpy(np.abs(b - b.mean()))) for b in blocks]))
    for got, ref in zip(mdas, ref_mdas, strict=True):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    scales = sac_scales(mdas, 0.5, 3.0)
    flat = np.concatenate(ref_mdas)
    reference = lower_median(torch.from_numpy(flat[flat > 0]))
    for got, d in zip(scales, ref_mdas, strict=True):
        expected = np.clip(np.where(d > 0, reference / np.where(d > 0, d, 1.0), 1.0), 0.5, 3.0)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert scales[2].tolist() == [1.0]  # an all-zero update carries no signal: neutral scale


def test_sac_scale_of_units_without_signal_is_neutral_within_bounds():
    scales = sac_scales([torch.zeros(3, dtype=torch.float64)], 1.5, 4.0)
    assert scales[0].tolist() == [1.5, 1.5, 1.5]


@pytest.mark.parametrize("cls", [AdamWSAC, Adam_miniSAC])
def test_sac_scales_move_within_bounds_and_refresh_on_schedule(cls):
    params, loss_fn = lora_problem()
    opt = make(cls, params, scale_update_freq=4, scale_bound=(0.5, 4.0))
    history = []
    for _ in range(13):
        run(opt, params, loss_fn, 1)
        history.append(torch.cat([opt.state[p]["sac_scale"].reshape(-1) for p in params]).clone())
    for scales in history:
        assert torch.all(scales >= 0.5) and torch.all(scales <= 4.0)
    final = history[-1]
    assert not torch.all(final == 0.5)  # the original pinned every scale to the lower bound
    assert torch.any((final > 0.5) & (final < 4.0))
    assert final.max() > final.min()
    # refreshed on steps 1, 5, 9, 13 only
    changed = [i + 1 for i in range(1, 13) if not torch.equal(history[i], history[i - 1])]
    assert set(changed) <= {5, 9, 13} and changed
    metrics = opt.log_metrics()
    assert float(metrics["sac_scale_min"]) >= 0.5 and float(metrics["sac_scale_max"]) <= 4.0


def test_partitions_follow_names_dim_and_heads():
    shape_up, shape_down = torch.Size([16, 4]), torch.Size([4, 24])
    assert adam_mini_blocks("x_to_q.lora_up.weight", shape_up, 16, 4) == 4  # rows == dim: n_heads heads
    assert adam_mini_blocks("x_to_k.lora_up.weight", torch.Size([8, 4]), 16, 4) == 2  # rows / head_dim
    assert adam_mini_blocks("x_to_q.lora_up.weight", torch.Size([6, 4]), 16, 4) == 6  # no heads: per row
    assert adam_mini_blocks("x_to_q.lora_down.weight", shape_down, 16, 4) == 4  # rank rows, per row
    assert adam_mini_blocks("x_to_v.lora_up.weight", shape_up, 16, 4) == 16  # value: per output neuron
    assert (
        adam_mini_blocks(None, shape_up, 16, 4) == 16
        and adam_mini_blocks("x.bias", torch.Size([16]), 16, 4) == 1
    )
    assert sac_units("x_to_v.lora_up.weight", shape_up, 16, 4) == 4
    assert sac_units("x_to_q.lora_down.weight", shape_down, 16, 4) == 1
    assert sac_units(None, shape_up, 16, 4) == 1


def test_names_give_the_lora_side_and_head_structure():
    assert [lora_role(n) for n in ("m.lora_down.weight", "m.lora_B.default.weight", "m.weight", None)] == [
        "down", "up", None, None]  # fmt: skip
    assert is_head_structured("x_attn1_to_k.lora_up.weight") and not is_head_structured("x_to_k.lora_A.weight")
    assert not is_head_structured("x_to_v.lora_up.weight") and is_head_structured("x.v_proj.w", QUERY_KEY_VALUE)
    assert head_count(24, 16, 4) == 6 and head_count(6, 16, 4) is None


def test_adam_mini_matches_float64_reference():
    rng = np.random.default_rng(3)
    theta0 = rng.normal(size=(8, 3))
    p = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = Adam_mini([{"params": [p], "names": ["blk.q_proj.weight"]}], dim=8, n_heads=2, **hp)
    ref = AdamMiniReference([torch.from_numpy(theta0)], [2], **hp)  # two heads of four rows
    for _ in range(5):
        g = rng.normal(size=theta0.shape) * np.array([[1.0]] * 4 + [[1e-2]] * 4)
        p.grad = torch.from_numpy(g)
        opt.step()
        ref.step([p.grad])
    np.testing.assert_allclose(p.detach().numpy(), ref.p[0].numpy(), rtol=1e-11, atol=1e-14)
    assert opt.state[p]["block_sq"].shape == (2, 1)


# A LoRA pair of a query projection, a value projection's up factor, a full key weight, a bias and a scalar, with
# the blocks the paper's partition gives them at dim=16, n_heads=4 (head_dim 4) and SAC's units.
REF_NAMES = ["a.to_q.lora_down.weight", "a.to_q.lora_up.weight", "a.to_v.lora_up.weight", "a.to_k.weight",
             "a.norm.bias", "a.gate"]  # fmt: skip
REF_SHAPES = [(4, 24), (16, 4), (16, 4), (8, 16), (16,), ()]
MINI_BLOCKS = [4, 4, 16, 2, 1, 1]  # down: rank rows; q up: 4 heads; v: rows; k (8 rows): 2 heads; whole vectors
SAC_UNITS = [1, 4, 4, 2, 1, 1]  # q/k/v heads, a down factor never; the rest whole


def _reference_problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in REF_SHAPES]

    def grad(shape):  # per-row magnitudes over three decades, so blocks and units differ
        rows = torch.randint(0, 3, shape[:1], generator=gen).to(torch.float64)
        row_scale = (0.1**rows).reshape(shape[:1] + (1,) * (len(shape) - 1))
        return torch.randn(shape, generator=gen, dtype=torch.float64) * row_scale

    return start, [[grad(s) for s in REF_SHAPES] for _ in range(7)]


def test_adam_mini_on_lora_factors_and_heads_matches_float64_reference():
    start, grads = _reference_problem(11)
    params = [torch.nn.Parameter(t.clone()) for t in start]
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = Adam_mini([{"params": params, "names": REF_NAMES}], dim=16, n_heads=4, **hp)
    ref = AdamMiniReference(start, MINI_BLOCKS, **hp)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(step_grads)
    assert [opt.state[p]["block_sq"].shape[0] for p in params] == MINI_BLOCKS
    for p, expected in zip(params, ref.p, strict=True):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls", [AdamWSAC, Adam_miniSAC])
def test_sac_matches_float64_reference_across_refreshes(cls):
    start, grads = _reference_problem(12)
    params = [torch.nn.Parameter(t.clone()) for t in start]
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    sac = dict(scale_update_freq=3, scale_bound=(0.5, 4.0))
    opt = cls([{"params": params, "names": REF_NAMES}], dim=16, n_heads=4, **hp, **sac)
    blocks = MINI_BLOCKS if cls is Adam_miniSAC else None
    ref = SACReference(start, SAC_UNITS, blocks=blocks, **hp, **sac)
    for step_grads in grads:  # refreshes on steps 1, 4 and 7
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref.step(step_grads)
    for p, expected, scales, units in zip(params, ref.p, ref.scales, SAC_UNITS, strict=True):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)
        rows = opt.state[p]["sac_scale"].reshape(-1)
        torch.testing.assert_close(rows, scales.repeat_interleave(rows.numel() // units), rtol=1e-12, atol=0)
    every = torch.cat(ref.scales)
    assert every.min() < 1.0 < every.max() and every.max() < 4.0  # real scaling, inside the bounds


def test_adamw_sac_is_adamw_times_the_unit_scale():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 4, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    sac = AdamWSAC([{"params": [p], "names": ["a_to_k.lora_up.weight"]}], lr=1e-2, dim=16, n_heads=4)
    ref = torch.optim.AdamW([q], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    g = (
        torch.randn(16, 4, dtype=torch.float64)
        * torch.tensor([1.0, 1e-3, 1.0, 1e-2]).repeat_interleave(4)[:, None]
    )
    p.grad, q.grad = g.clone(), g.clone()
    before = p.detach().clone()
    sac.step()
    ref.step()
    scale = sac.state[p]["sac_scale"]
    decayed = before * (1 - 1e-2 * 0.01)
    torch.testing.assert_close(p.detach() - decayed, (q.detach() - decayed) * scale, rtol=1e-10, atol=1e-14)
    assert scale.shape == (16, 1) and len(set(scale.reshape(-1).tolist())) > 1


def test_opentome_defaults_and_explicit_values_win():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert AdamWSAC(p).defaults["betas"] == (0.9, 0.99)
    mini = Adam_miniSAC(p)
    assert mini.defaults["betas"] == (0.9, 0.99) and mini.defaults["eps"] == 1e-8
    assert AdamWSAC(p, betas=(0.8, 0.9)).defaults["betas"] == (0.8, 0.9)
    assert Adam_miniSAC(p, eps=1e-6).defaults["eps"] == 1e-6
    assert (
        AdamWSAC(p).defaults["scale_bound"] == (0.5, 10.0)
        and AdamWSAC(p).defaults["scale_update_freq"] == 1000
    )


@pytest.mark.parametrize("cls", [Adam_mini, AdamWSAC, Adam_miniSAC])
def test_reduces_loss_of_lora_regression(cls):
    params, loss_fn = lora_problem()
    kw = {} if cls is Adam_mini else {"scale_update_freq": 10}
    opt = make(cls, params, **kw)
    with torch.no_grad():
        start = loss_fn().item()
    run(opt, params, loss_fn, 120)
    with torch.no_grad():
        assert loss_fn().item() < 0.3 * start


@pytest.mark.parametrize("cls", [Adam_mini, AdamWSAC, Adam_miniSAC])
def test_resume_from_state_dict_is_bitwise_exact(cls):
    kw = {} if cls is Adam_mini else {"scale_update_freq": 3}
    params, loss_fn = lora_problem()
    opt = make(cls, params, **kw)
    run(opt, params, loss_fn, 5)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(opt, params, loss_fn, 7)
    params2, loss_fn2 = lora_problem()
    with torch.no_grad():
        for p, s in zip(params2, saved_params, strict=True):
            p.copy_(s)
    opt2 = make(cls, params2, **kw)
    opt2.load_state_dict(saved_state)
    run(opt2, params2, loss_fn2, 7)
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_plain_parameter_list_without_names_works():
    params, loss_fn = lora_problem()
    opt = Adam_miniSAC(params, lr=3e-2, dim=16, n_heads=4, scale_update_freq=5)
    run(opt, params, loss_fn, 10)
    assert all(opt.state[p]["sac_scale"].numel() in (16, 4) for p in params)
    assert opt.state[params[1]]["block_sq"].shape == (16, 1)  # per row without names


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (AdamWSAC, {"scale_update_freq": 0}, "scale_update_freq"),
        (AdamWSAC, {"scale_bound": (0.0, 1.0)}, "scale_bound"),
        (Adam_miniSAC, {"n_heads": 0}, "n_heads"),
        (Adam_mini, {"dim": 2, "n_heads": 4}, "n_heads"),
        (AdamWSAC, {"dim": 10, "n_heads": 4}, "n_heads"),  # heads of whole rows: n_heads divides dim
        (Adam_mini, {"lr": -1.0}, "lr"),
    ],
)
def test_invalid_settings_raise_optimizer_error_naming_the_key(cls, kwargs, key):
    with pytest.raises(OptimizerError, match=key):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_names_must_line_up_with_params():
    with pytest.raises(OptimizerError, match="names"):
        AdamWSAC([{"params": [torch.nn.Parameter(torch.zeros(2))], "names": ["a", "b"]}])


@pytest.mark.parametrize("cls", [Adam_mini, AdamWSAC, Adam_miniSAC])
def test_step_ops_do_not_grow_with_tensor_count_and_never_sync(cls):
    # step 3 refreshes the SAC scales (every 2 steps): the MDA medians are batched over all units too
    def make_opt(groups):
        kw = {} if cls is Adam_mini else {"scale_update_freq": 2}
        return cls(groups, lr=1e-3, dim=16, n_heads=4, **kw)

    small, small_all = step_ops(make_opt, 12)  # 24 tensors
    large, large_all = step_ops(make_opt, 48)  # 96 tensors
    assert small == large
    assert HOST_SYNC not in small_all and HOST_SYNC not in large_all


def test_adam_mini_joint_step_equals_separate_optimizers_with_uneven_steps():
    """Adam-mini is per tensor: one optimizer whose tensors skip different steps matches one per tensor."""
    shapes = [(16, 4), (4, 24), (16,), (16, 4), ()]
    names = ["a_to_q.lora_up.weight", "a_to_q.lora_down.weight", "b.bias", "c_to_v.lora_up.weight", "d.scale"]
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    kw = dict(lr=1e-2, weight_decay=0.1, dim=16, n_heads=4)
    joint = [torch.nn.Parameter(t.clone()) for t in start]
    alone = [torch.nn.Parameter(t.clone()) for t in start]
    opt = Adam_mini([{"params": joint, "names": names}], **kw)
    opts = [Adam_mini([{"params": [q], "names": [n]}], **kw) for q, n in zip(alone, names, strict=True)]
    for step in range(7):
        for i, (p, q) in enumerate(zip(joint, alone, strict=True)):
            skip = i % 2 == 1 and step % 3 == i % 3
            g = None if skip else torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad, q.grad = g, None if g is None else g.clone()
        opt.step()
        for q, o in zip(alone, opts, strict=True):
            if q.grad is not None:
                o.step()
    for p, q in zip(joint, alone, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)
    assert opt.state[joint[0]]["block_sq"].shape == (4, 1)


@pytest.mark.parametrize("lagging", [1, 2])
def test_sac_refresh_of_some_tensors_keeps_the_others_and_uses_only_their_units(lagging):
    params, loss_fn = lora_problem()
    opt = make(AdamWSAC, params, scale_update_freq=3)
    run(opt, params, loss_fn, 2)
    opt.zero_grad()
    loss_fn().backward()
    params[lagging].grad = None  # one tensor falls a step behind: the others refresh alone on their step 4
    opt.step()
    before = opt.state[params[lagging]]["sac_scale"].clone()
    opt.zero_grad()
    loss_fn().backward()
    grads = [p.grad.clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    opt.step()
    assert torch.equal(opt.state[params[lagging]]["sac_scale"], before)  # at its step 3: not due
    # the refreshed scales follow the definition over the refreshed tensors' units only (float64 reference)
    refreshed = [i for i in range(len(params)) if i != lagging]
    mdas = []
    for i in refreshed:
        s = state["state"][i]
        m = s["exp_avg"].double() * 0.9 + 0.1 * grads[i].double()
        v = s["exp_avg_sq"].double() * 0.99 + 0.01 * grads[i].double() ** 2
        t = s["step"] + 1
        u = (m / (1 - 0.9**t)) / ((v / (1 - 0.99**t)).sqrt() + 1e-8)
        mdas.append(unit_mda(u, s["sac_units"]))
    expected = sac_scales(mdas, 0.5, 10.0)
    for i, e in zip(refreshed, expected, strict=True):
        got = opt.state[params[i]]["sac_scale"].reshape(-1).double()
        torch.testing.assert_close(got, e.repeat_interleave(got.numel() // e.numel()), rtol=1e-4, atol=0)
