"""Our saved LoRA file in diffusers' `load_lora_weights` changes the outputs exactly as our hooked network does,
and its keys have the forms ComfyUI's and A1111's kohya key maps look up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import CLIPTokenizer

from networks.lora import LoRANetwork, create_network
from tests.networks.test_lora import randomize_lora, tiny_sdxl_unet, tiny_text_encoder, tiny_unet, unet_inputs

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "library" / "models" / "tokenizer" / "clip"


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


def sd_pipeline(unet, text_encoder) -> StableDiffusionPipeline:
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR) if TOKENIZER_DIR.is_dir() else None
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def trained_network(text_encoder, unet, **kwargs) -> LoRANetwork:
    network = create_network(1.0, 4, 2, None, text_encoder, unet, **kwargs)
    randomize_lora(network)
    network.apply_to(text_encoder, unet)
    return network


# every key used: diffusers' kohya conversion raises on a key it cannot rename, and PEFT warns (RuntimeWarning)
# about modules of the file it found no layer for
@torch.no_grad()
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize(
    "attention_in_both, network_args",
    [(False, {}), (False, {"conv_dim": 3, "conv_alpha": 1.5}), (True, {"conv_dim": 2})],
    ids=["attn-lora", "conv-lora", "attention-in-both-blocks"],
)
def test_diffusers_load_lora_weights_matches_our_network(tmp_path, attention_in_both, network_args):
    unet, te = tiny_unet(attention_in_both), tiny_text_encoder()
    network = trained_network(te, unet, **network_args)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, {"ss_network_dim": "4", "ss_network_alpha": "2"})

    sample, t, enc = unet_inputs()
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    ours_unet, ours_te = unet(sample, t, enc).sample, te(ids).last_hidden_state

    pipe = sd_pipeline(tiny_unet(attention_in_both), tiny_text_encoder())
    base_unet = pipe.unet(sample, t, enc).sample
    pipe.load_lora_weights(str(path))
    theirs_unet, theirs_te = pipe.unet(sample, t, enc).sample, pipe.text_encoder(ids).last_hidden_state

    assert (ours_unet - base_unet).abs().max() > 1e-2  # the LoRA does change the output
    torch.testing.assert_close(theirs_unet, ours_unet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs_te, ours_te, atol=1e-5, rtol=1e-5)

    # a hand merge of the file into fresh weights: W += up @ down * alpha / dim for every module
    hand = tiny_unet(attention_in_both)
    layers = {"lora_unet_" + n.replace(".", "_"): m for n, m in hand.named_modules()}
    sd = safetensors.torch.load_file(path)
    for key in [k for k in sd if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")]:
        name = key[: -len(".lora_down.weight")]
        down, up = sd[key], sd[f"{name}.lora_up.weight"]
        weight = layers[name].weight
        delta = (up.flatten(1) @ down.flatten(1)).view(weight.shape) * (float(sd[f"{name}.alpha"]) / down.shape[0])
        weight.add_(delta)
    torch.testing.assert_close(hand(sample, t, enc).sample, theirs_unet, atol=1e-5, rtol=1e-5)

    # the whole sampling loop, from the same prompt embeddings
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 5, 32, generator=generator)
    kwargs = dict(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="latent",
    )
    ours = sd_pipeline(unet, te)(generator=torch.Generator().manual_seed(1), **kwargs).images
    theirs = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_sdxl_two_text_encoders_load_into_text_encoder_and_text_encoder_2(tmp_path):
    def encoders():
        return tiny_text_encoder(0), tiny_text_encoder(1, with_projection=True)

    unet, (te1, te2) = tiny_sdxl_unet(), encoders()
    network = trained_network([te1, te2], unet, conv_dim=3)
    names = {k.split(".")[0] for k in network.state_dict()}
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    path = tmp_path / "sdxl.safetensors"
    network.save_weights(path, torch.float32, {})
    with safetensors.safe_open(path, "pt") as f:  # sd-scripts' SAI names for the U-Net
        unet_keys = [k for k in f.keys() if k.startswith("lora_unet_")]
    assert unet_keys and all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block",
                                           "lora_unet_output_blocks")) for k in unet_keys)

    sample, t, enc = unet_inputs()
    enc = torch.cat([enc, enc.flip(-1)], dim=-1)
    cond = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = (
        unet(sample, t, enc, added_cond_kwargs=cond).sample,
        te1(ids).last_hidden_state,
        te2(ids).text_embeds,
    )

    base_unet, (base_te1, base_te2) = tiny_sdxl_unet(), encoders()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=base_te1,
        text_encoder_2=base_te2,
        tokenizer=None,
        tokenizer_2=None,
        unet=base_unet,
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.load_lora_weights(str(path))
    theirs = (
        pipe.unet(sample, t, enc, added_cond_kwargs=cond).sample,
        pipe.text_encoder(ids).last_hidden_state,
        pipe.text_encoder_2(ids).text_embeds,
    )
    for a, b in zip(theirs, ours, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ComfyUI (comfy/lora.py model_lora_keys_clip) maps these CLIP layers of each encoder layer b to
# lora_te{,1,2}_text_model_encoder_layers_{b}_{name}.
COMFY_CLIP_LAYERS = (
    "mlp_fc1",
    "mlp_fc2",
    "self_attn_k_proj",
    "self_attn_q_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
)

# A1111 (extensions-builtin/Lora) turns diffusers-form U-Net names into LDM names with these patterns; a name
# matching none of them is left unconverted and the layer silently ignored.
A1111_UNET_PATTERNS = (
    r"lora_unet_down_blocks_\d+_(attentions|resnets)_\d+_.+",
    r"lora_unet_mid_block_(attentions|resnets)_\d+_.+",
    r"lora_unet_up_blocks_\d+_(attentions|resnets)_\d+_.+",
    r"lora_unet_down_blocks_\d+_downsamplers_0_conv",
    r"lora_unet_up_blocks_\d+_upsamplers_0_conv",
)


@pytest.mark.parametrize("two_encoders", [False, True])
def test_keys_are_in_comfyui_and_a1111_key_maps(two_encoders):
    unet = tiny_unet(attention_in_both=True)
    encoders = (
        [tiny_text_encoder(0), tiny_text_encoder(1, with_projection=True)]
        if two_encoders
        else [tiny_text_encoder()]
    )
    network = create_network(1.0, 4, 1, None, encoders, unet, conv_dim=4)
    keys = set(network.state_dict())
    names = {k.split(".")[0] for k in keys}
    assert keys == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}

    # ComfyUI: "lora_unet_" + a diffusers U-Net weight path with "." -> "_"
    comfy_unet = {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        for k in unet.state_dict()
        if k.endswith(".weight")
    }
    prefixes = ["lora_te1", "lora_te2"] if two_encoders else ["lora_te"]
    comfy_clip = {
        f"{p}_text_model_encoder_layers_{b}_{c}"
        for p in prefixes
        for b in range(2)
        for c in COMFY_CLIP_LAYERS
    }
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    assert unet_names <= comfy_unet
    assert names - unet_names == comfy_clip  # every CLIP attention/MLP layer, nothing else
    unmatched = [n for n in unet_names if not any(re.fullmatch(p, n) for p in A1111_UNET_PATTERNS)]
    assert unmatched == []
