"""Sample images on disk: one PNG per prompt and step, plus a grid per prompt over the steps so far, labelled with
its prompt and each image's step (small images are drawn at least 128 px wide so the labels stay readable)."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, ImageDraw

from library.training.atomic import atomic_file


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")[:n] or "prompt"


def save_samples(output_dir: Path, name: str, step: int, prompts, images, accelerator=None) -> list[Path]:
    folder = Path(output_dir) / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (sp, img) in enumerate(zip(prompts, images, strict=True)):
        path = folder / f"{name}_{step:06d}_{i:02d}_{_slug(sp.prompt)}.png"
        with atomic_file(path) as tmp:
            img.save(tmp, format="PNG")
        written.append(path)
        steps = sorted(folder.glob(f"{name}_[0-9][0-9][0-9][0-9][0-9][0-9]_{i:02d}_*.png"))
        labels = [f"step {int(p.name[len(name) + 1:len(name) + 7])}" for p in steps]
        grid = labelled_row([Image.open(p).convert("RGB") for p in steps], labels, sp.prompt)
        with atomic_file(folder / f"{name}_grid_{i:02d}.png") as tmp:
            grid.save(tmp, format="PNG")
    if accelerator is not None and images:
        tracker = getattr(_tensorboard(accelerator), "writer", None)  # a blank tracker when tensorboard is off
        if tracker is not None:
            import numpy as np

            for i, img in enumerate(images):
                tracker.add_image(f"samples/{i:02d}", np.asarray(img), step, dataformats="HWC")
    return written


def make_row(images: list[Image.Image], pad: int = 2) -> Image.Image:
    w = sum(im.width for im in images) + pad * (len(images) - 1)
    h = max(im.height for im in images)
    row = Image.new("RGB", (w, h), "white")
    x = 0
    for im in images:
        row.paste(im, (x, 0))
        x += im.width + pad
    return row


_LINE = 12  # px per line of Pillow's default font
_MIN_SIDE = 128


def labelled_row(images: list[Image.Image], labels: list[str], title: str) -> Image.Image:
    """`make_row` of the images (enlarged to at least 128 px wide) with a label under each and a title above."""
    scale = max(1, -(-_MIN_SIDE // max(im.width for im in images)))
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    row = make_row(images)
    canvas = Image.new("RGB", (row.width, row.height + 2 * _LINE + 4), "white")
    canvas.paste(row, (0, _LINE + 2))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 0), _fit(draw, title, row.width - 4), fill="black")
    x = 0
    for im, label in zip(images, labels, strict=True):
        draw.text((x + 2, row.height + _LINE + 3), _fit(draw, label, im.width - 4), fill="black")
        x += im.width + 2
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` px."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _tensorboard(accelerator):
    try:
        return accelerator.get_tracker("tensorboard", unwrap=False)
    except (ValueError, KeyError, AttributeError):
        return None
