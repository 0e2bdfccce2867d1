"""LoRA network with sd-scripts' network-module interface and kohya's file format.

`train_network.py --network_module networks.lora` calls `create_network(...)`, `network.apply_to(...)`,
`network.prepare_optimizer_params(...)` and `network.save_weights(...)` exactly as sd-scripts does, and the
saved `.safetensors` uses kohya's key names (`lora_unet_<diffusers module path with _>`, `lora_te_...`,
`lora_te1_`/`lora_te2_` with two text encoders) so diffusers' `load_lora_weights`, ComfyUI and A1111 read it.
Targets are kohya's: every Linear / 1x1 Conv2d inside the UNet's `Transformer2DModel`s and the text encoders'
CLIP attention and MLP blocks; with `conv_dim` also every layer of `ResnetBlock2D`/`Downsample2D`/`Upsample2D`
(3x3 convs at conv_dim/conv_alpha, the others at network_dim/network_alpha). Block-wise ranks and learning
rates (`block_dims`, `down_lr_weight`, ...) follow `networks.blocks`. SDXL U-Net modules are saved under
sd-scripts' SAI names and read in either naming, diffusers/PEFT files too (`networks.files`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from library.errors import ConfigError, ModelError
from networks import blocks
from networks.files import (
    check_modules,
    is_sdxl_unet,
    module_names,
    read_lora_file,
    save_network,
    to_network_keys,
    untrained_prefixes,
)
from networks.lora_modules import LoRAModule

logger = logging.getLogger(__name__)

UNET_TARGET_MODULES = ("Transformer2DModel",)
UNET_CONV_TARGET_MODULES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_MODULES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
LORA_PREFIX_UNET = "lora_unet"
BUILDS_ON_META_DEVICE = True  # create_network reads no weight: the trainer may count parameters from configs
CUDA_GRAPHS = True  # its forward makes no host decision: --cuda_graphs can record it
LORA_PREFIX_TEXT_ENCODER = "lora_te"

NETWORK_ARGS = (
    "conv_dim",
    "conv_alpha",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
    "verbose",
    *blocks.BLOCK_ARGS,
)


def _target_layers(
    root: nn.Module, prefix: str, target_classes: Sequence[str]
) -> Iterator[tuple[str, nn.Module]]:
    """(kohya name, layer) for every Linear/Conv2d inside a module whose class name is in `target_classes`."""
    for name, module in root.named_modules():
        if type(module).__name__ not in target_classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                yield f"{prefix}.{name}.{child_name}".replace(".", "_"), child


def _is_conv3x3(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def _text_encoder_list(text_encoder: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [text_encoder]
    return [te for te in text_encoder if te is not None]


class LoRANetwork(nn.Module):
    """All adapters of one LoRA, registered under their kohya names so `state_dict()` is the file's content."""

    accepts_text_encoder_lr_list = True  # prepare_optimizer_params takes one lr per text encoder (SDXL)

    def __init__(
        self,
        text_encoder: nn.Module | Sequence[nn.Module] | None,
        unet: nn.Module | None,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float] | None = None,
        block_dims: Sequence[int] | None = None,
        block_alphas: Sequence[float] | None = None,
        conv_block_dims: Sequence[int] | None = None,
        conv_block_alphas: Sequence[float] | None = None,
        block_lr_weight: Sequence[float] | None = None,
        module_class: type[LoRAModule] = LoRAModule,
        module_kwargs: Mapping[str, Any] | None = None,
        loraplus_lr_ratio: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        self.multiplier = float(multiplier)
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim or None
        self.conv_alpha = conv_alpha
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        self.sdxl = is_sdxl_unet(unet)
        self.block_lr_weight = list(block_lr_weight) if block_lr_weight is not None else None
        dropouts = {"dropout": dropout, "rank_dropout": rank_dropout, "module_dropout": module_dropout}
        dropouts.update(module_kwargs or {})

        def build(prefix: str, root: nn.Module, targets: Sequence[str]) -> list[LoRAModule]:
            loras = []
            for name, layer in _target_layers(root, prefix, targets):
                if modules_dim is not None:
                    if name not in modules_dim:
                        continue
                    dim = modules_dim[name]
                    dim_alpha = (modules_alpha or {}).get(name, dim)
                elif prefix == LORA_PREFIX_UNET and block_dims is not None:
                    idx = blocks.block_index(name, self.sdxl)
                    if not _is_conv3x3(layer):
                        dim, dim_alpha = block_dims[idx], (block_alphas or block_dims)[idx]
                    elif conv_block_dims is not None:
                        dim, dim_alpha = conv_block_dims[idx], (conv_block_alphas or conv_block_dims)[idx]
                    else:
                        continue
                    if not dim:
                        continue
                elif not _is_conv3x3(layer):
                    dim, dim_alpha = lora_dim, alpha
                elif self.conv_lora_dim is not None:
                    dim, dim_alpha = self.conv_lora_dim, conv_alpha
                else:
                    continue
                if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                    logger.warning("LoRA: skipping grouped convolution %s", name)
                    continue
                loras.append(module_class(name, layer, self.multiplier, dim, dim_alpha, **dropouts))
            return loras

        text_encoders = _text_encoder_list(text_encoder)
        self.text_encoder_loras: list[LoRAModule] = []
        for i, te in enumerate(text_encoders):
            prefix = (
                LORA_PREFIX_TEXT_ENCODER if len(text_encoders) == 1 else f"{LORA_PREFIX_TEXT_ENCODER}{i + 1}"
            )
            # kohya names follow transformers 4's CLIPTextModel, whose layers live under `.text_model`;
            # transformers 5 flattened CLIPTextModel, so name from the inner text model, whichever it is
            core = getattr(te, "text_model", te)
            self.text_encoder_loras += build(f"{prefix}.text_model", core, TEXT_ENCODER_TARGET_MODULES)
        unet_targets = UNET_TARGET_MODULES
        if modules_dim is not None or self.conv_lora_dim is not None or conv_block_dims is not None:
            unet_targets = UNET_TARGET_MODULES + UNET_CONV_TARGET_MODULES
        self.unet_loras: list[LoRAModule] = (
            build(LORA_PREFIX_UNET, unet, unet_targets) if unet is not None else []
        )

        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in self._modules:
                raise ModelError(f"LoRA: duplicate module name {lora.lora_name}")
            self.add_module(lora.lora_name, lora)
        if verbose:
            for lora in self.text_encoder_loras + self.unet_loras:
                logger.info("  %s", lora.extra_repr())

    # --- sd-scripts network-module interface -------------------------------------------------------------

    def apply_to(
        self,
        text_encoder: Any = None,
        unet: Any = None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Hook the adapters in; adapters of a part not trained are dropped from the network (as in kohya)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
        # here, not when built: a network built only to count parameters says nothing, and a part not trained
        # is not counted
        logger.info("LoRA: %d text encoder modules, %d U-Net modules", len(self.text_encoder_loras),
                    len(self.unet_loras))

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.remove()
            del self._modules[lora.lora_name]

    def remove_from(self) -> None:
        """Unhook every adapter; the base model runs as if the network never existed."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = self.multiplier

    def is_mergeable(self) -> bool:
        return True

    def merge_to(
        self,
        text_encoder: Any = None,
        unet: Any = None,
        weights_sd: Mapping[str, Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Add the adapters into the base weights (after loading `weights_sd` if given) and unhook them.

        sd-scripts' signature; the model arguments, dtype and device are not needed (each adapter knows its
        layer, and the update is formed in float32 on the layer's device).
        """
        if weights_sd is not None:
            self._load_state_dict_checked(dict(weights_sd), "weights_sd", strict=False)
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.merge()

    def unmerge(self) -> None:
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.unmerge()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the adapters run inside the base model's checkpointed blocks."""

    def requires_grad_(self, requires_grad: bool = True) -> LoRANetwork:
        """Each adapter decides which of its tensors train (LoRA-FA keeps lora_down frozen)."""
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.requires_grad_(requires_grad)
        return self

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def get_trainable_params(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def lora_params_named(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(kohya key, parameter), e.g. `lora_unet_..._to_q.lora_down.weight`: the names optimizers see."""
        return self.named_parameters()

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None,
    ) -> list[dict[str, Any]]:
        """Param groups `{"params", "names", "lr", "description"}`; LoRA+ puts `lora_up` (DyLoRA's `lora_B`) in
        its own group; frozen tensors (LoRA-FA's lora_down) stay out.

        A part whose lr is None falls back to `default_lr`; a group whose lr ends up 0 or None is left out
        (that part is frozen), as in sd-scripts. `text_encoder_lr` may be a list, one lr per text encoder.
        """
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []

        def add(loras: list[LoRAModule], lr: float | None, ratio: float | None, description: str) -> None:
            split: dict[str, tuple[list[str], list[nn.Parameter]]] = {"": ([], []), " plus": ([], [])}
            for lora in loras:
                for pname, param in lora.named_parameters():
                    if not param.requires_grad:
                        continue
                    key = " plus" if ratio is not None and pname.startswith(("lora_up", "lora_B")) else ""
                    split[key][0].append(f"{lora.lora_name}.{pname}")
                    split[key][1].append(param)
            for key, (names, params) in split.items():
                if not params:
                    continue
                group_lr = lr * ratio if (key and lr is not None) else lr
                if not group_lr:
                    logger.info("LoRA: %s%s has lr %s, not trained", description, key, group_lr)
                    continue
                groups.append(
                    {"params": params, "names": names, "lr": group_lr, "description": description + key}
                )

        if self.text_encoder_loras:
            ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
            by_te: dict[str, list[LoRAModule]] = {}
            per_encoder = isinstance(text_encoder_lr, Sequence) and len(text_encoder_lr) > 1
            for lora in self.text_encoder_loras:
                # one "textencoder" group as sd-scripts, unless each encoder has its own lr
                by_te.setdefault(lora.lora_name.split("_")[1] if per_encoder else "te", []).append(lora)
            for i, (te, loras) in enumerate(by_te.items()):
                lr = text_encoder_lr
                if isinstance(lr, Sequence):
                    lr = lr[min(i, len(lr) - 1)] if lr else None
                add(
                    loras,
                    default_lr if lr is None else lr,
                    ratio,
                    "textencoder" if te == "te" else f"textencoder{te[2:]}",
                )
        if self.unet_loras:
            ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
            lr = default_lr if unet_lr is None else unet_lr
            if self.block_lr_weight is None:
                add(self.unet_loras, lr, ratio, "unet")
            else:  # one group per block, lr times the block's weight (as sd-scripts)
                by_block: dict[int, list[LoRAModule]] = {}
                for lora in self.unet_loras:
                    by_block.setdefault(blocks.block_index(lora.lora_name, self.sdxl), []).append(lora)
                for idx, loras in by_block.items():
                    weight = self.block_lr_weight[idx] if 0 <= idx < len(self.block_lr_weight) else 1.0
                    add(loras, None if lr is None else lr * weight, ratio, f"unet_block{idx}")
        return groups

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: Any = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Scale down adapters whose ||scale * up @ down||_F exceeds `max_norm_value` (--scale_weight_norms).

        Returns (number scaled, mean norm, max norm) as tensors: the caller reads them only on logging steps.
        ||U D||_F^2 = sum((U^T U) * (D D^T)) costs dim x dim per adapter, no dense weight is formed.
        """
        loras = self.text_encoder_loras + self.unet_loras
        norms = []
        for lora in loras:
            up = lora.lora_up.weight.flatten(1).float()
            down = lora.lora_down.weight.flatten(1).float()
            norms.append(((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt() * abs(lora.scale))
        norm = torch.stack(norms)
        clamped = norm.clamp(min=max_norm_value / 2)
        ratio = clamped.clamp(max=max_norm_value) / clamped
        sqrt_ratio = ratio.sqrt()
        for i, lora in enumerate(loras):
            lora.lora_up.weight.mul_(sqrt_ratio[i].to(lora.lora_up.weight.dtype))
            lora.lora_down.weight.mul_(sqrt_ratio[i].to(lora.lora_down.weight.dtype))
        scaled = norm * ratio
        return (ratio != 1).sum(), scaled.mean(), scaled.max()

    # --- files -------------------------------------------------------------------------------------------

    def save_weights(
        self,
        file: str | os.PathLike,
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the kohya-format file atomically (SDXL U-Net keys under sd-scripts' SAI names)."""
        save_network(self, file, dtype, metadata)

    def load_weights(self, file: str | os.PathLike, strict: bool = False) -> Any:
        """Load a LoRA file in any naming `networks.files` reads; returns torch's (missing_keys, unexpected_keys).

        Raises ModelError on a shape mismatch, when a module of the file is not in the network (parts this
        run does not train excepted) or (strict=True) on any mismatch.
        """
        return self._load_state_dict_checked(read_lora_file(file), str(file), strict)

    def _load_state_dict_checked(self, state_dict: dict[str, Tensor], source: str, strict: bool) -> Any:
        state_dict = to_network_keys(state_dict, self.sdxl)
        own = self.state_dict()
        for key, value in state_dict.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise ModelError(
                    f"{source}: {key} has shape {tuple(value.shape)}, this network expects {tuple(own[key].shape)} "
                    "(different network_dim/conv_dim?)"
                )
        check_modules(module_names(state_dict), module_names(own), source, untrained_prefixes(self))
        missing = sorted(own.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - own.keys())
        if strict and (missing or unexpected):
            raise ModelError(
                f"{source}: keys do not match the network: missing {_few(missing)}, unexpected {_few(unexpected)}"
            )
        info = self.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
        for lora in self.text_encoder_loras + self.unet_loras:
            if f"{lora.lora_name}.alpha" in state_dict:
                lora.set_alpha_from_buffer()
        if missing:
            logger.info("LoRA %s: %d network keys not in the file start fresh", source, len(missing))
        return info


def _few(keys: Sequence[str], n: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# --- network_args parsing ---------------------------------------------------------------------------------


def _arg(
    kwargs: dict[str, Any],
    key: str,
    kind: type,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
) -> Any:
    """Pop `--network_args key=value` (already literal-evaluated or still a string) and validate it."""
    value = kwargs.pop(key, None)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            number = int(number)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--network_args {key}={value!r}: expected {'an integer' if kind is int else 'a number'}"
        ) from None
    if (low is not None and number < low) or (
        high is not None and (number >= high if high_open else number > high)
    ):
        valid = (
            f"{low} <= {key} {'<' if high_open else '<='} {high}" if high is not None else f"{key} >= {low}"
        )
        raise ConfigError(f"--network_args {key}={value!r}: out of range, valid is {valid}")
    return number


def check_network_args(
    kwargs: Mapping[str, Any],
    neuron_dropout: float | None,
    module: str = "networks.lora",
    valid: Sequence[str] = NETWORK_ARGS,
) -> dict[str, Any]:
    """Validate --network_args and return LoRANetwork kwargs (create_network*, and the trainer's early checks).

    Block-wise keys come back raw under "block_args" (syntax checked here; their lengths depend on the model,
    `blocks.block_lr_weights` / `blocks.block_dims_and_alphas` check those).
    """
    kw = dict(kwargs)
    unknown = sorted(kw.keys() - set(valid))
    if unknown:
        raise ConfigError(f"--network_args {unknown[0]}: unknown for {module}; valid keys: {', '.join(valid)}")
    block_args = {k: kw.pop(k) for k in blocks.BLOCK_ARGS if kw.get(k) is not None}
    blocks.check_syntax(block_args)
    verbose = str(kw.pop("verbose", False)).strip().lower() in ("true", "1", "yes")
    out = {
        "dropout": _arg({"network_dropout": neuron_dropout}, "network_dropout", float, 0, 1, high_open=True),
        "rank_dropout": _arg(kw, "rank_dropout", float, 0, 1, high_open=True),
        "module_dropout": _arg(kw, "module_dropout", float, 0, 1, high_open=True),
        "verbose": verbose,
    }
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        ratio = _arg(kw, key, float, 0)
        if ratio == 0:
            raise ConfigError(f"--network_args {key}=0: the LoRA+ ratio must be > 0")
        out[key] = ratio
    out["conv_dim"] = _arg(kw, "conv_dim", int, 0)
    out["conv_alpha"] = _arg(kw, "conv_alpha", float, 0)
    out["block_args"] = block_args
    return out


def network_from_args(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    kw: dict[str, Any],
    **extra: Any,
) -> LoRANetwork:
    """A LoRANetwork from checked args (`check_network_args`), block-wise settings resolved for this U-Net."""
    dim = 4 if network_dim is None else _arg({"network_dim": network_dim}, "network_dim", int, 1)
    if dim is None:
        raise ConfigError(f"--network_dim {network_dim!r}: expected an integer >= 1")
    alpha = (
        1.0 if network_alpha is None else _arg({"network_alpha": network_alpha}, "network_alpha", float, 0)
    )
    conv_dim, conv_alpha = kw.pop("conv_dim"), kw.pop("conv_alpha")
    if conv_dim and conv_alpha is None:
        conv_alpha = 1.0
    block_args = kw.pop("block_args")
    sdxl = is_sdxl_unet(unet)
    lr_weights = blocks.block_lr_weights(block_args, sdxl)
    if lr_weights is not None or block_args.get("block_dims") is not None:
        b_dims, b_alphas, c_dims, c_alphas = blocks.block_dims_and_alphas(
            block_args, sdxl, dim, alpha, conv_dim or None, conv_alpha, lr_weights
        )
        extra.update(block_dims=b_dims, block_alphas=b_alphas, conv_block_dims=c_dims, conv_block_alphas=c_alphas)
    elif set(block_args) - {"block_lr_zero_threshold"}:
        raise ConfigError(
            f"--network_args {sorted(block_args)[0]}: needs block_dims or a *_lr_weight to take effect (as sd-scripts)"
        )
    return LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=dim,
        alpha=alpha,
        conv_lora_dim=conv_dim or None,
        conv_alpha=conv_alpha,
        block_lr_weight=lr_weights,
        **kw,
        **extra,
    )


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """sd-scripts entry point: a fresh LoRA (down kaiming-uniform, up zeros) on kohya's target layers."""
    kw = check_network_args(kwargs, neuron_dropout)
    return network_from_args(multiplier, network_dim, network_alpha, text_encoder, unet, kw)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: Any,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, Tensor]]:
    """sd-scripts entry point: a network shaped like a LoRA file (per-module dim/alpha, conv layers included).

    Returns `(network, weights_sd)` as sd-scripts does; the weights are not loaded yet (`load_weights` or
    `load_state_dict(weights_sd)` does that). Dropout and LoRA+ settings still come from `kwargs`;
    `for_inference` is accepted for sd-scripts callers and changes nothing (the modules are the same).
    """
    kw = check_network_args(kwargs, None)
    return network_from_weights(multiplier, file, text_encoder, unet, weights_sd, kw)


def network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, Tensor] | None,
    kw: dict[str, Any],
    **extra: Any,
) -> tuple[LoRANetwork, dict[str, Tensor]]:
    """`create_network_from_weights` for every LoRA-shaped module (LoRA, LoRA-FA, DyLoRA): the file's names
    (any naming `networks.files` reads) and per-module ranks; every module of the file must exist here."""
    if weights_sd is None:
        if file is None:
            raise ModelError("create_network_from_weights: neither a file nor weights_sd was given")
        weights_sd = read_lora_file(file)
    source = str(file) if file is not None else "weights_sd"
    weights_sd = to_network_keys(weights_sd, is_sdxl_unet(unet))
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        if rest == "alpha":
            modules_alpha[name] = float(value)
        elif rest == "lora_down.weight":
            modules_dim[name] = int(value.shape[0])
    if not modules_dim:
        raise ModelError(f"{source}: no '<name>.lora_down.weight' keys, not a kohya-format LoRA")
    for key in ("conv_dim", "conv_alpha", "block_args"):
        kw.pop(key, None)
    network = LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
        **kw,
        **extra,
    )
    found = {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras}
    check_modules(set(modules_dim), found, source)
    network.lora_dim, network.alpha = most_common_dim_alpha(modules_dim, modules_alpha)
    return network, dict(weights_sd)


def most_common_dim_alpha(modules_dim: Mapping[str, int], modules_alpha: Mapping[str, float]) -> tuple[int, float]:
    """The (dim, alpha) most modules of a file have: what its ss_network_dim/alpha would say."""
    pairs = Counter((dim, modules_alpha.get(name, float(dim))) for name, dim in modules_dim.items())
    return pairs.most_common(1)[0][0]
