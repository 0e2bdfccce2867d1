"""`--network_module lycoris.kohya`: LyCORIS' own networks (lycoris-lora), made to work on our models.

The modules, their maths and their state-dict keys are LyCORIS' (`lycoris.kohya.create_network` builds them);
this wrapper only fixes what breaks between LyCORIS and a diffusers/transformers model and adds our network
interface:

- Duplicate modules. LyCORIS 4.1.3's presets list the class `TimestepEmbedding` (for Anima) as a target and
  also the names `time_embedding.linear_1/2`; a diffusers U-Net's `time_embedding` *is* a TimestepEmbedding,
  so both rules build `lora_unet_time_embedding_linear_1` and LyCORIS stops on its own
  `AssertionError: duplicated lora name` (sd-scripts' SD1/SD2 U-Net has the same class there and fails the
  same way). We add an `exclude_name` rule for every target-class module whose children a name rule already
  picks: each layer is built once, by the name rule, with its per-name settings; nothing else changes.
- Text encoder names. transformers 5 dropped `CLIPTextModel.text_model`; LyCORIS names modules from the
  model's paths, so its keys would lose the `text_model_` every other tool expects. LyCORIS walks a view of
  the encoder that keeps the old path.
- SDXL U-Net keys are written with sd-scripts' SAI names (what LyCORIS writes inside sd-scripts) and read in
  either naming; a file's modules must all exist in the network (`networks.files`).
- `--network_args` keys LyCORIS does not read are refused instead of silently dropped; `--network_dropout`
  reaches LyCORIS' `dropout` (LyCORIS' create_network ignores sd-scripts' `neuron_dropout`).
- Optimizer param groups carry parameter names and per-encoder lrs like networks.lora's.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from lycoris import kohya
from lycoris.config import PRESET
from lycoris.wrapper import network_module_dict
from torch import Tensor, nn

from library.errors import ConfigError, ModelError
from networks import files

logger = logging.getLogger(__name__)
CUDA_GRAPHS = "LyCORIS modules decide dropout and rank on the host (torch.rand(1) < p, random ranks)"

_BOOL_ARGS = (
    "use_tucker", "use_conv_cp", "use_cp", "disable_conv_cp", "use_scalar", "train_norm", "rescaled", "dora_wd",
    "wd_on_output", "full_matrix", "bypass_mode", "rs_lora", "unbalanced_factorization", "decompose_both",
)
_NUMBER_ARGS = (
    "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "block_size", "constraint", "constrain",
    "factor", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
)
NETWORK_ARGS = ("algo", "preset", *_BOOL_ARGS, *_NUMBER_ARGS)
# LyCORIS algos whose forward fails on Stable Diffusion's U-Net (measured with lycoris-lora 4.1.3)
_NOT_ON_SD_UNETS = {"tlora": "LyCORIS' tlora forward fails on Stable Diffusion U-Net layers (shape mismatch)"}


def check_network_args(kwargs: Mapping[str, Any], neuron_dropout: float | None) -> dict[str, Any]:
    """Refuse keys LyCORIS would ignore and values it would crash on; returns the kwargs to pass on."""
    kw = dict(kwargs)
    unknown = sorted(kw.keys() - set(NETWORK_ARGS))
    if unknown:
        raise ConfigError(
            f"--network_args {unknown[0]}: unknown for lycoris.kohya; valid keys: {', '.join(NETWORK_ARGS)}"
        )
    algo = str(kw.get("algo", "lora") or "lora").lower()
    offered = [a for a in network_module_dict if a not in _NOT_ON_SD_UNETS]
    if algo in _NOT_ON_SD_UNETS:
        raise ConfigError(f"--network_args algo={algo}: {_NOT_ON_SD_UNETS[algo]}; valid algos are {', '.join(offered)}")
    if algo not in network_module_dict:
        raise ConfigError(f"--network_args algo={algo}: valid algos are {', '.join(offered)}")
    preset = kw.get("preset", "full")
    if preset not in PRESET and not os.path.isfile(str(preset)):
        raise ConfigError(
            f"--network_args preset={preset}: neither a built-in preset ({', '.join(PRESET)}) nor a preset file"
        )
    for key in _NUMBER_ARGS:
        if kw.get(key) is not None:
            try:
                float(kw[key])
            except (TypeError, ValueError):
                raise ConfigError(f"--network_args {key}={kw[key]!r}: expected a number") from None
    for key in _BOOL_ARGS:
        if key in kw:
            kw[key] = str(kw[key]).strip().lower() in ("true", "1", "yes")
    if neuron_dropout and kw.get("dropout") is None:
        kw["dropout"] = neuron_dropout
    return kw


class _TextModelView(nn.Module):
    """Holds a flattened transformers-5 CLIP model under `.text_model`, so module paths read as kohya's."""

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model


