"""`--output_config`: write the merged options as TOML that `--config_file` reads back."""

from __future__ import annotations

import argparse
from pathlib import Path

from library.errors import ConfigError
from library.training.atomic import atomic_file

_SKIP = {"config_file", "output_config", "optimizer_table", "config_file_keys"}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(args: argparse.Namespace) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in sorted(vars(args).items()) if k not in _SKIP and v is not None]
    table = getattr(args, "optimizer_table", None)
    if table:
        lines += ["", "[optimizer]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write_config(args: argparse.Namespace) -> Path:
    if not args.output_dir:
        raise ConfigError("--output_config needs --output_dir")
    path = Path(args.output_dir) / f"{args.output_name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(to_toml(args), encoding="utf-8")
    return path
