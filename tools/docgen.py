"""Shared main of the doc generators: rewrite a generated page, or with --check fail when it is stale."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def write_or_check(doc: Path, render_from: Callable[[str], str], fix: str, description: str,
                   argv: list[str] | None = None, empty: str = "") -> int:
    """`render_from(current page text)` gives the new text; `fix` is the command that regenerates the page."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help=f"exit 1 when {doc.name} is stale")
    args = parser.parse_args(argv)
    current = doc.read_text(encoding="utf-8") if doc.exists() else empty
    new = render_from(current)
    if args.check:
        if new != current:
            print(f"{doc} is stale: run {fix}", file=sys.stderr)
            return 1
        return 0
    doc.write_text(new, encoding="utf-8")
    print(f"wrote {doc}")
    return 0
