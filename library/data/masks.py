"""Loss masks (--masked_loss): an image's alpha channel, or a mask image of the same name in conditioning_data_dir.

As sd-scripts: a mask is 1 where the loss counts and 0 where it does not, read as value / 255 from the alpha
channel or from the mask image's red channel; it is resized and cropped exactly as its image is (the caller runs
both through the same resize-and-crop), then flipped with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.data.images import IMAGE_EXTENSIONS, load_image, probe_image
from library.errors import DatasetError


def find_mask_file(folder: Path, image: Path) -> Path:
    """The mask image for `image`: same stem, any image extension, in `folder`; DatasetError if none."""
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / (image.stem + ext), folder / (image.stem + ext.upper())):
            if candidate.is_file():
                return candidate
    raise DatasetError(f"image {image}: no mask image {image.stem}.* in conditioning_data_dir {folder}")


def check_mask_file(mask: Path, image: Path, image_size: tuple[int, int]) -> None:
    """A mask must decode and have its image's size (sd-scripts asserts the same when bucketing)."""
    size = probe_image(mask, min_side=1)
    if size != image_size:
        raise DatasetError(f"mask {mask} is {size[0]}x{size[1]} px but its image {image.name} is "
                           f"{image_size[0]}x{image_size[1]}; masks must have their image's size")


def split_alpha(rgba: Image.Image) -> tuple[Image.Image, Image.Image]:
    """(RGB as stored, alpha as an "L" image)."""
    return rgba.convert("RGB"), rgba.getchannel("A")


def load_mask_image(mask: Path, size: tuple[int, int]) -> Image.Image:
    """The mask image's red channel as an "L" image of `size` (the decoded size of its image)."""
    red = load_image(mask, min_side=1).getchannel("R")
    return red if red.size == size else red.resize(size, Image.Resampling.BILINEAR)


def to_mask_bytes(mask: Image.Image) -> torch.Tensor:
    """"L" image -> uint8 [H, W] (what caches keep: a quarter of float32)."""
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())


def mask_tensor(mask_bytes: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """uint8 [H, W] -> FloatTensor [1, H, W] in [0, 1] (value / 255, as sd-scripts)."""
    mask = mask_bytes.float().div_(255.0).unsqueeze(0)
    return mask.flip(-1) if flip else mask
