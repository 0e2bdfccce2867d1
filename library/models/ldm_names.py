"""Diffusers/transformers parameter names -> original-layout (LDM / SGM) checkpoint keys.

The reverse of the renaming `single_file.py` gets from diffusers' LDM converters, for the parameters a LoRA
changes (U-Net layers, text-encoder linears), so a merged model can be written back into its own
single file with every other tensor untouched. OpenCLIP encoders (SD2, SDXL's second) fuse q/k/v into one
`in_proj_weight`; their q/k/v projections map to a row block of it.
"""

from __future__ import annotations

import re

from diffusers import UNet2DConditionModel

from library.models.single_file import TEXT_ENCODER_LAYOUTS, UNET_PREFIX

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_OPEN_CLIP = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET.get(name, name)}.{tail}"


def unet_key(unet: UNet2DConditionModel, key: str) -> str:
    """The LDM key (with `model.diffusion_model.`) of a diffusers U-Net parameter of a block."""
    per = unet.config.layers_per_block + 1  # LDM: the resnets of a level plus its down/up-sampler slot
    rules = (
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
            lambda m: f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.0.{_resnet(m[3])}",
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
            lambda m: f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.1.{m[3]}",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)",
            lambda m: f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}",
        ),
        (r"mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"),
        (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
            lambda m: f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}",
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
            lambda m: f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)",
            lambda m: (
                f"output_blocks.{int(m[1]) * per + per - 1}."
                f"{2 if getattr(unet.up_blocks[int(m[1])], 'attentions', None) else 1}.conv.{m[2]}"
            ),
        ),
    )
    for pattern, build in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return UNET_PREFIX + build(match)
    raise KeyError(f"no original-layout name for U-Net parameter {key}")


def text_encoder_key(model_type: str, index: int, key: str) -> tuple[str, int | None]:
    """(LDM key, q/k/v block index or None) of a text-encoder parameter (`text_model.` optional)."""
    prefix, layout = TEXT_ENCODER_LAYOUTS[model_type][index]
    rest = key.removeprefix("text_model.")
    if layout == "clip":
        return f"{prefix}text_model.{rest}", None
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", rest)
    if not match:
        raise KeyError(f"no original-layout name for text encoder parameter {key}")
    layer, module, kind = match[1], match[2], match[3]
    block = f"{prefix}transformer.resblocks.{layer}."
    if module.startswith("self_attn.") and module.split(".")[1] in _QKV:
        return f"{block}attn.in_proj_{kind}", _QKV.index(module.split(".")[1])
    if module not in _OPEN_CLIP:
        raise KeyError(f"no original-layout name for text encoder parameter {key}")
    return f"{block}{_OPEN_CLIP[module]}.{kind}", None
