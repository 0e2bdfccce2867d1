"""What the user watches: one tqdm bar (epoch, average loss, lr, it/s, ETA, VRAM), tracker scalars, a loss/lr plot.

Everything here receives numbers already read back from the device on logging steps only. Each logged loss is
also appended to `<output_name>_loss.csv`, the run's own record, so the plot spans the whole run across
`--resume`s and is written on Ctrl-C too.
"""

from __future__ import annotations

import csv
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
        self.record = output_dir / f"{args.output_name}_loss.csv"
        # (step, loss, lr of group 0): a resumed run starts from what the run logged up to its resume point
        self.history: list[tuple[int, float, float]] = read_loss_record(self.record, upto=initial) if initial else []
        if enabled:
            write_loss_record(self.record, self.history)
        self.last_step = initial

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """`epoch` 1-based, as the user counts."""
        self.bar.set_description(f"epoch {epoch}/{num_epochs}", refresh=False)

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
        if self.enabled:
            with self.record.open("a", encoding="utf-8", newline="") as f:
                csv.writer(f).writerow((step, loss, lr0))
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
        """Closes the bar and writes the plot: at the end of the run, and when it stops early (Ctrl-C, an error),
        before the stop's message, which must not land on the bar's line."""
        self.bar.close()
        path = self.plot()
        if path:
            logger.info("loss/lr plot -> %s", path)


def read_loss_record(path: Path, *, upto: int) -> list[tuple[int, float, float]]:
    """The logged (step, loss, lr) of steps <= `upto` (a resumed run drops what a stopped run logged after its
    last saved state)."""
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            try:
                step, loss, lr = int(row[0]), float(row[1]), float(row[2])
            except (IndexError, ValueError):  # a line cut by a kill: skip it
                continue
            if step <= upto:
                rows.append((step, loss, lr))
    return rows


def write_loss_record(path: Path, rows: list[tuple[int, float, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
