"""The README's demo: generate the bundled demo images, train a LoRA on builtin:tiny-sd on the CPU, show where it went.

Runs the same command line a user would type (printed first), so the demo doubles as a copyable example.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_STEPS = 150


def demo_command(output_dir: str = "out/demo", steps: int = DEMO_STEPS) -> list[str]:
    return [
        "--pretrained_model_name_or_path", "builtin:tiny-sd",
        "--dataset_config", "configs/examples/demo.toml",
        "--output_dir", output_dir, "--output_name", "demo",
        "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-3",
        "--max_train_steps", str(steps), "--save_every_n_epochs", "5", "--save_state",
        "--sample_prompts", "configs/examples/demo_prompts.txt", "--sample_every_n_steps", str(steps // 2),
        "--sample_at_first", "--log_with", "tensorboard", "--overwrite", "--seed", "0",
    ]


def main() -> int:
    import os

    os.chdir(ROOT)
    from library.data.synthetic import generate_shapes_dataset
    from library.training.entry import main as train_main

    if not (ROOT / "demo_data" / "concept").is_dir():
        generate_shapes_dataset(ROOT / "demo_data" / "concept", 32, 64, seed=0, concept=True)
    argv = demo_command()
    print("python train_network.py " + " ".join(shlex.quote(a) for a in argv), flush=True)
    t0 = time.time()
    code = train_main(argv)
    print(f"demo finished in {time.time() - t0:.0f} s with exit code {code}; outputs in {ROOT / 'out/demo'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
