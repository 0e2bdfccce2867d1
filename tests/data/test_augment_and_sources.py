"""Colour and face-crop augmentation, validation split membership, fine-tuning metadata and cache_info, against
sd-scripts' definitions."""

from __future__ import annotations

import json
import math
import random

import cv2
import numpy as np
import pytest
from PIL import Image

from library.config.dataset_config import (
    DatasetBlueprint,
    DatasetConfig,
    SubsetConfig,
    config_from_in_json,
    load_dataset_config,
)
from library.data.dataset import CaptionedImageDataset
from library.data.debug import print_dataset
from library.data.sources import INFO_CACHE_FILE
from library.data.transforms import color_aug, face_crop, face_from_name
from library.errors import ConfigError


def _images(folder, n, size=(64, 64), captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
        if captions:
            (folder / f"im{i:02d}.txt").write_text(f"caption {i}", encoding="utf-8")
    return folder


def _config(*subsets, **kw):
    return DatasetConfig([DatasetBlueprint(resolution=(64, 64), subsets=list(subsets), **kw)], source="test")


# ------------------------------------------------------------------------------------------------ colour
def test_color_aug_is_a_hue_shift_or_gamma_a_third_of_the_time():
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    hue = gamma = same = 0
    for seed in range(3000):
        out = color_aug(pixels, np.random.default_rng(seed))
        draw = np.random.default_rng(seed)  # replay sd-scripts' definition with the same draws
        if draw.random() > 0.33:
            assert np.array_equal(out, pixels)
            same += 1
        elif draw.random() > 0.5:
            shift = draw.uniform(-8, 8)
            hsv = cv2.cvtColor(pixels, cv2.COLOR_BGR2HSV)
            hsv[:, :, 0] = (hsv[:, :, 0] + (shift + 180 if shift < 0 else shift)) % 180
            assert np.array_equal(out, cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR))
            hue += 1
        else:
            g = draw.uniform(0.95, 1.05)
            assert np.array_equal(out, np.clip(pixels.astype(np.float64) ** g, 0, 255).astype(np.uint8))
            gamma += 1
    assert abs(same / 3000 - 0.67) < 0.03 and abs(hue - gamma) < 120


# ------------------------------------------------------------------------------------------------ face crop
def test_face_crop_reads_the_name_and_centres_the_face():
    assert face_from_name("portrait_120_80_40_50") == (120, 80, 40, 50)
    assert face_from_name("portrait_0_80_40_50") is None and face_from_name("cat_1") is None
    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[60:100, 100:140] = 255  # the face: centre (120, 80), 40x40
    out = face_crop(pixels, (120, 80, 40, 40), (64, 64), (2.0, 2.0), False, np.random.default_rng(0))
    # scale: the face's 40 px must be 1/2 of the 64 px short side -> 32/40 = 0.8; 300x200 -> 240x160
    assert out.shape == (64, 64, 3)
    ys, xs = np.nonzero(out[:, :, 0] > 127)
    assert abs((ys.min() + ys.max()) / 2 - 31.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 31.5) <= 1
    assert ys.max() - ys.min() + 1 == pytest.approx(32, abs=1)


