"""Merge LoRAs into an SDXL model, or several SDXL LoRAs into one (sd-scripts' command line)."""

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
    parser.add_argument("--models", type=str, nargs="*", help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", help="one ratio per LoRA")
    parser.add_argument("--lbws", type=str, nargs="*", help="layer-block weights (not supported: refused)")
    parser.add_argument(
        "--no_metadata",
        action="store_true",
        help="do not save modelspec metadata (the minimum ss_* metadata of a LoRA is kept)",
    )
    parser.add_argument(
        "--concat",
        action="store_true",
        help="concatenate the LoRAs instead of summing them (rank = sum of the ranks)",
    )
    parser.add_argument("--shuffle", action="store_true", help="shuffle the rank axis of the merged LoRA")
    parser.add_argument(
        "--device", type=str, default=None, help="device to merge on (cpu, cuda, cuda:N); cpu if omitted"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> None:
        from library.tools.merge import merge  # after run_tool quiets the import noise

        merge(args, sdxl=True)

    return run_tool(setup_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
