"""Load a diffusers-format model folder (model_index.json + one subfolder per component), never touching the Hub."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.errors import ModelError
from library.models.clip_tokenizer import OPEN_CLIP_PAD, SDXL_TOKENIZER_2_PAD, load_clip_tokenizer
from library.models.common import (
    SDModel,
    assemble,
    check_model_type,
    ddpm_scheduler_config,
    first_line,
    read_json,
)


def detect_folder_type(model_index: dict, unet_config: dict, text_encoder_config: dict) -> tuple[str, str]:
    """Return (model type, evidence). Full-size models are told apart by the UNet's cross-attention width;
    smaller custom ones by their text encoder (OpenCLIP, SD2's encoder, uses gelu; CLIP ViT-L quick_gelu)."""
    if unet_config.get("addition_embed_type") == "text_time" or "XL" in str(
        model_index.get("_class_name", "")
    ):
        return "sdxl", "UNet addition_embed_type 'text_time' / XL pipeline"
    cross = unet_config.get("cross_attention_dim")
    if cross == 768:
        return "sd1", "UNet cross_attention_dim 768"
    if cross == 1024:
        return "sd2", "UNet cross_attention_dim 1024"
    if text_encoder_config.get("hidden_act") == "gelu":
        return "sd2", f"cross_attention_dim {cross} with an OpenCLIP-style (gelu) text encoder"
    return "sd1", f"cross_attention_dim {cross} with a CLIP-style (quick_gelu) text encoder"


def _component(path: Path, subfolder: str, load):
    try:
        return load(path, subfolder=subfolder, local_files_only=True)
    except (
        Exception
    ) as exc:  # OSError, SafetensorError, size mismatches...: all mean "this folder is unusable"
        raise ModelError(f"{path / subfolder}: cannot load this component ({first_line(exc)})") from exc


def _tokenizer(path: Path, subfolder: str, pad_token: str | None = None) -> CLIPTokenizer:
    """The folder's own tokenizer when it has one, else the bundled (identical) CLIP vocabulary."""
    if not (path / subfolder).is_dir():
        return load_clip_tokenizer(pad_token) if pad_token else load_clip_tokenizer()
    return _component(path, subfolder, CLIPTokenizer.from_pretrained)


def load_diffusers_folder(
    path: Path, *, v2: bool, sdxl: bool, v_parameterization: bool, dtype: torch.dtype, mmap: bool = True
) -> SDModel:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelError(
            f"{path}: folder has no model_index.json; expected a diffusers model folder "
            "(model_index.json, unet/, vae/, text_encoder/, scheduler/)"
        )
    model_index = read_json(index_file, "diffusers model index")
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        if not (path / sub).is_dir():
            raise ModelError(f"{path}: diffusers folder lacks the '{sub}/' subfolder")
    unet_config = read_json(path / "unet" / "config.json", "UNet config")
    te_config = read_json(path / "text_encoder" / "config.json", "text encoder config")
    model_type, evidence = detect_folder_type(model_index, unet_config, te_config)
    check_model_type(model_type, v2=v2, sdxl=sdxl, source=str(path), evidence=evidence)

    raw_scheduler = read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    is_v = v_parameterization or raw_scheduler.get("prediction_type") == "v_prediction"
    scheduler_config = ddpm_scheduler_config(raw_scheduler, v_parameterization=is_v)

    tokenizers = [_tokenizer(path, "tokenizer", OPEN_CLIP_PAD if model_type == "sd2" else None)]
    text_encoders = [_component(path, "text_encoder", CLIPTextModel.from_pretrained)]
    if model_type == "sdxl":
        if not (path / "text_encoder_2").is_dir():
            raise ModelError(f"{path}: SDXL diffusers folder lacks the 'text_encoder_2/' subfolder")
        tokenizers.append(_tokenizer(path, "tokenizer_2", SDXL_TOKENIZER_2_PAD))
        text_encoders.append(_component(path, "text_encoder_2", CLIPTextModelWithProjection.from_pretrained))
    vae = _component(path, "vae", functools.partial(AutoencoderKL.from_pretrained, disable_mmap=not mmap))
    unet = _component(path, "unet", functools.partial(UNet2DConditionModel.from_pretrained, disable_mmap=not mmap))
    return assemble(model_type, tokenizers, text_encoders, vae, unet, scheduler_config, str(path), dtype)
