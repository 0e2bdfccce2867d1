"""Validation loss as sd-scripts computes and logs it (`--validation_split` and friends).

Every validation pass runs the held-out batches at four fixed timesteps, evenly inside [min_timestep,
max_timestep] (200, 400, 600, 800 for 1000 steps), with the random generators seeded by --validation_seed (else
--seed) and restored afterwards, so training draws the same noise with or without validation. The averages follow
sd-scripts' loss recorder: in the first epoch every pass adds to one running list, later epochs overwrite it entry
by entry. Logged: `loss/validation/step_average`, `loss/validation/step_divergence` (after steps) and
`loss/validation/epoch_average`, `loss/validation/epoch_divergence` (after epochs); the divergence is the
validation average minus the training loss's moving average.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterable

import numpy as np
import torch

logger = logging.getLogger("loraforge")

NUM_VALIDATION_TIMESTEPS = 4  # sd-scripts' fixed count


def validation_timesteps(num_train_timesteps: int, min_timestep: int | None = None,
                         max_timestep: int | None = None) -> list[int]:
    """The interior points of an even split of [min, max] into NUM_VALIDATION_TIMESTEPS + 1 parts (truncated)."""
    lo = 0 if min_timestep is None else min_timestep
    hi = num_train_timesteps if max_timestep is None else max_timestep
    return [int(t) for t in np.linspace(lo, hi, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]]


class LossRecorder:
    """sd-scripts' moving average: epoch 0 appends every loss; later epochs replace the loss at the same step.
    Losses may be device tensors: nothing is read back until `moving_average` is asked for."""

    def __init__(self) -> None:
        self.losses: list = []
        self.total = 0.0

    def add(self, *, epoch: int, step: int, loss) -> None:
        if epoch == 0:
            self.losses.append(loss)
        else:
            while len(self.losses) <= step:
                self.losses.append(0.0)
            self.total = self.total - self.losses[step]
            self.losses[step] = loss
        self.total = self.total + loss

    @property
    def moving_average(self) -> float:
        return float(self.total / len(self.losses)) if self.losses else 0.0


@contextlib.contextmanager
def seeded_generators(seed: int, device: torch.device):
    """Seed torch (CPU and the device) and Python's `random` for a validation pass, then put them back."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    py = random.getstate()
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        random.setstate(py)


class ValidationLoss:
    """When to validate, over which batches and timesteps, and the running averages to log."""

    def __init__(self, num_batches: int, *, seed: int, num_train_timesteps: int, min_timestep: int | None = None,
                 max_timestep: int | None = None, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, max_steps: int | None = None):
        self.steps = min(max_steps, num_batches) if max_steps is not None else num_batches
        self.timesteps = validation_timesteps(num_train_timesteps, min_timestep, max_timestep)
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.train = LossRecorder()
        self.recorders = {"step": LossRecorder(), "epoch": LossRecorder()}

    def due_after_step(self, global_step: int) -> bool:
        return self.steps > 0 and self.every_n_steps is not None and global_step % self.every_n_steps == 0

    def due_after_epoch(self, epochs_done: int) -> bool:
        return self.steps > 0 and (self.every_n_epochs is None or epochs_done % self.every_n_epochs == 0)

    def run(self, kind: str, epoch: int, batches: Iterable[dict], loss_at: Callable[[dict, int], torch.Tensor],
            device: torch.device) -> dict[str, float]:
        """One pass: `loss_at(batch, timestep)` for the first `steps` batches at every fixed timestep; returns the
        logs (`kind` is "step" or "epoch"; `epoch` is 0-based, as sd-scripts' recorder counts)."""
        recorder = self.recorders[kind]
        index = 0
        with seeded_generators(self.seed, device), torch.no_grad():
            for step, batch in enumerate(batches):
                if step >= self.steps:
                    break
                for t in self.timesteps:
                    recorder.add(epoch=epoch, step=index, loss=loss_at(batch, t).item())
                    index += 1
        average = recorder.moving_average
        logs = {f"loss/validation/{kind}_average": average,
                f"loss/validation/{kind}_divergence": average - self.train.moving_average}
        logger.info("validation (%s): average loss %.5f, divergence %.5f", kind, average,
                    logs[f"loss/validation/{kind}_divergence"])
        return logs
