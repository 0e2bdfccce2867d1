"""LoRA network with sd-scripts' network-module interface and kohya's file format.

`train_network.py --network_module networks.lora` calls `create_network(...)`, `network.apply_to(...)`,
`network.prepare_optimizer_params(...)` and `network.save_weights(...)` exactly as sd-scripts does, and the
saved `.safetensors` uses kohya's key names (`lora_unet_<diffusers module path with _>`, `lora_te_...`,
`lora_te1_`/`lora_te2_` with two text encoders) so diffusers' `load_lora_weights`, ComfyUI and A1111 read it.
Targets are kohya's: every Linear / 1x1 Conv2d inside the UNet's `Transformer2DModel`s and the text encoders'
CLIP attention and MLP blocks; with `conv_dim` also every layer of `ResnetBlock2D`/`Downsample2D`/`Upsample2D`
(3x3 convs at conv_dim/conv_alpha, the others at network_dim/network_alpha).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from library.errors import ConfigError, ModelError
from networks.lora_modules import LoRAModule

logger = logging.getLogger(__name__)

UNET_TARGET_MODULES = ("Transformer2DModel",)
UNET_CONV_TARGET_MODULES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_MODULES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
LORA_PREFIX_UNET = "lora_unet"
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
        dropouts = {"dropout": dropout, "rank_dropout": rank_dropout, "module_dropout": module_dropout}

        def build(prefix: str, root: nn.Module, targets: Sequence[str]) -> list[LoRAModule]:
            loras = []
            for name, layer in _target_layers(root, prefix, targets):
                if modules_dim is not None:
                    if name not in modules_dim:
                        continue
                    dim = modules_dim[name]
                    dim_alpha = (modules_alpha or {}).get(name, dim)
                elif not _is_conv3x3(layer):
                    dim, dim_alpha = lora_dim, alpha
                elif self.conv_lora_dim is not None:
                    dim, dim_alpha = self.conv_lora_dim, conv_alpha
                else:
                    continue
                if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                    logger.warning("LoRA: skipping grouped convolution %s", name)
                    continue
                loras.append(LoRAModule(name, layer, self.multiplier, dim, dim_alpha, **dropouts))
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
        if modules_dim is not None or self.conv_lora_dim is not None:
            unet_targets = UNET_TARGET_MODULES + UNET_CONV_TARGET_MODULES
        self.unet_loras: list[LoRAModule] = (
            build(LORA_PREFIX_UNET, unet, unet_targets) if unet is not None else []
        )

        for lora in self.text_encoder_loras + self.unet_loras:
            if lora.lora_name in self._modules:
                raise ModelError(f"LoRA: duplicate module name {lora.lora_name}")
            self.add_module(lora.lora_name, lora)
        logger.info(
            "LoRA: %d text encoder modules, %d U-Net modules",
            len(self.text_encoder_loras),
            len(self.unet_loras),
        )
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

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def get_trainable_params(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def lora_params_named(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(kohya key, parameter), e.g. `lora_unet_..._to_q.lora_down.weight`: the names optimizers see."""
        return self.named_parameters()

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None,
    ) -> list[dict[str, Any]]:
        """Param groups `{"params", "names", "lr", "description"}`; LoRA+ puts `lora_up` in its own group.

        A part whose lr is None falls back to `default_lr`; a group whose lr ends up 0 or None is left out
        (that part is frozen), as in sd-scripts. `text_encoder_lr` may be a list, one lr per text encoder.
        """
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []

        def add(loras: list[LoRAModule], lr: float | None, ratio: float | None, description: str) -> None:
            split: dict[str, tuple[list[str], list[nn.Parameter]]] = {"": ([], []), " plus": ([], [])}
            for lora in loras:
                for pname, param in lora.named_parameters():
                    key = " plus" if ratio is not None and pname.startswith("lora_up") else ""
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
            add(self.unet_loras, default_lr if unet_lr is None else unet_lr, ratio, "unet")
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
        """Write the kohya-format file atomically; `.safetensors` gets the metadata and the sshs_* hashes."""
        state_dict = {
            k: v.detach().to(device="cpu", dtype=dtype if dtype is not None else v.dtype).contiguous()
            for k, v in self.state_dict().items()
        }
        path = Path(file)
        tmp = path.with_name(path.name + ".tmp")
        if path.suffix == ".safetensors":
            meta = {str(k): str(v) for k, v in (metadata or {}).items()}
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(state_dict, meta)
            safetensors.torch.save_file(state_dict, str(tmp), meta)
        else:
            torch.save(state_dict, tmp)
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_weights(self, file: str | os.PathLike, strict: bool = False) -> Any:
        """Load a kohya-format file; returns torch's (missing_keys, unexpected_keys).

        Raises ModelError on a shape mismatch, when no key matches at all, or (strict=True) on any mismatch.
        """
        return self._load_state_dict_checked(read_lora_file(file), str(file), strict)

    def _load_state_dict_checked(self, state_dict: dict[str, Tensor], source: str, strict: bool) -> Any:
        own = self.state_dict()
        for key, value in state_dict.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise ModelError(
                    f"{source}: {key} has shape {tuple(value.shape)}, this network expects {tuple(own[key].shape)} "
                    "(different network_dim/conv_dim?)"
                )
        missing = sorted(own.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - own.keys())
        if own and state_dict and len(unexpected) == len(state_dict):
            raise ModelError(
                f"{source}: none of its {len(state_dict)} keys (e.g. {unexpected[0]}) belong to this network "
                f"(e.g. {next(iter(own))}); is it a LoRA for this model type?"
            )
        if strict and (missing or unexpected):
            raise ModelError(
                f"{source}: keys do not match the network: missing {_few(missing)}, unexpected {_few(unexpected)}"
            )
        info = self.load_state_dict(state_dict, strict=False)
        for lora in self.text_encoder_loras + self.unet_loras:
            if f"{lora.lora_name}.alpha" in state_dict:
                lora.set_alpha_from_buffer()
        if missing or unexpected:
            logger.warning(
                "LoRA %s: %d missing keys, %d unexpected keys", source, len(missing), len(unexpected)
            )
        return info


