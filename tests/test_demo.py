"""tools/demo.py: the printed command parses, and the before/after grid really switches the LoRA on."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from library.cli import parse_args
from library.models import load_sd_model
from networks.lora import create_network

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    if "demo_tool" not in sys.modules:
        spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["demo_tool"]


def test_demo_command_is_a_valid_training_command():
    demo = _demo()
    args = parse_args(demo.demo_command("out/x", steps=20))
    assert args.pretrained_model_name_or_path == "builtin:tiny-sd" and args.max_train_steps == 20
    assert args.sample_every_n_steps == 10 and args.output_dir == "out/x"


def test_before_after_grid_draws_without_then_with_the_lora(tmp_path):
    demo = _demo()
    model = load_sd_model("builtin:tiny-sd")
    network = create_network(1.0, 4, 4, model.vae, model.text_encoders[0], model.unet)
    network.apply_to(model.text_encoders[0], model.unet)
    with torch.no_grad():  # lora_up starts at zero: give the adapters a visible effect
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    lora = tmp_path / "concept.safetensors"
    network.save_weights(lora)

    specs = demo.DEMO_SPECS[:2]
    grid = demo.before_after_grid(lora, specs, size=32, steps=2)
    cell, left, pad = 64, 60, 2  # 32 px drawn at 2x
    top = grid.height - 3 * (cell + pad)
    assert grid.width == left + 2 * (cell + pad) and top > 0
    pixels = np.asarray(grid).astype(int)

    def row(r):
        return pixels[top + r * (cell + pad) : top + r * (cell + pad) + cell, left:]

    assert np.abs(row(0) - row(1)).mean() > 1  # the LoRA changed the picture
    again = demo.before_after_grid(lora, specs, size=32, steps=2)
    assert np.array_equal(np.asarray(again), np.asarray(grid))  # same seeds, and the base model was left clean
    target = row(2)[:, :cell]  # the "target" row: the concept as in the training set, a red checkered heart on blue
    for rgb, share in (((220, 40, 40), 0.05), ((245, 245, 245), 0.05), ((40, 80, 220), 0.3)):
        assert (np.abs(target - np.array(rgb)).sum(axis=-1) < 60).mean() > share, rgb
