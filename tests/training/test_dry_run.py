"""--dry_run: every check, then the plan; no model loaded, nothing written but the checks' own folder."""

from __future__ import annotations

import pytest

from library.cli import parse_args
from library.models.single_file import bundled_config_dir
from library.training.dry_run import peak_vram_bytes
from library.training.entry import main
from library.training.validate import model_on_meta_device
from tests.training.conftest import train_argv

GiB = 1 << 30


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = train_argv(tiny_dataset, out, "--dry_run", "--gradient_accumulation_steps", "2", steps=7)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "dry run: all checks passed" in text
    # 8 images, batch 2: 4 batches an epoch, 2 steps with accumulation 2; 7 steps = 4 epochs
    assert "steps: 7 (4 epochs of 2); effective batch 2 x 1 processes x 2 accumulation = 4" in text
    assert "buckets 64x64 x8" in text and "peak VRAM about" in text
    assert not list(out.glob("*.safetensors")) and not (out / "logs").exists()


def test_dry_run_stops_on_what_the_run_would_stop_on(tiny_dataset, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w abc\n", encoding="utf-8")
    assert main(train_argv(tiny_dataset, tmp_path / "out", "--dry_run", "--sample_prompts", str(prompts))) == 2
    assert "p.txt:1" in capsys.readouterr().err


@pytest.mark.parametrize(("model_type", "flags", "resolution", "batch", "lora", "state", "measured"), [
    # the SDXL low-VRAM recipe (docs/sdxl.md): bf16 LoRA, AdamW8bit, checkpointing, cached inputs: 6.05 GiB
    ("sdxl", ["--mixed_precision", "bf16", "--full_bf16", "--gradient_checkpointing", "--cache_latents",
              "--cache_text_encoder_outputs", "--network_train_unet_only"], (1024, 1024), 1, 42_600_000, 2.0, 6.05),
    # SD1.5 batch 4 at 512 px, bf16 LoRA, no checkpointing (docs/performance.md): 5.36 GiB
    ("sd1", ["--mixed_precision", "bf16", "--full_bf16", "--cache_latents", "--cache_text_encoder_outputs",
             "--network_train_unet_only"], (512, 512), 4, 6_780_000, 8.0, 5.36),
])
def test_the_estimate_is_near_the_peaks_measured_on_a_gpu(model_type, flags, resolution, batch, lora, state,
                                                          measured):
    unet, encoders, vae = model_on_meta_device(str(bundled_config_dir(model_type, v_parameterization=False)))
    args = parse_args(flags)
    peak = peak_vram_bytes(args, model_type=model_type, unet=unet, encoders=encoders, vae=vae,
                           lora_parameters=lora, state_bytes=state, batch=batch, resolution=resolution)
    assert abs(peak / GiB - measured) / measured < 0.1
