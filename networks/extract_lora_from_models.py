"""Extract a LoRA from the difference of a tuned and an original model (sd-scripts' command line)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python networks/<tool>.py`

from library.tools.runner import run_tool  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--v2", action="store_true", help="load Stable Diffusion 2.x models")
    parser.add_argument(
        "--v_parameterization",
        action="store_true",
        default=None,
        help="write v-parameterization metadata (default: same as --v2)",
    )
    parser.add_argument("--sdxl", action="store_true", help="load SDXL models")
    parser.add_argument(
        "--load_precision",
        type=str,
        default=None,
        choices=[None, "float", "fp16", "bf16"],
        help="precision to load the models in; float if omitted",
    )
    parser.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=[None, "float", "fp16", "bf16"],
        help="precision of the saved file; float if omitted",
    )
    parser.add_argument(
        "--model_org", type=str, required=True, help="original model (file, folder or builtin:)"
    )
    parser.add_argument(
        "--model_tuned", type=str, required=True, help="tuned model; the LoRA is tuned - original"
    )
    parser.add_argument("--save_to", type=str, required=True, help="output LoRA file (.safetensors/.ckpt)")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA")
    parser.add_argument(
        "--conv_dim", type=int, default=None, help="rank for Conv2d 3x3 layers (default: no conv layers)"
    )
    parser.add_argument("--device", type=str, default=None, help="device for the SVD (cuda for GPU)")
    parser.add_argument(
        "--clamp_quantile",
        type=float,
        default=0.99,
        help="clip the factors at this quantile of their values (0-1]",
    )
    parser.add_argument(
        "--min_diff",
        type=float,
        default=0.01,
        help="text encoders differing by at most this are left out of the LoRA",
    )
    parser.add_argument(
        "--no_metadata",
        action="store_true",
        help="do not save modelspec metadata (the minimum ss_* metadata is kept)",
    )
    parser.add_argument(
        "--load_original_model_to", type=str, default=None, help="device to load the original model on"
    )
    parser.add_argument(
        "--load_tuned_model_to", type=str, default=None, help="device to load the tuned model on"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> None:
        from library.tools.extract import (
            extract_file,  # after run_tool quiets the import noise
        )

        extract_file(args)

    return run_tool(setup_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
