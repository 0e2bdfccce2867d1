"""The flat-buffer transforms against float64 definitions written coordinate by coordinate (docs/optimizers.md, the cited papers)."""

import math

import pytest
import torch

from library.optimizers import transforms as T
from library.optimizers.flat import FlatLayout, segment_ids

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


def test_a_kept_index_outlives_the_step_and_gives_the_same_broadcast():
    tensors = [_rand(3, 2, seed=70), _rand(5, seed=71), _rand(3, 2, seed=72)]
    f = Flat(tensors)
    values = torch.arange(3, dtype=F64)
    with f.seg.indexed():
        per_step = f.seg.expand(values)
    assert f.seg.index is None  # dropped after the block: no 4 bytes per element between steps
    f.seg.keep_index()
    kept = f.seg.index
    with f.seg.indexed():
        assert f.seg.index is kept  # a captured graph reads it at this address
        assert torch.equal(f.seg.expand(values), per_step)
    assert f.seg.index is kept
