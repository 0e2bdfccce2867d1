"""Test helper: write diffusers/transformers modules as one original-layout (LDM) checkpoint.

Written independently of diffusers' LDM -> diffusers converter (from the CompVis / SGM naming), so that a
round trip through `load_sd_model` checks the loader against the real layout rather than against itself.
"""

from __future__ import annotations

import re

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _resnet_unet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{RESNET_UNET.get(name, name)}.{tail}"


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    per_block = unet.config.layers_per_block + 1  # LDM: layers_per_block resnets + one down/up-sampler slot
    out = {}
    for key, value in unet.state_dict().items():
        rules = [
            (r"time_embedding\.linear_1\.(.*)", lambda m: f"time_embed.0.{m[1]}"),
            (r"time_embedding\.linear_2\.(.*)", lambda m: f"time_embed.2.{m[1]}"),
            (r"add_embedding\.linear_1\.(.*)", lambda m: f"label_emb.0.0.{m[1]}"),
            (r"add_embedding\.linear_2\.(.*)", lambda m: f"label_emb.0.2.{m[1]}"),
            (r"conv_in\.(.*)", lambda m: f"input_blocks.0.0.{m[1]}"),
            (r"conv_norm_out\.(.*)", lambda m: f"out.0.{m[1]}"),
            (r"conv_out\.(.*)", lambda m: f"out.2.{m[1]}"),
            (
                r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
                lambda m: f"input_blocks.{int(m[1]) * per_block + int(m[2]) + 1}.0.{_resnet_unet(m[3])}",
            ),
            (
                r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
                lambda m: f"input_blocks.{int(m[1]) * per_block + int(m[2]) + 1}.1.{m[3]}",
            ),
            (
                r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
                lambda m: f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}",
            ),
            (
                r"mid_block\.resnets\.(\d+)\.(.*)",
                lambda m: f"middle_block.{2 * int(m[1])}.{_resnet_unet(m[2])}",
            ),
            (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
            (
                r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
                lambda m: f"output_blocks.{int(m[1]) * per_block + int(m[2])}.0.{_resnet_unet(m[3])}",
            ),
            (
                r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
                lambda m: f"output_blocks.{int(m[1]) * per_block + int(m[2])}.1.{m[3]}",
            ),
            (
                r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
                lambda m: (
                    f"output_blocks.{int(m[1]) * per_block + per_block - 1}."
                    f"{2 if getattr(unet.up_blocks[int(m[1])], 'attentions', None) else 1}.conv.{m[2]}"
                ),  # the upsampler follows the resnet (and the attention, when the block has one)
            ),
        ]
        for pattern, build in rules:
            match = re.fullmatch(pattern, key)
            if match:
                out[UNET + build(match)] = value.clone()
                break
        else:
            raise KeyError(f"no LDM name rule for UNet key {key}")
    return out


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def _vae_attention(rest: str) -> str:
    for new, old in VAE_ATTENTION.items():
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    raise KeyError(rest)


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    num_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        value = value.clone()
        rules = [
            (r"(encoder|decoder)\.conv_norm_out\.(.*)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
            (r"(encoder|decoder)\.(conv_in|conv_out)\.(.*)", lambda m: f"{m[1]}.{m[2]}.{m[3]}"),
            (r"(quant_conv|post_quant_conv)\.(.*)", lambda m: f"{m[1]}.{m[2]}"),
            (
                r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
                lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}",
            ),
            (
                r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)",
                lambda m: f"encoder.down.{m[1]}.downsample.{m[2]}",
            ),
            (
                r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
                lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}",
            ),
            (
                r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)",
                lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample.{m[2]}",
            ),
            (
                r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)",
                lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}",
            ),
            (
                r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)",
                lambda m: f"{m[1]}.mid.attn_1.{_vae_attention(m[2])}",
            ),
        ]
        for pattern, build in rules:
            match = re.fullmatch(pattern, key)
            if match:
                if ".attentions." in key and key.endswith(".weight") and value.ndim == 2:
                    value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
                out[VAE + build(match)] = value
                break
        else:
            raise KeyError(f"no LDM name rule for VAE key {key}")
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L layout: the HF CLIPTextModel keys under `<prefix>text_model.`."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value.clone()
    return out


def open_clip_to_ldm(text_encoder, prefix: str, extra_layers: int = 0) -> dict[str, torch.Tensor]:
    """OpenCLIP layout (SD2 `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`): fused qkv in_proj,
    `resblocks`, `ln_final`, a [width, dim] `text_projection`. `extra_layers` appends unused resblocks, as SD2's
    file has the 24th layer its diffusers encoder drops."""
    state = {k.removeprefix("text_model."): v.clone() for k, v in text_encoder.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
        prefix + "logit_scale": torch.tensor(4.6052),
    }
    width = out[prefix + "token_embedding.weight"].shape[1]
    out[prefix + "text_projection"] = (
        state.pop("text_projection.weight").T.contiguous()
        if "text_projection.weight" in state
        else torch.eye(width)
    )
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state.pop(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for new, old in OPEN_CLIP_LAYER.items():
                out[dst + f"{old}.{kind}"] = state.pop(src + f"{new}.{kind}")
    for i in range(layers, layers + extra_layers):
        template = {k: v for k, v in out.items() if k.startswith(f"{prefix}transformer.resblocks.0.")}
        for k, v in template.items():
            out[k.replace("resblocks.0.", f"resblocks.{i}.")] = torch.randn_like(v)
    if state:
        raise KeyError(f"no OpenCLIP name rule for {sorted(state)[:3]}")
    return out
