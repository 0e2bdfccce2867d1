"""The bundled full-size configs describe the published SD 1.5 / 2.1 / SDXL architectures exactly."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.models.common import ddpm_scheduler_config
from library.models.single_file import CONFIGS_DIR

# Published parameter counts of the original models (diffusers/transformers classes).
UNET_PARAMS = {"sd15": 859_520_964, "sd21-base": 865_910_724, "sd21": 865_910_724, "sdxl-base": 2_567_463_684}
VAE_PARAMS = 83_653_863
CLIP_L_PARAMS, OPENCLIP_H_PARAMS, OPENCLIP_BIGG_PARAMS = 123_060_480, 340_387_840, 694_659_840
TEXT_PARAMS = {"sd15": CLIP_L_PARAMS, "sd21-base": OPENCLIP_H_PARAMS, "sd21": OPENCLIP_H_PARAMS}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(UNET_PARAMS))
def test_configs_build_the_published_architectures(name):
    folder = CONFIGS_DIR / name
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        assert _count(unet) == UNET_PARAMS[name]
        assert _count(vae) == VAE_PARAMS
        if name == "sdxl-base":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            assert (_count(te), _count(te2)) == (CLIP_L_PARAMS, OPENCLIP_BIGG_PARAMS)
        else:
            assert _count(te) == TEXT_PARAMS[name]


@pytest.mark.parametrize(
    ("name", "prediction", "latent_size", "vae_scale"),
    [
        ("sd15", "epsilon", 64, 0.18215),
        ("sd21-base", "epsilon", 64, 0.18215),
        ("sd21", "v_prediction", 96, 0.18215),
        ("sdxl-base", "epsilon", 128, 0.13025),
    ],
)
def test_scheduler_resolution_and_vae_scale(name, prediction, latent_size, vae_scale):
    folder = CONFIGS_DIR / name
    raw = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config = ddpm_scheduler_config(raw, v_parameterization=False)
    assert config["prediction_type"] == prediction
    assert (config["beta_start"], config["beta_end"], config["beta_schedule"]) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert json.loads((folder / "unet" / "config.json").read_text())["sample_size"] == latent_size
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == vae_scale
