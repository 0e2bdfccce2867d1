"""Merge LoRAs of any ranks into one LoRA of a new rank by SVD (sd-scripts' command line)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python networks/<tool>.py`

from library.tools import tool_args  # noqa: E402
from library.tools.runner import tool_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    tool_args.add_merge_precisions(parser)
    parser.add_argument("--save_to", type=str, default=None, help="output LoRA file (.safetensors/.ckpt)")
    tool_args.add_lora_inputs(parser)
    tool_args.add_new_ranks(parser, "rank of the output LoRA")
    tool_args.add_device(parser)
    tool_args.add_no_metadata(parser)
    return parser


main = tool_main(setup_parser, "library.tools.svd_merge:svd_merge")


if __name__ == "__main__":
    sys.exit(main())
