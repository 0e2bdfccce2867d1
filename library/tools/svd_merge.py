"""svd_merge_lora.py: LoRAs of any ranks summed as dense updates, then cut to `--new_rank` by SVD."""

from __future__ import annotations

import argparse
import logging

from library.tools.lora_files import check_save_path, join_modules, read_lora, save_lora
from library.tools.lora_ops import low_rank, summed_updates
from library.tools.merge import check_models_and_ratios, merge_precisions, merged_lora_metadata
from library.tools.runner import progress, resolve_device
from library.tools.sdxl_names import to_diffusers_names, to_file_names

logger = logging.getLogger(__name__)
CLAMP_QUANTILE = 0.99  # svd_merge_lora.py clips the new factors at this quantile (it has no flag for it)


def is_sdxl_lora(metadata: dict[str, str], names) -> bool:
    """SDXL by its metadata, its two text encoders' prefixes (lora_te1_/lora_te2_) or SAI U-Net names."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl"):
        return True
    return any(
        n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks"))
        for n in names
    )


def svd_merge(args: argparse.Namespace) -> None:
    check_models_and_ratios(args)
    save_to = check_save_path(args.save_to)
    merge_dtype, save_dtype = merge_precisions(args)
    device = resolve_device(args.device)
    new_conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    loras = [(path, *read_lora(path, merge_dtype)) for path in args.models]
    sdxl = any(is_sdxl_lora(md, modules) for _, modules, md in loras)
    if sdxl:
        loras = [(p, to_diffusers_names(m, p), md) for p, m, md in loras]
    logger.info("new rank %d, new conv rank %d", args.new_rank, new_conv_rank)
    updates = summed_updates([(p, m) for p, m, _ in loras], args.ratios, device, progress("sum updates"))
    merged = low_rank(updates, args.new_rank, new_conv_rank, CLAMP_QUANTILE, progress("SVD"))
    if sdxl:
        merged = to_file_names(merged)
    metadata = merged_lora_metadata(
        args,
        [md for _, _, md in loras],
        str(args.new_rank),
        str(args.new_rank),
        sdxl=sdxl,
        save_to=save_to,
        network_args={"conv_dim": new_conv_rank, "conv_alpha": new_conv_rank},
    )
    logger.info("saving %s", save_to)
    save_lora(save_to, join_modules(merged), metadata, save_dtype)
