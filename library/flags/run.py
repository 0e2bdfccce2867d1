"""sd-scripts' scheduler, optimizer-switch, logging, multi-process and Hugging Face options of a run.

The scheduler options are read by `library/training/lr_schedulers.py`, the logging options by
`library/training/trackers.py` and `library/training/entry.py`, the multi-process and DeepSpeed options by
`library/training/multiprocess.py`, the Hugging Face options by `library/training/hub.py`.
"""

from __future__ import annotations

import argparse

from library.errors import ConfigError

CONSOLE_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# options of this area that stop a run in one line before any model loads, and why (docs/cli.md lists them)
REFUSALS = {
    "deepspeed": "needs the deepspeed package and a CUDA GPU, and even then the LoRA (trained outside a wrapped "
                 "module) does not go through DeepSpeed's engine; several GPUs train with accelerate launch alone",
}


def int_or_float(value: str) -> int | float:
    """A step count, or a fraction of the run's steps as sd-scripts reads it: '0.1' and '10%' are fractions,
    '1' and above are steps."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected steps (e.g. 100) or a fraction of the steps (0.1 or 10%), "
                                         f"got {value!r}") from None
    if number >= 1 and not number.is_integer():
        raise argparse.ArgumentTypeError(f"{value!r}: steps are a whole number; a fraction of the steps is below 1")
    return int(number) if number >= 1 else number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning-rate schedule (more)")
    g.add_argument("--lr_scheduler_type", type=str, default="",
                   help="any torch.optim.lr_scheduler class (e.g. CosineAnnealingLR) or module.Class; its settings "
                        "come from --lr_scheduler_args; replaces --lr_scheduler")
    g.add_argument("--lr_scheduler_args", type=str, nargs="*", default=None,
                   help="key=value settings of the scheduler (Python literals), e.g. T_max=100 eta_min=1e-6")
    g.add_argument("--lr_decay_steps", type=int_or_float, default=0,
                   help="decay steps of warmup_stable_decay: steps, or a fraction of the steps (0.2 or 20%%)")
    g.add_argument("--lr_scheduler_timescale", type=int, default=None,
                   help="inverse_sqrt: time scale (default: the warm-up steps, else 10000)")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                   help="cosine_with_min_lr / warmup_stable_decay: the lowest lr as a fraction of the lr")

    g = parser.add_argument_group("optimizer switches (sd-scripts' older spellings)")
    g.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit (bitsandbytes)")
    g.add_argument("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion")

    g = parser.add_argument_group("logging (more)")
    g.add_argument("--log_tracker_name", type=str, default=None,
                   help="the tracker's project name (default: network_train, with --log_prefix in front)")
    g.add_argument("--log_tracker_config", type=str, default=None,
                   help="TOML file of per-tracker init settings, e.g. [wandb] entity = 'me' tags = ['lora']")
    g.add_argument("--wandb_run_name", type=str, default=None, help="the wandb run's name")
    g.add_argument("--wandb_api_key", type=str, default=None,
                   help="log in to wandb with this key first (never written to the config or metadata)")
    g.add_argument("--log_config", action="store_true",
                   help="send the run's options to the trackers as their config (the wandb key and Hugging Face "
                        "token left out)")
    g.add_argument("--console_log_level", type=str, default=None, choices=CONSOLE_LOG_LEVELS,
                   help="level of the console log (default: INFO)")
    g.add_argument("--console_log_file", type=str, default=None, help="write the log to this file instead of stderr")
    g.add_argument("--console_log_simple", action="store_true", help="plain log lines (level and message only)")

    g = parser.add_argument_group("multi-process")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                   help="gradients are views into the flat all-reduce buffer: no second copy of the gradients")
    g.add_argument("--ddp_static_graph", action="store_true",
                   help="the same parameters get gradients every step: the all-reduce layout is built once")
    g.add_argument("--deepspeed", action="store_true",
                   help="DeepSpeed training: refused in one line (several GPUs train with accelerate launch alone); "
                        "the other DeepSpeed options warn that they have no effect without it")
    g.add_argument("--zero_stage", type=int, default=None, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (default: 2)")
    g.add_argument("--offload_optimizer_device", type=str, default=None, choices=["cpu", "nvme"],
                   help="DeepSpeed: where the optimizer state lives")
    g.add_argument("--offload_optimizer_nvme_path", type=str, default=None, help="DeepSpeed: NVMe folder of the state")
    g.add_argument("--offload_param_device", type=str, default=None, choices=["cpu", "nvme"],
                   help="DeepSpeed: where parameters live (ZeRO-3)")
    g.add_argument("--offload_param_nvme_path", type=str, default=None, help="DeepSpeed: NVMe folder of parameters")
    g.add_argument("--zero3_init_flag", action="store_true", help="DeepSpeed: build large models partitioned (ZeRO-3)")
    g.add_argument("--zero3_save_16bit_model", action="store_true", help="DeepSpeed: gather 16-bit weights to save (ZeRO-3)")
    g.add_argument("--fp16_master_weights_and_gradients", action="store_true",
                   help="DeepSpeed: fp16 master weights and gradients (ZeRO-2 with CPU optimizer offload only)")

    g = parser.add_argument_group("Hugging Face Hub")
    g.add_argument("--huggingface_repo_id", type=str, default=None,
                   help="upload each saved LoRA (after it is safely on disk) to this Hub repository")
    g.add_argument("--huggingface_repo_type", type=str, default=None, help="model (default), dataset or space")
    g.add_argument("--huggingface_path_in_repo", type=str, default=None, help="folder inside the repository")
    g.add_argument("--huggingface_token", type=str, default=None, help="Hub token (else the saved login)")
    g.add_argument("--huggingface_repo_visibility", type=str, default=None,
                   help="public or private, for a repository that does not exist yet (default: private, as sd-scripts)")
    g.add_argument("--save_state_to_huggingface", action="store_true", help="upload the --save_state folders too")
    g.add_argument("--resume_from_huggingface", action="store_true",
                   help="--resume names a Hub state folder: repo_id/path_in_repo:revision:repo_type")
    g.add_argument("--async_upload", action="store_true", help="upload in the background; training goes on")


def resolve_optimizer_switches(args: argparse.Namespace, *, optimizer_type_given: bool) -> None:
    """--use_8bit_adam / --use_lion_optimizer name the optimizer, as in sd-scripts, which refuses them beside an
    explicit --optimizer_type or each other."""
    switches = [f"--{s}" for s in ("use_8bit_adam", "use_lion_optimizer") if getattr(args, s)]
    if len(switches) == 2:
        raise ConfigError("--use_8bit_adam and --use_lion_optimizer exclude each other; give one --optimizer_type")
    if switches and optimizer_type_given:
        raise ConfigError(f"{switches[0]} and --optimizer_type {args.optimizer_type} exclude each other, as in "
                          "sd-scripts; keep one")
    if args.use_8bit_adam:
        args.optimizer_type = "AdamW8bit"
    elif args.use_lion_optimizer:
        args.optimizer_type = "Lion"
