"""`--network_module networks.oft`: Orthogonal Finetuning (Qiu et al. 2023) as sd-scripts trains it.

Each target layer's output rows are cut into `network_dim` blocks of size n = out/network_dim; block k gets an
orthogonal R_k = (I + Q_k)(I - Q_k)^-1 from Q_k = B_k - B_k^T (Cayley), with ||Q||_F clamped to
`network_alpha * out` (sd-scripts' constraint; alpha defaults to 1e-3). The multiplier blends m (R - I) + I,
and the layer runs with W'_k = R_k^T W_k. `oft_blocks` (B) starts at zero, so a new network is the identity.

U-Net only, as sd-scripts: attention projections by default, every Linear/1x1 conv of the transformer blocks
with `enable_all_linear=True`, the ResNet/up/down-sampling convs too with `enable_conv=True`. Keys:
`oft_unet_<name>.oft_blocks` and `.alpha`; SDXL names are sd-scripts' SAI ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.errors import ConfigError, ModelError
from networks import lora
from networks.files import check_modules, is_sdxl_unet, read_lora_file, to_network_keys
from networks.lora_modules import LoRAModule

BUILDS_ON_META_DEVICE = True
CUDA_GRAPHS = "its per-step batched matrix solve has not been verified inside a recorded CUDA graph"
OFT_PREFIX_UNET = "oft_unet"
ATTENTION_TARGETS = ("Attention",)  # diffusers' name for sd-scripts' CrossAttention
ALL_LINEAR_TARGETS = ("Transformer2DModel",)
CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
NETWORK_ARGS = ("enable_all_linear", "enable_conv")


def oft_rotation(blocks: Tensor, constraint: float, multiplier: float) -> Tensor:
    """Per-block m (R - I) + I with R the Cayley transform of the norm-clamped skew part of `blocks`."""
    q = blocks - blocks.transpose(1, 2)
    norm = torch.linalg.vector_norm(q)
    q = q * ((norm.clamp(max=constraint) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    r = torch.linalg.solve_ex((eye - q).float(), (eye + q).float(), left=False)[0]  # (I + Q)(I - Q)^-1
    return multiplier * (r - eye) + eye


def rotate_weight(weight: Tensor, rotation: Tensor) -> Tensor:
    """W'_k = R_k^T W_k over the output-row blocks of W (Linear or Conv2d weight)."""
    k, n, _ = rotation.shape
    blocks = weight.reshape(k, n, -1)
    return torch.einsum("knm,knp->kmp", rotation, blocks).reshape(weight.shape)


class OFTModule(LoRAModule):
    """One OFT adapter; LoRAModule's hooking, OFT's weights and forward."""

    def __init__(self, oft_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1e-3, **_: Any) -> None:
        nn.Module.__init__(self)
        out_dim = org_module.weight.shape[0]
        if out_dim % lora_dim:
            raise ConfigError(f"--network_dim {lora_dim}: OFT needs it to divide every target layer's output size "
                              f"({oft_name} has {out_dim})")
        self.lora_name, self.lora_dim = oft_name, lora_dim
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self.block_size = out_dim // lora_dim
        alpha = float(alpha if alpha is not None else 1e-3)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.constraint = alpha * out_dim
        self.oft_blocks = nn.Parameter(torch.zeros(lora_dim, self.block_size, self.block_size))
        self.scale = 1.0
        self._init_hook_state(org_module, multiplier)

    def set_alpha_from_buffer(self) -> None:
        self.constraint = float(self.alpha) * self.org_module.weight.shape[0]

    def rotated_weight(self) -> Tensor:
        rotation = oft_rotation(self.oft_blocks, self.constraint, self.multiplier)
        return rotate_weight(self.org_module.weight.float(), rotation)

    def forward(self, x: Tensor) -> Tensor:
        if self.multiplier == 0.0:
            return self.org_forward(x)
        org = self.org_module
        weight = self.rotated_weight().to(x.dtype)
        if self.is_conv:
            return F.conv2d(x, weight, org.bias, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, weight, org.bias)

    def delta_weight(self) -> Tensor:
        with torch.no_grad():
            return self.rotated_weight() - self.org_module.weight.float()

    def extra_repr(self) -> str:
        return f"{self.lora_name}, blocks={self.lora_dim}x{self.block_size}, constraint={self.constraint:g}"


