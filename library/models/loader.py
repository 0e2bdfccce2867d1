"""`load_sd_model`: one entry for every base-model source the trainer accepts, all offline.

Sources: `builtin:tiny-sd`; a diffusers folder (model_index.json); a single original-layout (LDM / kohya)
`.safetensors` or `.ckpt` file, read against the JSON configs bundled in `configs/`. The model type comes from
the model itself; the `--v2` / `--sdxl` flags must agree with it, because the entry script chosen and the
conditioning the training loop builds depend on them and a silent mismatch trains garbage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from library.errors import ModelError
from library.models.builtin import BUILTIN_NAMES, build_tiny_sd_modules
from library.models.common import (
    SDModel,
    assemble,
    check_model_type,
    ddpm_scheduler_config,
    expected_model_type,
    read_json,
    sd_tokenizers,
)
from library.models.diffusers_folder import detect_folder_type, load_diffusers_folder
from library.models.single_file import detect_checkpoint_type, load_single_file


def load_sd_model(
    name_or_path: str | Path,
    *,
    v2: bool = False,
    v_parameterization: bool = False,
    sdxl: bool = False,
    dtype: torch.dtype = torch.float32,
    config_dir: str | Path | None = None,
    mmap: bool = True,
) -> SDModel:
    """Load tokenizers, text encoders, VAE, UNet and the DDPM config of a base model.

    `v_parameterization` forces v-prediction (needed for SD 2.x 768-v single files: their keys are identical to
    the 512 epsilon model's). `config_dir` replaces the bundled configs of a single file (tests, custom models).
    `mmap=False` reads .safetensors weights into memory at once (--disable_mmap_load_safetensors).
    """
    name = str(name_or_path)
    expected_model_type(v2=v2, sdxl=sdxl)
    if name in BUILTIN_NAMES:
        check_model_type("sd1", v2=v2, sdxl=sdxl, source=name, evidence="builtin tiny SD1 architecture")
        text_encoder, vae, unet, raw_scheduler = build_tiny_sd_modules()
        scheduler_config = ddpm_scheduler_config(raw_scheduler, v_parameterization=v_parameterization)
        return assemble("sd1", sd_tokenizers("sd1"), [text_encoder], vae, unet, scheduler_config, name, dtype)
    if name.startswith("builtin:"):
        raise ModelError(f"unknown built-in model '{name}'; valid: {', '.join(BUILTIN_NAMES)}")

    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(
            f"model '{name}' not found: expected a diffusers folder (with model_index.json), a .safetensors/"
            f".ckpt file, or {', '.join(BUILTIN_NAMES)}"
        )
    if path.is_dir():
        return load_diffusers_folder(
            path, v2=v2, sdxl=sdxl, v_parameterization=v_parameterization, dtype=dtype, mmap=mmap
        )
    return load_single_file(
        path,
        v2=v2,
        sdxl=sdxl,
        v_parameterization=v_parameterization,
        dtype=dtype,
        config_dir=Path(config_dir) if config_dir is not None else None,
        mmap=mmap,
    )


def detect_model_type(name_or_path: str | Path) -> str | None:
    """The family ("sd1" | "sd2" | "sdxl") from configs or tensor names alone, without reading weights.

    Lets `train_network.py` take an SDXL model without `--sdxl`. None when the source cannot be read; loading it
    then raises the error that says what is wrong with it.
    """
    name = str(name_or_path)
    if name in BUILTIN_NAMES:
        return "sd1"
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            configs = [read_json(path / f, f) for f in ("model_index.json", "unet/config.json",
                                                           "text_encoder/config.json")]
            return detect_folder_type(*configs)[0]
        return detect_checkpoint_type(_tensor_names(path), path)[0]
    except Exception:  # unreadable in any way (SafetensorError, pickle, zip...): the loader names the problem
        return None


def _tensor_names(path: Path) -> set[str]:
    """A safetensors header, or a zip-format torch checkpoint memory-mapped (tensors are not read)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return set(f.keys())
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return set(state)
