"""The shared transforms against float64 definitions written coordinate by coordinate (docs/optimizers.md, the cited papers)."""

import math

import pytest
import torch

from library.optimizers import transforms as T

F64 = torch.float64


def _rand(*shape, seed):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _flat(x):
    return x.reshape(-1).tolist()


def test_orthograd_matches_definition_and_skips_zero_weights():
    thetas = [_rand(4, 3, seed=1), torch.zeros(5, 2, dtype=F64), _rand(7, seed=2)]
    grads = [_rand(4, 3, seed=3), _rand(5, 2, seed=4), _rand(7, seed=5)]
    expected = []
    for theta, g in zip(thetas, grads, strict=True):
        th, gg = _flat(theta), _flat(g)
        tt = sum(a * a for a in th)
        if tt <= 1e-30:
            expected.append(list(gg))
            continue
        coef = sum(a * b for a, b in zip(th, gg, strict=True)) / tt
        perp = [b - coef * a for a, b in zip(th, gg, strict=True)]
        scale = math.sqrt(sum(b * b for b in gg)) / math.sqrt(sum(b * b for b in perp))
        expected.append([b * scale for b in perp])
    work = [g.clone() for g in grads]
    T.orthograd_(thetas, work)
    for w, e, theta, g in zip(work, expected, thetas, grads, strict=True):
        assert torch.allclose(w.reshape(-1), torch.tensor(e, dtype=F64), rtol=1e-12, atol=1e-12)
        assert torch.dot(w.reshape(-1), theta.reshape(-1)).abs() < 1e-12
        assert torch.isclose(w.norm(), g.norm(), rtol=1e-12)
    assert torch.equal(work[1], grads[1])


def test_agr_matches_definition():
    grads = [_rand(6, 4, seed=7), torch.zeros(3, dtype=F64)]
    g = _flat(grads[0])
    mass = sum(abs(x) for x in g)
    expected = [x - (abs(x) / mass) * x for x in g]
    work = [x.clone() for x in grads]
    T.agr_(work)
    assert torch.allclose(work[0].reshape(-1), torch.tensor(expected, dtype=F64), rtol=1e-13, atol=0)
    assert torch.equal(work[1], grads[1])  # all-zero gradient stays zero, no NaN


def test_grams_takes_sign_from_gradient_and_magnitude_from_update():
    u, g = _rand(10, seed=8), _rand(10, seed=9)
    g[3] = 0.0
    expected = [math.copysign(abs(a), b) if b != 0 else 0.0 for a, b in zip(_flat(u), _flat(g), strict=True)]
    work = [u.clone()]
    T.grams_(work, [g])
    assert work[0].tolist() == expected


def test_cautious_masks_disagreeing_coordinates_and_rescales():
    u, g = _rand(8, seed=10), _rand(8, seed=11)
    agree = [1.0 if a * b > 0 else 0.0 for a, b in zip(_flat(u), _flat(g), strict=True)]
    frac = max(sum(agree) / len(agree), 1e-3)
    expected = [a * k / frac for a, k in zip(_flat(u), agree, strict=True)]
    work = [u.clone()]
    T.cautious_(work, [g])
    assert torch.allclose(work[0], torch.tensor(expected, dtype=F64), rtol=1e-14, atol=0)
    assert 0 < sum(agree) < len(agree)  # the case really masks something


def test_cautious_all_disagree_gives_zero_not_nan():
    u = torch.ones(4, dtype=F64)
    work = [u.clone()]
    T.cautious_(work, [-u])
    assert torch.equal(work[0], torch.zeros(4, dtype=F64))


def test_tam_damping_follows_smoothed_cosine():
    m = [_rand(5, seed=12), torch.zeros(3, dtype=F64)]
    x = [_rand(5, seed=13), _rand(3, seed=14)]
    s = [torch.tensor(0.3, dtype=F64), torch.tensor(-0.2, dtype=F64)]
    beta = 0.9
    a, b = _flat(m[0]), _flat(x[0])
    cos0 = sum(i * j for i, j in zip(a, b, strict=True)) / (
        math.sqrt(sum(i * i for i in a)) * math.sqrt(sum(j * j for j in b))
    )
    s_new = [beta * 0.3 + (1 - beta) * cos0, beta * -0.2 + (1 - beta) * 0.0]  # zero momentum: cos = 0
    d = T.tam_damping_(m, x, s, beta)
    for got, want, d_i in zip(s, s_new, d, strict=True):
        assert got.item() == pytest.approx(want, rel=1e-13)
        assert d_i.item() == pytest.approx((1 + want) / 2, rel=1e-13)


def test_tam_damps_a_gradient_opposing_the_momentum_more():
    m = [torch.ones(4, dtype=F64)]
    s_with, s_against = [torch.tensor(0.0, dtype=F64)], [torch.tensor(0.0, dtype=F64)]
    d_with = T.tam_damping_(m, [torch.ones(4, dtype=F64)], s_with, 0.5)[0]
    d_against = T.tam_damping_(m, [-torch.ones(4, dtype=F64)], s_against, 0.5)[0]
    assert d_with.item() == pytest.approx(0.75) and d_against.item() == pytest.approx(0.25)


def test_allora_row_scale_matches_definition():
    eta = 2.0
    p = _rand(3, 5, seed=15)
    p[1] = 0.0
    u = _rand(3, 5, seed=16)
    expected = []
    for i in range(3):
        row_sq = sum(v * v for v in p[i].tolist())
        expected.append([v / math.sqrt(row_sq + 1 / eta**2) for v in u[i].tolist()])
    work = [u.clone()]
    T.allora_scale_(work, [p], eta)
    assert torch.allclose(work[0], torch.tensor(expected, dtype=F64), rtol=1e-14, atol=0)
    assert torch.allclose(work[0][1], u[1] * eta)  # a zero row gets the largest factor, η


def test_allora_scale_on_conv_shaped_lora():
    p = _rand(4, 3, 3, 3, seed=17)
    scales = T.allora_row_scale([p], 2.0)[0]
    assert scales.shape == (4, 1, 1, 1)
    want = 1 / torch.sqrt(p.reshape(4, -1).square().sum(1) + 0.25)
    assert torch.allclose(scales.reshape(-1), want, rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transforms_keep_dtype_and_stay_finite(dtype):
    theta = [torch.randn(8, 4).to(dtype), torch.zeros(4, 2, dtype=dtype)]
    grads = [torch.randn(8, 4).to(dtype), torch.zeros(4, 2, dtype=dtype)]
    T.orthograd_(theta, grads)
    T.agr_(grads)
    u = [g.clone() for g in grads]
    T.grams_(u, grads)
    T.cautious_(u, grads)
    T.allora_scale_(u, theta, 2.0)
    for x in grads + u:
        assert x.dtype == dtype and torch.isfinite(x.float()).all()
