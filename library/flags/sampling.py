"""sd-scripts' sample-image options."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds nothing yet: the area's options still live in library/cli.py."""
