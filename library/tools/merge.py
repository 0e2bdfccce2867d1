"""merge_lora.py / sdxl_merge_lora.py: LoRAs into a base model (`--sd_model`), or several LoRAs into one."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from library.errors import ConfigError, ModelError
from library.models import load_sd_model
from library.tools.checkpoint import (
    check_lora_fits,
    is_checkpoint_file,
    lora_layers,
    merge_into,
    model_flags,
    save_merged_model,
)
from library.tools.lora_files import (
    check_save_path,
    join_modules,
    merged_from,
    minimum_network_metadata,
    model_type_of,
    modelspec,
    precision,
    read_any_lora,
    read_lora,
    read_metadata,
    save_lora,
)
from library.tools.lora_ops import merge_weighted, shuffle_ranks
from library.tools.runner import progress, resolve_device
from library.tools.sdxl_names import to_diffusers_names, to_file_names

logger = logging.getLogger(__name__)
MERGE_ADVICE = {
    "sd1": "merge into it with networks/merge_lora.py without --v2",
    "sd2": "merge into it with networks/merge_lora.py --v2",
    "sdxl": "merge into it with networks/sdxl_merge_lora.py",
}


def check_models_and_ratios(args: argparse.Namespace) -> None:
    if not args.models:
        raise ConfigError("--models: give one or more LoRA files to merge")
    if args.ratios is None or len(args.ratios) != len(args.models):
        got = 0 if args.ratios is None else len(args.ratios)
        raise ConfigError(
            f"--ratios: {got} value(s) for {len(args.models)} --models; give one ratio per LoRA"
        )
    if getattr(args, "lbws", None):
        raise ConfigError(
            "--lbws: layer-block weights are not supported; merge without --lbws "
            "(scale whole LoRAs with --ratios)"
        )
    for path in args.models:
        if not Path(path).is_file():
            raise ModelError(f"--models: LoRA file not found: {path}")


def merge_precisions(args: argparse.Namespace) -> tuple[torch.dtype, torch.dtype]:
    """(--precision, --save_precision): as in sd-scripts' merge scripts, the file keeps the merging precision
    unless --save_precision is given."""
    merge_dtype = precision(args.precision, "--precision")
    return merge_dtype, precision(args.save_precision, "--save_precision") or merge_dtype


def merged_lora_metadata(
    args: argparse.Namespace,
    sources: list[dict[str, str]],
    dims: str,
    alphas: str,
    *,
    sdxl: bool,
    save_to: str | Path,
    network_args: dict | None = None,
) -> dict[str, str]:
    """A merged LoRA's ss_* keys, its model version taken from the first source file that has metadata,
    and modelspec keys unless --no_metadata."""
    first = next((md for md in sources if md), {})
    metadata = minimum_network_metadata(
        first.get("ss_v2"), first.get("ss_base_model_version"), dims, alphas, network_args
    )
    if not args.no_metadata:
        model_type, v_param = ("sdxl", False) if sdxl else model_type_of(first)
        metadata.update(
            modelspec(
                model_type, v_param, lora=True, title=Path(save_to).stem, merged_from=merged_from(args.models)
            )
        )
    return metadata


def read_loras(
    paths: list[str], dtype: torch.dtype, sdxl: bool, lycoris: bool = False
) -> list[tuple[str, dict, dict]]:
    """Each file's modules (SDXL names in sd-scripts' SAI form are read as the diffusers-path names); with
    `lycoris` LoHa / LoKr modules too (merging into a model is defined for them, LoRA-to-LoRA merges are
    not)."""
    out = []
    for path in paths:
        if lycoris:
            modules, metadata = read_any_lora(path, dtype), read_metadata(path)
        else:
            modules, metadata = read_lora(path, dtype)
        if sdxl:
            modules = to_diffusers_names(modules, path)
        out.append((path, modules, metadata))
    return out


def merge(args: argparse.Namespace, *, sdxl: bool = False) -> None:
    check_models_and_ratios(args)
    merge_dtype, save_dtype = merge_precisions(args)
    if not args.save_to:
        raise ConfigError("--save_to is required: the merged model file or folder (or the merged LoRA file)")
    save_to = Path(args.save_to)
    device = resolve_device(args.device)
    if args.sd_model is None:
        check_save_path(args.save_to)
        _merge_loras(args, merge_dtype, save_dtype, save_to, sdxl)
        return
    if is_checkpoint_file(save_to) and not Path(args.sd_model).is_file():
        raise ConfigError(
            f"--save_to {save_to}: a single-file checkpoint needs a single-file --sd_model "
            f"({args.sd_model} is not one); give a folder name to save a diffusers model"
        )
    v2, sdxl = model_flags(args.sd_model, v2=getattr(args, "v2", False), sdxl=sdxl, advice=MERGE_ADVICE)
    loras = read_loras(args.models, merge_dtype, sdxl, lycoris=True)
    logger.info("loading %s", args.sd_model)
    model = load_sd_model(args.sd_model, v2=v2, sdxl=sdxl, dtype=merge_dtype)
    for part in (*model.text_encoders, model.unet):
        part.to(device)
    layers = lora_layers(model)
    for path, modules, _ in loras:
        check_lora_fits(modules, layers, path, model)
    changed: set[str] = set()
    for (path, modules, _), ratio in zip(loras, args.ratios, strict=True):
        logger.info("merging %s (ratio %g)", path, ratio)
        merge_into(modules, layers, ratio, device, path, progress(f"merge {Path(path).name}"))
        changed |= modules.keys()
    metadata = None
    if not args.no_metadata:
        metadata = modelspec(
            model.model_type,
            model.v_parameterization,
            lora=False,
            title=save_to.stem,
            merged_from=merged_from([args.sd_model, *args.models]),
        )
    logger.info("saving %s", save_to)
    save_merged_model(model, layers, changed, save_to, save_dtype, metadata)


def _merge_loras(
    args: argparse.Namespace, merge_dtype: torch.dtype, save_dtype: torch.dtype, save_to: Path, sdxl: bool
) -> None:
    loras = read_loras(args.models, merge_dtype, sdxl)
    merged = merge_weighted([(p, m) for p, m, _ in loras], args.ratios, concat=args.concat)
    if args.shuffle:
        shuffle_ranks(merged)
    ranks = {w.rank for w in merged.values()}
    alphas = {w.alpha for w in merged.values()}
    metadata = merged_lora_metadata(
        args,
        [md for _, _, md in loras],
        str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        sdxl=sdxl,
        save_to=save_to,
    )
    state = join_modules(to_file_names(merged) if sdxl else merged)
    logger.info("saving %s", save_to)
    save_lora(save_to, state, metadata, save_dtype)
