"""Lower a LoRA's rank by SVD, to a fixed rank or by a dynamic rule (sd-scripts' command line)."""

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
        help="precision of the saved file; float if omitted",
    )
    parser.add_argument(
        "--new_rank", type=int, default=4, help="rank of the output LoRA (the cap with --dynamic_method)"
    )
    parser.add_argument(
        "--new_conv_rank", type=int, default=None, help="rank for Conv2d 3x3 modules; --new_rank if omitted"
    )
    parser.add_argument(
        "--save_to", type=str, default=None, help="output LoRA file (.safetensors/.ckpt/.pt/.pth)"
    )
    parser.add_argument("--model", type=str, default=None, help="LoRA file to resize")
    parser.add_argument("--device", type=str, default=None, help="device to compute on (cuda for GPU)")
    parser.add_argument("--verbose", action="store_true", help="print what each module keeps")
    parser.add_argument(
        "--dynamic_method",
        type=str,
        default=None,
        choices=[None, "sv_ratio", "sv_fro", "sv_cumulative"],
        help="choose each module's rank by a rule on its singular values; --new_rank is the cap",
    )
    parser.add_argument("--dynamic_param", type=float, default=None, help="the rule's target")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> None:
        from library.tools.resize import resize_file  # after run_tool quiets the import noise

        resize_file(args)

    return run_tool(setup_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