class OFTNetwork(lora.LoRANetwork):
    """OFT adapters on the U-Net; LoRANetwork's interface (apply, merge, files, optimizer groups)."""

    def __init__(self, unet: nn.Module, multiplier: float, dim: int, alpha: float, enable_all_linear: bool,
                 enable_conv: bool, modules: Sequence[str] | None = None) -> None:
        nn.Module.__init__(self)
        self.multiplier, self.lora_dim, self.alpha = float(multiplier), dim, alpha
        self.sdxl = is_sdxl_unet(unet)
        self.block_lr_weight = None
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        targets = (ALL_LINEAR_TARGETS if enable_all_linear else ATTENTION_TARGETS) + (CONV_TARGETS if enable_conv
                                                                                      else ())
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras = []
        seen = set()
        for name, layer in lora._target_layers(unet, OFT_PREFIX_UNET, targets):
            wanted = isinstance(layer, nn.Linear) or not lora._is_conv3x3(layer) or enable_conv
            if name in seen or not wanted or (modules is not None and name not in modules):
                continue
            seen.add(name)
            self.unet_loras.append(OFTModule(name, layer, self.multiplier, dim, alpha))
        for module in self.unet_loras:
            self.add_module(module.lora_name, module)


def _flag(kwargs: dict[str, Any], key: str) -> bool:
    value = kwargs.get(key)
    if value is None:
        return False
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"--network_args {key}={value!r}: expected True or False")
    return text in ("true", "1", "yes")


def check_network_args(kwargs: dict[str, Any], neuron_dropout: float | None) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(NETWORK_ARGS))
    if unknown:
        raise ConfigError(f"--network_args {unknown[0]}: unknown for networks.oft; valid keys: "
                          f"{', '.join(NETWORK_ARGS)}")
    if neuron_dropout:
        raise ConfigError("--network_dropout: networks.oft has no dropout (sd-scripts' OFT neither)")
    return {key: _flag(kwargs, key) for key in NETWORK_ARGS}


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any) -> OFTNetwork:
    """sd-scripts entry point: OFT with network_dim blocks per layer and constraint network_alpha (1e-3)."""
    kw = check_network_args(kwargs, neuron_dropout)
    if unet is None:
        raise ConfigError("--network_module networks.oft trains the U-Net only; it got no U-Net")
    dim = 4 if network_dim is None else int(network_dim)
    alpha = 1e-3 if network_alpha is None else float(network_alpha)
    return OFTNetwork(unet, multiplier, dim, alpha, kw["enable_all_linear"], kw["enable_conv"])


def create_network_from_weights(multiplier: float, file: Any, vae: Any, text_encoder: Any, unet: nn.Module,
                                weights_sd: Any = None, for_inference: bool = False, **kwargs: Any):
    """An OFT shaped like the file: its blocks, constraint, and which layers it covers."""
    source = str(file) if file is not None else "weights_sd"
    weights = to_network_keys(read_lora_file(file) if weights_sd is None else weights_sd, is_sdxl_unet(unet))
    names = {k.split(".", 1)[0] for k in weights if k.endswith(".oft_blocks")}
    if not names:
        raise ModelError(f"{source}: no '<name>.oft_blocks' keys, not an sd-scripts OFT file")
    first = sorted(names)[0]
    dim = int(weights[f"{first}.oft_blocks"].shape[0])
    alpha = float(weights.get(f"{first}.alpha", torch.tensor(1e-3)))
    network = OFTNetwork(unet, multiplier, dim, alpha, enable_all_linear=True, enable_conv=True, modules=names)
    check_modules(names, {m.lora_name for m in network.unet_loras}, source)
    return network, weights
