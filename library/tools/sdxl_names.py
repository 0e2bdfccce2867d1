"""SDXL LoRA module names for the tools: read files in either naming, write sd-scripts' SAI names.

Our network names SDXL U-Net modules by their diffusers path; sd-scripts (and its sdxl_merge_lora.py) by the
original Stability U-Net (`networks.sdxl_keys`). The tools work on diffusers-path names inside and write SAI
names, so a file they produce loads in sd-scripts as well as in diffusers, ComfyUI and A1111.
"""

from __future__ import annotations

from typing import TypeVar

from library.errors import ModelError
from networks.sdxl_keys import unet_key_to_diffusers, unet_key_to_sai

T = TypeVar("T")


def to_diffusers_names(modules: dict[str, T], source: str = "LoRA") -> dict[str, T]:
    """SAI-named U-Net modules renamed to diffusers paths; diffusers-named and text-encoder ones kept."""
    out: dict[str, T] = {}
    for name, value in modules.items():
        try:
            new = unet_key_to_diffusers(name)
        except KeyError:  # already a diffusers path (or unknown: the model check names it)
            new = name
        if new in out:
            raise ModelError(f"{source}: module {new} appears twice (once under its SAI name {name})")
        out[new] = value
    return out


def to_file_names(modules: dict[str, T]) -> dict[str, T]:
    """Diffusers-path U-Net modules renamed to sd-scripts' SAI names, for writing an SDXL LoRA."""
    return {unet_key_to_sai(name): value for name, value in modules.items()}
