"""Command-line entry: parse, special commands, train; user errors become one line and exit code 2."""

from __future__ import annotations

import logging
import sys

from library.errors import LoraForgeError
from library.quiet import silence_library_noise


def _setup_logging() -> None:
    import os

    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun/accelerate only rank 0 reports progress
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    silence_library_noise()


def _announce(args) -> None:
    """The run's first line, printed before torch and diffusers load (several seconds on a cold start)."""
    steps = f"{args.max_train_epochs} epochs" if args.max_train_epochs else f"{args.max_train_steps} steps"
    where = f"{args.output_dir}/{args.output_name}" if args.output_dir else args.output_name
    logging.getLogger("loraforge").info("loraforge: a %s LoRA on %s, %s, %s -> %s; loading libraries",
                                        args.network_module, args.pretrained_model_name_or_path, steps,
                                        args.optimizer_type, where)


def main(argv: list[str] | None = None, *, force_sdxl: bool = False) -> int:
    _setup_logging()
    try:
        from library.cli import parse_args
        from library.training.trackers import configure_console

        args = parse_args(argv, prog="sdxl_train_network.py" if force_sdxl else "train_network.py")
        configure_console(args)
        if force_sdxl:
            args.sdxl = True
        if args.optimizer_type.lower() == "list":
            from library.optimizers.registry import format_optimizer_table

            print(format_optimizer_table())
            return 0
        if args.output_config:
            from library.training.config_dump import write_config

            print(write_config(args))
            return 0
        _announce(args)
        if args.dry_run:
            from library.training.dry_run import plan
            from library.training.trainer import LoRATrainer

            trainer = LoRATrainer(args)
            trainer.check()
            print(plan(trainer))
            return 0
        from library.training.trainer import TrainingStopped, train

        try:
            train(args)
        except TrainingStopped as stop:
            print(f"loraforge: {stop}", file=sys.stderr)
            return stop.exit_code
    except LoraForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training's own handler is in place: nothing to save yet
        print("loraforge: interrupted during set-up; nothing was trained or saved", file=sys.stderr)
        return 130
    return 0
