"""What a cached latent depends on, so a disk cache is reused only when the latent would come out the same.

The encoder is identified by its weights (a hash over every VAE tensor), not by the model's path: a file replaced
under the same name, or a `--vae` swap, must re-encode. The image by its size and modification time, as build
tools identify a source file; a re-saved image gets a new latent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 over the VAE's tensor names, shapes, dtypes and bytes (about a second for an SD VAE on a CPU)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return "vae-sha256:" + digest.hexdigest()[:32]


def image_identity(path: Path) -> tuple[int, int]:
    """(bytes, modification time in ns) of the image file."""
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def latent_shape_fits(shape: tuple[int, ...], bucket: tuple[int, int], factor: int, channels: int | None) -> bool:
    """A latent of `bucket` (width, height) is [channels, height/factor, width/factor]."""
    width, height = bucket
    return (len(shape) == 3 and tuple(shape[1:]) == (height // factor, width // factor)
            and (channels is None or shape[0] == channels))
