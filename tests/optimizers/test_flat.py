"""FlatLayout / FlatState: segment math against per-tensor reference computations."""

import torch

from library.optimizers.flat import (
    FlatBucket,
    FlatLayout,
    FlatState,
    InOrderLayout,
    matrix_shape,
    partition,
    segment_ids,
)

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


def test_partition_groups_by_device_and_working_dtype_then_callers_keys():
    tensors = [torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float16),
               torch.zeros(2, dtype=torch.float64), torch.zeros(3)]  # fmt: skip
    cpu = torch.device("cpu")
    assert partition(tensors) == {(cpu, torch.float32): [0, 1, 2, 4], (cpu, torch.float64): [3]}
    quantised = [False, False, True, False, False]
    assert partition(tensors, quantised) == {
        (cpu, torch.float32, False): [0, 1, 4], (cpu, torch.float32, True): [2], (cpu, torch.float64, False): [3],
    }  # fmt: skip


def test_in_order_layout_keeps_order_and_filled_hands_out_views():
    shapes = [(5, 1), (2, 1), (3, 1)]
    layout = InOrderLayout(shapes, "cpu")
    assert layout.order == [0, 1, 2] and layout.sizes == [5, 2, 3]
    store = FlatState(layout)
    states = [{}, {}, {}]
    flat = store.filled(states, "v", torch.float32, 0.5)  # all missing: one allocation, no gather
    assert torch.all(flat == 0.5) and all(s["v"]._base is flat for s in states)
    assert [tuple(s["v"].shape) for s in states] == shapes
    fresh = [{"v": torch.full((5, 1), 2.0)}, {}, {"v": torch.full((3, 1), 3.0)}]  # a tensor joined later
    flat = store.filled(fresh, "v", torch.float32, 1.0)
    assert flat.tolist() == [2.0] * 5 + [1.0] * 2 + [3.0] * 3 and fresh[1]["v"]._base is flat


def test_bucket_apply_is_the_decoupled_step_for_mixed_dtypes_and_strided_weights():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen).to(torch.bfloat16),
               torch.randn(3, 4, generator=gen).t()]  # fmt: skip  # the last is not contiguous
    before = [w.double() for w in weights]
    bucket = FlatBucket(weights, torch.float32)
    update = torch.randn(bucket.layout.numel, generator=gen)
    bucket.apply_(update, lr=0.1, weight_decay=0.5)
    for w, b, u in zip(weights, before, bucket.layout.views(update), strict=True):
        # θ(1 − lr·wd) − lr·u in float64, u rounded to the weight's dtype first; then rounded as the weight is
        expected = b * (1 - 0.1 * 0.5) - 0.1 * u.to(w.dtype).double()
        torch.testing.assert_close(w, expected.to(w.dtype), rtol=0 if w.dtype == torch.float32 else 1e-2,
                                   atol=1e-6 if w.dtype == torch.float32 else 1e-2)  # fmt: skip
