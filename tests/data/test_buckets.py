import numpy as np
import pytest
from PIL import Image

from library.data.buckets import closest_bucket, make_buckets, no_upscale_bucket, resize_and_crop
from library.errors import DatasetError


def test_buckets_for_512_match_the_definition():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    # for each width w (multiple of 64 in [256, 1024]): the largest height multiple of 64 with w*h <= 512^2,
    # capped at 1024, kept if >= 256; plus the transposes.
    half = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
            (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    expected = sorted(set(half) | {(h, w) for w, h in half})
    assert buckets == expected
    for w, h in buckets:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024


def test_bucket_limits_and_non_square_resolution():
    buckets = make_buckets((768, 512), 320, 960, 64)
    assert (768, 512) in buckets and (640, 576) in buckets
    assert all(w * h <= 768 * 512 and 320 <= w <= 960 and 320 <= h <= 960 for w, h in buckets)
    assert make_buckets((64, 64), 64, 64, 64) == [(64, 64)]


def test_closest_aspect_ratio_assignment():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert closest_bucket((1200, 800), buckets) == (640, 384)  # 1.5: 640/384=1.67 beats 576/448=1.29
    assert closest_bucket((800, 1200), buckets) == (384, 640)
    assert closest_bucket((1000, 1000), buckets) == (512, 512)
    assert closest_bucket((4000, 500), buckets) == (1024, 256)  # 8:1 -> the widest bucket


def test_no_upscale_bucket():
    assert no_upscale_bucket((300, 200), (512, 512), 1024, 64) == (256, 192)  # own size, floored to 64
    # larger than the area: scaled to 512^2 area (724x362), then floored
    assert no_upscale_bucket((2000, 1000), (512, 512), 1024, 64) == (704, 320)
    assert no_upscale_bucket((5000, 600), (512, 512), 1024, 64)[0] == 1024  # capped at max_bucket_reso
    with pytest.raises(DatasetError, match=r"small\.png is 50x300 px.*bucket_reso_steps = 64"):
        no_upscale_bucket((50, 300), (512, 512), 1024, 64, "image small.png")


def _x_ramp(w, h):
    """Pixel value = x coordinate (so crops are visible in the numbers)."""
    arr = np.tile(np.arange(w, dtype=np.uint8)[None, :, None], (h, 1, 3))
    return Image.fromarray(arr)


def test_resize_covers_then_center_crops():
    img, (top, left) = resize_and_crop(_x_ramp(200, 100), (64, 64))
    assert img.size == (64, 64)
    assert (top, left) == (0, 32)  # 200x100 -> 128x64, centre 64 columns start at 32
    row = np.asarray(img)[32, :, 0].astype(float)
    # column j of the crop shows source x ~ (32 + j + 0.5) / 0.64 - 0.5
    assert abs(row[0] - (32.5 / 0.64 - 0.5)) < 2 and abs(row[63] - (95.5 / 0.64 - 0.5)) < 2


def test_random_crop_fractions_and_upscale():
    _, (top, left) = resize_and_crop(_x_ramp(200, 100), (64, 64), (0.0, 0.0))
    assert (top, left) == (0, 0)
    _, (top, left) = resize_and_crop(_x_ramp(200, 100), (64, 64), (1.0, 1.0))
    assert (top, left) == (0, 64)
    up, (top, left) = resize_and_crop(_x_ramp(32, 32), (64, 64))
    assert up.size == (64, 64) and (top, left) == (0, 0)
