"""`builtin:tiny-sd`: an SD1-architecture model small enough to train on a CPU in seconds, with no download.

Weights are random but seeded (same tensors on every machine and run, without touching the caller's RNG). If
`weights/tiny-sd.safetensors` is present (a pre-trained tiny model, keys `unet.*`, `vae.*`, `text_encoder.*`
in diffusers naming) it replaces the random weights; `save_tiny_sd_weights` writes that file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
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
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise ModelError(
            f"{path}: cannot read tiny-sd weights ({first_line(exc)}); expected safetensors"
        ) from exc
    for prefix, module in modules.items():
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as exc:  # missing/unexpected keys or size mismatch
            raise ModelError(
                f"{path}: tiny-sd weights do not match the bundled '{prefix}' config ({first_line(exc)})"
            ) from exc


def save_tiny_sd_weights(path: Path, text_encoder, vae, unet) -> None:
    """Write the file `build_tiny_sd_modules` picks up instead of random weights."""
    state = {}
    for prefix, module in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet)):
        state.update({f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
