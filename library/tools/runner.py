"""What every tool script shares: logging, the device check, progress bars, errors as one line + exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from library.errors import ConfigError, LoraForgeError
from library.quiet import silence_library_noise

logger = logging.getLogger("loraforge.tools")


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """The compute device; a CUDA device on a machine without one stops here, before any model loads."""
    if not name:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{flag} {name!r}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {name}: CUDA is not available on this machine; use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def progress(desc: str) -> Callable[[Iterable], Iterable]:
    """A tqdm bar over a list (on stderr; tqdm hides it when stderr is not a terminal)."""
    return lambda items: tqdm(items, desc=desc, disable=None, leave=False)


def run_tool(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse, run; a LoraForgeError becomes `error: <one line>` on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    silence_library_noise()
    args = parser.parse_args(argv)
    try:
        body(args)
    except LoraForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def tool_main(
    setup_parser: Callable[[], argparse.ArgumentParser], target: str, **kwargs
) -> Callable[[Sequence[str] | None], int]:
    """A tool script's `main(argv)`: run_tool on `module:function(args, **kwargs)`.

    The module is imported inside run_tool, after the library import noise is quieted.
    """
    module_name, function_name = target.split(":")

    def body(args: argparse.Namespace) -> None:
        getattr(importlib.import_module(module_name), function_name)(args, **kwargs)

    def main(argv: Sequence[str] | None = None) -> int:
        return run_tool(setup_parser(), body, argv)

    return main
