"""FlatLayout / FlatState: segment math against per-tensor reference computations."""

import torch

from library.optimizers.flat import FlatLayout, FlatState, matrix_shape, segment_ids

SHAPES = [(4, 3), (5,), (4, 3), (2, 3, 1, 1), (), (4, 3), (5,)]


def _tensors(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def test_layout_groups_equal_matrix_shapes_and_round_trips():
    layout = FlatLayout(SHAPES, "cpu")
    tensors = _tensors()
    flat = layout.flatten(tensors)
    assert flat.numel() == sum(t.numel() for t in tensors) == layout.numel
    for t, v in zip(tensors, layout.views(flat), strict=True):
        assert v.shape == t.shape and torch.equal(v, t)
    keys = [(b.rows, b.cols) for b in layout.buckets]
    assert len(keys) == len(set(keys)) == len({matrix_shape(s) for s in SHAPES})
    bucket = next(b for b in layout.buckets if (b.rows, b.cols) == (4, 3))
    stack = layout.bucket_view(flat, bucket)
    expected = torch.stack([t for t in tensors if t.shape == (4, 3)])
    assert torch.equal(stack, expected)
    stack.mul_(2)  # a view: writes land in the flat buffer
    assert torch.equal(layout.views(flat)[0], 2 * tensors[0])


def test_segment_reductions_and_expand_match_per_tensor_math():
    layout = FlatLayout(SHAPES, "cpu")
    tensors = _tensors()
    flat = layout.flatten(tensors)
    arranged = layout.arrange(tensors)
    torch.testing.assert_close(layout.sum(flat), torch.stack([t.sum() for t in arranged]))
    torch.testing.assert_close(layout.max(flat), torch.stack([t.max() for t in arranged]))
    torch.testing.assert_close(layout.norm(flat), torch.stack([t.norm() for t in arranged]))
    values = torch.arange(len(SHAPES), dtype=torch.float64)
    owner = segment_ids(layout.lengths, layout.numel)
    assert owner.dtype == torch.int32 and owner.numel() == layout.numel
    torch.testing.assert_close(values.index_select(0, owner), layout.expand(values))
    scaled = layout.views(flat * layout.expand(values))
    for j, i in enumerate(layout.order):
        torch.testing.assert_close(scaled[i], tensors[i] * values[j])


def test_copy_to_casts_into_the_callers_tensors():
    layout = FlatLayout(SHAPES, "cpu")
    targets = [torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES]
    source = _tensors(torch.float32)
    layout.copy_to_(targets, layout.flatten(source))
    for t, s in zip(targets, source, strict=True):
        assert t.dtype == torch.bfloat16 and torch.equal(t, s.to(torch.bfloat16))


def test_flat_state_keeps_views_and_regathers_replaced_tensors():
    layout = FlatLayout(SHAPES, "cpu")
    states = [{"m": torch.full(s, float(i))} for i, s in enumerate(SHAPES)]
    store = FlatState(layout)
    flat = store.buffer(states, "m", torch.float32)
    assert all(s["m"]._base is flat for s in states)
    flat.add_(1.0)
    assert all(torch.all(s["m"] == i + 1) for i, s in enumerate(states))
    assert store.buffer(states, "m", torch.float32) is flat  # unchanged: no gather
    states[2]["m"] = torch.full(SHAPES[2], 7.0)  # e.g. load_state_dict put a fresh tensor there
    again = store.buffer(states, "m", torch.float32)
    assert again is not flat and torch.all(states[2]["m"] == 7.0) and states[2]["m"]._base is again
    assert torch.all(states[0]["m"] == 1.0)


def test_gather_and_scatter_round_trip_contiguous_or_not():
    for tensors in ([torch.zeros(5), torch.zeros(2, 3)], [torch.zeros(5), torch.zeros(3, 4).t()]):
        layout = FlatLayout([t.shape for t in tensors], "cpu")
        flat = torch.arange(layout.numel, dtype=torch.float64)
        layout.scatter_(layout.rows(tensors), flat)
        assert torch.equal(layout.gather(tensors, torch.float64), flat)  # fp32 targets, values cast back exactly
        assert torch.equal(torch.cat([t.reshape(-1) for t in layout.arrange(tensors)]).double(), flat)
