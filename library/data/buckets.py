"""Aspect-ratio buckets (sd-scripts style): train each image at the bucket closest to its aspect ratio instead of
cropping everything square, so tall and wide images keep their composition.

Buckets have an area at most the training resolution's, sides that are multiples of `bucket_reso_steps`, and
sides within [min_bucket_reso, max_bucket_reso]. An image is resized so it covers its bucket, then cropped.
"""

from __future__ import annotations

import math

from PIL import Image

from library.errors import DatasetError


def make_buckets(resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int) -> list[tuple[int, int]]:
    """Sorted (width, height) buckets: the square one plus, for every width, the tallest height that fits."""
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area)) // steps * steps
    buckets = {(side, side)} if min_reso <= side <= max_reso else set()
    width = math.ceil(min_reso / steps) * steps
    while width <= max_reso:
        height = min(max_reso, max_area // width // steps * steps)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += steps
    return sorted(buckets)


def closest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio (w/h) is closest to the image's; ties go to the first (smallest) bucket."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


def no_upscale_bucket(size: tuple[int, int], resolution: tuple[int, int], max_reso: int, steps: int,
                      name: str = "image") -> tuple[int, int]:
    """`bucket_no_upscale`: the image's own size (scaled down to the resolution's area if larger), each side
    floored to a multiple of `steps` and capped at `max_reso`, so images are never enlarged."""
    w, h = size
    max_area = resolution[0] * resolution[1]
    scale = min(1.0, math.sqrt(max_area / (w * h)))
    bw = min(max_reso, int(w * scale) // steps * steps)
    bh = min(max_reso, int(h * scale) // steps * steps)
    if bw == 0 or bh == 0:
        raise DatasetError(f"{name} is {w}x{h} px: with bucket_no_upscale each side must be at least "
                           f"bucket_reso_steps = {steps} px")
    return bw, bh


def resize_and_crop(img: Image.Image, bucket: tuple[int, int],
                    crop_fraction: tuple[float, float] = (0.5, 0.5)) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the image covers `bucket` (keeping its aspect ratio), then crop to it.

    `crop_fraction` (x, y) in [0, 1] places the crop window: (0.5, 0.5) is a centre crop, random values give
    random_crop. Returns the image and the crop's (top, left) in resized pixels (SDXL's crop conditioning).
    """
    bw, bh = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        if scale < 1:
            img = img.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
        else:
            img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    left = round((rw - bw) * crop_fraction[0])
    top = round((rh - bh) * crop_fraction[1])
    if (rw, rh) != (bw, bh):
        img = img.crop((left, top, left + bw, top + bh))
    return img, (top, left)
