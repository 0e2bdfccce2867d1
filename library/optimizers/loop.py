"""What an optimizer needs from the training loop, asked in one place instead of branches on its name.

The loop talks to :class:`LoopNeeds` only. An optimizer states its needs by defining any of these members (all
optional, looked up once when the loop starts):

- ``log_metrics() -> dict``: values to log every logging step (no device reads; tensors are read at log time);
- ``hessian_update_interval`` and ``update_hessian(batch_size)``: run a Hessian-estimate backward every k steps
  (SophiaG's Gauss-Newton-Bartlett pass, Liu et al. 2023);
- ``own_lr_scheduler()``: a learning-rate schedule the optimizer brings, used instead of ``--lr_scheduler``;
- ``setup_warnings(network_args) -> list[str]``: settings that combine badly with the network's, logged once.

Optimizers from other packages cannot define these, so their two conventions are read here: a group key ``d``
(D-Adaptation, Prodigy: the step taken is d·lr, logged as ``lr/d*lr``) and transformers' Adafactor with
``relative_step`` (its own schedule, as sd-scripts uses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class LoopNeeds:
    """The training loop's view of one optimizer's needs (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        update = getattr(optimizer, "update_hessian", None)
        interval = getattr(optimizer, "hessian_update_interval", None)
        self.hessian_interval: int | None = interval if callable(update) and interval else None
        self._log_metrics = getattr(optimizer, "log_metrics", None)

    def hessian_due(self, step: int) -> bool:
        """Whether the loop runs the Hessian pass after optimizer step ``step``."""
        return self.hessian_interval is not None and step % self.hessian_interval == 0

    def update_hessian(self, batch_size: int) -> None:
        self.optimizer.update_hessian(batch_size=batch_size)

    def metrics(self) -> dict[str, float]:
        """Per-group learning rates (and d·lr where the optimizer adapts d) plus the optimizer's own metrics."""
        logs: dict[str, float] = {}
        for i, group in enumerate(self.optimizer.param_groups):
            logs[f"lr/group{i}"] = float(group["lr"])
            if "d" in group:
                logs[f"lr/d*lr/group{i}"] = float(group["d"]) * float(group["lr"])
        if callable(self._log_metrics):
            for key, value in self._log_metrics().items():
                logs[f"optimizer/{key}"] = float(value)
        return logs

    def lr_scheduler(self) -> Any | None:
        """The schedule the optimizer brings, or None for ``--lr_scheduler``'s."""
        own = getattr(self.optimizer, "own_lr_scheduler", None)
        if callable(own):
            return own()
        if type(self.optimizer).__name__ == "Adafactor" and self.optimizer.defaults.get("relative_step"):
            from transformers.optimization import AdafactorSchedule

            return AdafactorSchedule(self.optimizer)
        return None

    def setup_warnings(self, network_args: Sequence[str]) -> list[str]:
        warn = getattr(self.optimizer, "setup_warnings", None)
        return list(warn(network_args)) if callable(warn) else []
