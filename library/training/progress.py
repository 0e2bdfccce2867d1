"""What the user watches: one tqdm bar (average loss, lr, it/s, ETA, VRAM), tracker scalars, a loss/lr plot.

Everything here receives numbers already read back from the device on logging steps only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from library.training.trackers import log_scalars
from library.training.validation_loss import LossRecorder

logger = logging.getLogger("loraforge")


class Progress:
    def __init__(self, args, *, total: int, initial: int, enabled: bool, device, accelerator, output_dir: Path):
        self.args = args
        self.device = device
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="steps", dynamic_ncols=True)
        self.losses = LossRecorder()
        self.history: list[tuple[int, float, float]] = []  # (step, loss, lr of group 0)
        self.last_step = initial

    def update(self, step: int) -> None:
        self.bar.update(step - self.last_step)
        self.last_step = step

    def log(self, step: int, loss: float, lr_logs: dict[str, float], *, epoch: int, position: int,
            postfix: dict[str, str] | None = None) -> None:
        """`position`: the how-many-th log of this epoch, where sd-scripts' loss average keeps its slot."""
        self.losses.add(epoch=epoch, step=position, loss=loss)
        average = self.losses.moving_average
        lr0 = next(iter(lr_logs.values()), 0.0)
        self.history.append((step, loss, lr0))
        postfix = {"loss": f"{average:.4f}", "lr": f"{lr0:.2e}", **(postfix or {})}
        if self.device.type == "cuda":
            postfix["vram"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}G"
        self.bar.set_postfix(postfix, refresh=False)
        log_scalars(self.accelerator, {"loss/current": loss, "loss/average": average, **lr_logs}, step_value=step,
                    global_step=step, epoch=epoch + 1)
        every = self.args.plot_every_n_steps
        if every and step % every == 0:
            self.plot()

    def end_epoch(self, epoch: int, global_step: int) -> None:
        """loss/epoch_average at the epoch's number (1-based), as sd-scripts logs it."""
        log_scalars(self.accelerator, {"loss/epoch_average": self.losses.moving_average}, step_value=epoch,
                    global_step=global_step, epoch=epoch)

    def plot(self) -> Path | None:
        if not self.enabled or not self.history:
            return None
        from library.training.plots import plot_loss_lr

        return plot_loss_lr(self.history, self.output_dir / f"{self.args.output_name}_loss.png", title=self.args.output_name)

    def close(self) -> None:
        path = self.plot()
        self.bar.close()
        if path:
            logger.info("loss/lr plot -> %s", path)