def _kohya_paths(text_encoder: Any) -> Any:
    if text_encoder is None:
        return None
    if isinstance(text_encoder, Sequence) and not isinstance(text_encoder, nn.Module):
        return [_kohya_paths(te) for te in text_encoder if te is not None]
    return text_encoder if hasattr(text_encoder, "text_model") else _TextModelView(text_encoder)


def _matches(cls: type, pattern: str, name: str) -> bool:
    return fnmatch.fnmatch(name, pattern) if cls.USE_FNMATCH else bool(re.match(pattern, name))


def _duplicate_exclusions(cls: type, unet: nn.Module | None) -> list[str]:
    """`exclude_name` rules for target-class modules whose children a target-name rule also picks."""
    if unet is None or not cls.UNET_TARGET_REPLACE_NAME:
        return []
    paths = [name for name, _ in unet.named_modules() if name]
    picked = {p for p in paths if p in cls.UNET_TARGET_REPLACE_NAME
              or any(_matches(cls, t, p) for t in cls.UNET_TARGET_REPLACE_NAME)}
    out = []
    for name, module in unet.named_modules():
        if name and type(module).__name__ in cls.UNET_TARGET_REPLACE_MODULE and name not in picked:
            if any(p.startswith(name + ".") for p in picked):
                out.append(name if cls.USE_FNMATCH else f"^{re.escape(name)}$")
    return out


@contextlib.contextmanager
def _without_duplicates(unet: nn.Module | None) -> Iterator[None]:
    """While LyCORIS builds a network, every preset it applies gets the exclusions that keep names unique."""
    network_class = kohya.LycorisNetworkKohya
    original = network_class.__dict__["apply_preset"].__func__

    def apply_preset(cls: type, preset: dict) -> type:
        original(cls, preset)
        extra = _duplicate_exclusions(cls, unet)
        cls.TARGET_EXCLUDE_NAME = list(preset.get("exclude_name", [])) + extra
        if extra:
            logger.info("LyCORIS: %s built by name only (their class rule would build them twice)", extra)
        return cls

    network_class.apply_preset = classmethod(apply_preset)
    try:
        network_class.apply_preset({})  # create_network_from_weights builds with the current class settings
        yield
    finally:
        network_class.apply_preset = classmethod(original)


def _adopt(network: nn.Module, unet: nn.Module | None) -> nn.Module:
    network.__class__ = LycorisNetwork
    network.sdxl = files.is_sdxl_unet(unet)
    for lora in network.loras:  # registered now, so the network has a state_dict before apply_to
        network.add_module(lora.lora_name, lora)
    return network


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """LyCORIS' `create_network` with the fixes above."""
    kw = check_network_args(kwargs, neuron_dropout)
    with _without_duplicates(unet):
        network = kohya.create_network(
            multiplier, network_dim, 1.0 if network_alpha is None else network_alpha, vae,
            _kohya_paths(text_encoder), unet, **kw,
        )
    if not network.loras:
        raise ConfigError(
            f"--network_args {' '.join(f'{k}={v}' for k, v in kwargs.items())}: LyCORIS builds no module on this "
            "model (its preset's targets match no layer name here; try preset=full or attn-mlp)"
        )
    return _adopt(network, unet)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module | None,
    weights_sd: Mapping[str, Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, Tensor]]:
    """LyCORIS' `create_network_from_weights` (each module's algo and shape from the file), any naming read."""
    source = str(file) if file is not None else "weights_sd"
    weights = files.read_lora_file(file) if weights_sd is None else weights_sd
    weights = files.to_network_keys(weights, files.is_sdxl_unet(unet))
    if any(k.endswith(".on_input") for k in weights):  # IA3Module.make_module_from_state_dict takes one tensor
        raise ConfigError(f"--dim_from_weights {source}: LyCORIS 4.1.3 cannot rebuild an IA3 network from a file; "
                          "IA3 has no rank, so drop --dim_from_weights and pass --network_args algo=ia3")
    with _without_duplicates(unet):
        try:
            network, _ = kohya.create_network_from_weights(
                multiplier, None, vae, _kohya_paths(text_encoder), unet, weights_sd=weights
            )
        except (RuntimeError, TypeError, ValueError) as e:  # a tensor LyCORIS' own loader cannot place
            raise ModelError(f"{source}: LyCORIS cannot rebuild a network from this file: "
                             f"{type(e).__name__}: {e}".splitlines()[0]) from e
    network.loras = network.text_encoder_loras + network.unet_loras
    files.check_modules(files.module_names(weights), {lora.lora_name for lora in network.loras}, source)
    ranks = Counter((getattr(m, "lora_dim", None), float(m.alpha) if isinstance(m.alpha, Tensor) else m.alpha)
                    for m in network.loras if hasattr(m, "alpha"))
    if ranks:  # what most modules have: the run's ss_network_dim / ss_network_alpha
        network.lora_dim, network.alpha = ranks.most_common(1)[0][0]
    return _adopt(network, unet), weights


