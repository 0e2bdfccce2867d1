"""Load one original-layout (LDM / kohya / A1111) checkpoint file, offline.

The file carries weights only; the architecture comes from the diffusers-format JSON configs bundled under
`configs/` (sd15, sd21-base, sd21, sdxl-base), so nothing is fetched from the Hub. The family is read from the
keys: `conditioner.embedders.1.` -> SDXL, `cond_stage_model.model.` (OpenCLIP) -> SD2,
`cond_stage_model.transformer.` (CLIP) -> SD1. SD 2.x 768-v and 512 epsilon files have identical keys, so
`--v_parameterization` picks between the sd21 (768, v_prediction) and sd21-base (512, epsilon) configs.
Keys are renamed by diffusers' own LDM converters (UNet, VAE, OpenCLIP); every component is then loaded strictly
onto an empty (meta) model, so a file missing any weight fails here, naming it, instead of training a
half-initialised model.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.errors import ModelError
from library.models.common import (
    SDModel,
    assemble,
    check_model_type,
    ddpm_scheduler_config,
    first_line,
    read_json,
    sd_tokenizers,
)

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (model type, text encoder key prefix, LDM layout of that encoder)
TEXT_ENCODER_LAYOUTS = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "open_clip")],
    "sdxl": [
        ("conditioner.embedders.0.transformer.", "clip"),
        ("conditioner.embedders.1.model.", "open_clip"),
    ],
}


def bundled_config_dir(model_type: str, v_parameterization: bool) -> Path:
    name = {"sd1": "sd15", "sdxl": "sdxl-base"}.get(model_type)
    if name is None:
        name = "sd21" if v_parameterization else "sd21-base"
    return CONFIGS_DIR / name


def read_checkpoint(path: Path, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors; every way a file can be wrong becomes a ModelError naming it.

    `mmap=False` (--disable_mmap_load_safetensors) reads a .safetensors file into memory in one go instead of
    memory-mapping it, which is much faster where mapped reads are slow (WSL's file systems).
    """
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelError(
            f"{path}: unsupported model file type '{suffix}'; expected {', '.join(CHECKPOINT_SUFFIXES)} "
            "or a diffusers folder"
        )
    if suffix == ".safetensors":
        try:
            if mmap:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    state = {key: f.get_tensor(key) for key in f.keys()}
            else:
                state = safetensors.torch.load(path.read_bytes())
        except Exception as exc:  # SafetensorError / OSError: bad header, truncated data, not safetensors
            raise ModelError(
                f"{path}: not a readable safetensors file ({first_line(exc)}); the file may be truncated or "
                "of another format"
            ) from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # zip/pickle errors, EOF, non-tensor objects refused by weights_only
            raise ModelError(
                f"{path}: cannot read as a PyTorch checkpoint with weights_only=True ({first_line(exc)}); "
                "expected a torch.save'd state_dict of tensors (convert other checkpoints to .safetensors)"
            ) from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ModelError(f"{path}: holds no state_dict of tensors; expected an SD checkpoint")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_checkpoint_type(keys: set[str], path: Path) -> tuple[str, str]:
    """Return (model type, the key evidence) from an LDM-layout state dict."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(UNET_PREFIX):
        if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
            raise ModelError(f"{path}: is a LoRA file, not a base model; pass it with --network_weights")
        if has("down_blocks.") or has("conv_in."):
            raise ModelError(
                f"{path}: holds diffusers-named weights of a single component; expected a full original-layout "
                "checkpoint (keys 'model.diffusion_model.*') or a diffusers folder with model_index.json"
            )
        raise ModelError(
            f"{path}: no UNet weights (keys 'model.diffusion_model.*'); expected an SD1/SD2/SDXL checkpoint"
        )
    if not has(VAE_PREFIX):
        raise ModelError(
            f"{path}: no VAE weights (keys 'first_stage_model.*'); expected a full SD checkpoint"
        )
    if has("conditioner.embedders.1."):
        return "sdxl", "keys 'conditioner.embedders.1.*'"
    if has("conditioner.embedders.0."):
        raise ModelError(f"{path}: looks like an SDXL refiner (one OpenCLIP encoder); only base models train")
    if has("cond_stage_model.model."):
        return "sd2", "OpenCLIP text encoder keys 'cond_stage_model.model.*'"
    if has("cond_stage_model.transformer."):
        return "sd1", "CLIP text encoder keys 'cond_stage_model.transformer.*'"
    raise ModelError(
        f"{path}: has no text encoder weights ('cond_stage_model.*' or 'conditioner.embedders.*'); "
        "expected a full SD1/SD2/SDXL checkpoint"
    )


def _empty(build):
    """Build on the meta device (no random init of billions of weights); the file's tensors are assigned."""
    with init_empty_weights():
        return build()


