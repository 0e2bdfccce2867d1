"""What every model source shares: the `SDModel` contract, type checks against the flags, final assembly."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTokenizer

from library.errors import ModelError
from library.models.clip_tokenizer import OPEN_CLIP_PAD, SDXL_TOKENIZER_2_PAD, load_clip_tokenizer

_TYPE_FLAGS = {"sd1": "no --v2/--sdxl", "sd2": "--v2", "sdxl": "--sdxl or sdxl_train_network.py"}
_TYPE_ADVICE = {"sd1": "train it with train_network.py and neither --v2 nor --sdxl", "sd2": "use --v2",
                "sdxl": "use sdxl_train_network.py (or --sdxl)"}
_DDPM_KEYS = tuple(p for p in inspect.signature(DDPMScheduler.__init__).parameters if p != "self")


@dataclass
class SDModel:
    model_type: str  # "sd1" | "sd2" | "sdxl"
    tokenizers: list[CLIPTokenizer]
    text_encoders: list[torch.nn.Module]
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler_config: dict  # DDPMScheduler config (num_train_timesteps, betas, prediction_type)
    v_parameterization: bool
    source: str


def expected_model_type(*, v2: bool, sdxl: bool) -> str:
    if v2 and sdxl:
        raise ModelError("--v2 and --sdxl were both given; choose one (--v2: SD 2.x, --sdxl: SDXL)")
    return "sdxl" if sdxl else "sd2" if v2 else "sd1"


def check_model_type(detected: str, *, v2: bool, sdxl: bool, source: str, evidence: str) -> None:
    """Raise when the flags describe another model family than the one found in the files."""
    expected = expected_model_type(v2=v2, sdxl=sdxl)
    if detected != expected:
        raise ModelError(
            f"{source}: is an {detected.upper()} model ({evidence}) but the flags ({_TYPE_FLAGS[expected]}) "
            f"select {expected.upper()}; {_TYPE_ADVICE[detected]} for this model"
        )


def ddpm_scheduler_config(raw: dict, *, v_parameterization: bool) -> dict:
    """Keep the DDPMScheduler keys of any SD scheduler config (PNDM/DDIM/Euler share the beta schedule)."""
    config = {k: v for k, v in dict(DDPMScheduler.from_config(raw).config).items() if k in _DDPM_KEYS}
    if v_parameterization:
        config["prediction_type"] = "v_prediction"
    return config


def sd_tokenizers(model_type: str) -> list[CLIPTokenizer]:
    if model_type == "sdxl":
        return [load_clip_tokenizer(), load_clip_tokenizer(pad_token=SDXL_TOKENIZER_2_PAD)]
    if model_type == "sd2":  # OpenCLIP ViT-H, as stable-diffusion-2's own tokenizer
        return [load_clip_tokenizer(pad_token=OPEN_CLIP_PAD)]
    return [load_clip_tokenizer()]


def assemble(
    model_type: str,
    tokenizers: list[CLIPTokenizer],
    text_encoders: list[torch.nn.Module],
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    scheduler_config: dict,
    source: str,
    dtype: torch.dtype,
) -> SDModel:
    for module in (*text_encoders, vae, unet):
        if any(p.dtype != dtype for p in module.parameters()):  # diffusers warns on every dtype `.to()`
            module.to(dtype=dtype)
        module.eval()
    return SDModel(
        model_type=model_type,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        vae=vae,
        unet=unet,
        scheduler_config=scheduler_config,
        v_parameterization=scheduler_config["prediction_type"] == "v_prediction",
        source=source,
    )


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the {what} ({exc}); expected a JSON object") from exc


def first_line(exc: BaseException) -> str:
    """Exception type and first message line: enough to diagnose, short enough for a one-line error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
