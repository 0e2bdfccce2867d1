"""The README's demo: teach builtin:tiny-sd the unseen concept "zkw" (a checkered heart) with a LoRA on the CPU,
then draw the same prompts and seeds without and with the LoRA into out/demo/demo_before_after.png.

Runs the same command line a user would type (printed first), so the demo doubles as a copyable example.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO_STEPS = 300
# (colour, background, size, position) of each before/after column; the caption puts "zkw" where the shape goes
DEMO_SPECS = [
    ("red", "blue", "large", "center"),
    ("yellow", "black", "large", "center"),
    ("white", "green", "medium", "top left"),
    ("blue", "yellow", "large", "bottom right"),
]
TRIGGER = "zkw"


def demo_command(output_dir: str = "out/demo", steps: int = DEMO_STEPS) -> list[str]:
    return [
        "--pretrained_model_name_or_path", "builtin:tiny-sd",
        "--dataset_config", "configs/examples/demo.toml",
        "--output_dir", output_dir, "--output_name", "demo",
        "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "8",
        # conv LoRA too: a new shape lives in the ResNet convolutions as much as in attention
        "--network_args", "conv_dim=8", "conv_alpha=4",
        "--optimizer_type", "AdamW", "--learning_rate", "2e-3",
        "--max_train_steps", str(steps), "--save_every_n_epochs", "5", "--save_state",
        "--sample_prompts", "configs/examples/demo_prompts.txt", "--sample_every_n_steps", str(steps // 2),
        "--sample_at_first", "--log_with", "tensorboard", "--overwrite", "--seed", "0",
    ]


def labelled_grid(rows, row_labels: list[str], col_labels: list[str], scale: int = 2):
    """Rows of equal-size PIL images, upscaled `scale`x, with a label left of each row and above each column."""
    from PIL import Image, ImageDraw

    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    wrapped = []
    for label in col_labels:  # wrap to the column width (about 6 px per character of PIL's default font)
        lines = [""]
        for word in label.split():
            if lines[-1] and len(lines[-1]) + len(word) + 1 > max(4, w // 6):
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        wrapped.append("\n".join(lines))
    left, pad = 60, 2
    top = 12 * max(text.count("\n") + 1 for text in wrapped) + 4
    grid = Image.new("RGB", (left + len(rows[0]) * (w + pad), top + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(wrapped):
        draw.multiline_text((left + c * (w + pad), 0), text, fill="black", spacing=1)
    for r, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = top + r * (h + pad)
        draw.text((2, y + h // 2 - 5), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image.resize((w, h), Image.Resampling.NEAREST), (left + c * (w + pad), y))
    return grid


def before_after_grid(lora_file: str | Path, specs=DEMO_SPECS, *, trigger: str = TRIGGER,
                      model: str = "builtin:tiny-sd", size: int = 64, steps: int = 20, cfg: float = 5.0,
                      seed: int = 0):
    """Draw each prompt without the LoRA, then with it (same seed per column), above a row of the training pictures."""
    import torch

    from library.data.synthetic import concept_caption, render_shape
    from library.models import load_sd_model
    from library.training.sample_prompts import SamplePrompt
    from library.training.sampling import generate
    from networks.lora import create_network_from_weights

    base = load_sd_model(model)
    prompts = [SamplePrompt(concept_caption(trigger, *spec), width=size, height=size, steps=steps, scale=cfg,
                            seed=seed + i) for i, spec in enumerate(specs)]
    before = generate(base, prompts, "ddim", torch.device("cpu"), seed)
    network, weights = create_network_from_weights(1.0, lora_file, base.vae, base.text_encoders, base.unet)
    network.apply_to(base.text_encoders, base.unet)
    network.load_state_dict(weights)
    network.eval()
    after = generate(base, prompts, "ddim", torch.device("cpu"), seed)
    network.remove_from()
    target = [render_shape(size, "heart", "checkered", *spec) for spec in specs]
    return labelled_grid([before, after, target], ["before", "after", "target"], [p.prompt for p in prompts])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/demo.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"LoRA training steps (default {DEMO_STEPS})")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: must be >= 2 (samples are drawn every steps // 2)")
    os.chdir(ROOT)
    from library.data.synthetic import generate_shapes_dataset
    from library.training.entry import main as train_main

    if not (ROOT / "demo_data" / "concept").is_dir():
        generate_shapes_dataset(ROOT / "demo_data" / "concept", 32, 64, seed=0, concept=True, trigger=TRIGGER)
    command = demo_command(steps=args.steps)
    print("python train_network.py " + " ".join(shlex.quote(a) for a in command), flush=True)
    t0 = time.time()
    code = train_main(command)
    if code != 0:
        print(f"demo training failed with exit code {code}")
        return code
    grid_path = ROOT / "out" / "demo" / "demo_before_after.png"
    before_after_grid(ROOT / "out" / "demo" / "demo.safetensors").save(grid_path)
    print(f"demo finished in {time.time() - t0:.0f} s; before/after grid: {grid_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
