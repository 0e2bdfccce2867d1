import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import library.data.dataset as dataset_module
from library.config.dataset_config import DatasetBlueprint, DatasetConfig, SubsetConfig, load_dataset_config
from library.data.dataset import CaptionedImageDataset, balance_reg_repeats, collate
from library.data.synthetic import generate_shapes_dataset
from library.errors import DatasetError

REPO = Path(__file__).resolve().parents[2]


def _img(path: Path, size=(64, 64), color=(255, 0, 0), caption: str | None = None, ext=".txt"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        (path.parent / (path.stem + ext)).write_text(caption, encoding="utf-8")
    return path


def _config(*subsets: SubsetConfig, resolution=(64, 64), batch_size=2, **kw) -> DatasetConfig:
    return DatasetConfig([DatasetBlueprint(resolution=resolution, batch_size=batch_size, subsets=list(subsets), **kw)],
                         source="test.toml")


def _fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the VAE: 8x average pooling, 4 channels."""
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


def test_repeats_items_and_pixels(tmp_path):
    for i in range(3):
        _img(tmp_path / "a" / f"{i}.png", color=(255, 0, 0), caption=f"red {i}")
    ds = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a", num_repeats=5)), seed=0)
    assert len(ds) == 15
    assert Counter(ds[i]["caption"] for i in range(15)) == {"red 0": 5, "red 1": 5, "red 2": 5}
    item = ds[0]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert torch.equal(item["pixel_values"][:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red in [-1, 1]
    assert item["bucket"] == (64, 64) and item["is_reg"] is False and item["index"] == 0
    assert item["original_size"] == (64, 64) and "latents" not in item


def test_captions_fall_back_to_class_tokens_and_summary_reports_extensions(tmp_path):
    _img(tmp_path / "a/1.png", caption="from caption", ext=".caption")
    _img(tmp_path / "a/2.png", caption="from txt", ext=".txt")
    _img(tmp_path / "a/3.png")
    _img(tmp_path / "b/猫の写真.png", caption="猫, 写真, かわいい")
    cfg = _config(SubsetConfig(tmp_path / "a", class_tokens="zkw"), SubsetConfig(tmp_path / "b", num_repeats=2))
    ds = CaptionedImageDataset(cfg, seed=0)
    assert [ds[i]["caption"] for i in range(len(ds))] == ["from caption", "from txt", "zkw", "猫, 写真, かわいい",
                                                          "猫, 写真, かわいい"]
    s = ds.summary()
    assert s["datasets"][0]["subsets"][0]["caption_extension"] == {".caption": 1, ".txt": 1, "none": 1}
    assert s["datasets"][0]["subsets"][1]["caption_extension"] == {".txt": 1}
    assert (s["num_train_images"], s["num_reg_images"], s["num_samples"], s["num_batches"]) == (4, 0, 5, 3)
    assert s["dataset_dirs"] == {"a": {"n_repeats": 1, "img_count": 3}, "b": {"n_repeats": 2, "img_count": 1}}
    assert s["tag_frequency"]["b"] == {"猫": 1, "写真": 1, "かわいい": 1}
    assert s["tag_frequency"]["a"] == {"from caption": 1, "from txt": 1, "zkw": 1}


def test_reg_balance_rule():
    assert balance_reg_repeats([1, 1, 1, 1], 6) == [2, 2, 1, 1]  # all once, then +1 each until 6
    assert balance_reg_repeats([1] * 10, 4) == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # truncated
    assert balance_reg_repeats([3, 3], 4) == [3, 3]  # sd-scripts keeps a started image's repeats
    assert balance_reg_repeats([], 5) == []


def test_reg_images_are_balanced_to_train_count(tmp_path):
    for i in range(2):
        _img(tmp_path / "train" / f"{i}.png", caption="zkw")
    for i in range(4):
        _img(tmp_path / "reg" / f"{i}.png", color=(0, 0, 255), caption="heart")
    cfg = _config(SubsetConfig(tmp_path / "train", num_repeats=3), SubsetConfig(tmp_path / "reg", is_reg=True))
    ds = CaptionedImageDataset(cfg, seed=0)
    items = [ds[i] for i in range(len(ds))]
    assert sum(not it["is_reg"] for it in items) == 6 and sum(it["is_reg"] for it in items) == 6
    s = ds.summary()
    assert (s["num_train_images"], s["num_reg_images"], s["num_samples"]) == (2, 4, 12)


def _bucket_dataset(tmp_path, seed=3, **subset_kw):
    sizes = [(120, 64)] * 5 + [(64, 120)] * 3 + [(64, 64)] * 4
    for i, size in enumerate(sizes):
        _img(tmp_path / "a" / f"{i:02d}.png", size=size, caption=f"img {i}")
    cfg = _config(SubsetConfig(tmp_path / "a", num_repeats=2, **subset_kw), resolution=(96, 96), batch_size=3,
                  enable_bucket=True, min_bucket_reso=32, max_bucket_reso=160, bucket_reso_steps=32)
    return CaptionedImageDataset(cfg, seed=seed)


def test_buckets_and_batches_never_mix(tmp_path):
    ds = _bucket_dataset(tmp_path)
    buckets = ds.summary()["datasets"][0]["buckets"]
    # buckets of 96x96 in steps of 32: 32x160, 64x128, 96x96, 128x64, 160x32 (ratios 0.2, 0.5, 1, 2, 5)
    assert buckets == {"64x128": 6, "96x96": 8, "128x64": 10}  # 120x64 (1.875) -> 2; 64x120 -> 0.5
    sampler = ds.batch_sampler(seed=3)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 2 + 3 + 4  # ceil(6/3) + ceil(8/3) + ceil(10/3)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))  # each sample once per epoch
    for b in batches:
        assert len({ds[i]["bucket"] for i in b}) == 1
        assert 1 <= len(b) <= 3
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=ds.collate)
    for batch in loader:
        w, h = batch["bucket"][0]
        assert batch["pixel_values"].shape[1:] == (3, h, w)


def test_sampler_is_deterministic_per_epoch_and_resumable(tmp_path):
    ds = _bucket_dataset(tmp_path)
    s1, s2 = ds.batch_sampler(seed=3), ds.batch_sampler(seed=3)
    s1.set_epoch(4)
    s2.set_epoch(4)
    epoch4 = list(s1)
    assert epoch4 == list(s2)
    s2.set_epoch(5)
    assert list(s2) != epoch4
    s3 = ds.batch_sampler(seed=4)
    s3.set_epoch(4)
    assert list(s3) != epoch4
    s1.set_epoch(4, skip_batches=5)
    assert list(s1) == epoch4[5:] and len(s1) == len(epoch4)
    ordered = ds.batch_sampler(seed=3, shuffle=False)
    assert list(ordered)[0] == sorted(list(ordered)[0])


def test_flip_aug_is_seeded_per_epoch_and_index(tmp_path):
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    (tmp_path / "a").mkdir()
    Image.fromarray(arr).save(tmp_path / "a/x.png")
    ds = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a", num_repeats=8, flip_aug=True)), seed=1)
    flips = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            left = ds[i]["pixel_values"][:, 10, 2]
            flips.append(bool(left[2] > 0))  # blue on the left = flipped
            again = ds[i]["pixel_values"][:, 10, 2]
            assert torch.equal(left, again)
    assert 0 < sum(flips) < len(flips)
    ds.set_epoch(0)
    assert [bool(ds[i]["pixel_values"][2, 10, 2] > 0) for i in range(len(ds))] == flips[:8]


def test_caption_shuffle_changes_with_epoch_but_reproduces(tmp_path):
    _img(tmp_path / "a/x.png", caption="zkw, a, b, c, d, e")
    cfg = _config(SubsetConfig(tmp_path / "a", num_repeats=4, shuffle_caption=True, keep_tokens=1))
    ds1, ds2 = CaptionedImageDataset(cfg, seed=5), CaptionedImageDataset(cfg, seed=5)
    per_epoch = []
    for epoch in range(3):
        ds1.set_epoch(epoch)
        ds2.set_epoch(epoch)
        caps = [ds1[i]["caption"] for i in range(4)]
        assert caps == [ds2[i]["caption"] for i in range(4)]
        assert all(c.startswith("zkw, ") for c in caps)
        per_epoch.append(caps)
    assert per_epoch[0] != per_epoch[1]
    assert ds1.random_caption_subsets() == [str(tmp_path / "a")]  # shuffled: no cached encoding


def test_wildcards_token_warmup_and_cached_captions_from_the_dataset(tmp_path):
    _img(tmp_path / "w/x.png", caption="a {red|blue} cat\n\nthe {big|small} dog\n")
    _img(tmp_path / "t/y.png", caption="zkw, t0, t1, t2, t3, t4, t5")
    _img(tmp_path / "c/z.png", caption="red;;;dress, blue ||| best")
    cfg = _config(SubsetConfig(tmp_path / "w", enable_wildcard=True, num_repeats=40, name="wild"),
                  SubsetConfig(tmp_path / "t", keep_tokens=1, token_warmup_min=1, token_warmup_step=0.5, name="warm"),
                  SubsetConfig(tmp_path / "c", caption_prefix="zkw,", secondary_separator=";;;",
                               keep_tokens_separator="|||", name="fixed"))
    ds = CaptionedImageDataset(cfg, seed=3)
    assert ds.random_caption_subsets() == ["wild", "warm"]
    assert set(ds[i]["caption"] for i in range(40)) == {"a red cat", "a blue cat", "the big dog", "the small dog"}
    warm = 40
    ds.set_sample_steps({warm: 0}, max_train_steps=10)  # warm-up over floor(0.5 * 10) = 5 steps
    assert ds[warm]["caption"] == "zkw, t0"
    ds.set_sample_steps({warm: 3}, max_train_steps=10)
    assert ds[warm]["caption"] == "zkw, t0, t1, t2, t3"  # floor(3 * (6 - 1) / 5) + 1 tags
    ds.set_sample_steps({warm: 5}, max_train_steps=10)
    assert ds[warm]["caption"] == "zkw, t0, t1, t2, t3, t4, t5"
    assert ds[41]["caption"] == ds.caption_for_cache(41) == "zkw, red,dress, blue ||| best"
    subsets = ds.summary()["datasets"][0]["subsets"]
    assert subsets[0]["enable_wildcard"] and subsets[2]["caption_prefix"] == "zkw,"
    assert (subsets[2]["secondary_separator"], subsets[2]["keep_tokens_separator"]) == (";;;", "|||")


def test_bad_files_stop_before_training_with_a_list(tmp_path):
    _img(tmp_path / "a/good.png", caption="ok")
    (tmp_path / "a/corrupt.png").write_bytes(b"not an image")
    _img(tmp_path / "a/tiny.png", size=(16, 16))
    _img(tmp_path / "a/latin1.png")
    (tmp_path / "a/latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cfg = _config(SubsetConfig(tmp_path / "a"))
    with pytest.raises(DatasetError) as err:
        CaptionedImageDataset(cfg, seed=0)
    msg = str(err.value)
    assert msg.startswith("3 unusable file(s) in test.toml: ")
    assert "corrupt.png cannot be decoded" in msg and "tiny.png is 16x16 px" in msg and "latin1.txt is not valid UTF-8" in msg
    assert "--skip_bad_images" in msg


def test_skip_bad_images_warns_once_and_trains_on_the_rest(tmp_path, caplog):
    _img(tmp_path / "a/good.png", caption="ok")
    for i in range(7):
        (tmp_path / "a" / f"bad{i}.png").write_bytes(b"\x00" * 10)
    cfg = _config(SubsetConfig(tmp_path / "a"))
    with pytest.raises(DatasetError, match=r"^7 unusable .*bad4\.png cannot be decoded.* \(and 2 more\)"):
        CaptionedImageDataset(cfg, seed=0)
    with caplog.at_level(logging.WARNING):
        ds = CaptionedImageDataset(cfg, seed=0, skip_bad_images=True)
    assert len(ds) == 1 and ds[0]["caption"] == "ok"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(f"bad{i}.png" in warnings[0] for i in range(7))
    assert len(ds.summary()["skipped"]) == 7


def test_empty_and_unusable_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no images in .*empty \(looked for \.png"):
        CaptionedImageDataset(_config(SubsetConfig(tmp_path / "empty", name="datasets[0].subsets[0]")), seed=0)
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad/x.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"no usable images in .*allbad \(1 skipped"):
        CaptionedImageDataset(_config(SubsetConfig(tmp_path / "allbad")), seed=0, skip_bad_images=True)
    _img(tmp_path / "reg/x.png")
    with pytest.raises(DatasetError, match=r"only regularisation images"):
        CaptionedImageDataset(_config(SubsetConfig(tmp_path / "reg", is_reg=True)), seed=0)
    with pytest.raises(DatasetError, match=r"image folder .*nowhere not found"):
        CaptionedImageDataset(_config(SubsetConfig(tmp_path / "nowhere")), seed=0)


def test_sizes_are_measured_once(tmp_path, monkeypatch):
    for i in range(4):
        _img(tmp_path / "a" / f"{i}.png", size=(96, 64))
    calls = []
    real = dataset_module.probe_image
    monkeypatch.setattr(dataset_module, "probe_image", lambda p, m: calls.append(p) or real(p, m))
    cfg = _config(SubsetConfig(tmp_path / "a", num_repeats=3), enable_bucket=True, min_bucket_reso=32,
                  max_bucket_reso=128, bucket_reso_steps=32)
    ds = CaptionedImageDataset(cfg, seed=0)
    for i in range(len(ds)):
        ds[i]
    ds.summary()
    assert len(calls) == 4


def test_cache_latents_in_memory_with_flips(tmp_path):
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, :32] = 255
    (tmp_path / "a").mkdir()
    Image.fromarray(arr).save(tmp_path / "a/x.png")
    ds = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a", num_repeats=6, flip_aug=True)), seed=2)
    pixels = [ds[i]["pixel_values"] for i in range(len(ds))]
    ds.cache_latents(_fake_encode, to_disk=False, batch_size=4)
    for i in range(len(ds)):
        item = ds[i]
        assert "pixel_values" not in item
        assert torch.allclose(item["latents"], _fake_encode(pixels[i][None])[0])  # flipped where the image was
    assert len({bool(ds[i]["latents"][0, 0, 0] > 0) for i in range(len(ds))}) == 2  # both flips occur
    batch = collate([ds[0], ds[1]])
    assert batch["latents"].shape == (2, 4, 8, 8) and "pixel_values" not in batch


def test_cache_latents_on_disk_is_reused_and_invalidated(tmp_path):
    _img(tmp_path / "a/猫.png", size=(64, 64), color=(10, 200, 30), caption="cat")
    _img(tmp_path / "a/b.png", size=(64, 64), color=(200, 10, 30), caption="b")
    calls = []

    def encode(p):
        calls.append(p.shape[0])
        return _fake_encode(p)

    cfg = _config(SubsetConfig(tmp_path / "a"))
    ds = CaptionedImageDataset(cfg, seed=0)
    expected = _fake_encode(ds[1]["pixel_values"][None])[0]  # sorted: b.png, 猫.png
    ds.cache_latents(encode, to_disk=True, batch_size=8, cache_tag="vae-a")
    npz = tmp_path / "a/猫.npz"
    assert npz.is_file() and calls == [2]
    with np.load(npz, allow_pickle=False) as data:
        assert data["bucket"].tolist() == [64, 64] and data["latents"].shape == (4, 8, 8)
        assert str(data["cache_tag"]) == "vae-a" and "latents_flipped" not in data

    again = CaptionedImageDataset(cfg, seed=0)
    again.cache_latents(encode, to_disk=True, cache_tag="vae-a")
    assert calls == [2]  # nothing re-encoded
    assert torch.allclose(again[1]["latents"], expected)

    again.cache_latents(encode, to_disk=True, cache_tag="vae-b")  # another encoder: stale
    assert calls == [2, 2]
    flipped = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a", flip_aug=True)), seed=0)
    flipped.cache_latents(encode, to_disk=True, cache_tag="vae-b")  # needs the flipped variant now
    assert calls == [2, 2, 2, 2]
    bigger = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a"), resolution=(32, 32)), seed=0)
    bigger.cache_latents(encode, to_disk=True, cache_tag="vae-b")  # other bucket size: stale
    assert calls[-1] == 2 and bigger[0]["latents"].shape == (4, 4, 4)
    assert not list((tmp_path / "a").glob("*.tmp"))
    unchecked = CaptionedImageDataset(cfg, seed=0)  # --skip_cache_check: any existing file is taken as it is
    unchecked.cache_latents(encode, to_disk=True, cache_tag="vae-c", skip_cache_check=True)
    assert len(calls) == 5 and unchecked[0]["latents"].shape == (4, 4, 4)


def test_cache_latents_refuses_random_crop(tmp_path):
    _img(tmp_path / "a/x.png", size=(96, 64))
    ds = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a", random_crop=True, name="s0")), seed=0)
    with pytest.raises(DatasetError, match=r"random_crop \(subset s0\)"):
        ds.cache_latents(_fake_encode, to_disk=False)


def test_random_crop_moves_the_window(tmp_path):
    arr = np.tile(np.arange(128, dtype=np.uint8)[None, :, None] * 2, (64, 1, 3))
    (tmp_path / "a").mkdir()
    Image.fromarray(arr).save(tmp_path / "a/x.png")
    ds = CaptionedImageDataset(_config(SubsetConfig(tmp_path / "a", num_repeats=16, random_crop=True)), seed=0)
    # pixel value = 2 * x, so a sample's first column tells where its window starts; the SDXL crop conditioning
    # stays the offset of the whole image fitted in the bucket (64x32 at top 16), as sd-scripts passes it
    lefts = {int(ds.pixels(i)[0, 0, 0]) // 2 for i in range(len(ds))}
    assert len(lefts) > 4 and min(lefts) >= 0 and max(lefts) <= 64
    assert {ds[i]["crop_top_left"] for i in range(len(ds))} == {(16, 0)}


def test_demo_toml_gives_an_epoch_of_10_to_20_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate_shapes_dataset(tmp_path / "demo_data/concept", 32, concept=True)
    ds = CaptionedImageDataset(load_dataset_config(REPO / "configs/examples/demo.toml"), seed=0)
    sampler = ds.batch_sampler(seed=0)
    assert 10 <= len(sampler) <= 20
    batch = collate([ds[i] for i in next(iter(sampler))])
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert all("zkw" in c for c in batch["caption"])


def test_bucket_no_upscale_uses_the_image_size(tmp_path):
    _img(tmp_path / "a/small.png", size=(100, 70), caption="s")
    _img(tmp_path / "a/big.png", size=(400, 200), caption="b")
    cfg = _config(SubsetConfig(tmp_path / "a"), resolution=(128, 128), enable_bucket=True, bucket_no_upscale=True,
                  min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=32)
    ds = CaptionedImageDataset(cfg, seed=0)
    by_caption = {ds[i]["caption"]: ds[i] for i in range(len(ds))}
    assert by_caption["s"]["bucket"] == (96, 64)  # floored, never enlarged
    # 400x200 -> 128^2 area: 181x90; width-first rounding gives 160x64 (aspect 2.5), height-first 128x64 (2.0):
    # sd-scripts keeps the closer aspect
    assert by_caption["b"]["bucket"] == (128, 64)
    assert by_caption["b"]["pixel_values"].shape == (3, 64, 128)
