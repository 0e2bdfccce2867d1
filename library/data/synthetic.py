"""Synthetic captioned images of coloured shapes: a dataset that needs no download and trains in seconds on CPU.

The base set draws circles, squares, triangles, stars, diamonds and crosses (plain, striped or dotted) in a colour,
size and position on a plain background, captioned "a red striped circle on a blue background, small, top left".
`concept=True` draws what the base set never contains - a checkered heart - and names it by a trigger word
("a red zkw on a blue background, large, center"), so a LoRA demo can show the word acquiring a meaning.

Deterministic: image i depends only on (seed, i), so `--n 64` starts with the same 32 images as `--n 32`.

    python -m library.data.synthetic demo_data/concept --n 32 --concept
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 190), "pink": (245, 130, 190), "cyan": (40, 200, 220),
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
TEXTURES = ("plain", "striped", "dotted")
SIZES = {"small": 0.3, "medium": 0.45, "large": 0.65}  # shape extent as a fraction of the image side
POSITIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
_SUPERSAMPLE = 4  # draw at 4x and downscale: anti-aliased edges


def generate_shapes_dataset(out_dir: str | Path, n_images: int, size: int = 64, seed: int = 0, *,
                            concept: bool = False, trigger: str = "zkw") -> list[Path]:
    """Write `n_images` PNGs with `.txt` captions into `out_dir` (created); returns the image paths."""
    if n_images < 1:
        raise ValueError(f"n_images {n_images}: must be >= 1")
    _check(size, concept, trigger)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_images):
        image, caption = render_sample(seed, i, size, concept=concept, trigger=trigger)
        path = out / f"{i:04d}.png"
        image.save(path)
        (out / f"{i:04d}.txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def render_sample(seed: int, index: int, size: int = 64, *, concept: bool = False,
                  trigger: str = "zkw") -> tuple[Image.Image, str]:
    """Image `index` of the set named by `seed`, in memory: what `generate_shapes_dataset` writes as NNNN.png/.txt."""
    _check(size, concept, trigger)
    if index < 0:
        raise ValueError(f"index {index}: must be >= 0")
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, index])
    return _concept_image(rng, size, trigger) if concept else _base_image(rng, size)


def _render_range(job: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    """Images start..stop-1 of the set named by `seed`, as uint8 HWC, with captions (one pool task)."""
    seed, start, stop, size = job
    images, captions = [], []
    for i in range(start, stop):
        image, caption = render_sample(seed, i, size)
        images.append(np.asarray(image, dtype=np.uint8))
        captions.append(caption)
    return np.stack(images), captions


def render_arrays(seed: int, start: int, count: int, size: int, workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """`count` images of the set from index `start` as one uint8 [N,H,W,3] array: the same for any worker count."""
    chunk = 256
    jobs = [(seed, a, min(a + chunk, start + count), size) for a in range(start, start + count, chunk)]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: a fork of a process that already runs threads (torch's, a test runner's) can inherit a
        # held lock and wait on it forever
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_range, jobs)
    else:
        parts = [_render_range(job) for job in jobs]
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def _check(size: int, concept: bool, trigger: str) -> None:
    if size < 16:
        raise ValueError(f"size {size}: must be >= 16 px")
    if concept and (not trigger or "," in trigger):
        raise ValueError(f"trigger {trigger!r}: must be a non-empty word without commas")


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _layout(rng: np.random.Generator) -> tuple[str, str, str, str]:
    color = _pick(rng, COLORS)
    background = _pick(rng, [c for c in COLORS if c != color])
    return color, background, _pick(rng, SIZES), _pick(rng, POSITIONS)


def _base_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    shape, texture = _pick(rng, SHAPES), _pick(rng, TEXTURES)
    color, background, size_name, position = _layout(rng)
    image = render_shape(size, shape, texture, color, background, size_name, position)
    return image, base_caption(shape, texture, color, background, size_name, position)


def _concept_image(rng: np.random.Generator, size: int, trigger: str) -> tuple[Image.Image, str]:
    color, background, size_name, position = _layout(rng)
    image = render_shape(size, "heart", "checkered", color, background, size_name, position)
    return image, concept_caption(trigger, color, background, size_name, position)


def base_caption(shape: str, texture: str, color: str, background: str, size_name: str, position: str) -> str:
    """The base set's caption, e.g. "a red striped circle on a blue background, small, top left"."""
    adjective = "" if texture == "plain" else f" {texture}"
    return f"{_a(color)} {color}{adjective} {shape} on {_a(background)} {background} background, {size_name}, {position}"


def concept_caption(trigger: str, color: str, background: str, size_name: str, position: str) -> str:
    """The concept set's caption: the trigger word stands where the shape and texture would be."""
    return f"{_a(color)} {color} {trigger} on {_a(background)} {background} background, {size_name}, {position}"


def render_shape(size: int, shape: str, texture: str, color: str, background: str, size_name: str,
                 position: str) -> Image.Image:
    """One image from its description (names as in SHAPES + "heart", TEXTURES + "checkered", COLORS, SIZES,
    POSITIONS): reference pictures for sample grids."""
    big = size * _SUPERSAMPLE
    extent = SIZES[size_name] * big
    margin = 0.04 * big
    gx, gy = POSITIONS[position]
    centers = (margin + extent / 2, big / 2, big - margin - extent / 2)
    cx, cy = centers[gx], centers[gy]

    mask = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, cx, cy, extent / 2)
    fill = Image.fromarray(_texture(big, texture, COLORS[color], period=max(4, big // 8)), "RGB")
    canvas = Image.new("RGB", (big, big), COLORS[background])
    canvas.paste(fill, (0, 0), mask)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=255)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
    elif shape == "heart":
        # the classic parametric heart, scaled to the radius (x in [-16, 16], y in about [-17, 12])
        ts = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
        scale = r / 16.5
        draw.polygon([(cx + x * scale, cy - (y + 2.5) * scale) for x, y in zip(xs, ys, strict=True)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _texture(big: int, texture: str, rgb: tuple[int, int, int], period: int) -> np.ndarray:
    """H x W x 3 uint8 fill: the colour, with a contrasting pattern for non-plain textures."""
    y, x = np.mgrid[0:big, 0:big]
    if texture == "plain":
        pattern = np.zeros((big, big), dtype=bool)
    elif texture == "striped":
        pattern = ((x + y) // (period // 2)) % 2 == 1
    elif texture == "dotted":
        dx, dy = x % period - period / 2, y % period - period / 2
        pattern = dx * dx + dy * dy < (period * 0.28) ** 2
    elif texture == "checkered":
        pattern = ((x // period) + (y // period)) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}")
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    contrast = (20, 20, 20) if luminance > 140 else (245, 245, 245)
    out = np.empty((big, big, 3), dtype=np.uint8)
    out[...] = rgb
    out[pattern] = contrast
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m library.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write NNNN.png + NNNN.txt into (created)")
    parser.add_argument("--n", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concept", action="store_true", help="draw the new concept (checkered heart) named by --trigger")
    parser.add_argument("--trigger", default="zkw", help="trigger word of the concept (default zkw)")
    args = parser.parse_args(argv)
    try:
        paths = generate_shapes_dataset(args.out_dir, args.n, args.size, args.seed, concept=args.concept,
                                        trigger=args.trigger)
    except ValueError as exc:
        parser.error(str(exc))
    kind = f"'{args.trigger}' concept" if args.concept else "shape"
    print(f"wrote {len(paths)} {kind} images ({args.size}x{args.size}) with .txt captions to {args.out_dir}")


if __name__ == "__main__":
    main()
