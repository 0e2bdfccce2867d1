"""sd-scripts flags several LoRA tool scripts share, defined once so their names, defaults and choices agree.

Each script still builds its own parser from these and its own flags, in sd-scripts' order.
"""

from __future__ import annotations

import argparse

PRECISIONS = ("float", "fp16", "bf16")
COMPUTE_DEVICE_HELP = "device to compute on (cuda for GPU)"


def add_v2(parser: argparse.ArgumentParser, models: str) -> None:
    parser.add_argument("--v2", action="store_true", help=f"load {models}")


def add_save_precision(parser: argparse.ArgumentParser, when_omitted: str) -> None:
    parser.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=[None, *PRECISIONS],
        help=f"precision of the saved file; {when_omitted} if omitted",
    )


def add_merge_precisions(parser: argparse.ArgumentParser) -> None:
    """--save_precision and --precision of the merge scripts: the file is saved in the merging precision."""
    add_save_precision(parser, "the merging precision")
    parser.add_argument(
        "--precision",
        type=str,
        default="float",
        choices=list(PRECISIONS),
        help="precision of the merge (float is recommended)",
    )


def add_lora_inputs(parser: argparse.ArgumentParser) -> None:
    """--models / --ratios / --lbws: the LoRAs a merge reads, one ratio each."""
    parser.add_argument("--models", type=str, nargs="*", help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", help="one ratio per LoRA")
    parser.add_argument("--lbws", type=str, nargs="*", help="layer-block weights (not supported: refused)")


def add_new_ranks(parser: argparse.ArgumentParser, new_rank_help: str) -> None:
    """--new_rank / --new_conv_rank of the tools that cut a LoRA to a new rank by SVD."""
    parser.add_argument("--new_rank", type=int, default=4, help=new_rank_help)
    parser.add_argument(
        "--new_conv_rank", type=int, default=None, help="rank for Conv2d 3x3 modules; --new_rank if omitted"
    )


def add_device(parser: argparse.ArgumentParser, help: str = COMPUTE_DEVICE_HELP) -> None:
    parser.add_argument("--device", type=str, default=None, help=help)


def add_no_metadata(parser: argparse.ArgumentParser, kept: str = "the minimum ss_* metadata") -> None:
    parser.add_argument(
        "--no_metadata", action="store_true", help=f"do not save modelspec metadata ({kept} is kept)"
    )


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags merge_lora.py and sdxl_merge_lora.py share (all of them but merge_lora.py's --v2)."""
    add_merge_precisions(parser)
    parser.add_argument(
        "--sd_model",
        type=str,
        default=None,
        help="base model to merge into: a .safetensors/.ckpt file, a diffusers folder or "
        "builtin:tiny-sd; without it the LoRAs are merged into one LoRA",
    )
    parser.add_argument(
        "--save_to",
        type=str,
        default=None,
        help="output: .safetensors/.ckpt (a LoRA, or a checkpoint in the --sd_model file's layout) "
        "or a folder (a diffusers model)",
    )
    add_lora_inputs(parser)
    add_no_metadata(parser, "the minimum ss_* metadata of a LoRA")
    parser.add_argument(
        "--concat",
        action="store_true",
        help="concatenate the LoRAs instead of summing them (rank = sum of the ranks)",
    )
    parser.add_argument("--shuffle", action="store_true", help="shuffle the rank axis of the merged LoRA")
    add_device(parser, "device to merge on (cpu, cuda, cuda:N); cpu if omitted")
