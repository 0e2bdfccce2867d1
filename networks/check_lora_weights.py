"""Print each LoRA tensor's shape, mean and min absolute value (sd-scripts' command line)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as `python networks/<tool>.py`

from library.tools.runner import run_tool  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=str, help="LoRA file to check")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="show all keys")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body(args: argparse.Namespace) -> None:
        from library.tools.check import check_file  # after run_tool quiets the import noise

        check_file(args)

    return run_tool(setup_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
