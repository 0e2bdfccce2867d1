"""`--overwrite`: an earlier run's outputs of the same name are moved aside, not mixed with the new run's.

Without this, the new run's sample grids would join the old steps' images, and old checkpoints would sit beside
new ones under the same names' pattern. Moving (never deleting) keeps the earlier run recoverable.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

logger = logging.getLogger("loraforge")


def earlier_outputs(output_dir: Path, output_name: str) -> list[Path]:
    """Every file or folder a run named `output_name` writes in `output_dir`: the LoRA and its checkpoints
    (`-NNNNNN`, `-stepNNNNNNNN`, `-...-lastgood`, each with its `-state` folder), the loss record and plot, and
    the sample images and grids."""
    if not output_dir.is_dir():
        return []
    own = re.compile(rf"{re.escape(output_name)}(\.[^.]+|-(\d{{6}}|step\d{{8}})(-lastgood)?(\.[^.]+|-state)|-state"
                     r"|_loss\.(png|csv))")
    found = [p for p in output_dir.iterdir() if own.fullmatch(p.name)]
    samples = output_dir / "sample"
    if samples.is_dir():
        sample = re.compile(rf"{re.escape(output_name)}_(\d{{6}}_\d{{2}}_.*|grid_\d{{2}})\.png")
        found += [p for p in samples.iterdir() if sample.fullmatch(p.name)]
    return sorted(found)


def set_aside(output_dir: Path, output_name: str) -> Path | None:
    """Move the earlier run's outputs into `earlier-<output_name>-<time>/` (same layout); None if there were none."""
    found = earlier_outputs(output_dir, output_name)
    if not found:
        return None
    folder = output_dir / f"earlier-{output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for path in found:
        target = folder / path.relative_to(output_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    logger.info("--overwrite: moved %d output(s) of an earlier run named %s to %s", len(found), output_name, folder)
    return folder
