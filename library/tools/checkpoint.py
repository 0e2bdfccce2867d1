"""The model side of the tools: the layers a LoRA adapts (by kohya name), merging LoRAs into them, and writing
the merged model as a single file in its own original layout or as a diffusers folder."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import DDPMScheduler
from torch import nn

from library.errors import ConfigError, ModelError
from library.models.common import SDModel
from library.models.ldm_names import text_encoder_key, unet_key
from library.models.loader import detect_model_type
from library.models.single_file import CHECKPOINT_SUFFIXES, read_checkpoint
from library.tools.lora_files import LoraWeights, LycorisWeights
from library.training.atomic import atomic_dir, atomic_file
from library.training.sampling import build_pipeline
from networks.lora import (
    LORA_PREFIX_TEXT_ENCODER,
    LORA_PREFIX_UNET,
    TEXT_ENCODER_TARGET_MODULES,
    UNET_CONV_TARGET_MODULES,
    UNET_TARGET_MODULES,
    _target_layers,
)


def model_flags(name: str, *, v2: bool, sdxl: bool, advice: dict[str, str]) -> tuple[bool, bool]:
    """(v2, sdxl) for loading `name`: the model's own type when no flag names one (sd-scripts needs `--v2`
    for SD2 files; the tools read it from the file), a one-line error with the tool's `advice[detected type]`
    when a flag contradicts it, before the model loads."""
    detected = detect_model_type(name)
    if detected is None:  # unreadable: the loader names the problem
        return v2, sdxl
    given = "sdxl" if sdxl else "sd2" if v2 else None
    if given is not None and given != detected:
        raise ModelError(f"{name}: is an {detected.upper()} model, not {given.upper()}; {advice[detected]}")
    return detected == "sd2", detected == "sdxl"


@dataclass
class Layer:
    component: str  # "unet" or "text_encoder<i>"
    path: str  # the layer's module path inside its component (its weight is `<path>.weight`)
    module: nn.Module


def lora_layers(model: SDModel, conv: bool = True) -> dict[str, Layer]:
    """kohya name -> layer, for every layer networks.lora can adapt (ResNet/sampler layers: with `conv`)."""
    layers: dict[str, Layer] = {}
    count = len(model.text_encoders)
    for i, te in enumerate(model.text_encoders):
        prefix = LORA_PREFIX_TEXT_ENCODER if count == 1 else f"{LORA_PREFIX_TEXT_ENCODER}{i + 1}"
        paths = {id(m): n for n, m in te.named_modules()}
        core = getattr(te, "text_model", te)
        for name, layer in _target_layers(core, f"{prefix}.text_model", TEXT_ENCODER_TARGET_MODULES):
            layers[name] = Layer(f"text_encoder{i}", paths[id(layer)], layer)
    targets = UNET_TARGET_MODULES + (UNET_CONV_TARGET_MODULES if conv else ())
    paths = {id(m): n for n, m in model.unet.named_modules()}
    for name, layer in _target_layers(model.unet, LORA_PREFIX_UNET, targets):
        layers[name] = Layer("unet", paths[id(layer)], layer)
    return layers


def check_lora_fits(
    modules: dict[str, LoraWeights | LycorisWeights], layers: dict[str, Layer], source: str, model: SDModel
) -> None:
    """Every module must name a layer of this model, of its weight's size; the error names the first not."""
    unknown = sorted(modules.keys() - layers.keys())
    te_names = [n for n in modules if n.startswith(LORA_PREFIX_TEXT_ENCODER)]
    two_encoders = any(n.startswith(("lora_te1_", "lora_te2_")) for n in te_names)
    if te_names and two_encoders != (len(model.text_encoders) == 2):
        kind = "SDXL (two text encoders)" if two_encoders else "SD1/SD2 (one text encoder)"
        raise ModelError(
            f"{source}: is a LoRA for {kind}, e.g. {te_names[0]}, but {model.source} is an "
            f"{model.model_type.upper()} model; it is for another model type"
        )
    if unknown and len(unknown) == len(modules):
        raise ModelError(
            f"{source}: none of its {len(modules)} modules (e.g. {unknown[0]}) is a layer of the "
            f"{model.model_type.upper()} model {model.source}; is the LoRA for another model type?"
        )
    if unknown:
        raise ModelError(
            f"{source}: unknown keys, {len(unknown)} modules are not layers of {model.source}: "
            f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}"
        )
    for name, w in modules.items():
        if not isinstance(w, LoraWeights):
            continue  # a LyCORIS module's shape shows when its update is formed (merge_into)
        weight = layers[name].module.weight
        need = (w.up.shape[0], *w.down.shape[1:])
        if weight.numel() != torch.Size(need).numel():
            raise ModelError(
                f"{source}: {name} is for a layer of shape {tuple(need)}, {model.source} has "
                f"{tuple(weight.shape)}; is the LoRA for another model?"
            )


