import re

import numpy as np
from PIL import Image

from library.data.synthetic import COLORS, POSITIONS, SHAPES, generate_shapes_dataset, main

CAPTION = re.compile(r"^an? (\w+)(?: (striped|dotted))? (\w+) on an? (\w+) background, (small|medium|large), ([a-z ]+)$")


def _read(paths):
    return [(p.read_bytes(), p.with_suffix(".txt").read_text(encoding="utf-8")) for p in paths]


def test_deterministic_from_seed_and_prefix_stable(tmp_path):
    a = _read(generate_shapes_dataset(tmp_path / "a", 6, seed=1))
    b = _read(generate_shapes_dataset(tmp_path / "b", 6, seed=1))
    c = _read(generate_shapes_dataset(tmp_path / "c", 6, seed=2))
    longer = _read(generate_shapes_dataset(tmp_path / "d", 9, seed=1))
    assert a == b and a != c and longer[:6] == a


def test_captions_describe_the_pixels(tmp_path):
    paths = generate_shapes_dataset(tmp_path, 24, size=64, seed=0)
    shapes = set()
    for path in paths:
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        m = CAPTION.match(caption)
        assert m, caption
        colour, _, shape, background, _, position = m.groups()
        assert shape in SHAPES and colour != background and position in POSITIONS
        shapes.add(shape)
        gx, gy = POSITIONS[position]
        corner = (63 if gx == 0 else 0, 63 if gy == 0 else 0)  # the corner away from the shape
        with Image.open(path) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
            pixel = np.array(img.getpixel(corner))
        assert np.abs(pixel - np.array(COLORS[background])).max() <= 2, caption
    assert len(shapes) >= 4


def test_concept_images_use_the_trigger_word_and_a_new_shape(tmp_path, capsys):
    main([str(tmp_path / "concept"), "--n", "5", "--concept", "--trigger", "qxv"])
    assert "wrote 5 'qxv' concept images" in capsys.readouterr().out
    captions = [p.read_text(encoding="utf-8") for p in sorted((tmp_path / "concept").glob("*.txt"))]
    assert len(captions) == 5 and all(re.match(r"^an? \w+ qxv on an? \w+ background, ", c) for c in captions)
    base = [p.read_text(encoding="utf-8") for p in (generate_shapes_dataset(tmp_path / "base", 40)[0].parent).glob("*.txt")]
    assert not any("heart" in c or "checkered" in c or "qxv" in c for c in base)
