"""Lower a LoRA's rank by SVD, to a fixed rank or by a dynamic rule (sd-scripts' command line)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python networks/<tool>.py`

from library.tools import tool_args  # noqa: E402
from library.tools.runner import tool_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    tool_args.add_save_precision(parser, "float")
    tool_args.add_new_ranks(parser, "rank of the output LoRA (the cap with --dynamic_method)")
    parser.add_argument(
        "--save_to", type=str, default=None, help="output LoRA file (.safetensors/.ckpt/.pt/.pth)"
    )
    parser.add_argument("--model", type=str, default=None, help="LoRA file to resize")
    tool_args.add_device(parser)
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


main = tool_main(setup_parser, "library.tools.resize:resize_file")


if __name__ == "__main__":
    sys.exit(main())
