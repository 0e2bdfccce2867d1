"""Block-wise 8-bit state: round-trip accuracy, block locality, plain-tensor state that survives torch.save."""

import io

import pytest
import torch

from library.optimizers import quant8
from library.optimizers.flat import FlatLayout


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _block_absmax(x):
    flat = x.reshape(-1)
    pad = (-flat.numel()) % quant8.BLOCKSIZE
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, quant8.BLOCKSIZE)
    per_block = blocks.abs().amax(1, keepdim=True).expand_as(blocks).reshape(-1)
    return per_block[: flat.numel()].reshape(x.shape)


def test_signed_roundtrip_error_is_within_one_percent_of_block_absmax():
    x = _randn(37, 53)
    codes, absmax = quant8.quantize(x, signed=True)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (quant8.num_blocks(x.numel()),)
    y = quant8.dequantize(codes, absmax, signed=True)
    assert ((y - x).abs() <= 0.01 * _block_absmax(x)).all()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("numel", "dtype"), [(5 * quant8.BLOCKSIZE, torch.float32), (1000, torch.float32),
                                              (777, torch.bfloat16)])
def test_each_code_is_the_nearest_map_value_of_x_over_its_block_absmax(signed, numel, dtype):
    """Reference in float64: absmax per block, then the arg-min distance over all 256 map values."""
    x = _randn(numel, seed=5) * torch.linspace(0.0, 3.0, numel)  # first block near zero, later ones larger
    x[: quant8.BLOCKSIZE // 2] = 0.0
    if not signed:
        x = x.abs()
    if numel == 5 * quant8.BLOCKSIZE:
        x[quant8.BLOCKSIZE : 2 * quant8.BLOCKSIZE] = 0.0  # an all-zero block
    x = x.to(dtype)
    codes, absmax = quant8.quantize(x, signed=signed)
    torch.testing.assert_close(absmax.double(), _block_absmax(x.double())[:: quant8.BLOCKSIZE], rtol=0, atol=0)
    scaled = x.double() / _block_absmax(x.double()).clamp_min(1e-300)
    table = quant8.quant_map(signed, torch.device("cpu")).double()
    distance = (scaled.unsqueeze(1) - table).abs()
    chosen = distance.gather(1, codes.long().unsqueeze(1)).squeeze(1)
    assert torch.equal(chosen, distance.min(1).values)  # no code is farther than the nearest (ties either way)
    zero = int(torch.argmin(table.abs()))
    assert (codes[x == 0] == zero).all()


def test_unsigned_map_keeps_small_positive_values_better_than_signed():
    x = _randn(4096, seed=1).square() * 1e-3
    err_unsigned = (quant8.dequantize(*quant8.quantize(x, signed=False), signed=False) - x).abs().mean()
    err_signed = (quant8.dequantize(*quant8.quantize(x, signed=True), signed=True) - x).abs().mean()
    assert err_unsigned < err_signed
    assert (quant8.dequantize(*quant8.quantize(x, signed=False), signed=False) >= 0).all()


def test_an_outlier_only_costs_precision_in_its_own_block():
    x = _randn(4 * quant8.BLOCKSIZE, seed=2) * 1e-2
    spiked = x.clone()
    spiked[0] = 1e3
    y = quant8.dequantize(*quant8.quantize(spiked, signed=True), signed=True)
    later_blocks = slice(quant8.BLOCKSIZE, None)
    assert ((y[later_blocks] - x[later_blocks]).abs() <= 0.01 * _block_absmax(x)[later_blocks]).all()


def test_state_helpers_store_in_place_and_zero_init_decodes_to_zero():
    state = {}
    quant8.init_state(state, "exp_avg", torch.empty(300, 20), signed=True)
    quant8.init_state(state, "exp_avg_sq", torch.empty(300, 20), signed=False)
    assert quant8.has_state(state, "exp_avg") and not quant8.has_state(state, "other")
    assert torch.equal(quant8.load(state, "exp_avg", signed=True), torch.zeros(300, 20))
    assert torch.equal(quant8.load(state, "exp_avg_sq", signed=False), torch.zeros(300, 20))
    ptr = state["exp_avg_codes"].data_ptr()
    x = _randn(300, 20, seed=3)
    quant8.store_(state, "exp_avg", x, signed=True)
    assert state["exp_avg_codes"].data_ptr() == ptr
    assert ((quant8.load(state, "exp_avg", signed=True) - x).abs() <= 0.01 * _block_absmax(x)).all()
    assert quant8.state_nbytes(state) == 2 * (6000 + 4 * quant8.num_blocks(6000))


def test_state_is_plain_tensors_that_survive_torch_save():
    state = {}
    quant8.init_state(state, "m", torch.empty(1000), signed=True)
    quant8.store_(state, "m", _randn(1000, seed=4), signed=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    assert torch.equal(quant8.load(loaded, "m", signed=True), quant8.load(state, "m", signed=True))


def test_float64_and_bfloat16_inputs_are_accepted():
    x = _randn(500, seed=5)
    for dtype in (torch.float64, torch.bfloat16):
        codes, absmax = quant8.quantize(x.to(dtype), signed=True)
        y = quant8.dequantize(codes, absmax, signed=True, dtype=dtype)
        assert y.dtype == dtype
        assert ((y.float() - x).abs() <= 0.02 * _block_absmax(x)).all()


@pytest.mark.parametrize(
    "shapes",
    [[(3, 100), (7,), (256,), (2, 300), (3, 100)], [(16, 32), (512,), (4, 64, 1, 1)]],
    ids=["unaligned", "aligned"],
)
@pytest.mark.parametrize("signed", [True, False])
def test_flat_state_is_bit_identical_to_quantising_each_tensor(shapes, signed):
    tensors = [_randn(*s, seed=10 + k) * (k + 1) for k, s in enumerate(shapes)]
    if not signed:
        tensors = [t.square() for t in tensors]
    layout = FlatLayout(shapes, "cpu")
    flat_state = quant8.FlatQuantState(layout)
    states = [{} for _ in shapes]
    for state, t in zip(states, tensors, strict=True):
        quant8.init_state(state, "m", t, signed=signed)
    assert torch.equal(flat_state.load(states, "m", signed=signed), torch.zeros(layout.numel))
    flat_state.store_("m", layout.flatten(tensors), signed=signed)
    expected = []
    for state, t in zip(states, tensors, strict=True):
        codes, absmax = quant8.quantize(t, signed=signed)
        assert torch.equal(state["m_codes"], codes) and torch.equal(state["m_absmax"], absmax)
        expected.append(quant8.dequantize(codes, absmax, signed=signed))
    assert torch.equal(flat_state.load(states, "m", signed=signed), layout.flatten(expected))
    # the per-parameter tensors are views of one code buffer (one quantisation call per step)
    bases = {s["m_codes"].untyped_storage().data_ptr() for s in states}
    assert len(bases) == 1


def test_flat_state_gathers_per_parameter_tensors_that_were_replaced():
    shapes = [(300,), (40, 8)]
    layout = FlatLayout(shapes, "cpu")
    flat_state = quant8.FlatQuantState(layout)
    states = [{}, {}]
    for state, s in zip(states, shapes, strict=True):
        quant8.init_state(state, "v", torch.empty(s), signed=False)
    flat_state.load(states, "v", signed=False)
    loaded = _randn(40, 8, seed=7).abs()
    states[1]["v_codes"], states[1]["v_absmax"] = quant8.quantize(
        loaded, signed=False
    )  # e.g. load_state_dict
    want = quant8.dequantize(states[1]["v_codes"], states[1]["v_absmax"], signed=False)
    got = layout.views(flat_state.load(states, "v", signed=False))
    assert torch.equal(got[1], want) and torch.equal(got[0], torch.zeros(300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flat_state_with_full_precision_tensors_keeps_them_exact_and_quantises_the_rest_alone(dtype):
    # small tensors stay at full precision (as below min_8bit_size); both kinds alternate in the layout's order
    shapes = [(3, 100), (7,), (2, 256), (5, 3), (3, 100)]
    quantised = [True, False, True, False, True]
    tensors = [torch.randn(s, generator=torch.Generator().manual_seed(20 + k), dtype=dtype) for k, s in enumerate(shapes)]
    layout = FlatLayout(shapes, "cpu")
    flat_state = quant8.FlatQuantState(layout, quantised)
    states = [{} for _ in shapes]
    for state, t, q in zip(states, tensors, quantised, strict=True):
        if q:
            quant8.init_state(state, "m", t, signed=True)
        else:
            state["m"] = torch.zeros_like(t)
    assert torch.equal(flat_state.load(states, "m", signed=True, dtype=dtype), torch.zeros(layout.numel, dtype=dtype))
    flat_state.store_("m", layout.flatten(tensors), signed=True)
    expected = []
    for state, t, q in zip(states, tensors, quantised, strict=True):
        if q:
            codes, absmax = quant8.quantize(t, signed=True)
            assert torch.equal(state["m_codes"], codes) and torch.equal(state["m_absmax"], absmax)
            expected.append(quant8.dequantize(codes, absmax, signed=True, dtype=dtype))
        else:
            assert "m_codes" not in state and state["m"].dtype == dtype and torch.equal(state["m"], t)
            expected.append(t)
    assert torch.equal(flat_state.load(states, "m", signed=True, dtype=dtype), layout.flatten(expected))
    states[3]["m"] = torch.ones(shapes[3], dtype=dtype)  # e.g. load_state_dict
    assert torch.equal(layout.views(flat_state.load(states, "m", signed=True, dtype=dtype))[3], states[3]["m"])
