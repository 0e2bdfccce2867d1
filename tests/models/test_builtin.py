"""`builtin:tiny-sd` is a working SD1-architecture model: offline, fast, seeded, shape-correct."""

import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import ModelError
from library.models import load_sd_model
from library.models.builtin import build_tiny_sd_modules, save_tiny_sd_weights


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_builds_in_well_under_a_second_of_cpu_time():
    load_sd_model("builtin:tiny-sd")  # warm imports and lazy registries
    start = time.process_time()
    model = load_sd_model("builtin:tiny-sd")
    assert time.process_time() - start < 1.0
    assert model.model_type == "sd1" and model.source == "builtin:tiny-sd"
    assert len(model.tokenizers) == len(model.text_encoders) == 1


def test_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = load_sd_model("builtin:tiny-sd")
    assert torch.equal(torch.rand(3), expected_draw)
    torch.manual_seed(999)
    second = load_sd_model("builtin:tiny-sd")
    for a, b in [
        (first.unet, second.unet),
        (first.vae, second.vae),
        (first.text_encoders[0], second.text_encoders[0]),
    ]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert first.unet.conv_in.weight.std() > 0  # really initialised, not zeros


def test_forward_shapes_image_to_latent_to_unet():
    model = load_sd_model("builtin:tiny-sd")
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    ids = model.tokenizers[0](
        ["a photo of a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.sample() * model.vae.config.scaling_factor
        hidden = model.text_encoders[0](ids).last_hidden_state
        noise_pred = model.unet(latents, torch.tensor([1, 999]), hidden).sample
        decoded = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    assert latents.shape == (2, 4, 32, 32)
    assert hidden.shape == (2, 77, model.unet.config.cross_attention_dim)
    assert noise_pred.shape == latents.shape
    assert decoded.shape == pixels.shape
    assert torch.isfinite(noise_pred).all()


def test_scheduler_config_is_sd_ddpm_and_follows_v_parameterization():
    eps = load_sd_model("builtin:tiny-sd")
    assert eps.scheduler_config["beta_schedule"] == "scaled_linear"
    assert (eps.scheduler_config["beta_start"], eps.scheduler_config["beta_end"]) == (0.00085, 0.012)
    assert eps.scheduler_config["num_train_timesteps"] == 1000
    assert eps.scheduler_config["prediction_type"] == "epsilon" and not eps.v_parameterization
    v = load_sd_model("builtin:tiny-sd", v_parameterization=True)
    assert v.scheduler_config["prediction_type"] == "v_prediction" and v.v_parameterization


def test_dtype_is_applied_to_every_module():
    model = load_sd_model("builtin:tiny-sd", dtype=torch.bfloat16)
    for module in (*model.text_encoders, model.vae, model.unet):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


def test_pretrained_weights_file_replaces_random_init(tmp_path):
    text_encoder, vae, unet, _ = build_tiny_sd_modules(weights=None)
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)
        text_encoder.final_layer_norm.bias.fill_(0.5)
    expected_unet, expected_te = _state(unet), _state(text_encoder)
    weights = tmp_path / "tiny-sd.safetensors"
    save_tiny_sd_weights(weights, text_encoder, vae, unet)
    te2, _, unet2, _ = build_tiny_sd_modules(weights=weights)
    assert all(torch.equal(unet2.state_dict()[k], v) for k, v in expected_unet.items())
    assert all(torch.equal(te2.state_dict()[k], v) for k, v in expected_te.items())
    random_te, _, random_unet, _ = build_tiny_sd_modules(weights=tmp_path / "absent.safetensors")
    assert not torch.equal(random_unet.conv_in.weight, unet2.conv_in.weight)


def test_pretrained_weights_of_another_shape_are_refused(tmp_path):
    weights = tmp_path / "tiny-sd.safetensors"
    text_encoder, vae, unet, _ = build_tiny_sd_modules(weights=None)
    save_tiny_sd_weights(weights, text_encoder, vae, unet)
    state = load_file(weights)
    state["unet.conv_in.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(ModelError, match="tiny-sd weights do not match the bundled 'unet' config"):
        build_tiny_sd_modules(weights=weights)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"v2": True}, r"flags \(--v2\) select SD2"),
        ({"sdxl": True}, r"flags \(--sdxl or sdxl_train_network.py\) select SDXL"),
        ({"v2": True, "sdxl": True}, "both"),
    ],
)
def test_flags_that_contradict_the_builtin_model_are_errors(kwargs, message):
    with pytest.raises(ModelError, match=message):
        load_sd_model("builtin:tiny-sd", **kwargs)


def test_unknown_builtin_name_lists_the_valid_ones():
    with pytest.raises(ModelError, match="builtin:tiny-sd"):
        load_sd_model("builtin:huge-sd")


def test_fp16_file_round_trips_into_float32_modules_with_its_latent_scale(tmp_path):
    text_encoder, vae, unet, _ = build_tiny_sd_modules(weights=None)
    vae.register_to_config(scaling_factor=0.71)
    weights = tmp_path / "tiny-sd.safetensors"
    save_tiny_sd_weights(weights, text_encoder, vae, unet, dtype=torch.float16)
    stored = load_file(weights)
    assert {v.dtype for k, v in stored.items() if v.is_floating_point()} == {torch.float16}
    te2, vae2, unet2, _ = build_tiny_sd_modules(weights=weights)
    assert vae2.config.scaling_factor == 0.71
    for before, after in ((text_encoder, te2), (vae, vae2), (unet, unet2)):
        expected, loaded = before.state_dict(), after.state_dict()
        assert expected.keys() == loaded.keys()
        for key, value in expected.items():
            assert loaded[key].dtype == value.dtype  # cast back on load
            if value.is_floating_point():
                torch.testing.assert_close(loaded[key], value, rtol=1e-3, atol=1e-4)  # fp16 keeps ~3 digits
            else:
                assert torch.equal(loaded[key], value)
    assert not torch.equal(unet2.conv_in.weight, unet.conv_in.weight)  # really went through fp16


def test_truncated_weights_file_is_one_line_model_error(tmp_path):
    text_encoder, vae, unet, _ = build_tiny_sd_modules(weights=None)
    weights = tmp_path / "tiny-sd.safetensors"
    save_tiny_sd_weights(weights, text_encoder, vae, unet, dtype=torch.float16)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"tiny-sd\.safetensors: cannot read tiny-sd weights") as info:
        build_tiny_sd_modules(weights=weights)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", ["-1.0", "nan", "big"])
def test_bad_latent_scale_in_metadata_is_refused(tmp_path, bad):
    text_encoder, vae, unet, _ = build_tiny_sd_modules(weights=None)
    weights = tmp_path / "tiny-sd.safetensors"
    save_tiny_sd_weights(weights, text_encoder, vae, unet)
    save_file(load_file(weights), weights, metadata={"vae.scaling_factor": bad})
    with pytest.raises(ModelError, match=f"metadata vae.scaling_factor '{bad}' is not a positive finite number"):
        build_tiny_sd_modules(weights=weights)
