"""resize_lora.py: each module's update cut to a lower rank by SVD (fixed, or by a `--dynamic_method`
rule)."""

from __future__ import annotations

import argparse
import logging
import statistics

import torch

from library.errors import ConfigError
from library.tools.lora_files import check_save_path, join_modules, precision, read_lora, save_lora
from library.tools.lora_math import DYNAMIC_METHODS
from library.tools.lora_ops import resize
from library.tools.runner import progress, resolve_device

logger = logging.getLogger(__name__)


def check_args(args: argparse.Namespace) -> None:
    if not args.model:
        raise ConfigError("--model is required: the LoRA file to resize")
    if args.dynamic_method is not None and args.dynamic_method not in DYNAMIC_METHODS:
        raise ConfigError(
            f"--dynamic_method {args.dynamic_method}: valid values are {', '.join(DYNAMIC_METHODS)}"
        )
    if args.dynamic_method and not args.dynamic_param:
        raise ConfigError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param (its target)")
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise ConfigError("--new_rank / --new_conv_rank: must be >= 1")


def resize_file(args: argparse.Namespace) -> None:
    check_args(args)
    save_to = check_save_path(args.save_to)
    save_dtype = precision(args.save_precision, "--save_precision") or torch.float32
    device = resolve_device(args.device)
    new_conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    modules, metadata = read_lora(args.model, torch.float32)  # resize_lora.py computes in float32 always
    old_dim = max(w.rank for w in modules.values())
    if args.dynamic_method:
        logger.info(
            "dynamic rank by %s %g, at most %d", args.dynamic_method, args.dynamic_param, args.new_rank
        )
    resized, reports = resize(
        modules,
        args.new_rank,
        new_conv_rank,
        args.dynamic_method,
        args.dynamic_param,
        device,
        progress("resize"),
    )
    if args.verbose:
        for r in reports:
            line = (
                f"{r.name:75} | sum(S) retained: {r.sum_retained:.1%}, fro retained: {r.fro_retained:.1%}, "
                f"max(S) ratio: {r.max_ratio:0.1f}"
            )
            print(
                line + (f", dynamic | dim: {r.new_rank}, alpha: {r.new_alpha}" if args.dynamic_method else "")
            )
        fro = [r.fro_retained for r in reports]
        print(
            f"Average Frobenius norm retention: {statistics.fmean(fro):.2%} | "
            f"std: {statistics.pstdev(fro):0.3f}"
        )
    metadata = dict(metadata)
    comment = metadata.get("ss_training_comment", "")
    if args.dynamic_method:
        metadata["ss_training_comment"] = (
            f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from {old_dim}; {comment}"
        )
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
    else:
        conv = "" if args.new_rank == new_conv_rank else f" (conv: {new_conv_rank})"
        metadata["ss_training_comment"] = (
            f"dimension is resized from {old_dim} to {args.new_rank}{conv}; {comment}"
        )
        metadata["ss_network_dim"] = str(args.new_rank)
        metadata["ss_network_alpha"] = str(
            reports[-1].new_alpha
        )  # as resize_lora.py: the last module's alpha
    logger.info("saving %s", save_to)
    save_lora(save_to, join_modules(resized), metadata, save_dtype)
