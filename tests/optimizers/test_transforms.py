"""The flat-buffer transforms against float64 definitions written coordinate by coordinate (docs/optimizers.md, the cited papers)."""

import contextlib
import math

import pytest
import torch

from library.optimizers import transforms as T
from library.optimizers.flat import FlatLayout, segment_ids
from library.optimizers.references import (
    adopt_input_reference,
    adopt_moments_reference,
    ref_allora,
    spd_reference,
)

F64 = torch.float64


class Flat:
    """Tensors laid end to end as the optimizer lays them: a layout, its Segments and flat copies."""

    def __init__(self, tensors):
        self.layout = FlatLayout([t.shape for t in tensors], "cpu")
        self.seg = T.Segments(self.layout)

    def flat(self, tensors):
        return self.layout.flatten(tensors)

    def split(self, flat):
        return self.layout.views(flat)

    def per_tensor(self, values):
        """Per-tensor results (layout order) back in the caller's order."""
        out = [None] * self.layout.count
        for j, i in enumerate(self.layout.order):
            out[i] = values[j]
        return out


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
    f = Flat(grads)
    flat_g = f.flat(grads)
    T.orthograd_(f.seg, f.flat(thetas), flat_g)
    work = f.split(flat_g)
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
    f = Flat(grads)
    flat_g = f.flat(grads)
    T.agr_(f.seg, flat_g)
    work = f.split(flat_g)
    assert torch.allclose(work[0].reshape(-1), torch.tensor(expected, dtype=F64), rtol=1e-13, atol=0)
    assert torch.equal(work[1], grads[1])  # all-zero gradient stays zero, no NaN


def test_grams_takes_sign_from_gradient_and_magnitude_from_update():
    u, g = _rand(10, seed=8), _rand(10, seed=9)
    g[3] = 0.0
    expected = [math.copysign(abs(a), b) if b != 0 else 0.0 for a, b in zip(_flat(u), _flat(g), strict=True)]
    assert T.grams(u, g).tolist() == expected


def test_cautious_masks_disagreeing_coordinates_and_rescales():
    u, g = _rand(8, seed=10), _rand(8, seed=11)
    agree = [1.0 if a * b > 0 else 0.0 for a, b in zip(_flat(u), _flat(g), strict=True)]
    frac = max(sum(agree) / len(agree), 1e-3)
    expected = [a * k / frac for a, k in zip(_flat(u), agree, strict=True)]
    f = Flat([u])
    got = T.cautious(f.seg, u, g)
    assert torch.allclose(got, torch.tensor(expected, dtype=F64), rtol=1e-14, atol=0)
    assert 0 < sum(agree) < len(agree)  # the case really masks something


def test_cautious_all_disagree_gives_zero_not_nan():
    u = torch.ones(4, dtype=F64)
    assert torch.equal(T.cautious(Flat([u]).seg, u, -u), torch.zeros(4, dtype=F64))


def test_tam_damping_follows_smoothed_cosine():
    m = [_rand(5, seed=12), torch.zeros(3, dtype=F64)]
    x = [_rand(5, seed=13), _rand(3, seed=14)]
    beta = 0.9
    a, b = _flat(m[0]), _flat(x[0])
    cos0 = sum(i * j for i, j in zip(a, b, strict=True)) / (
        math.sqrt(sum(i * i for i in a)) * math.sqrt(sum(j * j for j in b))
    )
    s_new = [beta * 0.3 + (1 - beta) * cos0, beta * -0.2 + (1 - beta) * 0.0]  # zero momentum: cos = 0
    f = Flat(m)
    smoothed = torch.tensor(f.layout.arrange([0.3, -0.2]), dtype=F64)
    d = f.per_tensor(T.tam_damping_(f.seg, f.flat(m), f.flat(x), smoothed, beta))
    for got, want, d_i in zip(f.per_tensor(smoothed), s_new, d, strict=True):
        assert got.item() == pytest.approx(want, rel=1e-13)
        assert d_i.item() == pytest.approx((1 + want) / 2, rel=1e-13)


