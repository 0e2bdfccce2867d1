import re

import numpy as np
import pytest
from PIL import Image

from library.data.synthetic import (
    COLORS,
    POSITIONS,
    SHAPES,
    base_caption,
    generate_shapes_dataset,
    main,
    render_sample,
    render_shape,
)

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


def test_in_memory_render_is_what_the_writer_saves(tmp_path):
    paths = generate_shapes_dataset(tmp_path, 4, size=32, seed=7, concept=True)
    for i in (3, 0):  # any order: image i depends only on (seed, i)
        image, caption = render_sample(7, i, 32, concept=True)
        with Image.open(paths[i]) as saved:
            assert np.array_equal(np.asarray(saved), np.asarray(image))
        assert paths[i].with_suffix(".txt").read_text(encoding="utf-8") == caption + "\n"
    assert render_sample(7, 1, 32)[1] != render_sample(7, 1, 32, concept=True)[1]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"index": -1}, "index -1"), ({"size": 8}, "size 8"), ({"concept": True, "trigger": "a,b"}, "trigger 'a,b'"),
])
def test_render_sample_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_sample(**{"seed": 0, "index": 0, **kwargs})


def test_render_shape_redraws_an_image_from_its_caption():
    for i in range(6):
        image, caption = render_sample(3, i, 48)
        colour, texture, shape, background, size_name, position = CAPTION.match(caption).groups()
        texture = texture or "plain"
        assert base_caption(shape, texture, colour, background, size_name, position) == caption
        redrawn = render_shape(48, shape, texture, colour, background, size_name, position)
        assert np.array_equal(np.asarray(redrawn), np.asarray(image))