class LycorisNetwork(kohya.LycorisNetworkKohya):
    """LyCORIS' network with what our trainer and tools call on a network."""

    def apply_to(self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        kept = (self.text_encoder_loras if apply_text_encoder else []) + (self.unet_loras if apply_unet else [])
        for lora in self.loras:
            if lora not in kept:
                del self._modules[lora.lora_name]
        self.text_encoder_loras = self.text_encoder_loras if apply_text_encoder else []
        self.unet_loras = self.unet_loras if apply_unet else []
        self.loras = kept
        for lora in kept:
            lora.apply_to()

    def lora_params_named(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.named_parameters()

    def prepare_optimizer_params(self, text_encoder_lr: Any, unet_lr: float | None,
                                 default_lr: float | None) -> list[dict[str, Any]]:
        """Groups `{"params", "names", "lr", "description"}`; LoRA+ splits off `lora_up` as LyCORIS does."""
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []

        def add(loras: list, lr: float | None, ratio: float | None, description: str) -> None:
            split: dict[str, tuple[list[str], list[nn.Parameter]]] = {"": ([], []), " plus": ([], [])}
            for lora in loras:
                for pname, param in lora.named_parameters():
                    key = " plus" if ratio is not None and "lora_up" in pname else ""
                    split[key][0].append(f"{lora.lora_name}.{pname}")
                    split[key][1].append(param)
            for key, (names, params) in split.items():
                group_lr = lr * ratio if (key and params and lr is not None) else lr
                if params and group_lr:
                    groups.append({"params": params, "names": names, "lr": group_lr,
                                   "description": description + key})

        by_te: dict[str, list] = {}
        for lora in self.text_encoder_loras:
            by_te.setdefault(lora.lora_name.split("_")[1], []).append(lora)
        for i, (te, loras) in enumerate(by_te.items()):
            lr = text_encoder_lr
            if isinstance(lr, Sequence):
                lr = lr[min(i, len(lr) - 1)] if lr else None
            add(loras, default_lr if lr is None else lr,
                self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio,
                "textencoder" if te == "te" else f"textencoder{te[2:]}")
        if self.unet_loras:
            add(self.unet_loras, default_lr if unet_lr is None else unet_lr,
                self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, "unet")
        return groups

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        """LyCORIS' keys, written atomically with sd-scripts' hashes (SDXL U-Net keys under SAI names)."""
        files.save_network(self, file, dtype, metadata)

    def load_weights(self, file: str | os.PathLike) -> Any:
        """Load a LyCORIS file (either SDXL naming); every module of the file must exist in this network."""
        weights = files.to_network_keys(files.read_lora_file(file), self.sdxl)
        own_modules = {lora.lora_name for lora in self.loras}
        files.check_modules(files.module_names(weights), own_modules, str(file), files.untrained_prefixes(self))
        if any(type(lora).__name__ == "DyLoraModule" for lora in self.loras):
            raise ConfigError(f"--network_weights {file}: LyCORIS' DyLoRA cannot load its own file into its rank "
                              "blocks; add --dim_from_weights to continue it (LyCORIS rebuilds it as a LoCon)")
        with torch.no_grad():  # LyCORIS' Full adds the file's diff to the module's current weight: start from W0
            for lora in self.loras:
                if type(lora).__name__ == "FullModule" and f"{lora.lora_name}.diff" in weights:
                    lora.weight.copy_(lora.org_weight.to(lora.weight))
                    if lora.bias is not None and lora.org_bias is not None:
                        lora.bias.copy_(lora.org_bias[0].to(lora.bias))
        own = self.state_dict()
        return self.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)

    def remove_from(self) -> None:
        self.restore()
