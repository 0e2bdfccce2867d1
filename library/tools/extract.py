"""extract_lora_from_models.py: a LoRA from the weight difference of a tuned model and its original."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from library.errors import ConfigError, ModelError
from library.models import load_sd_model
from library.models.common import expected_model_type
from library.tools.checkpoint import lora_layers, model_flags
from library.tools.lora_files import check_save_path, join_modules, modelspec, precision, save_lora
from library.tools.lora_ops import extract
from library.tools.runner import progress, resolve_device
from library.tools.sdxl_names import to_file_names
from library.training.metadata import base_model_version

logger = logging.getLogger(__name__)


ADVICE = {"sd1": "drop --v2/--sdxl", "sd2": "use --v2", "sdxl": "use --sdxl"}


def _load(name: str, args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    logger.info("loading %s", name)
    model = load_sd_model(name, v2=args.v2, sdxl=args.sdxl, dtype=dtype)
    for part in (*model.text_encoders, model.unet):
        part.to(device)
    return model


@torch.no_grad()
def weight_differences(original, tuned, conv: bool, min_diff: float) -> dict[str, torch.Tensor]:
    """kohya name -> tuned - original (float32) of every layer a LoRA adapts; the text encoders' layers are
    left out when none differs by more than `min_diff` (as sd-scripts decides "text encoder is the same")."""
    layers_o, layers_t = lora_layers(original, conv), lora_layers(tuned, conv)
    if layers_o.keys() != layers_t.keys():
        raise ModelError(
            f"{original.source} and {tuned.source} are different model versions "
            f"({len(layers_o)} vs {len(layers_t)} LoRA target layers)"
        )
    diffs, te_max = {}, 0.0
    for name, layer in layers_o.items():
        a, b = layer.module.weight, layers_t[name].module.weight
        if a.shape != b.shape:
            raise ModelError(
                f"{tuned.source}: layer {name} has shape {tuple(b.shape)}, the original {tuple(a.shape)}"
            )
        diff = (b.to(a.device).float() - a.float()).cpu()
        if layer.component != "unet":
            te_max = max(te_max, float(diff.abs().max()))
        diffs[name] = diff
    if te_max <= min_diff:
        logger.warning(
            "text encoder is the same (max difference %g <= --min_diff %g): extracting the U-Net only",
            te_max,
            min_diff,
        )
        diffs = {n: d for n, d in diffs.items() if layers_o[n].component == "unet"}
    else:
        logger.info("text encoder differs (max difference %g > --min_diff %g)", te_max, min_diff)
    return diffs


def extract_file(args: argparse.Namespace) -> None:
    expected_model_type(v2=args.v2, sdxl=args.sdxl)  # both flags: one line
    flags = [
        model_flags(name, v2=args.v2, sdxl=args.sdxl, advice=ADVICE)
        for name in (args.model_org, args.model_tuned)
    ]
    if flags[0] != flags[1]:
        raise ModelError(
            f"--model_org {args.model_org} and --model_tuned {args.model_tuned} are different model "
            "types; a LoRA is extracted from two models of one type"
        )
    args.v2, args.sdxl = flags[0]
    model_type = expected_model_type(v2=args.v2, sdxl=args.sdxl)
    save_to = check_save_path(args.save_to)
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        raise ConfigError("--dim / --conv_dim: must be >= 1")
    if not 0 < args.clamp_quantile <= 1:
        raise ConfigError(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]")
    v_param = args.v2 if args.v_parameterization is None else args.v_parameterization
    load_dtype = precision(args.load_precision, "--load_precision") or torch.float32
    save_dtype = precision(args.save_precision, "--save_precision")
    device = resolve_device(args.device)
    org_device = resolve_device(args.load_original_model_to, "--load_original_model_to")
    tuned_device = resolve_device(args.load_tuned_model_to, "--load_tuned_model_to")
    original = _load(args.model_org, args, load_dtype, org_device)
    tuned = _load(args.model_tuned, args, load_dtype, tuned_device)
    diffs = weight_differences(original, tuned, args.conv_dim is not None, args.min_diff)
    del original, tuned
    diffs = {n: d.to(device) for n, d in diffs.items()}
    modules = extract(diffs, args.dim, args.conv_dim, args.clamp_quantile, progress("SVD"))
    if model_type == "sdxl":
        modules = to_file_names(modules)
    network_args = {}
    if args.conv_dim is not None:
        network_args = {"conv_dim": str(args.conv_dim), "conv_alpha": str(float(args.conv_dim))}
    metadata = {
        "ss_v2": str(args.v2),
        "ss_base_model_version": base_model_version(model_type, v_param),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.dim),
        "ss_network_alpha": str(float(args.dim)),
        "ss_network_args": json.dumps(network_args),
    }
    if not args.no_metadata:
        metadata.update(modelspec(model_type, v_param, lora=True, title=Path(save_to).stem))
    logger.info("saving %s", save_to)
    save_lora(save_to, join_modules(modules), metadata, save_dtype)
