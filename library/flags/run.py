"""sd-scripts' scheduler, optimizer-switch, logging and multi-process options."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds nothing yet: the area's options still live in library/cli.py."""
