"""Decode any image a user may drop in a training folder into an RGB PIL image.

Transparent images are composited on white (a black background would teach the model black halos), 16-bit images
are scaled rather than clipped, EXIF orientation is applied, and huge images are downscaled while decoding (JPEG
draft mode) or right after (integer `reduce`), so a 12000x9000 photo never costs gigabytes per training step.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from library.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# PIL warns above MAX_IMAGE_PIXELS and refuses above twice that (decompression-bomb guard). We downscale on load,
# so allow large photos (400 MP hard limit) but keep a guard: a bigger header is almost surely a bomb or an error.
MAX_IMAGE_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

DEFAULT_MAX_PIXELS = 4096 * 4096  # decoded size cap: enough for 2048x2048 buckets with margin
MIN_IMAGE_SIDE = 64
PROBE_PIXELS = 256 * 256  # validation decodes at this size: it proves the file decodes, cheaply

_ORIENTATION = {  # EXIF orientation tag -> the transpose that makes the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_IMAGE_SIDE,
               cover: tuple[int, int] | None = None, keep_alpha: bool = False) -> Image.Image:
    """RGB image, upright, at most `max_pixels` pixels; DatasetError naming the file if it cannot be used.

    `cover=(w, h)`: the image will be resized to cover this size, so decode it only as large as needed for that
    (JPEG draft + integer reduce), never smaller: a 24 MP photo for a 512 bucket costs a fraction of a full decode.
    `keep_alpha`: RGBA with the colours as stored (opaque where the file has no alpha), for alpha loss masks.
    """
    return _decode(Path(path), max_pixels, min_side, cover, keep_alpha)[0]


def probe_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE) -> tuple[int, int]:
    """Upright full-resolution (width, height), after proving the file decodes (at a small size, so it is cheap)."""
    return _decode(Path(path), PROBE_PIXELS, min_side, None)[1]


def _decode(path: Path, max_pixels: int, min_side: int, cover: tuple[int, int] | None,
            keep_alpha: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                orientation = _orientation(img)
                swap = orientation in (5, 6, 7, 8)
                w, h = (img.height, img.width) if swap else img.size
                if min(w, h) < min_side:
                    raise DatasetError(f"image {path} is {w}x{h} px, too small: images need at least {min_side} px "
                                       f"on each side; remove it or upscale it")
                need = _needed_size((w, h), cover, max_pixels)  # upright
                if need is not None:
                    need = (need[1], need[0]) if swap else need  # file orientation
                    if img.format == "JPEG":
                        img.draft("RGB" if img.mode not in ("L", "CMYK") else img.mode, need)
                img.load()
                img = _to_reducible(img)
                factor = math.ceil(math.sqrt(img.width * img.height / max_pixels))
                if cover is not None and need is not None:
                    factor = max(factor, min(img.width // need[0], img.height // need[1]))
                if factor > 1:
                    img = img.reduce(factor)
                out = img.convert("RGBA") if keep_alpha else _to_rgb(img)
    except DatasetError:
        raise
    except Image.DecompressionBombError:
        raise DatasetError(f"image {path} is larger than {2 * MAX_IMAGE_PIXELS // 1_000_000} megapixels "
                           "(decompression-bomb limit); downscale it before training") from None
    except FileNotFoundError:
        raise DatasetError(f"image {path}: file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise DatasetError(f"image {path} cannot be decoded ({type(exc).__name__}: {exc}); "
                           "re-save it as PNG/JPEG or remove it (or pass --skip_bad_images)") from None
    if orientation in _ORIENTATION:
        out = out.transpose(_ORIENTATION[orientation])
    return out, (w, h)


def _needed_size(size: tuple[int, int], cover: tuple[int, int] | None, max_pixels: int) -> tuple[int, int] | None:
    """The smallest decoded size that still covers `cover` (or fits `max_pixels`); None: decode as is."""
    w, h = size
    if cover is not None:
        scale = max(cover[0] / w, cover[1] / h)
        return (math.ceil(w * scale), math.ceil(h * scale)) if scale < 1 else None
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        return max(1, int(w * scale)), max(1, int(h * scale))
    return None


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # broken EXIF blocks are common in the wild; the pixels are still fine
        return 1
    return value if isinstance(value, int) else 1


def _to_reducible(img: Image.Image) -> Image.Image:
    """Convert modes `reduce`/`convert` cannot handle well: palette, 1-bit, 16/32-bit integer, float."""
    mode = img.mode
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        return img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    if mode in ("L", "RGB") and "transparency" in img.info:  # tRNS colour key
        return img.convert("LA" if mode == "L" else "RGBA")
    if mode == "I" or mode.startswith("I;16"):
        arr = np.asarray(img)
        out = np.empty(arr.shape, dtype=np.uint8)
        for start in range(0, arr.shape[0], 1024):  # in row blocks: a 100 MP scan never needs an int64 copy
            block = np.clip(arr[start:start + 1024].astype(np.int64), 0, 65535)
            out[start:start + 1024] = (block * 255 + 32767) // 65535
        return Image.fromarray(out, "L")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
