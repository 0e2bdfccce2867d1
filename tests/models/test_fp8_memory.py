"""--fp8_base's memory, counted exactly on the CPU: one LoRA training step of a small SDXL-like U-Net.

Every storage a forward+backward creates is recorded by the dispatcher ledger (bench/storage_ledger.py), so the
step's peak is a count of bytes, not an allocator reading. The float8 U-Net must keep its saving through the
step: autograd may save the float8 weight, never a wide copy of it, and the numbers must be those of a bf16
U-Net whose weights were rounded to e4m3 (sd-scripts' --fp8_base: stored in float8, computed in bf16).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.storage_ledger import StorageLedger
from library.models.fp8 import FP8, store_in_fp8

BF16 = torch.bfloat16
# SDXL's layout (text_time conditioning, linear projections, several transformer layers) at a toy width
TINY_SDXL = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 128],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=64, attention_head_dim=[2, 4, 8], norm_num_groups=32,
    transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=32 + 6 * 16, sample_size=16,
)


def _converted(unet: nn.Module) -> list[nn.Module]:
    return [m for m in unet.modules() if type(m) in (nn.Linear, nn.Conv2d)]


def _unet(weights: str) -> nn.Module:
    """The same seeded U-Net in bf16: 'bf16' as built, 'fp8' stored in float8, 'rounded' plain bf16 layers
    holding the e4m3-rounded weights (the reference for the float8 layers' numbers)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SDXL).to(BF16).requires_grad_(False)
    if weights == "fp8":
        store_in_fp8(unet, BF16)
    elif weights == "rounded":
        with torch.no_grad():
            for layer in _converted(unet):
                layer.weight.copy_(layer.weight.to(FP8).to(BF16))
    return unet


def _step(weights: str, checkpointing: bool, autocast: bool = True):
    """(bytes the U-Net holds, peak bytes created by one forward+backward, output, LoRA gradients)."""
    import networks.lora as lora

    unet = _unet(weights)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    torch.manual_seed(1)
    te = nn.Module()
    net = lora.create_network(1.0, 4, 4.0, None, te, unet)
    net.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.05)  # zero-initialised up weights would leave the down gradients at zero
    dtype = torch.float32 if autocast else BF16  # without autocast the inputs come in the weights' dtype
    x = torch.randn(1, 4, 16, 16).to(dtype)
    hidden = torch.randn(1, 7, 64).to(dtype)
    extra = {"text_embeds": torch.randn(1, 32).to(dtype), "time_ids": torch.randn(1, 6).to(dtype)}
    held = sum(p.numel() * p.element_size() for p in unet.parameters())
    with StorageLedger() as ledger:
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            out = unet(x, torch.tensor([500]), hidden, added_cond_kwargs=extra).sample
        out.float().square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    net.remove_from()  # no reference cycle between the layers and their adapters outlives the step
    return held, ledger.peak, out.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_fp8_step_peak_keeps_the_saving_of_the_weights(checkpointing):
    layers = _converted(_unet("bf16"))
    saved_at_rest = sum(m.weight.numel() for m in layers)  # bf16 -> e4m3: one byte per weight element
    widest = max(m.weight.numel() for m in layers)
    held16, peak16, _, _ = _step("bf16", checkpointing)
    held8, peak8, _, _ = _step("fp8", checkpointing)
    assert held16 - held8 == saved_at_rest
    assert (held16 + peak16) - (held8 + peak8) > 0.8 * saved_at_rest
    # beyond what the bf16 step makes, at most one layer's upcast weight is alive at any moment
    assert peak8 - peak16 <= 2 * widest


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_fp8_step_equals_bf16_with_e4m3_rounded_weights(autocast, checkpointing):
    _, _, out, grads = _step("fp8", checkpointing, autocast)
    _, _, ref_out, ref_grads = _step("rounded", checkpointing, autocast)
    assert torch.equal(out, ref_out)
    assert len(grads) == len(ref_grads) and all(g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