def _assign_strict(
    model: torch.nn.Module, weights: dict, what: str, config: Path, path: Path
) -> torch.nn.Module:
    """Load every parameter from `weights` or fail naming what is missing, so no weight stays uninitialised."""
    expected = model.state_dict().keys()
    missing = sorted(set(expected) - weights.keys())
    if missing:
        raise ModelError(f"{path}: {what} weights do not fit {config} (missing {', '.join(missing[:3])})")
    try:
        model.load_state_dict({k: weights[k] for k in expected}, strict=True, assign=True)
    except RuntimeError as exc:  # size mismatch: the file holds another architecture than the config
        raise ModelError(f"{path}: {what} weights do not fit {config} ({first_line(exc)})") from exc
    return model


def _config_folder(config_dir: Path, subfolder: str) -> Path:
    folder = config_dir / subfolder
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: no config.json for the {subfolder}")
    return folder


def _load_diffusers_model(cls, convert, state: dict, config_dir: Path, subfolder: str, path: Path):
    """UNet / VAE: diffusers' own LDM -> diffusers key converter, then a strict load."""
    folder = _config_folder(config_dir, subfolder)
    config = cls.load_config(folder)
    model = _empty(lambda: cls.from_config(config))
    try:
        weights = convert(state, dict(model.config))
    except (KeyError, IndexError, ValueError) as exc:  # the converter indexes keys the config implies
        raise ModelError(f"{path}: {subfolder} weights do not fit {folder} ({first_line(exc)})") from exc
    return _assign_strict(model, weights, subfolder, folder, path)


def _load_text_encoder(
    state: dict, prefix: str, layout: str, cls, config_dir: Path, subfolder: str, path: Path
) -> torch.nn.Module:
    folder = _config_folder(config_dir, subfolder)
    config = CLIPTextConfig.from_pretrained(folder, local_files_only=True)
    model = _empty(lambda: cls(config))
    if layout == "clip":
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        weights = convert_open_clip_checkpoint(model, state, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`)
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return _assign_strict(model, weights, f"{subfolder} (under '{prefix}')", folder, path)


def load_single_file(
    path: Path,
    *,
    v2: bool,
    sdxl: bool,
    v_parameterization: bool,
    dtype: torch.dtype,
    config_dir: Path | None = None,
    mmap: bool = True,
) -> SDModel:
    state = read_checkpoint(path, mmap=mmap)
    model_type, evidence = detect_checkpoint_type(set(state), path)
    check_model_type(model_type, v2=v2, sdxl=sdxl, source=str(path), evidence=evidence)
    config_dir = config_dir or bundled_config_dir(model_type, v_parameterization)

    text_encoders = []
    for i, (prefix, layout) in enumerate(TEXT_ENCODER_LAYOUTS[model_type]):
        cls = CLIPTextModelWithProjection if (model_type == "sdxl" and i == 1) else CLIPTextModel
        subfolder = "text_encoder" if i == 0 else "text_encoder_2"
        text_encoders.append(_load_text_encoder(state, prefix, layout, cls, config_dir, subfolder, path))
    unet = _load_diffusers_model(
        UNet2DConditionModel, convert_ldm_unet_checkpoint, state, config_dir, "unet", path
    )
    vae = _load_diffusers_model(AutoencoderKL, convert_ldm_vae_checkpoint, state, config_dir, "vae", path)
    del state

    raw_scheduler = read_json(config_dir / "scheduler" / "scheduler_config.json", "scheduler config")
    is_v = v_parameterization or raw_scheduler.get("prediction_type") == "v_prediction"
    scheduler_config = ddpm_scheduler_config(raw_scheduler, v_parameterization=is_v)
    return assemble(
        model_type, sd_tokenizers(model_type), text_encoders, vae, unet, scheduler_config, str(path), dtype
    )
