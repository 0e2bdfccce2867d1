"""SophiaG against a float64 transcription of Algorithm 3 of Liu et al. 2023 (arXiv 2305.14342)."""

from __future__ import annotations

import copy

import pytest
import torch

from library.optimizers.references import sophia_reference
from library.optimizers.sophia import SophiaG


def test_matches_float64_reference_with_hessian_refresh_every_k_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, 7, generator=gen, dtype=torch.float64) * 0.1 for _ in range(20)]
    gnb = {t: torch.randn(5, 7, generator=gen, dtype=torch.float64) for t in range(1, 21)}
    hp = dict(lr=0.05, beta1=0.9, beta2=0.95, rho=0.02, wd=0.1, eps=1e-12, k=3, batch=4)

    param = torch.nn.Parameter(theta0.clone())
    opt = SophiaG(
        [param],
        lr=hp["lr"],
        betas=(hp["beta1"], hp["beta2"]),
        rho=hp["rho"],
        weight_decay=hp["wd"],
        eps=hp["eps"],
        hessian_update_interval=hp["k"],
    )
    for t, g in enumerate(grads, start=1):
        param.grad = g.clone()
        opt.step()
        if t % opt.hessian_update_interval == 0:  # what the training loop does
            param.grad = gnb[t].clone()
            opt.update_hessian(batch_size=hp["batch"])

    theta, m, h = sophia_reference(theta0, grads, gnb, **hp)
    torch.testing.assert_close(param.detach(), theta, rtol=0, atol=1e-13)
    torch.testing.assert_close(opt.state[param]["exp_avg"], m, rtol=0, atol=1e-15)
    torch.testing.assert_close(opt.state[param]["hessian"], h, rtol=0, atol=1e-15)
    # the clip is active on part of the tensor and inactive on the rest, so both branches were compared
    ratio = (m / torch.clamp(hp["rho"] * h, min=hp["eps"])).abs()
    assert (ratio > 1).any() and (ratio < 1).any()


def test_step_never_exceeds_lr_per_coordinate() -> None:
    param = torch.nn.Parameter(torch.zeros(100))
    opt = SophiaG([param], lr=0.01, weight_decay=0.0)
    param.grad = torch.randn(100) * 1e3
    opt.step()
    assert param.detach().abs().max() <= 0.01 + 1e-9
    assert (param.detach().abs() > 0.0099).all()  # h = 0 before the first refresh: clipped sign momentum


def test_update_hessian_reads_grad_and_changes_later_steps() -> None:
    param = torch.nn.Parameter(torch.ones(4))
    opt = SophiaG([param], lr=0.1, betas=(0.9, 0.99), rho=1.0, weight_decay=0.0)
    param.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    opt.update_hessian(batch_size=2)
    torch.testing.assert_close(opt.state[param]["hessian"], 0.01 * 2 * torch.tensor([1.0, 4.0, 9.0, 16.0]))
    before = param.detach().clone()
    param.grad = torch.full((4,), 1e-3)
    opt.step()
    moved = (before - param.detach()).abs()
    # m = 1e-4; denominators ρh = 0.02..0.32: every coordinate is unclipped and moves lr·m/(ρh)
    torch.testing.assert_close(moved, 0.1 * 1e-4 / (0.02 * torch.tensor([1.0, 4.0, 9.0, 16.0])))


def test_training_with_gauss_newton_bartlett_reduces_logistic_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    y = (x @ torch.randn(10, 3, generator=gen)).argmax(1)
    weight = torch.nn.Parameter(torch.zeros(10, 3))
    opt = SophiaG([weight], lr=0.05, rho=0.05, weight_decay=0.0, hessian_update_interval=5)
    loss_fn = torch.nn.functional.cross_entropy
    start = loss_fn(x @ weight, y).item()
    for step in range(1, 101):
        opt.zero_grad()
        loss_fn(x @ weight, y).backward()
        opt.step()
        if step % opt.hessian_update_interval == 0:
            opt.zero_grad()
            logits = x @ weight
            sampled = torch.multinomial(logits.detach().softmax(1), 1, generator=gen).squeeze(1)  # ŷ ~ model
            loss_fn(logits, sampled).backward()
            opt.update_hessian(batch_size=x.shape[0])
    assert loss_fn(x @ weight, y).item() < 0.5 * start
    assert opt.state[weight]["hessian"].min() > 0


def test_state_dict_round_trip_resumes_exactly() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(3, 4) for _ in range(12)]
    param = torch.nn.Parameter(torch.randn(3, 4))

    def run(opt, p, gs, offset):
        for t, g in enumerate(gs, start=offset):
            p.grad = g.clone()
            opt.step()
            if t % 2 == 0:
                p.grad = g.flip(0).clone()
                opt.update_hessian()

    opt = SophiaG([param], lr=0.01, hessian_update_interval=2)
    run(opt, param, grads[:6], 1)
    saved_state, saved_param = copy.deepcopy(opt.state_dict()), param.detach().clone()
    run(opt, param, grads[6:], 7)

    param2 = torch.nn.Parameter(saved_param)
    opt2 = SophiaG([param2], lr=0.01, hessian_update_interval=2)
    opt2.load_state_dict(saved_state)
    run(opt2, param2, grads[6:], 7)
    assert torch.equal(param.detach(), param2.detach())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr -1.0"),
        ({"betas": (0.9, 1.0)}, r"betas \(0.9, 1.0\)"),
        ({"rho": 0.0}, "rho 0.0"),
        ({"weight_decay": -0.1}, "weight_decay -0.1"),
        ({"eps": 0.0}, "eps 0.0"),
        ({"hessian_update_interval": 0}, "hessian_update_interval 0"),
        ({"hessian_update_interval": 2.5}, "hessian_update_interval 2.5"),
    ],
)
def test_invalid_hyper_parameters_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"SophiaG: invalid {message}"):
        SophiaG([torch.nn.Parameter(torch.ones(2))], **kwargs)
