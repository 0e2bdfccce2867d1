"""networks.sdxl_keys against sd-scripts' own definitions, on the full SDXL U-Net.

`data/sdxl_unet_conversion_map.txt` is sd-scripts' SDXL checkpoint conversion map as it defines it;
`data/sdxl_sai_lora_names.txt` lists the LoRA modules sd-scripts' networks.lora creates (conv_dim set) on its
SAI SDXL U-Net. Both were dumped from sd-scripts, not derived from the module under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from networks.sdxl_keys import unet_key_to_diffusers, unet_key_to_sai

DATA = Path(__file__).parent / "data"
SDXL_UNET_CONFIG = Path(__file__).parents[2] / "library" / "models" / "configs" / "sdxl-base" / "unet"
LORA_TARGETS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def _lines(name: str) -> list[str]:
    return [line for line in (DATA / name).read_text().splitlines() if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def sdxl_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_UNET_CONFIG))


def test_every_lora_module_of_the_sdxl_unet_maps_onto_sd_scripts_sai_names(sdxl_unet):
    ours = []
    for name, module in sdxl_unet.named_modules():
        if type(module).__name__ in LORA_TARGETS:
            for child_name, child in module.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    ours.append(f"lora_unet.{name}.{child_name}".replace(".", "_"))
    sai = _lines("sdxl_sai_lora_names.txt")
    assert len(ours) == len(sai) == 788
    assert sorted(unet_key_to_sai(n) for n in ours) == sorted(sai)
    assert sorted(unet_key_to_diffusers(s) for s in sai) == sorted(ours)


def test_every_pair_of_sd_scripts_conversion_map_both_ways():
    pairs = [line.split() for line in _lines("sdxl_unet_conversion_map.txt")]
    assert len(pairs) == 131
    for sai, diffusers in pairs:
        sai_key = "lora_unet_" + sai.replace(".", "_") + "weight"
        diffusers_key = "lora_unet_" + diffusers.replace(".", "_") + "weight"
        assert unet_key_to_sai(diffusers_key) == sai_key
        assert unet_key_to_diffusers(sai_key) == diffusers_key


def test_every_unet_parameter_round_trips(sdxl_unet):
    for key in sdxl_unet.state_dict():
        module = "lora_unet_" + key.rsplit(".", 1)[0].replace(".", "_")
        assert unet_key_to_diffusers(unet_key_to_sai(module)) == module


@pytest.mark.parametrize(
    ("diffusers", "sai"),
    [
        (
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight",
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
        ),
        ("lora_unet_down_blocks_0_downsamplers_0_conv.alpha", "lora_unet_input_blocks_3_0_op.alpha"),
        ("lora_unet_up_blocks_0_upsamplers_0_conv.hada_w1_a", "lora_unet_output_blocks_2_2_conv.hada_w1_a"),
        ("oft_unet_mid_block_attentions_0_proj_out.oft_blocks", "oft_unet_middle_block_1_proj_out.oft_blocks"),
    ],
)
def test_full_keys_keep_their_suffix_and_prefix(diffusers, sai):
    assert unet_key_to_sai(diffusers) == sai
    assert unet_key_to_diffusers(sai) == diffusers


def test_non_unet_keys_pass_and_wrong_naming_is_refused():
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    assert unet_key_to_sai(te) == te == unet_key_to_diffusers(te)
    with pytest.raises(KeyError, match="lora_unet_input_blocks_4_1_proj_in: not a diffusers-named"):
        unet_key_to_sai("lora_unet_input_blocks_4_1_proj_in")
    with pytest.raises(KeyError, match="not a SAI-named"):
        unet_key_to_diffusers("lora_unet_down_blocks_1_attentions_0_proj_in")
