"""FlatLayout / FlatState / PackedState: segment, row and column math against per-tensor reference computations."""

import torch

from library.optimizers.flat import (
    FlatBucket,
    FlatLayout,
    FlatState,
    InOrderLayout,
    PackedState,
    broadcast_stacks,
    column_stacks,
    matrix_shape,
    outer_into,
    partition,
    reduce_stacks,
    segment_ids,
)
from library.optimizers.transforms import row_stacks

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


def _as_matrix(t):
    return t.reshape(*matrix_shape(t.shape))


def test_row_and_column_reductions_and_broadcasts_match_per_tensor_math():
    layout = FlatLayout(SHAPES, "cpu")
    tensors = _tensors()
    flat = layout.flatten(tensors)
    mats = [_as_matrix(t) for t in layout.arrange(tensors)]
    rows, cols = row_stacks(layout, flat), column_stacks(layout, flat)
    for reduce, ref in ((torch.sum, lambda m, d: m.sum(d)), (torch.mean, lambda m, d: m.mean(d)),
                        (torch.linalg.vector_norm, lambda m, d: m.norm(dim=d))):  # fmt: skip
        torch.testing.assert_close(reduce_stacks(rows, reduce, -1), torch.cat([ref(m, 1) for m in mats]))
        torch.testing.assert_close(reduce_stacks(cols, reduce, -2), torch.cat([ref(m, 0) for m in mats]))
    row_values = torch.arange(sum(m.shape[0] for m in mats), dtype=torch.float64) + 1
    col_values = torch.arange(sum(m.shape[1] for m in mats), dtype=torch.float64) + 2
    torch._foreach_div_(rows, broadcast_stacks(rows, row_values, -1))
    torch._foreach_mul_(cols, broadcast_stacks(cols, col_values, -2))
    outer = torch.empty_like(flat)
    outer_into(column_stacks(layout, outer), row_values, col_values)
    r0 = c0 = 0
    for j, m in enumerate(mats):
        n, k = m.shape
        r, c = row_values[r0 : r0 + n], col_values[c0 : c0 + k]
        got = flat[layout.offsets[j] : layout.offsets[j] + m.numel()].view(n, k)
        torch.testing.assert_close(got, m / r[:, None] * c[None, :])
        torch.testing.assert_close(outer[layout.offsets[j] : layout.offsets[j] + m.numel()].view(n, k),
                                   torch.outer(r, c))  # fmt: skip
        r0, c0 = r0 + n, c0 + k


def test_row_layout_segments_each_tensors_rows_in_layout_order_and_values_return_to_caller_order():
    layout = FlatLayout(SHAPES, "cpu")
    rows = layout.row_layout()
    assert rows.sizes == [matrix_shape(layout.shapes[i])[0] for i in layout.order]
    row_values = torch.arange(rows.numel, dtype=torch.float64)
    starts = [0, *torch.tensor(rows.sizes).cumsum(0).tolist()]
    expected = [row_values[a:b].mean() for a, b in zip(starts[:-1], starts[1:], strict=True)]
    torch.testing.assert_close(rows.mean(row_values), torch.stack(expected))
    flat = layout.flatten(_tensors())
    torch.testing.assert_close(layout.to_caller_order(layout.mean(flat)), torch.stack([t.mean() for t in _tensors()]))


def test_packed_state_packs_tensors_of_any_keys_and_shapes_and_regathers_replaced_ones():
    states = [{"v_row": torch.full((3,), 1.0)}, {"v": torch.tensor(2.0)}, {"v_row": torch.full((2,), 3.0)}]
    keys = ["v_row", "v", "v_row"]
    store = PackedState()
    flat = store.buffer("rows", states, keys, torch.float64)
    assert flat.tolist() == [1.0, 1.0, 1.0, 2.0, 3.0, 3.0] and states[1]["v"].shape == ()
    assert all(s[k]._base is flat and s[k].dtype == torch.float64 for s, k in zip(states, keys, strict=True))
    assert store.buffer("rows", states, keys, torch.float64) is flat  # unchanged: no gather
    states[2]["v_row"] = torch.full((2,), 5.0)  # e.g. load_state_dict
    again = store.buffer("rows", states, keys, torch.float64)
    assert again is not flat and again.tolist() == [1.0, 1.0, 1.0, 2.0, 5.0, 5.0]


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
