"""--vae, --no_half_vae, --tokenizer_cache_dir, --disable_mmap_load_safetensors, --base_weights and --fp8_base
against what each must do: replaced weights, dtypes, files, a float64 hand merge, e4m3 numerics and bytes."""

from __future__ import annotations

import json
import logging

import pytest
import safetensors.torch
import torch
from torch import nn

from library.cli import parse_args
from library.models.fp8 import FP8, store_in_fp8
from library.training.setup import load_model, merge_base_weights

CPU = torch.device("cpu")


def _args(*extra: str):
    return parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd", *extra])


@pytest.fixture(scope="module")
def tiny():
    return load_model(_args(), CPU, torch.float32)


# ------------------------------------------------------------------------------------------------ --vae
def _perturbed_vae(tiny):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(tiny.vae.config)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p))
    return vae


def test_vae_file_with_original_keys_replaces_the_models(tiny, tmp_path):
    from tests.models.ldm_writer import vae_to_ldm

    vae = _perturbed_vae(tiny)
    path = tmp_path / "vae.safetensors"
    # a VAE-only file: sd-scripts' --vae files carry the LDM names without the checkpoint prefix
    safetensors.torch.save_file({k.removeprefix("first_stage_model."): v.contiguous()
                                 for k, v in vae_to_ldm(vae).items()}, str(path))
    loaded = load_model(_args("--vae", str(path)), CPU, torch.float32).vae
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_vae_folder_replaces_the_models(tiny, tmp_path):
    vae = _perturbed_vae(tiny)
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_model(_args("--vae", str(tmp_path / "vae")), CPU, torch.float32).vae
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_vae_that_does_not_fit_is_one_line(tiny, tmp_path):
    from library.errors import ModelError

    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ModelError, match=r"--vae .*bad.safetensors"):
        load_model(_args("--vae", str(path)), CPU, torch.float32)


@pytest.mark.parametrize(("flags", "dtype"), [((), torch.bfloat16), (("--no_half_vae",), torch.float32)])
def test_no_half_vae_keeps_the_vae_in_float32(flags, dtype):
    model = load_model(_args("--mixed_precision", "bf16", *flags), CPU, torch.bfloat16)
    assert {p.dtype for p in model.vae.parameters()} == {dtype}
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}


def test_mem_eff_attn_is_reported(caplog):
    with caplog.at_level(logging.INFO, logger="loraforge"):
        load_model(_args("--mem_eff_attn"), CPU, torch.float32)
    assert "--mem_eff_attn: using PyTorch scaled-dot-product attention" in caplog.text


# ------------------------------------------------------------------------------------------------ tokenizer cache
def test_tokenizer_cache_dir_is_written_then_read(tmp_path):
    cache = tmp_path / "tok"
    first = load_model(_args("--tokenizer_cache_dir", str(cache)), CPU, torch.float32)
    folder = cache / "openai_clip-vit-large-patch14"  # sd-scripts' name for the SD1 tokenizer
    assert (folder / "tokenizer_config.json").is_file()
    assert first.tokenizers[0]("a cat").input_ids == [49406, 320, 2368, 49407]
    config = folder / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["model_max_length"] = 33  # a customised cached tokenizer must be the one used
    config.write_text(json.dumps(settings))
    second = load_model(_args("--tokenizer_cache_dir", str(cache)), CPU, torch.float32)
    assert second.tokenizers[0].model_max_length == 33
    assert second.tokenizers[0]("a cat").input_ids == [49406, 320, 2368, 49407]


# ------------------------------------------------------------------------------------------------ mmap
def test_disable_mmap_reads_the_file_without_mapping_it(tmp_path, monkeypatch):
    from library.models import single_file

    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    safetensors.torch.save_file(tensors, str(path))
    mapped = single_file.read_checkpoint(path)

    def no_mapping(*args, **kwargs):
        raise AssertionError("safe_open (a memory map) used despite mmap=False")

    monkeypatch.setattr(single_file, "safe_open", no_mapping)
    read = single_file.read_checkpoint(path, mmap=False)
    assert read.keys() == mapped.keys() and all(torch.equal(read[k], mapped[k]) for k in read)


# ------------------------------------------------------------------------------------------------ --base_weights
def _random_lora_file(tiny, path, seed: int, dim: int = 2, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    import networks.lora as lora

    net = lora.create_network(1.0, dim, alpha, tiny.vae, tiny.text_encoders[0], tiny.unet)
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.1 if "lora_" in k else v) for k, v in net.state_dict().items()}
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


def _layers_by_lora_name(model) -> dict[str, nn.Module]:
    import networks.lora as lora

    net = lora.create_network(1.0, 1, 1.0, model.vae, model.text_encoders[0], model.unet)
    return {m.lora_name: m.org_module for m in net.text_encoder_loras + net.unet_loras}


