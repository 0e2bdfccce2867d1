"""SDXL U-Net LoRA names: diffusers module paths <-> the SAI (original Stability) names sd-scripts uses.

Our U-Net is diffusers' `UNet2DConditionModel`, so a module's kohya name is built from its diffusers path
(`lora_unet_down_blocks_1_attentions_0_proj_in`). sd-scripts trains SDXL on the original Stability U-Net and
names the same module after that model (`lora_unet_input_blocks_4_1_proj_in`); its `--network_weights`,
`sdxl_merge_lora.py` and LyCORIS runs inside sd-scripts write and expect those SAI names. The layer
correspondence is the one sd-scripts converts SDXL checkpoints with:

    down_blocks.i.resnets.j / .attentions.j   -> input_blocks.(3i+j+1).0 / .1
    down_blocks.i.downsamplers.0.conv         -> input_blocks.(3i+3).0.op
    mid_block.resnets.j / .attentions.0       -> middle_block.(2j) / middle_block.1
    up_blocks.i.resnets.j / .attentions.j     -> output_blocks.(3i+j).0 / .1
    up_blocks.i.upsamplers.0                  -> output_blocks.(3i+2).2
    resnet norm1, conv1, norm2, conv2, time_emb_proj, conv_shortcut
                                              -> in_layers.0, in_layers.2, out_layers.0, out_layers.3,
                                                 emb_layers.1, skip_connection
    time_embedding.linear_1/2                 -> time_embed.0/2
    add_embedding.linear_1/2                  -> label_emb.0.0/2
    conv_in, conv_norm_out, conv_out          -> input_blocks.0.0, out.0, out.2

Everything below a mapped prefix (`transformer_blocks_0_attn1_to_q`, ...) is named the same in both models.

Two functions, both on one key at a time:

- `unet_key_to_sai(key)`: a diffusers-named key -> the SAI-named key.
- `unet_key_to_diffusers(key)`: a SAI-named key -> the diffusers-named key.

A key is a module name (`lora_unet_...`) or a full state-dict key (`lora_unet_....lora_down.weight`); the part
after the first `.` is kept. Only U-Net keys change (module names starting `<prefix>_unet_`, e.g. `lora_unet_`
or sd-scripts' OFT `oft_unet_`); text encoder and other keys come back unchanged. A U-Net key that does not
follow the source naming raises `KeyError` naming it (callers decide which naming a file uses).
"""

from __future__ import annotations

import re

_UNET_KEY = re.compile(r"^([a-z0-9]+_unet_)([^.]+)(.*)$", re.DOTALL)

_RESNET_LAYERS = (
    ("norm1", "in_layers_0"),
    ("conv1", "in_layers_2"),
    ("norm2", "out_layers_0"),
    ("conv2", "out_layers_3"),
    ("time_emb_proj", "emb_layers_1"),
    ("conv_shortcut", "skip_connection"),
)


def _prefix_pairs() -> list[tuple[str, str]]:
    """(diffusers prefix, SAI prefix) with `_` separators, the same set sd-scripts' conversion map spans."""
    blocks: list[tuple[str, str, bool]] = []  # (diffusers, sai, is_resnet)
    for i in range(3):
        for j in range(2):
            blocks.append((f"down_blocks_{i}_resnets_{j}", f"input_blocks_{3 * i + j + 1}_0", True))
            blocks.append((f"down_blocks_{i}_attentions_{j}", f"input_blocks_{3 * i + j + 1}_1", False))
        for j in range(3):
            blocks.append((f"up_blocks_{i}_resnets_{j}", f"output_blocks_{3 * i + j}_0", True))
            blocks.append((f"up_blocks_{i}_attentions_{j}", f"output_blocks_{3 * i + j}_1", False))
        blocks.append((f"down_blocks_{i}_downsamplers_0_conv", f"input_blocks_{3 * i + 3}_0_op", False))
        blocks.append((f"up_blocks_{i}_upsamplers_0", f"output_blocks_{3 * i + 2}_2", False))
    blocks.append(("mid_block_attentions_0", "middle_block_1", False))
    for j in range(2):
        blocks.append((f"mid_block_resnets_{j}", f"middle_block_{2 * j}", True))
    pairs = []
    for diffusers, sai, is_resnet in blocks:
        if is_resnet:
            pairs += [(f"{diffusers}_{d}", f"{sai}_{s}") for d, s in _RESNET_LAYERS]
        else:
            pairs.append((diffusers, sai))
    for j in range(2):
        pairs.append((f"time_embedding_linear_{j + 1}", f"time_embed_{2 * j}"))
        pairs.append((f"add_embedding_linear_{j + 1}", f"label_emb_0_{2 * j}"))
    pairs += [("conv_in", "input_blocks_0_0"), ("conv_norm_out", "out_0"), ("conv_out", "out_2")]
    return pairs


_PAIRS = _prefix_pairs()
_TO_SAI = dict(_PAIRS)
_TO_DIFFUSERS = {sai: diffusers for diffusers, sai in _PAIRS}


def _convert(key: str, table: dict[str, str], source: str) -> str:
    match = _UNET_KEY.match(key)
    if match is None:
        return key
    prefix, module, rest = match.groups()
    # the longest table prefix that ends at a `_` boundary of the module path
    parts = module.split("_")
    for n in range(len(parts), 0, -1):
        head = "_".join(parts[:n])
        if head in table:
            tail = module[len(head) :]
            return f"{prefix}{table[head]}{tail}{rest}"
    raise KeyError(f"{key}: not a {source}-named SDXL U-Net key")


def unet_key_to_sai(key: str) -> str:
    """`lora_unet_down_blocks_1_attentions_0_proj_in...` -> `lora_unet_input_blocks_4_1_proj_in...`."""
    return _convert(key, _TO_SAI, "diffusers")


def unet_key_to_diffusers(key: str) -> str:
    """`lora_unet_input_blocks_4_1_proj_in...` -> `lora_unet_down_blocks_1_attentions_0_proj_in...`."""
    return _convert(key, _TO_DIFFUSERS, "SAI")
