"""Print each LoRA tensor's shape, mean and min absolute value (sd-scripts' command line)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python networks/<tool>.py`

from library.tools.runner import tool_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=str, help="LoRA file to check")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="show all keys")
    return parser


main = tool_main(setup_parser, "library.tools.check:check_file")


if __name__ == "__main__":
    sys.exit(main())
