"""Loss masks: the alpha channel (alpha_mask) or conditioning_data_dir images, resized, cropped and flipped with their
image, kept by the latent caches, and checked before any model loads."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.dataset_config import (
    DatasetBlueprint,
    DatasetConfig,
    DatasetDefaults,
    SubsetConfig,
    check_mask_sources,
    config_from_train_data_dir,
    load_dataset_config,
)
from library.data.dataset import CaptionedImageDataset, collate
from library.errors import ConfigError, DatasetError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _masked_image(path: Path, size=(96, 64), alpha: bool = True) -> Image.Image:
    """Left 40% opaque red, the rest blue; as RGBA (alpha 255 on red, 0 on blue) or as RGB. Returns the mask."""
    w, h = size
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    edge = int(w * 0.4)
    arr[:, :edge] = (*RED, 255)
    arr[:, edge:] = (*BLUE, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr if alpha else arr[..., :3], "RGBA" if alpha else "RGB").save(path)
    (path.parent / (path.stem + ".txt")).write_text("x", encoding="utf-8")
    return Image.fromarray(np.where(arr[..., 3:4] > 0, 255, 0).repeat(3, -1).astype(np.uint8), "RGB")


def _config(*subsets: SubsetConfig, resolution=(64, 64)) -> DatasetConfig:
    return DatasetConfig([DatasetBlueprint(resolution=resolution, batch_size=2, subsets=list(subsets))], source="t")


def _assert_mask_follows_image(item: dict) -> None:
    """Red pixels are exactly where the mask is 1, blue where it is 0 (away from the resampled edge)."""
    red = item["pixel_values"][0] > 0.9
    blue = item["pixel_values"][2] > 0.9
    mask = item["mask"][0]
    assert item["mask"].shape == (1, *item["pixel_values"].shape[1:]) and item["mask"].dtype == torch.float32
    assert red.any() and blue.any()
    assert (mask[red] > 0.95).all() and (mask[blue] < 0.05).all()


@pytest.mark.parametrize("random_crop, flip", [(False, False), (True, True)])
def test_alpha_mask_follows_the_crop_and_flip_of_its_image(tmp_path, random_crop, flip):
    _masked_image(tmp_path / "a" / "0.png")
    sub = SubsetConfig(tmp_path / "a", alpha_mask=True, random_crop=random_crop, flip_aug=flip, num_repeats=8)
    ds = CaptionedImageDataset(_config(sub), seed=0)
    items = [ds[i] for i in range(8)]
    for item in items:
        _assert_mask_follows_image(item)
    lefts = {int(it["mask"][0, 0].argmin()) for it in items}  # where the opaque part ends
    if flip or random_crop:
        assert len(lefts) > 1
    assert set(torch.unique(items[0]["mask"]).tolist()) >= {0.0, 1.0}


def test_alpha_mask_keeps_the_stored_colours_and_without_it_transparency_is_white(tmp_path):
    _masked_image(tmp_path / "a" / "0.png", size=(64, 64))
    masked = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a", alpha_mask=True)), seed=0)[0]
    plain = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a")), seed=0)[0]
    assert torch.equal(masked["pixel_values"][:, 0, -1], torch.tensor([-1.0, -1.0, 1.0]))  # blue, as stored
    assert torch.equal(plain["pixel_values"][:, 0, -1], torch.tensor([1.0, 1.0, 1.0]))  # composited on white
    assert "mask" not in plain
    rgb_only = tmp_path / "b" / "0.png"
    _masked_image(rgb_only, size=(64, 64), alpha=False)
    no_alpha = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "b", alpha_mask=True)), seed=0)[0]
    assert torch.equal(no_alpha["mask"], torch.ones(1, 64, 64))  # no alpha channel: counts everywhere


def test_conditioning_images_mask_by_their_red_channel(tmp_path):
    mask = _masked_image(tmp_path / "img" / "0.png", alpha=False)
    (tmp_path / "masks").mkdir()
    mask.save(tmp_path / "masks" / "0.png")
    sub = SubsetConfig(tmp_path / "img", conditioning_data_dir=tmp_path / "masks", flip_aug=True, num_repeats=4)
    ds = CaptionedImageDataset(_config(sub), seed=1)
    for i in range(4):
        _assert_mask_follows_image(ds[i])


@pytest.mark.parametrize("to_disk", [False, True])
def test_cached_latents_carry_the_same_masks(tmp_path, to_disk):
    _masked_image(tmp_path / "a" / "0.png")
    sub = SubsetConfig(tmp_path / "a", alpha_mask=True, flip_aug=True, num_repeats=6)
    ds = CaptionedImageDataset(_config(sub), seed=0)
    live = [ds[i]["mask"] for i in range(6)]
    ds.cache_latents(lambda p: torch.nn.functional.avg_pool2d(p, 8), to_disk=to_disk)
    if to_disk:  # a second run reuses the file, mask included
        ds = CaptionedImageDataset(_config(sub), seed=0)
        ds.cache_latents(lambda p: (_ for _ in ()).throw(AssertionError("re-encoded")), to_disk=True)
    cached = [ds[i] for i in range(6)]
    assert all("latents" in it for it in cached)
    for got, want in zip(cached, live, strict=True):
        assert torch.equal(got["mask"], want)


def test_collate_gives_unmasked_images_a_mask_of_ones(tmp_path):
    _masked_image(tmp_path / "a" / "0.png", size=(64, 64))
    _masked_image(tmp_path / "b" / "1.png", size=(64, 64))
    ds = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a", alpha_mask=True), SubsetConfig(tmp_path / "b")),
                               seed=0)
    batch = collate([ds[0], ds[1]])
    assert batch["mask"].shape == (2, 1, 64, 64)
    assert torch.equal(batch["mask"][1], torch.ones(1, 64, 64)) and batch["mask"][0].min() == 0
    assert "mask" not in collate([ds[1], ds[1]])


def test_dataset_toml_keys_and_their_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _masked_image(tmp_path / "img" / "0.png", alpha=False)
    (tmp_path / "masks").mkdir()
    toml = tmp_path / "d.toml"
    toml.write_text('[general]\nalpha_mask = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\n'
                    '[[datasets.subsets]]\nimage_dir = "img"\nconditioning_data_dir = "masks"\n', encoding="utf-8")
    cfg = load_dataset_config(toml)
    a, b = cfg.datasets[0].subsets
    assert a.alpha_mask and a.conditioning_data_dir is None and b.conditioning_data_dir == tmp_path / "masks"
    assert not cfg.unsupported
    check_mask_sources(cfg, masked_loss=True)
    with pytest.raises(ConfigError, match="conditioning_data_dir .* add --masked_loss"):
        check_mask_sources(cfg, masked_loss=False)
    with pytest.raises(DatasetError, match=r"no mask image 0\.\* in conditioning_data_dir"):
        CaptionedImageDataset(cfg, seed=0)
    Image.new("RGB", (10, 10)).save(tmp_path / "masks" / "0.png")
    with pytest.raises(DatasetError, match="masks must have their image's size"):
        CaptionedImageDataset(cfg, seed=0)
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\nconditioning_data_dir = "nope"\n',
                    encoding="utf-8")
    with pytest.raises(ConfigError, match=r"subsets\[0\]\.conditioning_data_dir: folder 'nope' not found"):
        load_dataset_config(toml)
    with pytest.raises(ConfigError, match="--masked_loss: no mask"):
        check_mask_sources(_config(SubsetConfig(tmp_path / "img")), masked_loss=True)


def test_train_data_dir_masks_from_conditioning_data_dir(tmp_path):
    mask = _masked_image(tmp_path / "train" / "5_cat" / "0.png", alpha=False)
    (tmp_path / "cond" / "5_cat").mkdir(parents=True)
    mask.save(tmp_path / "cond" / "5_cat" / "0.png")
    defaults = DatasetDefaults.from_args(argparse.Namespace(conditioning_data_dir=str(tmp_path / "cond"),
                                                            resolution=(64, 64)))
    _masked_image(tmp_path / "reg" / "1_cat" / "r.png", alpha=False)
    cfg = config_from_train_data_dir(tmp_path / "train", tmp_path / "reg", defaults)
    train, reg = cfg.datasets[0].subsets
    assert train.conditioning_data_dir == tmp_path / "cond" / "5_cat" and reg.conditioning_data_dir is None
    _assert_mask_follows_image(CaptionedImageDataset(cfg, seed=0)[0])