def test_tam_damps_a_gradient_opposing_the_momentum_more():
    m = torch.ones(4, dtype=F64)
    seg = Flat([m]).seg
    d_with = T.tam_damping_(seg, m, torch.ones(4, dtype=F64), torch.zeros(1, dtype=F64), 0.5)[0]
    d_against = T.tam_damping_(seg, m, -torch.ones(4, dtype=F64), torch.zeros(1, dtype=F64), 0.5)[0]
    assert d_with.item() == pytest.approx(0.75) and d_against.item() == pytest.approx(0.25)


def row_index(layout):
    """For every flat element, the index of its row among all rows of the layout (rows in flat order)."""
    cols = [b.cols for b in layout.buckets for _ in range(b.count * b.rows)]
    return segment_ids(torch.tensor(cols, dtype=torch.int64), layout.numel)


def _row_factors(tensors, eta):
    """ALLoRA factors spread over the elements, back in the caller's tensor shapes."""
    f = Flat(tensors)
    flat = f.flat(tensors)
    stacks = [f.layout.bucket_view(flat, b) for b in f.layout.buckets]
    rows = T.allora_row_scale(stacks, eta)
    return f.split(rows.index_select(0, row_index(f.layout)))


def test_allora_row_scale_matches_definition():
    eta = 2.0
    p = _rand(3, 5, seed=15)
    p[1] = 0.0
    u = _rand(3, 5, seed=16)
    expected = []
    for i in range(3):
        row_sq = sum(v * v for v in p[i].tolist())
        expected.append([v / math.sqrt(row_sq + 1 / eta**2) for v in u[i].tolist()])
    scaled = u * _row_factors([p], eta)[0]
    assert torch.allclose(scaled, torch.tensor(expected, dtype=F64), rtol=1e-14, atol=0)
    assert torch.allclose(scaled[1], u[1] * eta)  # a zero row gets the largest factor, η


def test_allora_rows_of_mixed_shapes_and_conv_lora():
    """Rows are found per tensor however the layout reorders shapes (conv LoRA: a row is dim 0 by the rest)."""
    tensors = [_rand(4, 3, 3, 3, seed=17), _rand(2, 5, seed=18), _rand(4, 27, seed=19), _rand(6, seed=20)]
    for t, got in zip(tensors, _row_factors(tensors, 2.0), strict=True):
        rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
        want = 1 / torch.sqrt(rows.square().sum(1) + 0.25)
        assert torch.allclose(got.reshape(rows.shape), want[:, None].expand(rows.shape), rtol=1e-14, atol=0)


