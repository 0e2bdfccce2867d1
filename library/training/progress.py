"""What the user watches: one tqdm bar (smoothed loss, lr, it/s, ETA, VRAM), tensorboard scalars, a loss/lr plot.

Everything here receives numbers already read back from the device on logging steps only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger("loraforge")


class Progress:
    def __init__(self, args, *, total: int, initial: int, enabled: bool, device, accelerator, output_dir: Path):
        self.args = args
        self.device = device
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="steps", dynamic_ncols=True)
        self.smoothed: float | None = None
        self.history: list[tuple[int, float, float]] = []  # (step, loss, lr of group 0)
        self.last_step = initial

    def update(self, step: int) -> None:
        self.bar.update(step - self.last_step)
        self.last_step = step

    def log(self, step: int, loss: float, lr_logs: dict[str, float], postfix: dict[str, str] | None = None) -> None:
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        lr0 = next(iter(lr_logs.values()), 0.0)
        self.history.append((step, loss, lr0))
        postfix = {"loss": f"{self.smoothed:.4f}", "lr": f"{lr0:.2e}", **(postfix or {})}
        if self.device.type == "cuda":
            postfix["vram"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}G"
        self.bar.set_postfix(postfix, refresh=False)
        self.accelerator.log({"loss/current": loss, "loss/average": self.smoothed, **lr_logs}, step=step)
        every = self.args.plot_every_n_steps
        if every and step % every == 0:
            self.plot()

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
