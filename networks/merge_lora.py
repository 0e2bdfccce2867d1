"""Merge LoRAs into an SD1/SD2 model, or several LoRAs into one, with sd-scripts' command line."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python networks/<tool>.py`

from library.tools import tool_args  # noqa: E402
from library.tools.runner import tool_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    tool_args.add_v2(parser, "a Stable Diffusion 2.x model")
    tool_args.add_merge_arguments(parser)
    return parser


main = tool_main(setup_parser, "library.tools.merge:merge")


if __name__ == "__main__":
    sys.exit(main())
