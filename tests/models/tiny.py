"""Test helper: tiny SD1 / SD2 / SDXL models with random weights (seeded), their config folders and files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.models.builtin import TINY_SD_CONFIG_DIR
from library.models.clip_tokenizer import load_clip_tokenizer
from tests.models.ldm_writer import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

CLIP_COMMON = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
}


@dataclass
class Tiny:
    kind: str
    text_encoders: list
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler

    def modules(self) -> dict[str, torch.nn.Module]:
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        return {**dict(zip(names, self.text_encoders, strict=True)), "vae": self.vae, "unet": self.unet}

    def save_configs(self, folder: Path) -> Path:
        """Config-only diffusers folder: what `load_sd_model(..., config_dir=)` reads for a single file."""
        for name, module in self.modules().items():
            target = folder / name
            if name.startswith("text_encoder"):
                module.config.save_pretrained(target)
            else:
                module.save_config(target)
        self.scheduler.save_config(folder / "scheduler")
        return folder

    def save_pipeline(self, folder: Path) -> Path:
        tokenizer = load_clip_tokenizer()
        if self.kind == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=tokenizer,
                tokenizer_2=load_clip_tokenizer(pad_token="!"),
                unet=self.unet,
                scheduler=self.scheduler,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                tokenizer=tokenizer,
                unet=self.unet,
                scheduler=self.scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.save_pretrained(folder)
        return folder

    def ldm_state_dict(self, sd2_extra_layers: int = 1) -> dict[str, torch.Tensor]:
        state = {**unet_to_ldm(self.unet), **vae_to_ldm(self.vae)}
        if self.kind == "sd1":
            state.update(clip_to_ldm(self.text_encoders[0], "cond_stage_model.transformer."))
        elif self.kind == "sd2":
            state.update(open_clip_to_ldm(self.text_encoders[0], "cond_stage_model.model.", sd2_extra_layers))
        else:
            state.update(clip_to_ldm(self.text_encoders[0], "conditioner.embedders.0.transformer."))
            state.update(open_clip_to_ldm(self.text_encoders[1], "conditioner.embedders.1.model."))
        return state


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL.from_config(AutoencoderKL.load_config(TINY_SD_CONFIG_DIR / "vae"))


def make_tiny(kind: str, seed: int = 7, prediction_type: str = "epsilon") -> Tiny:
    """Random tiny model of one family; a seed other than the builtin's so a fallback to it cannot pass."""
    scheduler = DDPMScheduler(**SCHEDULER, prediction_type=prediction_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "sd1":
            te = CLIPTextModel(CLIPTextConfig.from_pretrained(TINY_SD_CONFIG_DIR / "text_encoder"))
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(TINY_SD_CONFIG_DIR / "unet")
            )
            return Tiny(kind, [te], _tiny_vae(), unet, scheduler)
        if kind == "sd2":
            te_config = CLIPTextConfig(
                **CLIP_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                hidden_act="gelu", projection_dim=32,
            )  # fmt: skip
            unet = UNet2DConditionModel(
                sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
            )  # fmt: skip
            return Tiny(kind, [CLIPTextModel(te_config)], _tiny_vae(), unet, scheduler)
        if kind == "sdxl":
            te1 = CLIPTextModel(
                CLIPTextConfig(
                    **CLIP_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32,
                )
            )  # fmt: skip
            te2 = CLIPTextModelWithProjection(
                CLIPTextConfig(
                    **CLIP_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, hidden_act="gelu", projection_dim=48,
                )
            )  # fmt: skip
            unet = UNet2DConditionModel(
                sample_size=32, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2), cross_attention_dim=32 + 64, attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=48 + 6 * 8,
            )  # fmt: skip
            return Tiny(kind, [te1, te2], _tiny_vae(), unet, scheduler)
    raise ValueError(kind)


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    exp, act = expected.state_dict(), actual.state_dict()
    assert exp.keys() == act.keys()
    for key in exp:
        assert torch.equal(exp[key], act[key]), key


def unet_inputs(tiny_or_model, batch: int = 2) -> dict:
    """Deterministic UNet inputs matching the model's conditioning (SDXL adds pooled text + time ids)."""
    unet = tiny_or_model.unet
    gen = torch.Generator().manual_seed(0)
    cross = unet.config.cross_attention_dim
    kwargs = {
        "sample": torch.randn(batch, 4, 32, 32, generator=gen),
        "timestep": torch.tensor([10, 700][:batch]),
        "encoder_hidden_states": torch.randn(batch, 77, cross, generator=gen),
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return kwargs
