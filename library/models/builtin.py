"""`builtin:tiny-sd`: an SD1-architecture model small enough to train on a CPU in seconds, with no download.

Weights are random but seeded (same tensors on every machine and run, without touching the caller's RNG). If
`weights/tiny-sd.safetensors` is present (a pre-trained tiny model, keys `unet.*`, `vae.*`, `text_encoder.*`
in diffusers naming, fp16 or fp32) it replaces the random weights, cast to float32; `save_tiny_sd_weights` writes
that file. Its metadata may carry `vae.scaling_factor`: a VAE trained from scratch has its own latent scale, and the
trainer and the sampling pipeline both read `vae.config.scaling_factor`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import ModelError
from library.models.common import first_line

PACKAGE_DIR = Path(__file__).resolve().parent
TINY_SD_CONFIG_DIR = PACKAGE_DIR / "configs" / "tiny-sd"
TINY_SD_WEIGHTS = PACKAGE_DIR / "weights" / "tiny-sd.safetensors"
BUILTIN_NAMES = ("builtin:tiny-sd",)
_SEED = 0


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def build_tiny_sd_modules(
    config_dir: Path = TINY_SD_CONFIG_DIR, weights: Path | None = TINY_SD_WEIGHTS
) -> tuple[CLIPTextModel, AutoencoderKL, UNet2DConditionModel, dict]:
    """Return (text_encoder, vae, unet, scheduler_config) built from the bundled JSON configs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    scheduler_config = _read_json(config_dir / "scheduler" / "scheduler_config.json")
    if weights is not None and weights.is_file():
        _load_tiny_sd_weights(weights, {"text_encoder": text_encoder, "vae": vae, "unet": unet})
    for module in (text_encoder, vae, unet):
        module.eval()
    return text_encoder, vae, unet, scheduler_config


def _load_tiny_sd_weights(path: Path, modules: dict[str, torch.nn.Module]) -> None:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise ModelError(
            f"{path}: cannot read tiny-sd weights ({first_line(exc)}); expected safetensors"
        ) from exc
    for prefix, module in modules.items():
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(part, strict=True)  # copies into the float32 parameters: fp16 files upcast
        except RuntimeError as exc:  # missing/unexpected keys or size mismatch
            raise ModelError(
                f"{path}: tiny-sd weights do not match the bundled '{prefix}' config ({first_line(exc)})"
            ) from exc
    if "vae.scaling_factor" in metadata:
        raw = metadata["vae.scaling_factor"]
        try:
            factor = float(raw)
        except ValueError:
            factor = math.nan
        if not (math.isfinite(factor) and factor > 0):
            raise ModelError(f"{path}: metadata vae.scaling_factor {raw!r} is not a positive finite number")
        modules["vae"].register_to_config(scaling_factor=factor)


def save_tiny_sd_weights(path: Path, text_encoder, vae, unet, *, dtype: torch.dtype = torch.float32) -> None:
    """Write the file `build_tiny_sd_modules` picks up instead of random weights (floats stored as `dtype`).

    fp16 halves the file that ships in the repository; the VAE's `scaling_factor` travels in the metadata.
    """
    state = {}
    for prefix, module in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet)):
        for k, v in module.state_dict().items():
            v = v.detach().cpu()
            state[f"{prefix}.{k}"] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata={"vae.scaling_factor": repr(float(vae.config.scaling_factor))})
