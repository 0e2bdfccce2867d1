"""--fp8_base_unet on a GPU: a full-size U-Net (bundled configs, random weights) trains a LoRA with less VRAM.

Prints the measured bytes; the assertions hold the saving to the weights' count: one byte per converted weight
element at rest, and a peak of a step below the bf16 step's by most of that.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from library.models.fp8 import store_in_fp8
from library.models.single_file import CONFIGS_DIR

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _step_memory(config: str, fp8: bool, latent: int) -> tuple[int, int, int]:
    """(bytes the U-Net holds, peak bytes of one LoRA training step, converted weight elements).

    The peak is counted from what was allocated before the U-Net was built, and the U-Net is freed before
    returning: a hooked layer and its adapter reference each other, so without the unhooking and the collection
    the previous call's wrapped layers would still be allocated during this call's step.
    """
    from diffusers import UNet2DConditionModel

    import networks.lora as lora

    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS_DIR / config / "unet"))
    unet.to(torch.bfloat16).requires_grad_(False)
    converted = sum(m.weight.numel() for m in unet.modules() if type(m) in (nn.Linear, nn.Conv2d))
    if fp8:
        store_in_fp8(unet, torch.bfloat16)
    unet.enable_gradient_checkpointing()
    unet.train()
    te = nn.Module()  # no text-encoder LoRA: the U-Net's memory is what is measured
    net = lora.create_network(1.0, 16, 16.0, None, te, unet)
    net.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    net.to("cuda")
    held = sum(p.numel() * p.element_size() for p in unet.parameters())
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, latent, latent, device="cuda")
    hidden = torch.randn(1, 77, cfg.cross_attention_dim, device="cuda")
    extra = None
    if cfg.addition_embed_type == "text_time":
        extra = {"text_embeds": torch.randn(1, 1280, device="cuda"), "time_ids": torch.randn(1, 6, device="cuda")}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = unet(x, torch.tensor([500], device="cuda"), hidden, added_cond_kwargs=extra).sample
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    net.remove_from()
    del unet, net, out
    gc.collect()
    return held, peak, converted


@pytest.mark.parametrize(("config", "latent"), [("sd15", 64), ("sdxl-base", 128)])
def test_fp8_base_unet_halves_the_weights_and_lowers_the_step_peak(config, latent):
    held16, peak16, converted = _step_memory(config, fp8=False, latent=latent)
    held8, peak8, _ = _step_memory(config, fp8=True, latent=latent)
    gib = 1 << 30
    print(f"\n{config} {latent * 8}px: U-Net weights {held16 / gib:.2f} -> {held8 / gib:.2f} GiB, "
          f"step peak {peak16 / gib:.2f} -> {peak8 / gib:.2f} GiB")
    assert held16 - held8 == converted  # one byte less per converted weight element
    assert peak16 - peak8 > 0.8 * converted  # the saving survives the step: no layer keeps a wide copy
