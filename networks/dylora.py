"""`--network_module networks.dylora`: DyLoRA (Valipour et al. 2023) as sd-scripts trains it.

Each training forward of each module draws a rank b (a multiple of `unit`, python's `random`, as sd-scripts)
and only the `unit` ranks b..b+unit learn; the output is `W x + m * (alpha/dim) * sqrt(dim/(b+unit)) * up(down(x))`
over all ranks (sd-scripts' formula). The ranks are held as `unit`-sized parameter chunks (`lora_A.i`,
`lora_B.i`) and the chunks not drawn enter the forward detached, so their gradients stay None and the optimizer
leaves them alone that step, exactly as sd-scripts' per-rank `requires_grad` switching does, without touching
parameter flags in the forward. In eval mode (sampling, inference) the full rank runs at scale alpha/dim.

The file is an ordinary kohya LoRA (`lora_down.weight`, `lora_up.weight`, `alpha`): its first k*unit ranks are a
rank-k LoRA. Targets are networks.lora's; `conv_dim` (must equal network_dim, as sd-scripts) adds the conv
layers. Keys: `conv_dim`, `conv_alpha` (accepted as sd-scripts does; conv layers use network_alpha), `unit`,
`loraplus_*`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.errors import ConfigError
from networks import lora
from networks.lora_modules import LoRAModule

BUILDS_ON_META_DEVICE = True
CUDA_GRAPHS = "each forward draws its rank on the host (python random), a graph would replay one"
NETWORK_ARGS = ("conv_dim", "conv_alpha", "unit", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                "loraplus_text_encoder_lr_ratio", "verbose")


class DyLoRAModule(LoRAModule):
    """One DyLoRA adapter; the hook/merge machinery is LoRAModule's, the weights are rank chunks."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, unit: int = 1, **_: Any) -> None:
        nn.Module.__init__(self)
        if lora_dim % unit:
            raise ConfigError(f"--network_args unit={unit}: network_dim {lora_dim} must be a multiple of it")
        self.lora_name, self.lora_dim, self.unit = lora_name, lora_dim, unit
        self.is_conv = isinstance(org_module, nn.Conv2d)
        weight = org_module.weight
        out_dim, in_dim, *kernel = weight.shape
        self.stride = org_module.stride if self.is_conv else None
        self.padding = org_module.padding if self.is_conv else None
        self.dilation = org_module.dilation if self.is_conv else None
        chunks = lora_dim // unit
        self.lora_A = nn.ParameterList(weight.new_empty((unit, in_dim, *kernel), dtype=torch.float32)
                                       for _ in range(chunks))
        self.lora_B = nn.ParameterList(weight.new_zeros((out_dim, unit, *([1] * len(kernel))), dtype=torch.float32)
                                       for _ in range(chunks))
        for rank in range(lora_dim):  # kaiming-uniform per rank row, as sd-scripts initialises its rank vectors
            chunk = self.lora_A[rank // unit]
            nn.init.kaiming_uniform_(chunk.data[rank % unit : rank % unit + 1], a=math.sqrt(5))
        alpha = float(lora_dim) if not alpha else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim
        self._init_hook_state(org_module, multiplier)
        self.register_state_dict_post_hook(self._as_lora_keys)

    def down_up(self, trainable: int | None = None) -> tuple[Tensor, Tensor]:
        """(down, up) over all ranks; chunks other than `trainable` detached (None: all live)."""
        def pick(chunks: nn.ParameterList, dim: int) -> Tensor:
            parts = [c if trainable is None or i == trainable else c.detach() for i, c in enumerate(chunks)]
            return torch.cat(parts, dim=dim)

        return pick(self.lora_A, 0), pick(self.lora_B, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.org_forward(x)
        scale = self.multiplier * self.scale
        if self.training:
            b = random.randint(0, self.lora_dim - 1)
            b -= b % self.unit
            down, up = self.down_up(b // self.unit)
            scale *= math.sqrt(self.lora_dim / (b + self.unit))
        else:
            down, up = self.down_up()
        xd = x.to(down.dtype)
        if self.is_conv:
            lx = F.conv2d(F.conv2d(xd, down, None, self.stride, self.padding, self.dilation), up)
        else:
            lx = F.linear(F.linear(xd, down), up)
        return out + (lx * scale).to(out.dtype)

    def delta_weight(self) -> Tensor:
        down, up = (t.detach().float() for t in self.down_up())
        delta = (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
        return delta * (self.multiplier * self.scale)

    @staticmethod
    def _as_lora_keys(module: DyLoRAModule, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """state_dict post-hook: the rank chunks leave the dict as one `lora_down.weight` / `lora_up.weight`."""
        for key in [k for k in state_dict if k.startswith((prefix + "lora_A.", prefix + "lora_B."))]:
            del state_dict[key]
        down, up = module.down_up()
        state_dict[prefix + "lora_down.weight"] = down.detach()
        state_dict[prefix + "lora_up.weight"] = up.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        down = state_dict.pop(prefix + "lora_down.weight", None)
        up = state_dict.pop(prefix + "lora_up.weight", None)
        if down is not None and up is not None:
            for i in range(len(self.lora_A)):
                state_dict[f"{prefix}lora_A.{i}"] = down[i * self.unit : (i + 1) * self.unit]
                state_dict[f"{prefix}lora_B.{i}"] = up[:, i * self.unit : (i + 1) * self.unit]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{self.lora_name}, dim={self.lora_dim}, unit={self.unit}, scale={self.scale:g}"


def _check(kwargs: dict[str, Any], neuron_dropout: float | None) -> tuple[dict[str, Any], int]:
    if neuron_dropout:
        raise ConfigError("--network_dropout: networks.dylora has no dropout (sd-scripts' DyLoRA neither)")
    kw = dict(kwargs)
    unit = lora._arg(kw, "unit", int, 1) or 1
    return lora.check_network_args(kw, None, "networks.dylora", NETWORK_ARGS), unit


def check_network_args(kwargs: dict[str, Any], neuron_dropout: float | None) -> dict[str, Any]:
    return _check(kwargs, neuron_dropout)[0]


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: nn.Module | Sequence[nn.Module] | None, unet: nn.Module | None,
                   neuron_dropout: float | None = None, **kwargs: Any) -> lora.LoRANetwork:
    """sd-scripts entry point: DyLoRA on networks.lora's targets (conv layers too with conv_dim)."""
    kw, unit = _check(kwargs, neuron_dropout)
    dim = 4 if network_dim is None else int(network_dim)
    if kw["conv_dim"] is not None:
        if kw["conv_dim"] != dim:
            raise ConfigError(f"--network_args conv_dim={kw['conv_dim']}: networks.dylora needs conv_dim = "
                              f"network_dim ({dim}), as sd-scripts")
        kw["conv_alpha"] = 1.0 if network_alpha is None else network_alpha
    return lora.network_from_args(multiplier, network_dim, network_alpha, text_encoder, unet, kw,
                                  module_class=DyLoRAModule, module_kwargs={"unit": unit})


def create_network_from_weights(multiplier: float, file: Any, vae: Any, text_encoder: Any, unet: Any,
                                weights_sd: Any = None, for_inference: bool = False, **kwargs: Any):
    """A DyLoRA shaped like the file (unit from `--network_args`, 1 by default)."""
    kw, unit = _check(kwargs, None)
    return lora.network_from_weights(multiplier, file, text_encoder, unet, weights_sd, kw,
                                     module_class=DyLoRAModule, module_kwargs={"unit": unit})
