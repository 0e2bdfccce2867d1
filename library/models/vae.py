"""`--vae`: a VAE that replaces the base model's, from a file or a diffusers folder, offline.

A file carries weights only, so its architecture is the base model's own VAE's config (SD1/SD2/SDXL VAEs share
one layout); its keys may be original LDM (`encoder.down.0...`, optionally under `first_stage_model.`, i.e. a
whole checkpoint) or diffusers (`encoder.down_blocks.0...`). The LDM names are mapped by diffusers' converter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from library.errors import ModelError
from library.models.common import first_line
from library.models.single_file import VAE_PREFIX, read_checkpoint


def load_vae(source: str | Path, like: AutoencoderKL, *, mmap: bool = True) -> AutoencoderKL:
    """The VAE at `source`, loaded strictly (a missing or misshapen weight is a ModelError naming the file)."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ModelError(f"--vae {source}: folder has no config.json (nor vae/config.json); expected a diffusers "
                             "VAE folder or model folder")
        try:
            return AutoencoderKL.from_pretrained(folder, local_files_only=True, disable_mmap=not mmap)
        except Exception as exc:  # OSError, size mismatches: the folder is unusable
            raise ModelError(f"--vae {folder}: cannot load this VAE ({first_line(exc)})") from exc
    state = read_checkpoint(path, mmap=mmap)
    if any(k.startswith(VAE_PREFIX) for k in state):
        state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    config = dict(like.config)
    diffusers_keys = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state)
    try:
        weights = state if diffusers_keys else convert_ldm_vae_checkpoint(state, config)
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelError(f"--vae {source}: not a VAE of this model's layout ({first_line(exc)})") from exc
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    expected = vae.state_dict().keys()
    missing = sorted(set(expected) - weights.keys())
    if missing:
        raise ModelError(f"--vae {source}: no VAE weights for {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}; expected a VAE (or SD checkpoint) file")
    try:
        vae.load_state_dict({k: weights[k].to(torch.float32) for k in expected}, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"--vae {source}: weights do not fit this model's VAE ({first_line(exc)})") from exc
    return vae
