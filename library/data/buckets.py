"""Aspect-ratio buckets as sd-scripts makes and picks them, so a dataset trains at the same sizes and crops.

Each image gets a bucket (the size it trains at) and a resized size (what it is scaled to before the crop):
- buckets from a list (`make_bucket_resolutions`): the bucket whose aspect ratio is closest, the image scaled so
  it covers the bucket, then trimmed; without `enable_bucket` the list is the one training resolution;
- `bucket_no_upscale`: images larger than the resolution's area are scaled down to it (rounded to the sides'
  steps the way that keeps the aspect closest), smaller ones keep their size; the bucket is that size floored to
  the steps, so the image is only ever cropped, never enlarged.
Every function is plain arithmetic on sizes, so images, latents and masks share the same crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Size = tuple[int, int]  # (width, height)
# the resize filters sd-scripts' resize_interpolation accepts (library/data/transforms.py applies them)
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def adjust_bucket_limits(min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """sd-scripts rounds min_bucket_reso down and max_bucket_reso up to multiples of bucket_reso_steps."""
    return min_reso - min_reso % steps, max_reso + (-max_reso) % steps


def make_bucket_resolutions(resolution: Size, min_size: int, max_size: int, steps: int) -> list[Size]:
    """sd-scripts' bucket list: the square of the resolution's area (floored to steps), plus for every width
    from min_size in steps up to max_size the tallest height (floored to steps, capped at max_size) within the
    area, and its transpose; sorted."""
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // steps) * steps)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


@dataclass(frozen=True)
class BucketFit:
    bucket: Size  # the size trained at
    resized: Size  # the size the image is scaled to before it is trimmed to the bucket


def fit_predefined(size: Size, buckets: list[Size]) -> BucketFit:
    """A bucket from the list: the image's own size if listed, else the closest aspect ratio (first on ties);
    the image is scaled so that its side that is short relative to the bucket matches (round half up)."""
    w, h = size
    aspect = w / h
    if size in buckets:
        bucket = size
    else:
        errors = np.abs(np.array([bw / bh for bw, bh in buckets]) - aspect)
        bucket = buckets[int(errors.argmin())]
    scale = bucket[1] / h if aspect > bucket[0] / bucket[1] else bucket[0] / w
    return BucketFit(bucket, (int(w * scale + 0.5), int(h * scale + 0.5)))


def fit_no_upscale(size: Size, resolution: Size, steps: int) -> BucketFit:
    """`bucket_no_upscale`: shrink to the resolution's area if larger (rounding width-first or height-first,
    whichever keeps the aspect closer), then floor each side to `steps` for the bucket."""
    w, h = size
    max_area = resolution[0] * resolution[1]
    if w * h > max_area:
        aspect = w / h
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        width_first = _round_to_steps(rw, steps)
        height_in_wr = _round_to_steps(width_first / aspect, steps)
        height_first = _round_to_steps(rh, steps)
        width_in_hr = _round_to_steps(height_first * aspect, steps)
        ar_w = width_first / height_in_wr if height_in_wr else math.inf
        ar_h = width_in_hr / height_first if height_first else math.inf
        if abs(ar_w - aspect) < abs(ar_h - aspect):
            resized = (width_first, int(width_first / aspect + 0.5))
        else:
            resized = (int(height_first * aspect + 0.5), height_first)
    else:
        resized = (w, h)
    return BucketFit((resized[0] - resized[0] % steps, resized[1] - resized[1] % steps), resized)


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def crop_offsets(resized: Size, bucket: Size, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """(left, top) of the bucket-sized window in the resized image: centred (`trim // 2`), or uniform over every
    position when `rng` is given (random_crop)."""
    trim_w, trim_h = max(0, resized[0] - bucket[0]), max(0, resized[1] - bucket[1])
    if rng is None:
        return trim_w // 2, trim_h // 2
    return int(rng.integers(0, trim_w + 1)), int(rng.integers(0, trim_h + 1))


def crop_ltrb(bucket: Size, original: Size) -> tuple[float, float, float, float]:
    """sd-scripts' SDXL crop box: where the whole image, fitted inside the bucket, would lie (left, top, right,
    bottom); the same for random crops, as sd-scripts does."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = original[0] / original[1]
    if bucket_ar > image_ar:
        width, height = bucket[1] * image_ar, bucket[1]
    else:
        width, height = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - width) // 2
    top = (bucket[1] - height) // 2
    return left, top, left + width, top + height


def crop_top_left(bucket: Size, original: Size, flipped: bool) -> tuple[int, int]:
    """SDXL's crop conditioning (top, left) as sd-scripts passes it: from `crop_ltrb`, the left edge mirrored
    (bucket width - right) for a flipped image, truncated to integers."""
    left, top, right, _ = crop_ltrb(bucket, original)
    return int(top), int(bucket[0] - right if flipped else left)