def test_base_weights_merge_equals_a_float64_hand_merge(tmp_path):
    import networks.lora as lora

    model = load_model(_args(), CPU, torch.float32)
    before = {n: layer.weight.detach().double().clone() for n, layer in _layers_by_lora_name(model).items()}
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    states = [_random_lora_file(model, files[0], 1, dim=2, alpha=1.0), _random_lora_file(model, files[1], 2, dim=4,
                                                                                          alpha=8.0)]
    args = _args("--base_weights", *map(str, files), "--base_weights_multiplier", "0.5")  # b: 1.0, as sd-scripts
    merge_base_weights(args, lora, model, CPU)
    after = _layers_by_lora_name(model)
    checked = 0
    for name, w0 in before.items():
        expected = w0.clone()
        for state, multiplier in zip(states, (0.5, 1.0), strict=True):
            down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
            scale = float(state[f"{name}.alpha"]) / down.shape[0]
            delta = up.flatten(1) @ down.flatten(1)  # W += m * alpha/dim * up @ down (1x1 convs flattened)
            expected += multiplier * scale * delta.reshape(w0.shape)
        torch.testing.assert_close(after[name].weight.double(), expected, rtol=0, atol=1e-5)
        checked += 1
    assert checked == len(before) > 50
    assert not any("forward" in vars(layer) for layer in after.values())  # merged, no adapter left hooked


# ------------------------------------------------------------------------------------------------ --fp8_base
def _e4m3(t: torch.Tensor) -> torch.Tensor:
    return t.to(FP8).double()


def test_fp8_linear_and_conv_match_the_e4m3_rounded_weights_forward_and_backward():
    torch.manual_seed(0)
    linear, conv = nn.Linear(16, 8), nn.Conv2d(4, 6, 3, padding=1, stride=2)
    refs = {id(m): (m.weight.detach().clone(), m.bias.detach().clone()) for m in (linear, conv)}
    holder = nn.Sequential(linear, conv)
    holder.requires_grad_(False)
    assert store_in_fp8(holder, torch.bfloat16) == 2
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    y = linear(x)
    w, b = refs[id(linear)]
    x64 = x.detach().double()
    ref = x64 @ _e4m3(w).T + b.to(torch.bfloat16).double()
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    unrounded = x64 @ w.double().T + b.double()
    assert (y.double() - unrounded).abs().max() > 4 * (y.double() - ref).abs().max()  # e4m3 really was used
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double() @ _e4m3(w), rtol=2e-2, atol=2e-2)

    xc = torch.randn(2, 4, 9, 9, dtype=torch.bfloat16, requires_grad=True)
    yc = conv(xc)
    w, b = refs[id(conv)]
    ref = torch.nn.functional.conv2d(xc.detach().double(), _e4m3(w), b.to(torch.bfloat16).double(), stride=2, padding=1)
    torch.testing.assert_close(yc.double(), ref, rtol=2e-2, atol=3e-2)
    gc = torch.randn_like(yc)
    yc.backward(gc)
    ref_grad = torch.nn.grad.conv2d_input(xc.shape, _e4m3(w), gc.double(), stride=2, padding=1)
    torch.testing.assert_close(xc.grad.double(), ref_grad, rtol=2e-2, atol=3e-2)
    # the weight is held in float8 and not upcast in place
    assert linear.weight.dtype == FP8 and conv.weight.dtype == FP8


def test_fp8_base_holds_one_byte_per_linear_and_conv_weight(tiny):
    import copy

    unet = copy.deepcopy(tiny.unet).to(torch.bfloat16)
    converted = {n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    expected = sum(p.numel() * (1 if name.rsplit(".", 1) == [mod, "weight"] and mod in converted else 2)
                   for name, p in unet.named_parameters() for mod in [name.rsplit(".", 1)[0]])
    before = sum(p.numel() * p.element_size() for p in unet.parameters())
    store_in_fp8(unet, torch.bfloat16)
    held = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert held == expected
    weights = sum(dict(unet.named_parameters())[f"{n}.weight"].numel() for n in converted)
    assert before - held == weights  # exactly one byte saved per converted weight element (bf16 -> e4m3)


def test_fp8_unet_trains_a_lora_with_finite_gradients(tiny):
    import copy

    import networks.lora as lora

    unet = copy.deepcopy(tiny.unet).to(torch.bfloat16)
    store_in_fp8(unet, torch.bfloat16)
    net = lora.create_network(1.0, 4, 4.0, tiny.vae, tiny.text_encoders[0], unet)
    net.apply_to(tiny.text_encoders[0], unet, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.01)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, 16, 16)
    hidden = torch.randn(1, 77, cfg.cross_attention_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, torch.tensor([500]), hidden).sample
    out.float().square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for n, g in zip(dict(net.named_parameters()), grads, strict=True) if "down" in n)


# ------------------------------------------------------------------------------------------------ --lowram, --highvram
@pytest.mark.parametrize(("flags", "unet_device"), [((), "cpu"), (("--lowram",), "meta")])
def test_lowram_puts_the_unet_on_the_device_as_it_loads(flags, unet_device):
    meta = torch.device("meta")  # stands in for the GPU: where each part lands is what is checked
    model = load_model(_args(*flags), meta, torch.float32)
    assert {p.device.type for p in model.unet.parameters()} == {unet_device}
    assert {p.device.type for p in model.vae.parameters()} == {"meta"}


@pytest.mark.parametrize(("highvram", "emptied"), [(False, 1), (True, 0)])
def test_highvram_keeps_the_cuda_cache_after_caching(monkeypatch, highvram, emptied):
    from library.training import trainer

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    trainer.release_cached_memory(torch.device("cuda"), highvram=highvram)
    trainer.release_cached_memory(CPU, highvram=False)  # nothing to release on the CPU
    assert len(calls) == emptied