def test_segments_reduce_and_expand_per_tensor_in_layout_order():
    tensors = [_rand(3, 2, seed=21), _rand(5, seed=22), _rand(3, 2, seed=23), torch.zeros(0, dtype=F64)]
    f = Flat(tensors)
    flat = f.flat(tensors)
    sums = f.per_tensor(f.seg.sum(flat))
    maxima = f.per_tensor(f.seg.max(flat))
    for t, s, m in zip(tensors[:3], sums, maxima, strict=False):
        assert s.item() == pytest.approx(sum(t.reshape(-1).tolist()), rel=1e-14)
        assert m.item() == max(t.reshape(-1).tolist())
    assert sums[3].item() == 0.0
    spread = f.split(f.seg.expand(torch.arange(4, dtype=F64)))
    for j, i in enumerate(f.layout.order):
        assert torch.equal(spread[i], torch.full_like(tensors[i], float(j)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transforms_keep_dtype_and_stay_finite(dtype):
    theta = [torch.randn(8, 4).to(dtype), torch.zeros(4, 2, dtype=dtype)]
    grads = [torch.randn(8, 4).to(dtype), torch.zeros(4, 2, dtype=dtype)]
    f = Flat(theta)
    flat_theta, g = f.flat(theta), f.flat(grads)
    T.orthograd_(f.seg, flat_theta, g)
    T.agr_(f.seg, g)
    u = T.cautious(f.seg, T.grams(g, g), g)
    stacks = [f.layout.bucket_view(flat_theta, b) for b in f.layout.buckets]
    u = u * T.allora_row_scale(stacks, 2.0).index_select(0, row_index(f.layout))
    for x in (g, u):
        assert x.dtype == dtype and torch.isfinite(x.float()).all()


def test_sums_of_several_products_match_one_reduction_each():
    tensors = [_rand(3, 4, seed=40), _rand(7, seed=41), _rand(2, 2, 2, seed=42), torch.zeros(0, dtype=F64)]
    others = [_rand(*t.shape, seed=50 + i) for i, t in enumerate(tensors)]
    f = Flat(tensors)
    a, b = f.flat(tensors), f.flat(others)
    ab, aa = f.seg.sums((a, b), (a, a))
    expected_ab = [
        sum(x * y for x, y in zip(_flat(t), _flat(o), strict=True))
        for t, o in zip(tensors, others, strict=True)
    ]
    expected_aa = [sum(x * x for x in _flat(t)) for t in tensors]
    assert f.per_tensor(ab.tolist()) == pytest.approx(expected_ab, rel=1e-12, abs=0.0)
    assert f.per_tensor(aa.tolist()) == pytest.approx(expected_aa, rel=1e-12, abs=0.0)


def test_row_stacks_merge_equal_cols_and_give_the_same_row_factors():
    # two LoRA downs (rows=rank 4, different cols) and three ups of different rows sharing cols=4 (the rank)
    tensors = [
        _rand(4, 6, seed=60),
        _rand(4, 10, seed=61),
        _rand(5, 4, seed=62),
        _rand(9, 4, seed=63),
        _rand(9, 2, 2, seed=64),
    ]
    f = Flat(tensors)
    flat = f.flat(tensors)
    stacks = T.row_stacks(f.layout, flat)
    assert [tuple(s.shape) for s in stacks] == [
        (4, 6),
        (4, 10),
        (5 + 9 + 9, 4),
    ]  # 4 distinct shapes, 3 stacks
    for s in stacks:
        assert s.data_ptr() >= flat.data_ptr()  # views, not copies
    by_bucket = T.allora_row_scale([f.layout.bucket_view(flat, b) for b in f.layout.buckets], 2.0)
    out = torch.full_like(by_bucket, float("nan"))
    merged = T.allora_row_scale(stacks, 2.0, out=out)
    assert merged.data_ptr() == out.data_ptr()
    torch.testing.assert_close(merged, by_bucket, rtol=1e-15, atol=0.0)
    expected = [1.0 / math.sqrt(sum(v * v for v in row.tolist()) + 0.25) for s in stacks for row in s]
    assert merged.tolist() == pytest.approx(expected, rel=1e-12)


# ----- ADOPT, SPD, ALLoRA, the step: against the per-tensor float64 references of CustomAdamW ---------------------


def _adopt_case():
    """Three tensors at steps 1, 5 and 16: one whose v has seen gradients (with zeros, so ε floors the
    normaliser, and large gradients, so the t^¼ clip acts), one at its initialising step (v all zero), one more."""
    v = [_rand(4, 3, seed=70).square_(), torch.zeros(5, dtype=F64), _rand(2, 2, 2, seed=71).square_()]
    v[0][0, 0] = 0.0
    g = [_rand(4, 3, seed=72) * 3.0, _rand(5, seed=73), _rand(2, 2, 2, seed=74)]
    return v, g, [1, 5, 16]


@pytest.mark.parametrize("uniform", [True, False], ids=["one-step", "per-tensor-steps"])
def test_adopt_input_normalises_by_the_previous_moment_and_clips(uniform):
    v, g, steps = _adopt_case()
    if uniform:
        steps = [5, 5, 5]
    eps = 1e-3
    f = Flat(v)
    if uniform:
        clip = steps[0] ** 0.25
        neg_clip = -clip
    else:
        clip = torch.tensor(f.layout.arrange([t**0.25 for t in steps]), dtype=F64)
        neg_clip = -clip
    x, ready = T.adopt_input(f.seg, f.flat(v), f.flat(g), eps, neg_clip, clip)
    clipped = 0
    for got, ok, vi, gi, t in zip(f.split(x), f.per_tensor(ready), v, g, steps, strict=True):
        want, want_ready = adopt_input_reference(vi, gi, eps, t)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0.0)
        assert ok.item() == float(want_ready)
        clipped += int((got.abs() == t**0.25).sum())
    assert f.per_tensor(ready.tolist()) == [1.0, 0.0, 1.0]  # the all-zero v is an initialising step
    assert clipped > 0  # the case really clips


def test_adopt_moments_update_ready_tensors_and_only_record_g2_on_the_first_step():
    v, g, steps = _adopt_case()
    m = [_rand(4, 3, seed=75), torch.zeros(5, dtype=F64), _rand(2, 2, 2, seed=76)]
    b1, b2, eps = 0.9, 0.99, 1e-6
    f = Flat(v)
    clip = torch.tensor(f.layout.arrange([t**0.25 for t in steps]), dtype=F64)
    flat_m, flat_v, flat_g = f.flat(m), f.flat(v), f.flat(g)
    x, ready = T.adopt_input(f.seg, flat_v, flat_g, eps, -clip, clip)
    inputs = f.split(x.clone())
    T.adopt_moments_(f.seg, flat_m, flat_v, x, flat_g, ready, T.adopt_lerp_coefs(b1, b2, F64, torch.device("cpu")))
    for i, (mi, vi, gi, t) in enumerate(zip(m, v, g, steps, strict=True)):
        xi, ok = adopt_input_reference(vi, gi, eps, t)
        torch.testing.assert_close(inputs[i], xi, rtol=1e-14, atol=0.0)
        want_m, want_v = adopt_moments_reference(mi, vi, xi, gi, ok, b1, b2)
        torch.testing.assert_close(f.split(flat_m)[i], want_m, rtol=1e-14, atol=1e-300)
        torch.testing.assert_close(f.split(flat_v)[i], want_v, rtol=1e-14, atol=1e-300)
    assert torch.equal(f.split(flat_v)[1], g[1] * g[1]) and torch.equal(f.split(flat_m)[1], m[1])  # init step


def _spd_case():
    """θ, θ₀ and g for four tensors: 0 steps away from θ₀ (⟨g, θ−θ₀⟩ < 0), 1 towards it, 2 at θ₀ (first step),
    3 with ⟨g, θ−θ₀⟩ < 0 but an update that brings it closer (r = 0)."""
    theta0 = [_rand(3, 4, seed=80), _rand(6, seed=81), _rand(2, 3, seed=82), _rand(5, seed=83)]
    dev = [_rand(3, 4, seed=84), _rand(6, seed=85), torch.zeros(2, 3, dtype=F64), _rand(5, seed=86)]
    theta = [a + d for a, d in zip(theta0, dev, strict=True)]
    g = [-dev[0] + 0.1 * _rand(3, 4, seed=87), dev[1], _rand(2, 3, seed=88), -dev[3]]
    update = [g[0], g[1], g[2], dev[3]]  # tensor 3's update points back to θ₀ whatever g says
    return theta, theta0, g, update


@pytest.mark.parametrize("per_tensor_strength", [False, True])
@pytest.mark.parametrize("indexed", [False, True])
def test_spd_step_decays_only_tensors_the_step_moves_away(per_tensor_strength, indexed):
    theta, theta0, g, update = _spd_case()
    lr, lam = 0.05, 0.3
    assert float((g[0] * (theta[0] - theta0[0])).sum()) < 0 < float((g[1] * (theta[1] - theta0[1])).sum())
    f = Flat(theta)
    flat_theta = f.flat(theta)
    strength = torch.full((4,), -lam, dtype=F64) if per_tensor_strength else -lam
    with f.seg.indexed() if indexed else contextlib.nullcontext():
        T.spd_step_(f.seg, flat_theta, f.flat(theta0), f.flat(g), f.flat(update), -lr, strength)
    got = f.split(flat_theta)
    for i in range(4):
        stepped = theta[i] - lr * update[i]
        want = spd_reference(theta[i], stepped, theta0[i], g[i], lam)
        torch.testing.assert_close(got[i], want, rtol=1e-13, atol=1e-15)
        decayed = not torch.allclose(want, stepped, rtol=1e-12, atol=0.0)
        assert decayed == (i == 0)  # only the tensor moving away is pulled back


def test_spd_sign_rule_follows_the_gradient_not_the_update():
    """The same update decays or not depending only on the sign of ⟨g, θ−θ₀⟩."""
    theta0, dev = _rand(8, seed=90), _rand(8, seed=91)
    theta, u = theta0 + dev, -dev  # the step θ − lr·u moves away from θ₀
    f = Flat([theta])
    results = []
    for g in (-dev, dev):
        flat_theta = theta.clone()
        T.spd_step_(f.seg, flat_theta, theta0, g.clone(), u, -0.1, -0.5)
        torch.testing.assert_close(flat_theta, spd_reference(theta, theta - 0.1 * u, theta0, g, 0.5), rtol=1e-14,
                                   atol=0.0)
        results.append(flat_theta)
    assert (results[0] - theta0).norm() < (theta + 0.1 * dev - theta0).norm()  # ⟨g, θ−θ₀⟩ < 0: pulled back
    torch.testing.assert_close(results[1], theta + 0.1 * dev, rtol=1e-15, atol=0.0)  # > 0: the plain step


def test_allora_scales_lora_rows_and_folds_in_the_lr_ratio():
    tensors = [_rand(4, 6, seed=92), _rand(9, 4, seed=93), _rand(7, seed=94)]  # down, up, a non-LoRA bias
    tensors[1][2] = 0.0
    updates = [_rand(*t.shape, seed=95 + i) for i, t in enumerate(tensors)]
    ratio, eta = 21.0, 2.0
    f = Flat(tensors)
    rows_of = [t.shape[0] if t.dim() > 1 else t.numel() for t in f.layout.arrange(tensors)]
    per_tensor = f.layout.arrange([(True, 1.0), (True, ratio), (False, 1.0)])
    lora_rows = torch.tensor([lora for (lora, _), n in zip(per_tensor, rows_of, strict=True) for _ in range(n)])
    row_lr = torch.tensor([r for (_, r), n in zip(per_tensor, rows_of, strict=True) for _ in range(n)], dtype=F64)
    flat_u = f.flat(updates)
    T.allora_(f.layout, f.flat(tensors), flat_u, eta, lora_rows=lora_rows, row_lr=row_lr)
    got = f.split(flat_u)
    torch.testing.assert_close(got[0], updates[0] * ref_allora(tensors[0], eta), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(got[1], ratio * updates[1] * ref_allora(tensors[1], eta), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(got[1][2], ratio * eta * updates[1][2], rtol=1e-14, atol=0.0)  # zero row: η
    assert torch.equal(got[2], updates[2])


def test_step_and_decoupled_decay():
    theta, u = _rand(6, seed=99), _rand(6, seed=100)
    for neg_lr in (-0.1, torch.tensor(-0.1, dtype=F64)):
        target = theta.clone()
        T.descend_(target, u, neg_lr)
        torch.testing.assert_close(target, theta - 0.1 * u, rtol=1e-15, atol=0.0)
    tensors = [_rand(3, seed=101), _rand(2, 2, seed=102)]
    f = Flat(tensors)
    flat = f.flat(tensors)
    T.decoupled_decay_(f.seg, flat, torch.tensor(f.layout.arrange([0.01, 0.2]), dtype=F64))
    for got, t, d in zip(f.split(flat), tensors, [0.01, 0.2], strict=True):
        torch.testing.assert_close(got, t * (1 - d), rtol=1e-15, atol=0.0)


def test_the_index_lives_only_inside_the_block_and_broadcasts_as_without_it():
    tensors = [_rand(3, 2, seed=70), _rand(5, seed=71), _rand(3, 2, seed=72)]
    f = Flat(tensors)
    values = torch.arange(3, dtype=F64)
    with f.seg.indexed():
        assert f.seg.index is not None
        per_step = f.seg.expand(values)
    assert f.seg.index is None  # dropped after the block: no 4 bytes per element between steps
    want = torch.repeat_interleave(values, torch.tensor(f.layout.lengths))
    assert torch.equal(per_step, want) and torch.equal(f.seg.expand(values), want)
