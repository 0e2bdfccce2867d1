"""Experiment trackers (TensorBoard, wandb) and the console log, set up from sd-scripts' logging options.

accelerate runs the trackers; this module only chooses them, names the run, and names the scalars as sd-scripts'
train_network.py does (lr/unet, lr/textencoder, loss/current, ...) so existing dashboards keep working.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from library.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# never sent to a tracker: secrets, and local paths that say who ran it (as sd-scripts leaves them out)
_SECRET_OPTIONS = ("wandb_api_key", "huggingface_token")
_PATH_OPTIONS = ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir",
                 "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir")


def configure_console(args: argparse.Namespace) -> None:
    """--console_log_level / --console_log_file / --console_log_simple: replaces the start-up console handler
    (only the plain stream/file handlers: others, such as a test runner's, stay)."""
    if not (args.console_log_level or args.console_log_file or args.console_log_simple):
        return
    if args.console_log_file:
        try:
            handler: logging.Handler = logging.FileHandler(args.console_log_file, mode="w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--console_log_file {args.console_log_file}: cannot write ({exc.strerror})") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if args.console_log_simple else "%(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if type(h) in (logging.StreamHandler, logging.FileHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    if args.console_log_level:
        root.setLevel(getattr(logging, args.console_log_level))


def tracker_choice(args: argparse.Namespace) -> str | None:
    """accelerate's log_with: --log_with, else TensorBoard when --logging_dir is given (sd-scripts); none: off."""
    if args.log_with == "none":
        return None
    return args.log_with or ("tensorboard" if args.logging_dir else None)


def logging_dir_of_run(args: argparse.Namespace, output_dir: Path | None) -> str:
    """This run's log folder: <--logging_dir>/<--log_prefix><start time>, as sd-scripts names it, so runs never
    share one TensorBoard folder (without --logging_dir: <output_dir>/logs/...)."""
    base = Path(args.logging_dir) if args.logging_dir else Path(output_dir or ".") / "logs"
    return str(base / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime())}")


def check_trackers(args: argparse.Namespace) -> None:
    """Before any model loads: the tracker package, the tracker config file."""
    choice = tracker_choice(args)
    if choice in ("wandb", "all"):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"--log_with {choice} needs the wandb package: pip install wandb")
    if args.log_tracker_config:
        tracker_init_kwargs(args)


def tracker_init_kwargs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per-tracker init settings: --log_tracker_config's TOML tables replace the defaults, as in sd-scripts."""
    if args.log_tracker_config:
        path = Path(args.log_tracker_config)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--log_tracker_config {path}: file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--log_tracker_config {path}: not a TOML file ({exc})") from None
        bad = [k for k, v in data.items() if not isinstance(v, dict)]
        if bad:
            raise ConfigError(f"--log_tracker_config {path}: {bad[0]!r} must be a table of one tracker's settings, "
                              "e.g. [wandb] entity = 'me'")
        return data
    return {"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {}


def sanitized_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options as a tracker config (--log_config): plain values, lists as text, no secrets or local paths."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in _SECRET_OPTIONS or key in _PATH_OPTIONS:
            continue
        out[key] = value if value is None or isinstance(value, (bool, str, int, float)) else str(value)
    return out


def start_trackers(accelerator, args: argparse.Namespace, extra_config: dict[str, Any]) -> None:
    """accelerator.init_trackers with sd-scripts' run name, init settings and config (main process only)."""
    choice = tracker_choice(args)
    if not choice or not accelerator.is_main_process:
        return
    if choice in ("wandb", "all"):
        import wandb

        if args.logging_dir:  # the wandb run folder lives with the run's other logs, as in sd-scripts
            os.makedirs(accelerator.project_dir, exist_ok=True)
            os.environ["WANDB_DIR"] = accelerator.project_dir
        if args.wandb_api_key:
            wandb.login(key=args.wandb_api_key)
    config = {**(sanitized_config(args) if args.log_config else {}), **extra_config}
    name = args.log_tracker_name or "network_train"
    accelerator.init_trackers(name, config=config, init_kwargs=tracker_init_kwargs(args))


def log_scalars(accelerator, logs: dict[str, float], *, step_value: int, global_step: int, epoch: int) -> None:
    """As sd-scripts' accelerator_logging: TensorBoard (and other trackers) at `step_value`; wandb at its own
    growing step with `global_step` and `epoch` beside the values (an epoch log's step would go backwards)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log({**logs, "global_step": global_step, "epoch": epoch})
        else:
            tracker.log(logs, step=step_value)


def lr_logs(groups: Sequence[dict], *, unet_only: bool) -> dict[str, float]:
    """Learning-rate scalars named as sd-scripts' generate_step_logs names them.

    sd-scripts writes `lr/<description>` per group ("textencoder", "unet", "unet plus", ...) and then, by its
    for/else, also `lr/textencoder` (group 0, unless U-Net only) and `lr/group<i>` for the others; the effective
    `lr/d*lr/...` of D-Adaptation / Prodigy beside each.
    """
    logs: dict[str, float] = {}

    def put(name: str, group: dict) -> None:
        logs[f"lr/{name}"] = float(group["lr"])
        if "d" in group:
            logs[f"lr/d*lr/{name}"] = float(group["d"]) * float(group["lr"])

    for i, group in enumerate(groups):
        put(group.get("description") or _fallback_description(i, len(groups), unet_only), group)
    first = 0
    if not unet_only and groups:
        logs["lr/textencoder"] = float(groups[0]["lr"])
        first = 1
    for i in range(first, len(groups)):
        logs[f"lr/group{i}"] = float(groups[i]["lr"])
        if "d" in groups[i]:
            logs[f"lr/d*lr/group{i}"] = float(groups[i]["d"]) * float(groups[i]["lr"])
    return logs


def _fallback_description(i: int, count: int, unet_only: bool) -> str:
    """sd-scripts' names for a network module that gives no descriptions."""
    idx = i - (0 if unet_only else 1)
    if idx == -1:
        return "textencoder"
    return f"group{idx}" if count > 2 else "unet"
