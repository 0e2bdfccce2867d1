"""Extract a LoRA from the difference of a tuned and an original model (sd-scripts' command line)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python networks/<tool>.py`

from library.tools import tool_args  # noqa: E402
from library.tools.runner import tool_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    tool_args.add_v2(parser, "Stable Diffusion 2.x models")
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
        choices=[None, *tool_args.PRECISIONS],
        help="precision to load the models in; float if omitted",
    )
    tool_args.add_save_precision(parser, "float")
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
    tool_args.add_device(parser, "device for the SVD (cuda for GPU)")
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
    tool_args.add_no_metadata(parser)
    for model, flag in (("original", "load_original_model_to"), ("tuned", "load_tuned_model_to")):
        parser.add_argument(f"--{flag}", type=str, default=None, help=f"device to load the {model} model on")
    return parser


main = tool_main(setup_parser, "library.tools.extract:extract_file")


if __name__ == "__main__":
    sys.exit(main())
