"""The learning-rate schedule, chosen and parameterised as sd-scripts' get_scheduler_fix does.

The curves themselves come from transformers (linear ... warmup_stable_decay), diffusers (piecewise_constant),
torch or any importable module (--lr_scheduler_type): only the choice of arguments is written here, so a run gets
sd-scripts' curve to the step. `check_lr_scheduler` runs before any model is loaded; `build_lr_scheduler` after
the optimizer exists.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Any

import torch

from library.cli import LR_SCHEDULERS
from library.errors import ConfigError
from library.training.setup import optimizer_name, parse_key_values

logger = logging.getLogger("loraforge")

# the names whose curve needs no warm-up value and refuse one, as sd-scripts refuses them
_NO_WARMUP = ("constant", "adafactor", "piecewise_constant")


def steps_of(value: int | float, total_steps: int) -> int:
    """--lr_warmup_steps / --lr_decay_steps: a float below 1 is a fraction of the steps (rounded down)."""
    return int(value * total_steps) if isinstance(value, float) else int(value)


def scheduler_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """--lr_scheduler_args k=v, values as Python literals (ast.literal_eval, never eval)."""
    return parse_key_values(args.lr_scheduler_args, "--lr_scheduler_args")


def _scheduler_class(path: str):
    """`Name` from torch.optim.lr_scheduler, or `module.Name` from any importable module."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except ImportError as exc:
        raise ConfigError(f"--lr_scheduler_type {path}: cannot import {module_name} ({exc})") from None
    target = getattr(module, attr, None)
    if not callable(target):
        where = module_name or "torch.optim.lr_scheduler"
        raise ConfigError(f"--lr_scheduler_type {path}: {where} has no scheduler {attr!r} "
                          "(give a torch.optim.lr_scheduler class such as CosineAnnealingLR, or module.Class)")
    return target


def is_schedule_free(args: argparse.Namespace) -> bool:
    """Schedule-free optimizers take no scheduler in sd-scripts (it gives them a dummy one)."""
    from library.optimizers.registry import resolve

    spec = resolve(optimizer_name(args))
    return getattr(spec.build, "path", spec.name).lower().endswith("schedulefree")


def _base_name(name: str) -> str:
    return "adafactor" if name.startswith("adafactor") else name


def check_lr_scheduler(args: argparse.Namespace) -> None:
    """The options' problems as one line each, before any model is loaded."""
    kwargs = scheduler_kwargs(args)
    warmup = args.lr_warmup_steps
    if warmup < 0 or (args.lr_decay_steps or 0) < 0:
        bad = "lr_warmup_steps" if warmup < 0 else "lr_decay_steps"
        raise ConfigError(f"--{bad} {getattr(args, bad)}: must be >= 0 (steps, or a fraction of the steps below 1)")
    if args.lr_scheduler_type:
        _scheduler_class(args.lr_scheduler_type)
        if warmup:
            raise ConfigError(f"--lr_scheduler_type {args.lr_scheduler_type} does not take --lr_warmup_steps "
                              f"({warmup}); set it to 0, as sd-scripts requires")
        return
    name = _base_name(args.lr_scheduler)
    if name not in LR_SCHEDULERS:
        raise ConfigError(f"--lr_scheduler {args.lr_scheduler}: choose one of: {', '.join(LR_SCHEDULERS)} "
                          "(or --lr_scheduler_type for any torch scheduler)")
    if name in _NO_WARMUP and warmup:
        raise ConfigError(f"--lr_scheduler {args.lr_scheduler} does not take --lr_warmup_steps ({warmup}); set it "
                          "to 0 or use constant_with_warmup, as sd-scripts requires")
    if args.lr_scheduler.startswith("adafactor:"):
        try:
            float(args.lr_scheduler.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"--lr_scheduler {args.lr_scheduler}: expected adafactor:INITIAL_LR, "
                              "e.g. adafactor:1e-3") from None
    if name == "piecewise_constant" and "step_rules" not in kwargs:
        raise ConfigError("--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules=\"1:10,0.1:20,0.01\" "
                          "(multiplier:until_step, ..., final multiplier)")
    if name == "cosine_with_min_lr" and args.lr_scheduler_min_lr_ratio is None:
        raise ConfigError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
    if name == "warmup_stable_decay" and not args.lr_decay_steps:
        raise ConfigError("--lr_scheduler warmup_stable_decay needs --lr_decay_steps (steps, or a fraction like 0.2)")


