"""tools/pretrain_tiny_sd.py end to end on the CPU: weights the loader takes, losses that fall, a sample grid."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.data.synthetic import render_arrays
from library.models.builtin import build_tiny_sd_modules

ROOT = Path(__file__).resolve().parents[1]


def _script():
    if "pretrain_tiny_sd" not in sys.modules:  # registered first: @dataclass looks its module up
        spec = importlib.util.spec_from_file_location("pretrain_tiny_sd", ROOT / "tools" / "pretrain_tiny_sd.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["pretrain_tiny_sd"]


@pytest.mark.slow
def test_quick_run_writes_loadable_fp16_weights_and_falling_losses(tmp_path):
    script = _script()
    weights = tmp_path / "w" / "tiny.safetensors"
    assert script.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "run"), "--weights_out", str(weights),
                        "--seed", "3"]) == 0
    report = json.loads((tmp_path / "run" / "pretrain.json").read_text(encoding="utf-8"))

    text_encoder, vae, unet, _ = build_tiny_sd_modules(weights=weights)
    random_te, _, random_unet, _ = build_tiny_sd_modules(weights=None)
    assert not torch.equal(unet.conv_in.weight, random_unet.conv_in.weight)
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert report["scaling_factor"] == pytest.approx(1 / report["latent_raw_std"])
    assert report["weights_mib"] < 25

    for stage in ("vae", "unet"):
        values = [loss for _, loss in report[stage]["losses"]]
        assert values and all(math.isfinite(v) for v in values)
    unet_losses = [loss for _, loss in report["unet"]["losses"]]
    assert unet_losses[-1] < unet_losses[0]
    assert report["unet"]["steps"] == 30 and report["vae"]["steps"] == 6  # no time limit in --quick

    with Image.open(report["grid"]) as grid:  # rows: target + one seed, of 2 prompts at 32 px upscaled 2x
        assert grid.width > 2 * 64 and grid.height > 2 * 64
    assert len(report["grid_prompts"]) == 2


def test_stage_progress_follows_steps_or_time_whichever_is_ahead():
    script = _script()
    clock = script.StageClock(steps=100, budget_s=0.0)
    clock.begin()
    assert clock.progress(25) == 0.25 and clock.progress(100) == 1.0
    timed = script.StageClock(steps=100, budget_s=1e-9)
    timed.begin()
    assert timed.progress(0) == 1.0
    assert script.lr_at(1.0, 0, 0.0, warmup=10) == pytest.approx(0.1)
    assert script.lr_at(1.0, 50, 0.0, warmup=10) == pytest.approx(1.0)
    assert script.lr_at(1.0, 50, 1.0, warmup=10) == pytest.approx(0.05)


def test_rendered_set_does_not_depend_on_the_worker_count():
    one, captions_one = render_arrays(5, 10, 300, 16, workers=1)
    two, captions_two = render_arrays(5, 10, 300, 16, workers=2)
    assert one.shape == (300, 16, 16, 3) and one.dtype.name == "uint8"
    assert (one == two).all() and captions_one == captions_two
    assert not any("zkw" in c or "heart" in c for c in captions_one)
