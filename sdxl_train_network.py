"""SDXL LoRA training, as sd-scripts' sdxl_train_network.py: the same options, the model is taken as SDXL."""

import sys

from library.training.entry import main

if __name__ == "__main__":
    sys.exit(main(force_sdxl=True))
