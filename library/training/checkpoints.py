"""sd-scripts' checkpoint names, which older checkpoint each save retires, and where a run starts.

Names: `<output_name>-<epoch:06d>.<ext>`, `<output_name>-step<step:08d>.<ext>`, `<output_name>.<ext>` for the
LoRA; the state folders add `-state`. Retention follows sd-scripts to the number: an epoch save retires the one
`every * last_n` epochs older; a step save retires the newest multiple of `every` at or before
`step - last_n - 1`, so the files of the last `last_n` steps stay.
"""

from __future__ import annotations

import argparse
import math


def epoch_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


def step_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"


def state_name(name: str) -> str:
    """The state folder saved beside the LoRA file `name` (sd-scripts' `-state` suffix)."""
    return f"{name}-state"


def epoch_to_remove(epoch: int, every: int, last_n: int | None) -> int | None:
    """The epoch whose checkpoint an epoch-`epoch` save retires (None: keep all, or nothing that old)."""
    if last_n is None:
        return None
    old = epoch - every * last_n
    return old if old >= 0 else None


def step_to_remove(step: int, every: int, last_n: int | None) -> int | None:
    """The step whose checkpoint a step-`step` save retires: the last `last_n` steps' files stay."""
    if last_n is None:
        return None
    old = step - last_n - 1
    old -= old % every
    return old if old >= 0 else None


def state_last_n(state_value: int | None, file_value: int | None) -> int | None:
    """--save_last_n_*_state when set (and non-zero), else the LoRA files' --save_last_n_*, as sd-scripts."""
    return state_value if state_value else file_value


def save_every_n_epochs(args: argparse.Namespace, num_epochs: int) -> int | None:
    """--save_n_epoch_ratio N: about N epoch files in all, overriding --save_every_n_epochs, as sd-scripts."""
    if args.save_n_epoch_ratio:
        return math.floor(num_epochs / args.save_n_epoch_ratio) or 1
    return args.save_every_n_epochs


def initial_step(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """The step --initial_step / --initial_epoch name (0 when neither is given); --initial_step wins."""
    if args.initial_step is not None:
        return args.initial_step
    if args.initial_epoch is not None:
        return (args.initial_epoch - 1) * steps_per_epoch
    return 0