def test_face_crop_applies_only_without_buckets(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    arr = np.zeros((128, 192, 3), np.uint8)
    arr[20:40, 150:170] = 255
    Image.fromarray(arr).save(folder / "x_160_30_20_20.png")
    sub = SubsetConfig(folder, face_crop_aug_range=(1.6, 1.6))
    ds = CaptionedImageDataset(_config(sub), seed=0)
    px = ds.pixels(0)
    ys, xs = np.nonzero(px[:, :, 0] > 127)  # scale 64 / (20 * 1.6) capped at 1 -> 1: the face is cut out unscaled
    assert px.shape == (64, 64, 3) and len(ys) and abs((xs.min() + xs.max()) / 2 - 31.5) <= 1
    assert ds.describe(0)["face_crop"]
    bucketed = CaptionedImageDataset(_config(sub, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128),
                                     seed=0)
    assert not bucketed.describe(0)["face_crop"]


# ------------------------------------------------------------------------------------------------ validation split
def _ref_split(items, split, seed, train):
    items = list(items)
    state = random.getstate()
    random.seed(seed)
    random.shuffle(items)
    random.setstate(state)
    if train:
        return items[:math.ceil(len(items) * (1 - split))]
    return items[len(items) - round(len(items) * split):]


def test_validation_split_membership_for_a_seed(tmp_path):
    folder = _images(tmp_path / "a", 10)
    reg = _images(tmp_path / "r", 3)
    subs = [SubsetConfig(folder, num_repeats=3), SubsetConfig(reg, is_reg=True)]
    config = _config(*subs, validation_split=0.3, validation_seed=42)
    train = CaptionedImageDataset(config, seed=0)
    val = CaptionedImageDataset(config, seed=0, split="validation")
    files = sorted(folder.glob("*.png"))
    names = lambda ds: sorted({ds.describe(i)["path"] for i in range(len(ds)) if not ds.describe(i)["is_reg"]})  # noqa: E731
    assert names(train) == sorted(str(p) for p in _ref_split(files, 0.3, 42, True))
    assert names(val) == sorted(str(p) for p in _ref_split(files, 0.3, 42, False))
    assert len(names(train)) == 7 and len(val) == 3  # validation: once each, no regularisation images
    assert not set(names(train)) & set(names(val))
    other = CaptionedImageDataset(_config(*subs, validation_split=0.3, validation_seed=7), seed=0, split="validation")
    assert names(other) == sorted(str(p) for p in _ref_split(files, 0.3, 7, False))
    assert CaptionedImageDataset(_config(*subs), seed=0, split="validation").summary()["datasets"] == []


def test_validation_keys_in_the_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "a", 4, (16, 16))
    toml = tmp_path / "d.toml"
    toml.write_text('[general]\nvalidation_split = 0.25\ncolor_aug = true\nresize_interpolation = "box"\n'
                    '[[datasets]]\nvalidation_seed = 3\nface_crop_aug_range = [2.0, 3.0]\n'
                    '[[datasets.subsets]]\nimage_dir = "a"\n', encoding="utf-8")
    bp = load_dataset_config(toml).datasets[0]
    assert (bp.validation_split, bp.validation_seed) == (0.25, 3)
    sub = bp.subsets[0]
    assert sub.color_aug and sub.resize_interpolation == "box" and sub.face_crop_aug_range == (2.0, 3.0)
    toml.write_text('[[datasets]]\nvalidation_split = 1.5\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.validation_split: bad value 1\.5"):
        load_dataset_config(toml)
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nresize_interpolation = "sinc"\n')
    with pytest.raises(ConfigError, match=r"resize_interpolation: bad value 'sinc': expected one of lanczos"):
        load_dataset_config(toml)


# ------------------------------------------------------------------------------------------------ metadata / cache
def test_in_json_metadata_dataset(tmp_path):
    folder = _images(tmp_path / "img", 3, captions=False)
    meta = {"im00.png": {"caption": "a photo", "tags": "red, square"},
            "im01": {"tags": "only tags"},  # older files: key without extension
            str(folder / "im02.png"): {"caption": "absolute key", "image_size": [64, 64]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    config = config_from_in_json(tmp_path / "meta.json", folder)
    config.datasets[0].subsets[0].num_repeats = 2
    ds = CaptionedImageDataset(config, seed=0)
    captions = sorted({ds.describe(i)["caption"] for i in range(len(ds))})
    assert captions == ["a photo,red, square", "absolute key", "only tags"] and len(ds) == 6
    assert ds.summary()["dataset_dirs"] == {"meta.json": {"n_repeats": 2, "img_count": 3}}


def test_cache_info_writes_then_reads_sizes_and_captions(tmp_path, monkeypatch):
    folder = _images(tmp_path / "a", 3, (80, 72))
    config = _config(SubsetConfig(folder, cache_info=True))
    CaptionedImageDataset(config, seed=0)
    cached = json.loads((folder / INFO_CACHE_FILE).read_text(encoding="utf-8"))
    assert cached[str(folder / "im01.png")] == {"caption": "caption 1", "resolution": [80, 72]}
    import library.data.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "probe_image", lambda *a, **k: pytest.fail("measured again"))
    ds = CaptionedImageDataset(config, seed=0)
    assert ds.describe(0)["original_size"] == (80, 72) and ds.describe(0)["caption"] == "caption 0"


def test_debug_dataset_lines(tmp_path):
    folder = _images(tmp_path / "a", 2, (96, 64))
    ds = CaptionedImageDataset(_config(SubsetConfig(folder, flip_aug=True), enable_bucket=True,
                                       min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32), seed=1)

    class Out(list):
        def write(self, text):
            self.append(text)

    out = Out()
    assert print_dataset(ds, seed=1, out=out) == 2
    lines = "".join(out).splitlines()
    assert lines[0] == "epoch 1: 2 batches, 2 samples"
    for line in lines[1:]:
        d = ds.describe(int(line.split("sample ")[1].split(":")[0]))
        assert f"bucket {d['bucket'][0]}x{d['bucket'][1]}" in line and f"caption: {d['caption']}" in line
        assert f"crop_top_left {d['crop_top_left']}" in line and "original 96x64" in line


def test_fast_decode_is_close_to_the_full_decode(tmp_path):
    folder = tmp_path / "j"
    folder.mkdir()
    yy, xx = np.mgrid[0:768, 0:1024]
    smooth = np.stack([xx // 4 % 256, yy // 3 % 256, (xx + yy) // 8 % 256], -1).astype(np.uint8)
    Image.fromarray(smooth).save(folder / "photo.jpg", quality=95)
    config = _config(SubsetConfig(folder))
    full = CaptionedImageDataset(config, seed=0).pixels(0).astype(np.float64)
    fast = CaptionedImageDataset(config, seed=0, fast_decode=True).pixels(0).astype(np.float64)
    assert full.shape == fast.shape == (64, 64, 3)
    assert 0 < np.abs(full - fast).mean() < 4  # not sd-scripts' pixels, but close to them


def test_cache_info_is_not_written_from_a_split_list(tmp_path):
    folder = _images(tmp_path / "a", 4)
    CaptionedImageDataset(_config(SubsetConfig(folder, cache_info=True), validation_split=0.5), seed=0)
    assert not (folder / INFO_CACHE_FILE).exists()  # it would list only the training half
    CaptionedImageDataset(_config(SubsetConfig(folder, cache_info=True)), seed=0)
    train = CaptionedImageDataset(_config(SubsetConfig(folder, cache_info=True), validation_split=0.5), seed=0)
    assert len(train) == 2  # read from the complete cache, then split
