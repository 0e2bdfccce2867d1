"""Merge LoRAs of any ranks into one LoRA of a new rank by SVD (sd-scripts' command line)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python networks/<tool>.py`

from library.tools.runner import run_tool  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=[None, "float", "fp16", "bf16"],
        help="precision of the saved file; the merging precision if omitted",
    )
    parser.add_argument(
        "--precision",
        type=str,
        default="float",
        choices=["float", "fp16", "bf16"],
        help="precision of the merge (float is recommended)",
    )
    parser.add_argument("--save_to", type=str, default=None, help="output LoRA file (.safetensors/.ckpt)")
    parser.add_argument("--models", type=str, nargs="*", help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", help="one ratio per LoRA")
    parser.add_argument("--lbws", type=str, nargs="*", help="layer-block weights (not supported: refused)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output LoRA")
    parser.add_argument(
        "--new_conv_rank", type=int, default=None, help="rank for Conv2d 3x3 modules; --new_rank if omitted"
    )
    parser.add_argument("--device", type=str, default=None, help="device to compute on (cuda for GPU)")
    parser.add_argument(
        "--no_metadata",
        action="store_true",
        help="do not save modelspec metadata (the minimum ss_* metadata is kept)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> None:
        from library.tools.svd_merge import svd_merge  # after run_tool quiets the import noise

        svd_merge(args)

    return run_tool(setup_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
