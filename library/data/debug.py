"""`--debug_dataset`: what every sample of the first epoch would be, printed instead of trained on (sd-scripts
shows each image in a window; a text line per sample works over SSH and in logs too)."""

from __future__ import annotations

import sys
from typing import TextIO

from library.data.dataset import CaptionedImageDataset


def print_dataset(dataset: CaptionedImageDataset, *, seed: int, epoch: int = 0, out: TextIO | None = None) -> int:
    """Prints the epoch's batches in training order, one line per sample (to stdout unless `out`); returns the
    number of samples."""
    out = sys.stdout if out is None else out
    dataset.set_epoch(epoch)
    sampler = dataset.batch_sampler(seed=seed, shuffle=True)
    sampler.set_epoch(epoch)
    count = 0
    print(f"epoch {epoch + 1}: {len(sampler)} batches, {len(dataset)} samples", file=out)
    for b, batch in enumerate(sampler):
        for index in batch:
            d = dataset.describe(index)
            crop = "around the face" if d["face_crop"] else "left,top={},{}".format(*d["crop_left_top"])
            print(f"batch {b} sample {index}: {d['path']} | original {d['original_size'][0]}x{d['original_size'][1]}"
                  f" -> resized {d['resized_size'][0]}x{d['resized_size'][1]} -> bucket {d['bucket'][0]}x"
                  f"{d['bucket'][1]} ({crop}) | flipped {d['flipped']} | crop_top_left {d['crop_top_left']} | "
                  f"reg {d['is_reg']} | caption: {d['caption']}", file=out)
            count += 1
    return count
