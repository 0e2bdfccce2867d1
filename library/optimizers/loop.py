"""What an optimizer needs from the training loop, asked in one place instead of branches on its name.

The loop talks to :class:`LoopNeeds` only. An optimizer states its needs by defining any of these members (all
optional, looked up once when the loop starts):

- ``log_metrics() -> dict``: values to log every logging step (no device reads; tensors are read at log time);
- ``hessian_update_interval`` and ``update_hessian(batch_size)``: run a Hessian-estimate backward every k steps
  (SophiaG's Gauss-Newton-Bartlett pass, Liu et al. 2023);
- ``setup_warnings(network_args) -> list[str]``: settings that combine badly with the network's, logged once;
- ``capturable -> bool``: step() may be recorded in a CUDA graph by the caller (torch.optim's convention: the step
  counts and lr live on the device, a scheduler fills the lr tensor, no host sync after the first call), so
  ``--cuda_graphs`` records it with the training step.

torch.optim's own Adam and AdamW declare it through their param groups: with ``fused=True`` or
``capturable=True`` they are made capturable when the loop records them (``capturable=True`` and the lr as a 0-d
device tensor, the form torch documents for capturing their step).

Two needs of optimizers from other packages are sd-scripts' own conventions and live where sd-scripts keeps them:
the ``d·lr`` of D-Adaptation / Prodigy is logged with the learning rates (library/training/trackers.py), and
transformers' Adafactor with ``relative_step`` gets its own schedule (library/training/lr_schedulers.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LoopNeeds:
    """The training loop's view of one optimizer's needs (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        update = getattr(optimizer, "update_hessian", None)
        interval = getattr(optimizer, "hessian_update_interval", None)
        self.hessian_interval: int | None = interval if callable(update) and interval else None
        self._log_metrics = getattr(optimizer, "log_metrics", None)

    @property
    def capturable(self) -> bool:
        """Asked when the loop starts, after a state load (whose param groups carry their own settings)."""
        declared = getattr(self.optimizer, "capturable", None)
        return bool(declared) if declared is not None else _torch_capturable(self.optimizer)

    def prepare_capture(self) -> None:
        """Before the first recorded step: switch torch's Adam/AdamW to their capturable form. Call after any
        state load (a loaded state brings its own param groups) and after the lr scheduler exists, whose base
        learning rates then stay Python numbers."""
        if getattr(self.optimizer, "capturable", None) is not None or not _torch_capturable(self.optimizer):
            return
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            device = group["params"][0].device
            lr = group["lr"]
            if not (isinstance(lr, torch.Tensor) and lr.device == device):
                group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)

    def hessian_due(self, step: int) -> bool:
        """Whether the loop runs the Hessian pass after optimizer step ``step``."""
        return self.hessian_interval is not None and step % self.hessian_interval == 0

    def update_hessian(self, batch_size: int) -> None:
        self.optimizer.update_hessian(batch_size=batch_size)

    def metrics(self) -> dict[str, float]:
        """The optimizer's own metrics, as ``optimizer/<key>`` (read on logging steps only)."""
        if not callable(self._log_metrics):
            return {}
        return {f"optimizer/{key}": float(value) for key, value in self._log_metrics().items()}

    def setup_warnings(self, network_args: Sequence[str]) -> list[str]:
        warn = getattr(self.optimizer, "setup_warnings", None)
        return list(warn(network_args)) if callable(warn) else []


def _torch_capturable(optimizer: torch.optim.Optimizer) -> bool:
    """torch's Adam/AdamW (AdamW subclasses Adam) whose every group is fused or capturable."""
    return isinstance(optimizer, torch.optim.Adam) and all(
        group.get("fused") or group.get("capturable") for group in optimizer.param_groups
    )
