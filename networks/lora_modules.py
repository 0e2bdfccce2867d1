"""One LoRA adapter on one Linear or Conv2d, hooked in by replacing the layer's `forward` (as sd-scripts does).

Replacing `forward` instead of wrapping the layer in a new module keeps the base model's module tree and
state_dict keys unchanged (so the base model saves, loads and compiles as before) and keeps the adapter's own
state_dict down to `lora_down.weight`, `lora_up.weight` and `alpha`. The step is bound by Python and kernel
launches, so the common path is two kernels on top of the base layer — `linear(x, down)` and one
`addmm` that adds `scale * lx @ up.T` to the base output — with no dropout objects and no host syncs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRAModule(nn.Module):
    """`y = W x + multiplier * (alpha / dim) * up(down(x))`, `up` zero-initialised so a new adapter is a no-op.

    Conv2d layers get `down = Conv2d(in, dim, k, stride, padding)` and `up = Conv2d(dim, out, 1)`, the shapes
    kohya, diffusers and ComfyUI use, so the saved tensors need no reshaping anywhere.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.is_conv = isinstance(org_module, nn.Conv2d)
        if self.is_conv:
            self.lora_down = nn.Conv2d(
                org_module.in_channels,
                lora_dim,
                org_module.kernel_size,
                org_module.stride,
                org_module.padding,
                dilation=org_module.dilation,
                bias=False,
            )
            self.lora_up = nn.Conv2d(lora_dim, org_module.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        # kohya treats alpha 0/None as "no scaling" (alpha = dim)
        alpha = float(lora_dim) if not alpha else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim  # a Python float: reading the buffer in forward would sync the device
        self._init_hook_state(org_module, multiplier, dropout, rank_dropout, module_dropout)

    def _init_hook_state(
        self,
        org_module: nn.Module,
        multiplier: float,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        """The state the hook/merge machinery reads, set alike by every adapter kind built on this class."""
        self.multiplier = float(multiplier)
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        # A list hides the wrapped layer from nn.Module registration: it must not enter this state_dict.
        self._org = [org_module]
        self.org_forward = None
        self.merged = False
        self._was_applied = False

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def has_dropout(self) -> bool:
        return self.dropout is not None or self.rank_dropout is not None or self.module_dropout is not None

    def apply_to(self) -> None:
        """Route the wrapped layer's calls through this adapter."""
        if self.org_forward is not None:
            return
        org = self.org_module
        self.org_forward = org.forward
        org.forward = self.forward

    def remove(self) -> None:
        """Give the wrapped layer its own forward back."""
        if self.org_forward is None:
            return
        org = self.org_module
        if org.__dict__.get("forward") == self.forward:
            del org.forward
            if org.forward != self.org_forward:  # the layer had an instance-level forward of its own
                org.forward = self.org_forward
        self.org_forward = None

    def set_alpha_from_buffer(self) -> None:
        """Re-derive the Python scale after `alpha` was loaded from a file (one host read, at load time)."""
        self.scale = float(self.alpha) / self.lora_dim

    def forward(self, x: Tensor) -> Tensor:
        out = self.org_forward(x)
        if self.training and self.module_dropout is not None and torch.rand(()) < self.module_dropout:
            return out  # CPU RNG: no device sync
        down = self.lora_down.weight
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            # half-precision base weights with a float32 adapter and no autocast: compute in the adapter's dtype
            return out + self._delta(x.to(down.dtype)).to(out.dtype)
        if self.is_conv or (self.training and self.has_dropout):
            return out + self._delta(x)
        lx = F.linear(x, down)
        fused = torch.addmm(
            out.reshape(-1, out.shape[-1]),
            lx.reshape(-1, self.lora_dim),
            self.lora_up.weight.t(),
            alpha=self.multiplier * self.scale,
        )
        return fused.view(out.shape)

    def _delta(self, x: Tensor) -> Tensor:
        """multiplier * scale * up(down(x)), with neuron and rank dropout in training mode."""
        scale = self.multiplier * self.scale
        lx = self._down(x)
        if self.training:
            if self.dropout is not None:
                lx = F.dropout(lx, p=self.dropout)
            if self.rank_dropout is not None:
                keep = torch.rand(lx.shape[0], self.lora_dim, device=lx.device) > self.rank_dropout
                if self.is_conv:
                    keep = keep[:, :, None, None]
                else:
                    keep = keep.view(lx.shape[0], *([1] * (lx.dim() - 2)), self.lora_dim)
                lx = lx * keep.to(lx.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        return self._up(lx) * scale

    def _down(self, x: Tensor) -> Tensor:
        if self.is_conv:
            d = self.lora_down
            return F.conv2d(x, d.weight, None, d.stride, d.padding, d.dilation)
        return F.linear(x, self.lora_down.weight)

    def _up(self, lx: Tensor) -> Tensor:
        if self.is_conv:
            return F.conv2d(lx, self.lora_up.weight)
        return F.linear(lx, self.lora_up.weight)

    def delta_weight(self) -> Tensor:
        """The dense weight change multiplier * scale * up @ down, shaped like the wrapped layer's weight."""
        up = self.lora_up.weight.float().flatten(1)
        down = self.lora_down.weight.float()
        delta = (up @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
        return delta * (self.multiplier * self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the wrapped layer's weight and unhook it (inference without the extra matmuls)."""
        if self.merged:
            return
        weight = self.org_module.weight
        weight.add_(self.delta_weight().to(device=weight.device, dtype=weight.dtype))
        self._was_applied = self.org_forward is not None
        self.remove()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to the rounding of the base weight's dtype) and re-hook if it was hooked."""
        if not self.merged:
            return
        weight = self.org_module.weight
        weight.sub_(self.delta_weight().to(device=weight.device, dtype=weight.dtype))
        self.merged = False
        if self._was_applied:
            self.apply_to()

    def extra_repr(self) -> str:
        return f"{self.lora_name}, dim={self.lora_dim}, scale={self.scale:g}, multiplier={self.multiplier:g}"
