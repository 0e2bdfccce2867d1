"""A disk latent cache is reused only when the latent would come out the same: same VAE weights, same image
file, same bucket, and a latent of the bucket's shape."""

from __future__ import annotations

import os

import numpy as np
import torch

from library.config.dataset_config import SubsetConfig
from library.data.dataset import CaptionedImageDataset
from library.data.latent_cache_key import vae_fingerprint
from tests.data.test_dataset import _config, _fake_encode, _img


def _counting(calls: list[int]):
    def encode(pixels):
        calls.append(pixels.shape[0])
        return _fake_encode(pixels)
    return encode


def test_a_changed_image_file_and_a_wrong_shaped_cache_are_encoded_again(tmp_path):
    image = _img(tmp_path / "a/x.png", color=(10, 200, 30), caption="x")
    cfg = _config(SubsetConfig(tmp_path / "a"))
    calls: list[int] = []
    CaptionedImageDataset(cfg, seed=0).cache_latents(_counting(calls), to_disk=True, cache_tag="v")
    CaptionedImageDataset(cfg, seed=0).cache_latents(_counting(calls), to_disk=True, cache_tag="v")
    assert calls == [1]  # reused

    _img(image, color=(200, 10, 30))  # the same name, another picture (same size, same bucket)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    ds = CaptionedImageDataset(cfg, seed=0)
    ds.cache_latents(_counting(calls), to_disk=True, cache_tag="v")
    assert calls == [1, 1]
    assert ds[0]["latents"][0, 0, 0] > 0  # red now: the red channel of the fake encoder is high

    npz = tmp_path / "a/x.npz"
    with np.load(npz, allow_pickle=False) as data:
        arrays = dict(data)
    arrays["latents"] = np.zeros((4, 5, 5), dtype=np.float32)  # bucket 64x64 gives 8x8 latents
    np.savez(npz, **arrays)
    ds = CaptionedImageDataset(cfg, seed=0)
    ds.cache_latents(_counting(calls), to_disk=True, cache_tag="v")
    assert calls == [1, 1, 1] and ds[0]["latents"].shape == (4, 8, 8)
    ds.cache_latents(_counting(calls), to_disk=True, cache_tag="v", latent_channels=16)  # another VAE family
    assert calls == [1, 1, 1, 1]


def test_the_vae_fingerprint_follows_the_weights_not_the_name():
    from library.models.loader import load_sd_model

    vae = load_sd_model("builtin:tiny-sd").vae
    before = vae_fingerprint(vae)
    assert before == vae_fingerprint(vae) and before.startswith("vae-sha256:")
    with torch.no_grad():
        next(vae.parameters()).view(-1)[0] += 1e-3
    assert vae_fingerprint(vae) != before
