"""Files from elsewhere load into us with every module matched: sd-scripts' LoRA / LoCon (SD1) and SDXL (SAI
names) files written here by its key scheme, diffusers/PEFT files; a file for another model is an error."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn

from library.errors import ModelError
from networks import lora
from tests.networks.test_lora import tiny_sdxl_unet, tiny_text_encoder, tiny_unet, unet_inputs

TE_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
BLOCK_LAYERS = ("proj_in", "proj_out", "transformer_blocks_0_attn1_to_q", "transformer_blocks_0_attn1_to_k",
                "transformer_blocks_0_attn1_to_v", "transformer_blocks_0_attn1_to_out_0",
                "transformer_blocks_0_attn2_to_q", "transformer_blocks_0_attn2_to_k",
                "transformer_blocks_0_attn2_to_v", "transformer_blocks_0_attn2_to_out_0",
                "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2")


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n.replace(".", "_"): m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _lora_tensors(name: str, layer: nn.Module, rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if isinstance(layer, nn.Conv2d):
        down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen) * 0.1
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen) * 0.1
    else:
        down = torch.randn(rank, layer.in_features, generator=gen) * 0.1
        up = torch.randn(layer.out_features, rank, generator=gen) * 0.1
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}


def _sd_scripts_sd1_file(unet, te, conv: bool) -> dict[str, torch.Tensor]:
    """sd-scripts' SD1 key scheme: lora_unet_<diffusers path>, lora_te_text_model_<path>; LoCon adds the
    ResNet / sampler convs."""
    gen = torch.Generator().manual_seed(0)
    unet_layers, sd = _layers(unet), {}
    names = [f"down_blocks_1_attentions_0_{x}" for x in BLOCK_LAYERS] + [f"mid_block_attentions_0_{x}"
                                                                         for x in BLOCK_LAYERS]
    if conv:
        names += ["down_blocks_0_resnets_0_conv1", "down_blocks_0_resnets_0_conv2", "down_blocks_0_resnets_0_time_emb_proj",
                  "down_blocks_0_downsamplers_0_conv", "up_blocks_1_resnets_0_conv_shortcut", "up_blocks_0_upsamplers_0_conv"]
    for n in names:
        sd.update(_lora_tensors(f"lora_unet_{n}", unet_layers[n], 2, gen))
    te_layers = _layers(te)
    for b in range(2):
        for x in TE_LAYERS:
            sd.update(_lora_tensors(f"lora_te_text_model_encoder_layers_{b}_{x}", te_layers[f"encoder_layers_{b}_{x}"],
                                    2, gen))
    return sd


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_sd_scripts_sd1_files_load_every_module(tmp_path, conv):
    unet, te = tiny_unet(attention_in_both=True), tiny_text_encoder()
    sd = _sd_scripts_sd1_file(unet, te, conv)
    path = tmp_path / "sd_scripts.safetensors"
    safetensors.torch.save_file(sd, path)
    network, weights = lora.create_network_from_weights(1.0, path, None, te, unet)
    network.apply_to(te, unet)
    network.load_weights(path)
    assert network.state_dict().keys() == sd.keys()
    assert all(torch.equal(network.state_dict()[k], v) for k, v in sd.items())


def test_sd_scripts_sdxl_file_with_sai_names_loads_every_module(tmp_path):
    """Names written by the SAI scheme for this SDXL-layout U-Net: down_blocks.1 -> input_blocks.4/5,
    mid_block -> middle_block.1, up_blocks.0 -> output_blocks.0/1/2 (attentions are the `_1` child)."""
    unet, te1, te2 = tiny_sdxl_unet(), tiny_text_encoder(0), tiny_text_encoder(1, with_projection=True)
    layers, gen, sd = _layers(unet), torch.Generator().manual_seed(0), {}
    sai_to_path = {"input_blocks_4_1": "down_blocks_1_attentions_0", "input_blocks_5_1": "down_blocks_1_attentions_1",
                   "middle_block_1": "mid_block_attentions_0", "output_blocks_0_1": "up_blocks_0_attentions_0",
                   "output_blocks_2_1": "up_blocks_0_attentions_2", "input_blocks_3_0_op": "down_blocks_0_downsamplers_0_conv",
                   "output_blocks_2_2_conv": "up_blocks_0_upsamplers_0_conv",
                   "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
                   "output_blocks_3_0_skip_connection": "up_blocks_1_resnets_0_conv_shortcut"}
    for sai, path in sai_to_path.items():
        suffixes = ("proj_in", "transformer_blocks_0_attn2_to_k") if sai.endswith("_1") else ("",)
        for x in suffixes:
            sd.update(_lora_tensors(f"lora_unet_{sai}{'_' + x if x else ''}", layers[f"{path}{'_' + x if x else ''}"],
                                    2, gen))
    te2_layers = _layers(getattr(te2, "text_model", te2))
    sd.update(_lora_tensors("lora_te2_text_model_encoder_layers_1_mlp_fc1", te2_layers["encoder_layers_1_mlp_fc1"],
                            2, gen))
    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(sd, path)
    network, _ = lora.create_network_from_weights(1.0, path, None, [te1, te2], unet)
    network.apply_to([te1, te2], unet)
    network.load_weights(path)
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len(sd) // 3
    network.save_weights(tmp_path / "again.safetensors", None, {})
    again = safetensors.torch.load_file(tmp_path / "again.safetensors")
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)  # same names back


def test_diffusers_peft_file_loads_as_lora_with_scale_one(tmp_path):
    unet, te = tiny_unet(), tiny_text_encoder()
    ours = lora.create_network(1.0, 4, 4, None, te, unet)  # alpha = dim: scale 1, as PEFT's default
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.05)
    ours.apply_to(te, unet)
    sample, t, enc = unet_inputs()
    with torch.no_grad():
        expected = unet(sample, t, enc).sample
    unet_paths = {f"lora_unet_{n}".replace(".", "_"): n for n, _ in unet.named_modules()}
    te_paths = {f"lora_te_text_model_{n}".replace(".", "_"): n for n, _ in te.named_modules()}
    peft = {}
    for m in ours.unet_loras + ours.text_encoder_loras:
        part, path = ("unet", unet_paths[m.lora_name]) if m.lora_name in unet_paths else \
            ("text_encoder", "text_model." + te_paths[m.lora_name])
        peft[f"{part}.{path}.lora_A.weight"] = m.lora_down.weight.detach().clone()
        peft[f"{part}.{path}.lora_B.weight"] = m.lora_up.weight.detach().clone()
    ours.remove_from()
    safetensors.torch.save_file(peft, tmp_path / "peft.safetensors")
    unet2, te2 = tiny_unet(), tiny_text_encoder()
    network = lora.create_network(1.0, 4, 1, None, te2, unet2)
    network.apply_to(te2, unet2)
    network.load_weights(tmp_path / "peft.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(unet2(sample, t, enc).sample, expected)


def test_file_for_other_layers_is_an_error_naming_the_count(tmp_path):
    unet, te = tiny_unet(attention_in_both=True), tiny_text_encoder()
    sd = _sd_scripts_sd1_file(unet, te, conv=False)
    sd.update(_lora_tensors("lora_unet_down_blocks_7_attentions_0_proj_in", nn.Linear(32, 32), 2,
                            torch.Generator().manual_seed(1)))
    safetensors.torch.save_file(sd, tmp_path / "other.safetensors")
    network = lora.create_network(1.0, 2, 1, None, te, unet)
    network.apply_to(te, unet)
    n = len(sd) // 3
    with pytest.raises(ModelError, match=rf"other.safetensors: only {n - 1} of its {n} modules match .*down_blocks_7"):
        network.load_weights(tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match=rf"only {n - 1} of its {n} modules match"):
        lora.create_network_from_weights(1.0, tmp_path / "other.safetensors", None, te, unet)
    unet_only = lora.create_network(1.0, 2, 1, None, te, unet)
    unet_only.apply_to(te, unet, apply_text_encoder=False)  # parts not trained are not counted
    sd = {k: v for k, v in sd.items() if "down_blocks_7" not in k}
    safetensors.torch.save_file(sd, tmp_path / "full.safetensors")
    unet_only.load_weights(tmp_path / "full.safetensors")
