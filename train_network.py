"""Train a LoRA for Stable Diffusion: `python train_network.py --help` (works under `accelerate launch` too)."""

import sys

from library.training.entry import main

if __name__ == "__main__":
    sys.exit(main())
