"""Pixel operations on HxW(xC) uint8 arrays as sd-scripts applies them: resize, bucket crop, colour and face-crop
augmentation.

Resizing uses OpenCV and Pillow exactly as sd-scripts does (area to shrink, Lanczos to enlarge unless
`resize_interpolation` names one), so a dataset's pixels equal sd-scripts' to the value. The functions take any
array shape, so a mask is resized and cropped by the same calls as its image.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from library.data.buckets import BucketFit, crop_offsets

_PIL = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_CV2 = {"nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
        "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}
HUE_SHIFT_LIMIT = 8  # degrees/2 in OpenCV's 0..180 hue scale, as sd-scripts
COLOR_AUG_PROBABILITY = 0.33


def resize(pixels: np.ndarray, size: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize to (width, height). None: area when neither side grows, else Lanczos (sd-scripts' default)."""
    h, w = pixels.shape[:2]
    if interpolation is None:
        interpolation = "area" if w >= size[0] and h >= size[1] else "lanczos"
    if interpolation in _PIL:
        return np.asarray(Image.fromarray(pixels).resize(size, resample=_PIL[interpolation]))
    return cv2.resize(pixels, size, interpolation=_CV2[interpolation])


def fit_to_bucket(pixels: np.ndarray, fit: BucketFit, offsets: tuple[int, int] | None = None,
                  interpolation: str | None = None) -> np.ndarray:
    """Resize to `fit.resized` (if it differs), then cut the bucket at `offsets` (left, top; default centred)."""
    if pixels.shape[1] != fit.resized[0] or pixels.shape[0] != fit.resized[1]:
        pixels = resize(pixels, fit.resized, interpolation)
    left, top = offsets if offsets is not None else crop_offsets(fit.resized, fit.bucket)
    bw, bh = fit.bucket
    return pixels[top:top + bh, left:left + bw]


def color_aug(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """sd-scripts' weak colour augmentation: a third of the time either a hue shift of up to +-8 (OpenCV hue
    units) or a gamma in [0.95, 1.05], each half of those times."""
    if rng.random() > COLOR_AUG_PROBABILITY:
        return pixels
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(pixels, cv2.COLOR_BGR2HSV)  # sd-scripts' channel order, kept for equal pixels
        shift = rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
        if shift < 0:
            shift += 180
        hsv[:, :, 0] = (hsv[:, :, 0] + shift) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(pixels ** gamma, 0, 255).astype(np.uint8)


def face_from_name(stem: str) -> tuple[int, int, int, int] | None:
    """(centre x, centre y, width, height) of the face from a file name ending `_cx_cy_w_h`, as sd-scripts
    reads it; None when the name does not carry one (or its centre x is 0)."""
    tokens = stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        face = tuple(int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return face if face[0] > 0 else None


def face_crop(pixels: np.ndarray, face: tuple[int, int, int, int], target: tuple[int, int],
              scale_range: tuple[float, float], random_crop: bool, rng: np.random.Generator,
              interpolation: str | None = None) -> np.ndarray:
    """sd-scripts' face_crop_aug_range: scale so the face's larger side is 1/range of the target's short side
    (random within the range, never enlarging past 1.0), then cut `target` (width, height) around the face."""
    height, width = pixels.shape[:2]
    tw, th = target
    if (width, height) == (tw, th):
        return pixels
    cx, cy, fw, fh = face
    face_size = max(fw, fh)
    short = min(tw, th)
    min_scale = max(th / height, tw / width)
    min_scale = min(1.0, max(min_scale, short / (face_size * scale_range[1])))
    max_scale = min(1.0, max(min_scale, short / (face_size * scale_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    nh, nw = int(height * scale + 0.5), int(width * scale + 0.5)
    pixels = resize(pixels, (nw, nh), interpolation)
    centre = (int(cy * scale + 0.5), int(cx * scale + 0.5))
    for axis, (size, length, face_p) in enumerate(zip((th, tw), (nh, nw), centre, strict=True)):
        p1 = face_p - size // 2
        if random_crop:  # keep the face near the centre more often, but show background too
            spread = max(length - face_p, face_p)
            p1 += int(rng.integers(0, spread + 1)) + int(rng.integers(0, spread + 1)) - spread
        elif scale_range[0] != scale_range[1] and face_size > short // 10 and face_size >= 40:
            p1 += int(rng.integers(-face_size // 20, face_size // 20 + 1))
        p1 = max(0, min(p1, length - size))
        pixels = pixels[p1:p1 + size] if axis == 0 else pixels[:, p1:p1 + size]
    return pixels