def build_lr_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, total_steps: int):
    """The scheduler for `total_steps` scheduler steps, as sd-scripts' get_scheduler_fix builds it."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, AdafactorSchedule, SchedulerType

    kwargs = scheduler_kwargs(args)
    if is_schedule_free(args):
        logger.info("%s follows its own schedule: the learning rate stays as given (--lr_scheduler is not used, as "
                    "in sd-scripts)", optimizer_name(args))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if args.lr_scheduler_type:
        logger.info("lr scheduler: %s %s", args.lr_scheduler_type, kwargs)
        try:
            return _scheduler_class(args.lr_scheduler_type)(optimizer, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--lr_scheduler_type {args.lr_scheduler_type} with --lr_scheduler_args {kwargs}: "
                              f"{exc}") from None
    name = args.lr_scheduler
    is_adafactor = type(optimizer).__name__ == "Adafactor"
    if is_adafactor and optimizer.defaults.get("relative_step") and not name.startswith("adafactor"):
        if args.lr_warmup_steps:
            raise ConfigError(f"Adafactor with relative_step uses its own schedule, which does not take "
                              f"--lr_warmup_steps ({args.lr_warmup_steps}); set it to 0, as sd-scripts requires")
        logger.info("Adafactor with relative_step: its own schedule replaces --lr_scheduler %s, as in sd-scripts", name)
        name = f"adafactor:{args.learning_rate or 0.0}"
    if name.startswith("adafactor"):
        if not is_adafactor:
            raise ConfigError(f"--lr_scheduler {name} is Adafactor's own schedule: use it with --optimizer_type "
                              "Adafactor")
        initial_lr = float(name.split(":", 1)[1]) if ":" in name else float(args.learning_rate or 0.0)
        return AdafactorSchedule(optimizer, initial_lr)
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        return get_piecewise_constant_schedule(optimizer, **kwargs)

    warmup = steps_of(args.lr_warmup_steps, total_steps)
    decay = steps_of(args.lr_decay_steps or 0, total_steps)
    fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    per_name: dict[str, dict[str, Any]] = {
        "constant": {},
        "constant_with_warmup": {"num_warmup_steps": warmup},
        "inverse_sqrt": {"num_warmup_steps": warmup, "timescale": args.lr_scheduler_timescale},
        "linear": {"num_warmup_steps": warmup, "num_training_steps": total_steps},
        "cosine": {"num_warmup_steps": warmup, "num_training_steps": total_steps},
        "cosine_with_restarts": {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                                 "num_cycles": args.lr_scheduler_num_cycles},
        "polynomial": {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                       "power": args.lr_scheduler_power},
        # sd-scripts passes half the cycles: one --lr_scheduler_num_cycles is one half-cosine down
        "cosine_with_min_lr": {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                               "num_cycles": args.lr_scheduler_num_cycles / 2,
                               "min_lr_rate": args.lr_scheduler_min_lr_ratio},
        "warmup_stable_decay": {"num_warmup_steps": warmup, "num_stable_steps": total_steps - warmup - decay,
                                "num_decay_steps": decay, "num_cycles": args.lr_scheduler_num_cycles / 2,
                                "min_lr_ratio": args.lr_scheduler_min_lr_ratio or 0.0},
    }
    try:
        return fn(optimizer, **per_name[name], **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--lr_scheduler {name} with --lr_scheduler_args {kwargs}: {exc}") from None
