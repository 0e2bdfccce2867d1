"""Sample grids say what they show: the prompt above, each image's step below."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from PIL import Image

from library.training.sample_grid import save_samples


def test_the_grid_labels_each_step_and_the_prompt(tmp_path):
    prompt = SimpleNamespace(prompt="a red zkw on a blue background")
    for step, colour in ((50, "red"), (100, "blue")):
        save_samples(tmp_path, "t", step, [prompt], [Image.new("RGB", (64, 64), colour)])
    grid = np.asarray(Image.open(tmp_path / "sample" / "t_grid_00.png").convert("L"))
    assert grid.shape == (128 + 2 * 12 + 4, 2 * 128 + 2)  # 64 px images drawn at 128 px, a title and a label line
    title, labels = grid[:12], grid[-12:]
    assert (title < 128).any()  # the prompt is written above
    assert (labels[:, :128] < 128).any() and (labels[:, 130:] < 128).any()  # a step under each image