@torch.no_grad()
def merge_into(
    modules: dict[str, LoraWeights | LycorisWeights],
    layers: dict[str, Layer],
    ratio: float,
    device: torch.device,
    source: str,
    progress=lambda items: items,
) -> None:
    """`W += ratio * update` for each module (LoRA: `alpha / rank * up @ down`; LoHa / LoKr: their products),
    computed on `device` in the weights' dtype."""
    for name, w in progress(list(modules.items())):
        weight = layers[name].module.weight
        try:
            delta = w.to(device, weight.dtype).delta(tuple(weight.shape))
        except RuntimeError as exc:  # the factors' product has another size than the layer
            raise ModelError(
                f"{source}: {name} does not fit the layer of shape {tuple(weight.shape)} "
                f"({str(exc).splitlines()[0]})"
            ) from None
        weight.add_((delta * ratio).to(weight.device))


def is_checkpoint_file(path: Path) -> bool:
    return path.suffix.lower() in CHECKPOINT_SUFFIXES


def save_merged_model(
    model: SDModel,
    layers: dict[str, Layer],
    changed: Iterable[str],
    save_to: Path,
    dtype: torch.dtype,
    metadata: dict[str, str] | None,
) -> None:
    """A file for a file: the source checkpoint with the changed layers replaced (every other key as it was,
    floats cast to `dtype`); a folder otherwise: the whole model as a diffusers pipeline folder."""
    if is_checkpoint_file(save_to):
        source = Path(model.source)
        if not source.is_file():
            raise ConfigError(
                f"--save_to {save_to}: a single-file checkpoint is written in the layout of a single-file "
                f"--sd_model, and {model.source} is not one; give a folder name to save a diffusers model"
            )
        _save_checkpoint(model, layers, changed, source, save_to, dtype, metadata)
    else:
        _save_folder(model, save_to, dtype)


def _save_checkpoint(
    model: SDModel,
    layers: dict[str, Layer],
    changed: Iterable[str],
    source: Path,
    save_to: Path,
    dtype: torch.dtype,
    metadata: dict[str, str] | None,
) -> None:
    state = read_checkpoint(source)
    for name in changed:
        layer = layers[name]
        weight = layer.module.weight.detach().cpu()
        if layer.component == "unet":
            key, block = unet_key(model.unet, f"{layer.path}.weight"), None
        else:
            key, block = text_encoder_key(model.model_type, int(layer.component[-1]), f"{layer.path}.weight")
        if key not in state:
            raise ModelError(f"{source}: has no key {key} for the merged layer {name}")
        if block is None:
            state[key] = weight.reshape(state[key].shape).to(state[key].dtype)
        else:  # a q/k/v row block of OpenCLIP's fused in_proj_weight
            rows = state[key].shape[0] // 3
            fused = state[key].clone()
            fused[block * rows : (block + 1) * rows] = weight.to(fused.dtype)
            state[key] = fused
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_to.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(save_to) as tmp:
        if save_to.suffix.lower() == ".safetensors":
            safetensors.torch.save_file(state, str(tmp), metadata)
        else:
            torch.save({"state_dict": state}, tmp)


def _save_folder(model: SDModel, save_to: Path, dtype: torch.dtype) -> None:
    pipe = build_pipeline(model, DDPMScheduler.from_config(model.scheduler_config))
    pipe.to(dtype=dtype)
    with atomic_dir(save_to) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