def _few(keys: Sequence[str], n: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_lora_file(file: str | os.PathLike) -> dict[str, Tensor]:
    """State dict of a `.safetensors` or torch-pickled LoRA file (tensors only, no code execution)."""
    path = Path(file)
    if not path.is_file():
        raise ModelError(f"LoRA file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: one line naming the file
        raise ModelError(f"cannot read LoRA file {path}: {type(e).__name__}: {e}".splitlines()[0]) from e


def safetensors_hashes(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts precomputes them for A1111's additional-networks index.

    The model hash is the sha256 of the tensor data (everything after the header); the legacy hash is the
    first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB. Only `ss_*` metadata enters the bytes
    hashed, so user metadata does not change the hash.
    """
    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(state_dict), ss_meta)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


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


def check_network_args(kwargs: Mapping[str, Any], neuron_dropout: float | None) -> dict[str, Any]:
    """Validate --network_args and return LoRANetwork kwargs (create_network*, and the trainer's early checks)."""
    kw = dict(kwargs)
    unknown = sorted(kw.keys() - set(NETWORK_ARGS))
    if unknown:
        raise ConfigError(
            f"--network_args {unknown[0]}: unknown for networks.lora; valid keys: {', '.join(NETWORK_ARGS)}"
        )
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
    return out


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
    dim = 4 if network_dim is None else _arg({"network_dim": network_dim}, "network_dim", int, 1)
    if dim is None:
        raise ConfigError(f"--network_dim {network_dim!r}: expected an integer >= 1")
    alpha = (
        1.0 if network_alpha is None else _arg({"network_alpha": network_alpha}, "network_alpha", float, 0)
    )
    kw = check_network_args(kwargs, neuron_dropout)
    conv_dim, conv_alpha = kw.pop("conv_dim"), kw.pop("conv_alpha")
    if conv_dim and conv_alpha is None:
        conv_alpha = 1.0
    return LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=dim,
        alpha=alpha,
        conv_lora_dim=conv_dim or None,
        conv_alpha=conv_alpha,
        **kw,
    )


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
    if weights_sd is None:
        if file is None:
            raise ModelError("create_network_from_weights: neither a file nor weights_sd was given")
        weights_sd = read_lora_file(file)
    source = str(file) if file is not None else "weights_sd"
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
    kw = check_network_args(kwargs, None)
    kw.pop("conv_dim"), kw.pop("conv_alpha")
    network = LoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
        **kw,
    )
    found = {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras}
    unmatched = sorted(modules_dim.keys() - found)
    if not found:
        raise ModelError(
            f"{source}: none of its {len(modules_dim)} modules (e.g. {unmatched[0]}) exist in this model"
        )
    if unmatched:
        logger.warning("LoRA %s: %d modules not in this model: %s", source, len(unmatched), _few(unmatched))
    return network, dict(weights_sd)
