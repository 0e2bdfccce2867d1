"""Buckets, resizing, crops and SDXL crop conditioning against sd-scripts' definitions, on a grid of 60 sizes.

The reference functions below restate sd-scripts' rules (BucketManager, make_bucket_resolutions,
trim_and_resize_if_required, get_crop_ltrb, utils.resize_image) independently of the library's code.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from library.data.buckets import (
    INTERPOLATIONS,
    adjust_bucket_limits,
    crop_offsets,
    crop_top_left,
    fit_no_upscale,
    fit_predefined,
    make_bucket_resolutions,
)
from library.data.transforms import fit_to_bucket, resize

_rng = np.random.default_rng(2024)
SIZES = [(int(w), int(h)) for w, h in zip(_rng.integers(100, 2000, 60), _rng.integers(100, 2000, 60), strict=True)]
SETTINGS = [((512, 512), 256, 1024, 64), ((512, 512), 200, 1000, 64), ((1024, 1024), 512, 2048, 64),
            ((768, 512), 320, 960, 32)]


# ------------------------------------------------------------------------------------------------ references
def ref_limits(lo, hi, steps):
    return (lo // steps) * steps, math.ceil(hi / steps) * steps


def ref_buckets(resolution, lo, hi, steps):
    area = resolution[0] * resolution[1]
    out = {(math.isqrt(area) // steps * steps,) * 2}
    for w in range(lo, hi + 1, steps):
        h = min(hi, (area // w) // steps * steps)
        if h >= lo:
            out |= {(w, h), (h, w)}
    return sorted(out)


def ref_choose(size, buckets):
    w, h = size
    if size in buckets:
        bucket = size
    else:
        errs = [abs(bw / bh - w / h) for bw, bh in buckets]
        bucket = buckets[errs.index(min(errs))]
    scale = bucket[1] / h if w / h > bucket[0] / bucket[1] else bucket[0] / w
    return bucket, (math.floor(w * scale + 0.5), math.floor(h * scale + 0.5))


def ref_no_upscale(size, resolution, steps):
    w, h = size
    area = resolution[0] * resolution[1]
    ar = w / h

    def to_steps(x):
        x = math.floor(x + 0.5)
        return x - x % steps

    if w * h > area:
        rw = math.sqrt(area * ar)
        a_w = to_steps(rw)
        a_h = to_steps(a_w / ar)
        b_h = to_steps(area / rw)
        b_w = to_steps(b_h * ar)
        if abs(a_w / a_h - ar) < abs(b_w / b_h - ar):
            resized = (a_w, math.floor(a_w / ar + 0.5))
        else:
            resized = (math.floor(b_h * ar + 0.5), b_h)
    else:
        resized = size
    return (resized[0] // steps * steps, resized[1] // steps * steps), resized


def ref_crop_top_left(bucket, size, flipped):
    image_ar = size[0] / size[1]
    if bucket[0] / bucket[1] > image_ar:
        fw, fh = bucket[1] * image_ar, bucket[1]
    else:
        fw, fh = bucket[0], bucket[0] / image_ar
    left, top = (bucket[0] - fw) // 2, (bucket[1] - fh) // 2
    return int(top), int(bucket[0] - (left + fw) if flipped else left)


def ref_fit(pixels, bucket, resized, interpolation=None):
    h, w = pixels.shape[:2]
    if (w, h) != resized:
        name = interpolation or ("area" if w >= resized[0] and h >= resized[1] else "lanczos")
        pil = {"lanczos": Image.LANCZOS, "box": Image.BOX}
        if name in pil:
            pixels = np.array(Image.fromarray(pixels).resize(resized, pil[name]))
        else:
            flag = {"nearest": cv2.INTER_NEAREST_EXACT, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
                    "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}[name]
            pixels = cv2.resize(pixels, resized, interpolation=flag)
    left, top = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    return pixels[top:top + bucket[1], left:left + bucket[0]]


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(("resolution", "lo", "hi", "steps"), SETTINGS)
def test_bucket_lists_equal_sd_scripts(resolution, lo, hi, steps):
    a_lo, a_hi = adjust_bucket_limits(lo, hi, steps)
    assert (a_lo, a_hi) == ref_limits(lo, hi, steps)
    assert make_bucket_resolutions(resolution, a_lo, a_hi, steps) == ref_buckets(resolution, a_lo, a_hi, steps)


def test_min_bucket_reso_not_a_multiple_of_steps_is_rounded_as_sd_scripts():
    assert adjust_bucket_limits(200, 1000, 64) == (192, 1024)
    buckets = make_bucket_resolutions((512, 512), 192, 1024, 64)
    assert len(buckets) == 19 and (192, 1024) in buckets and (1024, 256) in buckets


@pytest.mark.parametrize(("resolution", "lo", "hi", "steps"), SETTINGS)
def test_bucket_choice_for_60_sizes(resolution, lo, hi, steps):
    lo, hi = adjust_bucket_limits(lo, hi, steps)
    buckets = make_bucket_resolutions(resolution, lo, hi, steps)
    for size in SIZES:
        fit = fit_predefined(size, buckets)
        assert (fit.bucket, fit.resized) == ref_choose(size, buckets), size
        assert fit.resized[0] >= fit.bucket[0] and fit.resized[1] >= fit.bucket[1]
        fit = fit_no_upscale(size, resolution, steps)
        assert (fit.bucket, fit.resized) == ref_no_upscale(size, resolution, steps), size


def test_no_upscale_keeps_small_images_and_picks_the_closer_rounding():
    assert fit_no_upscale((300, 200), (512, 512), 64).resized == (300, 200)  # cropped at native size
    assert fit_no_upscale((300, 200), (512, 512), 64).bucket == (256, 192)
    fit = fit_no_upscale((400, 200), (128, 128), 32)  # width-first 160x64 (2.5) loses to height-first 128x64
    assert (fit.bucket, fit.resized) == ((128, 64), (128, 64))
    assert fit_no_upscale((8000, 500), (512, 512), 64).bucket == (2048, 128)  # no max_bucket_reso cap


def test_crop_top_left_for_60_sizes_and_flips():
    buckets = make_bucket_resolutions((1024, 1024), 512, 2048, 64)
    for size in SIZES:
        bucket = fit_predefined(size, buckets).bucket
        for flipped in (False, True):
            assert crop_top_left(bucket, size, flipped) == ref_crop_top_left(bucket, size, flipped)
    assert crop_top_left((1024, 1024), (2000, 1000), False) == (256, 0)
    assert crop_top_left((960, 1024), (1000, 2000), False) == (0, 224)
    assert crop_top_left((960, 1024), (1000, 2000), True) == (0, 224)  # mirrored: 960 - (224 + 512)


def test_crop_boxes_and_pixel_means_for_60_sizes():
    rng = np.random.default_rng(5)
    buckets = make_bucket_resolutions((128, 128), 64, 256, 32)
    for w, h in SIZES:
        w, h = w // 8, h // 8  # small images keep the test fast; the rules are the same
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        fit = fit_predefined((w, h), buckets)
        assert crop_offsets(fit.resized, fit.bucket) == ((fit.resized[0] - fit.bucket[0]) // 2,
                                                        (fit.resized[1] - fit.bucket[1]) // 2)
        ours = fit_to_bucket(pixels, fit)
        ref = ref_fit(pixels, fit.bucket, fit.resized)
        assert ours.shape == (fit.bucket[1], fit.bucket[0], 3)
        assert np.array_equal(ours, ref), (w, h)
        assert ours.astype(np.float64).mean() == pytest.approx(ref.astype(np.float64).mean(), abs=0)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_every_resize_interpolation_is_sd_scripts_filter(interpolation):
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for bucket, resized in (((32, 32), (45, 32)), ((96, 128), (179, 128))):  # shrink, enlarge
        ours = fit_to_bucket(pixels, fit_predefined((70, 50), [bucket]), None, interpolation)
        assert fit_predefined((70, 50), [bucket]).resized == resized
        assert np.array_equal(ours, ref_fit(pixels, bucket, resized, interpolation))


def test_default_resize_shrinks_with_area_and_enlarges_with_lanczos():
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[:2, :2] = 255  # one bright quadrant: area averaging gives exactly its share
    assert resize(pixels, (2, 2))[0, 0, 0] == 255 and resize(pixels, (1, 1))[0, 0, 0] == 64
    up = resize(pixels, (8, 8))
    assert np.array_equal(up, np.array(Image.fromarray(pixels).resize((8, 8), Image.LANCZOS)))


def test_random_crop_offsets_cover_every_position_uniformly():
    rng = np.random.default_rng(0)
    lefts = [crop_offsets((20, 10), (16, 10), rng)[0] for _ in range(5000)]
    counts = np.bincount(lefts, minlength=5)
    assert len(counts) == 5 and counts.min() > 900  # 0..4 each ~1000
