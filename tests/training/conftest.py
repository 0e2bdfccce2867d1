"""A tiny captioned dataset on disk and helpers to run the real trainer in-process on builtin:tiny-sd."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def make_images(folder: Path, n: int = 8, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(n):
        colour, bg = names[i % 4], names[(i + 1) % 4]
        img = Image.new("RGB", (size, size), COLOURS[bg])
        d = ImageDraw.Draw(img)
        r = 10 + 3 * (i % 3)
        c = 20 + 4 * i
        d.ellipse([c - r, 32 - r, c + r, 32 + r], fill=COLOURS[colour])
        img.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"a {colour} circle on a {bg} background", encoding="utf-8")
    return folder


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    images = make_images(tmp_path / "images")
    toml = tmp_path / "dataset.toml"
    toml.write_text(
        "[general]\nresolution = 64\nbatch_size = 2\n\n[[datasets]]\n\n[[datasets.subsets]]\n"
        f"image_dir = '{images.as_posix()}'\nnum_repeats = 1\ncaption_extension = '.txt'\n",
        encoding="utf-8",
    )
    return toml


def train_argv(dataset_toml: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--dataset_config", str(dataset_toml),
            "--output_dir", str(out), "--output_name", "t", "--network_dim", "4", "--network_alpha", "2",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--max_train_steps", str(steps), "--seed", "3",
            "--log_every_n_steps", "1", *extra]
