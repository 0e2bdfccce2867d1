"""Sample images on disk: one PNG per prompt and step, plus a grid per prompt over the steps so far."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

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
        grid = make_row([Image.open(p).convert("RGB") for p in steps])
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


def _tensorboard(accelerator):
    try:
        return accelerator.get_tracker("tensorboard", unwrap=False)
    except (ValueError, KeyError, AttributeError):
        return None
