"""`--network_module networks.lora_fa`: LoRA-FA (Zhang et al. 2023), LoRA with a frozen random `lora_down`.

As sd-scripts: `lora_down` starts from N(0, 2/(in+dim)) and never trains, `lora_up` starts at zero and is the
only trained tensor, so the optimizer holds state for half the parameters. Targets, `--network_args` (block-wise
ones included) and the file are networks.lora's: the file is an ordinary kohya LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from networks import lora
from networks.lora_modules import LoRAModule

BUILDS_ON_META_DEVICE = True
CUDA_GRAPHS = True  # networks.lora's forward


class LoRAFAModule(LoRAModule):
    """A LoRAModule whose down projection is a fixed random matrix."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        down = self.lora_down.weight  # (dim, in_features) or (dim, in_channels, kh, kw)
        nn.init.normal_(down, std=math.sqrt(2.0 / (down.shape[1] + self.lora_dim)))
        self.requires_grad_(True)

    def requires_grad_(self, requires_grad: bool = True) -> LoRAFAModule:
        self.lora_up.requires_grad_(requires_grad)
        self.lora_down.requires_grad_(False)
        return self


def check_network_args(kwargs: dict[str, Any], neuron_dropout: float | None) -> dict[str, Any]:
    return lora.check_network_args(kwargs, neuron_dropout, "networks.lora_fa")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: nn.Module | Sequence[nn.Module] | None, unet: nn.Module | None,
                   neuron_dropout: float | None = None, **kwargs: Any) -> lora.LoRANetwork:
    kw = check_network_args(kwargs, neuron_dropout)
    return lora.network_from_args(multiplier, network_dim, network_alpha, text_encoder, unet, kw,
                                  module_class=LoRAFAModule)


def create_network_from_weights(multiplier: float, file: Any, vae: Any, text_encoder: Any, unet: Any,
                                weights_sd: Any = None, for_inference: bool = False, **kwargs: Any):
    kw = check_network_args(kwargs, None)
    return lora.network_from_weights(multiplier, file, text_encoder, unet, weights_sd, kw,
                                     module_class=LoRAFAModule)
