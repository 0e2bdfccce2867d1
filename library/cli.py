"""The one command-line parser, with sd-scripts' option names and meanings.

Every option can also come from `--config_file` TOML (keys are option names, tables are flattened, the
`[optimizer]` table is the OpenToMe optimizer table); values given on the command line win over the file.
Optimizer flags default to `None` so that "given explicitly" can be told from "left at the default" — the
optimizer registry fills the documented defaults and logs where every non-default value came from.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from library.errors import ConfigError
from library.flags.kohya_gui import KOHYA_GUI_KEYS
from library.flags.run import int_or_float, resolve_optimizer_switches
from library.training.sample_prompts import SAMPLERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger("loraforge")

DEFAULT_MODEL = "builtin:tiny-sd"
# sd-scripts' --lr_scheduler names; "adafactor" (also "adafactor:LR") is Adafactor's own relative-step schedule
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "adafactor", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant")

# Optimizer-specific flags: (dest, type, documented default, help). Defaults are shown in --help but the parsed
# default is None, so the registry knows which values the user set.
CUSTOM_ADAMW_FLAGS: list[tuple[str, type, Any, str]] = [
    ("use_spd", bool, True, "Selective Projection Decay: pull parameters back towards their start when a step moves them away"),
    ("spd_lambda", float, 0.1, "SPD strength"),
    ("use_cautious", bool, True, "Cautious update: mask coordinates whose update disagrees with the gradient"),
    ("use_orthogonal_grad", bool, False,
     "OrthoGrad: remove the gradient component parallel to the weights (Automagic: after warm-up)"),
    ("use_adopt_stability", bool, True, "ADOPT: normalise by the previous step's second moment, clip by t^(1/4)"),
    ("use_grams", bool, True, "Grams: update direction from the gradient sign, magnitude from Adam"),
    ("use_agr", bool, True, "Adaptive Gradient Regularisation: damp coordinates with a large share of |g|"),
    ("use_tam", bool, True, "Torque-Aware Momentum: damp gradients that disagree with the momentum"),
    ("tam_beta", float, 0.999, "TAM smoothing of the gradient/momentum cosine"),
    ("use_alora", bool, True, "ALLoRA row scaling + LoRA+ learning-rate ratio for lora_up/lora_B"),
    ("alora_ratio", float, 21.0, "LoRA+ ratio lr(lora_up)/lr(lora_down) (the docs' ηB/ηA)"),
    ("alora_eta", float, 2.0, "ALLoRA row scaling 1/sqrt(|row|^2 + 1/eta^2) (CustomAdamW, Automagic)"),
    ("dynamic_weight_decay", bool, True, "Decay the weight decay after --wd_transition_steps"),
    ("wd_transition_steps", int, 1000, "steps at full weight decay before it starts to fall"),
    ("wd_decay_factor", float, 0.7, "weight decay multiplier per --wd_transition_steps after the transition"),
    ("wd_min_ratio", float, 0.1, "floor of the weight decay, as a fraction of --weight_decay"),
]
AUTOMAGIC_FLAGS: list[tuple[str, type, Any, str]] = [
    ("min_lr", float, 1e-6, "lower bound of the per-element learning-rate mask"),
    ("max_lr", float, 1e-2, "upper bound of the per-element learning-rate mask"),
    ("lr_bump", float, 1e-5, "step by which the learning-rate mask moves each step"),
    ("beta1", float, 0.9, "momentum decay"),
    ("d_coef", float, 2.0, "Prodigy-style coefficient on upward lr bumps"),
    ("warmup_steps", int, 500, "optimizer warm-up steps (decay in the first half, OrthoGrad after)"),
    ("full_finetune", bool, False, "full fine-tune mode (5 SinkGD iterations; all tensor shapes)"),
    ("stats_update_freq", int, 5, "refresh optimizer statistics every N steps"),
]
# earlier spellings, still accepted as second option strings of the same flag
FLAG_ALIASES = {"use_orthogonal_grad": "orthograd", "alora_eta": "eta"}
_EARLIER_NAMES = {earlier: dest for dest, earlier in FLAG_ALIASES.items()}
OPTIMIZER_FLAG_DESTS = tuple(d for d, *_ in CUSTOM_ADAMW_FLAGS + AUTOMAGIC_FLAGS) + ("weight_decay", "optim_bits")


DYNAMO_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

def _resolution(value: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768,512' -> (width, height) as sd-scripts."""
    try:
        parts = [int(p) for p in str(value).replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or W,H (e.g. 512 or 768,512), got {value!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected N or W,H with positive integers, got {value!r}")
    if min(parts) < 64 or max(parts) > 16384:
        raise argparse.ArgumentTypeError(f"{value!r}: each side must be from 64 to 16384 pixels")
    return parts[0], parts[1]


def _add_flag(group: argparse._ArgumentGroup, dest: str, kind: type, default: Any, text: str) -> None:
    names = [f"--{dest}"] + ([f"--{FLAG_ALIASES[dest]}"] if dest in FLAG_ALIASES else [])
    if dest in FLAG_ALIASES:
        text += f"; --{FLAG_ALIASES[dest]} is its earlier name"
    if kind is bool:
        group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{text} (default: {default})")
    else:
        group.add_argument(*names, dest=dest, type=kind, default=None, metavar=kind.__name__.upper(),
                           help=f"{text} (default: {default})")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's errors as one line, `<prog>: error: ...`, exit code 2, without the usage dump; an unknown
    option comes with the closest known ones."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = [s for a in self._actions for s in a.option_strings]
            hints = []
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=", 1)[0], known, n=2) if word.startswith("-") else []
                if close:
                    hints.append(f"{word} -> {' or '.join(close)}")
            if hints:
                message += f" (did you mean: {'; '.join(hints)}?)"
        self.exit(2, f"{self.prog}: error: {message}\n")


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not where its help already states it, nor for unset (None) values."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser(prog: str = "train_network.py") -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog=prog,
        description="Train a LoRA for Stable Diffusion 1.x / 2.x / SDXL (sd-scripts compatible options).",
        formatter_class=DefaultsOnceFormatter,
    )
    p.add_argument("--config_file", type=str, default=None,
                   help="TOML file with any of these options as keys; command-line values win")
    p.add_argument("--output_config", action="store_true", help="write the merged options to <output_dir>/<output_name>.toml and exit")
    p.add_argument("--dry_run", action="store_true",
                   help="check everything the run would touch (options, dataset, prompts, output names, free space) "
                        "and print its plan (steps, epochs, batch, buckets, a peak-VRAM estimate) without training")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=DEFAULT_MODEL,
                   help="diffusers folder, single .safetensors/.ckpt file, or builtin:tiny-sd")
    g.add_argument("--v2", action="store_true", help="the base model is SD 2.x")
    g.add_argument("--v_parameterization", action="store_true", help="v-prediction loss (SD 2.x 768)")
    g.add_argument("--sdxl", action="store_true", help="the base model is SDXL (detected from the file if not given)")
    g.add_argument("--clip_skip", type=int, default=None, help="use the output of the N-th last text-encoder layer")

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset_config", type=str, default=None, help="dataset TOML ([general], [[datasets]], [[datasets.subsets]])")
    g.add_argument("--train_data_dir", type=str, default=None, help="folder of <repeats>_<concept> image folders")
    g.add_argument("--reg_data_dir", type=str, default=None, help="folder of <repeats>_<class> regularisation image folders")
    g.add_argument("--resolution", type=_resolution, default=(512, 512), help="training resolution N or W,H")
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio buckets")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side in px")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side in px")
    g.add_argument("--bucket_reso_steps", type=int, default=64,
                   help="bucket sides are multiples of this many px")
    g.add_argument("--bucket_no_upscale", action="store_true",
                   help="never enlarge an image: small images get buckets of their own size")
    g.add_argument("--caption_extension", type=str, default=None,
                   help="caption file extension; default: .caption, then .txt (the log says which was used)")
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle comma-separated tags")
    g.add_argument("--keep_tokens", type=int, default=0, help="keep the first N tags in place when shuffling")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="probability of an empty caption")
    g.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    g.add_argument("--cache_latents", action="store_true", help="encode images with the VAE once, before training")
    g.add_argument("--cache_latents_to_disk", action="store_true", help="cache latents as .npz next to the images")
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="encode captions once (text encoders not trained; no caption shuffle/dropout)")
    g.add_argument("--max_data_loader_n_workers", type=int, default=0,
                   help="data-loading worker processes (0: load in the training process)")
    g.add_argument("--persistent_data_loader_workers", action="store_true",
                   help="keep the data-loading workers alive across epochs")
    g.add_argument("--skip_bad_images", action="store_true", help="skip unreadable images (listed in the log) instead of stopping")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")

    g = p.add_argument_group("network")
    g.add_argument("--network_module", type=str, default="networks.lora",
                   help="network to train: networks.lora, networks.dylora, networks.lora_fa, networks.oft, "
                        "lycoris.kohya (docs/networks.md)")
    g.add_argument("--network_dim", type=int, default=4, help="LoRA rank")
    g.add_argument("--network_alpha", type=float, default=1.0, help="LoRA alpha (scale = alpha / dim)")
    g.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down output")
    g.add_argument("--network_args", type=str, nargs="*", default=None,
                   help="key=value extras, e.g. conv_dim=4 conv_alpha=1 loraplus_lr_ratio=16")
    g.add_argument("--network_weights", type=str, default=None, help="start from these LoRA weights")
    g.add_argument("--network_train_unet_only", action="store_true", help="train the U-Net's LoRA only")
    g.add_argument("--network_train_text_encoder_only", action="store_true",
                   help="train the text encoders' LoRA only")
    g.add_argument("--unet_lr", type=float, default=None, help="learning rate of the U-Net's LoRA (default: --learning_rate)")
    g.add_argument("--text_encoder_lr", type=float, nargs="*", default=None,
                   help="learning rate of the text encoder(s); SDXL: one value for both, or one per encoder")
    g.add_argument("--dim_from_weights", action="store_true", help="take dim/alpha from --network_weights")

    g = p.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=1,
                   help="images per step and process (a dataset TOML's batch_size wins)")
    g.add_argument("--max_train_steps", type=int, default=1600, help="optimizer steps to train")
    g.add_argument("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches summed into one optimizer step")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, slower steps")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                   help="precision of the frozen model and the forward pass (bf16 on recent GPUs; no on CPUs)")
    g.add_argument("--full_fp16", action="store_true", help="fp16 LoRA weights too (loss scaling)")
    g.add_argument("--full_bf16", action="store_true", help="bf16 LoRA weights too")
    g.add_argument("--seed", type=int, default=42, help="seed of every random draw of the run")
    g.add_argument("--noise_offset", type=float, default=None,
                   help="offset noise strength (typical 0.05-0.1): lets the model learn very dark / bright images")
    g.add_argument("--min_snr_gamma", type=float, default=None,
                   help="Min-SNR loss weighting gamma (typical 5)")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                   help="v-prediction: weight the loss by SNR/(SNR+1), like an eps-prediction loss")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the noise schedule to zero SNR at the last timestep")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--lr_scheduler", type=str, default="constant", help=f"one of {', '.join(LR_SCHEDULERS)}")
    g.add_argument("--lr_warmup_steps", type=int_or_float, default=0,
                   help="warm-up steps, or a fraction of the steps (0.1 or 10%%)")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    g.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--sdpa", action="store_true", help="scaled-dot-product attention (PyTorch's, the default)")
    g.add_argument("--xformers", action="store_true", help="accepted for sd-scripts scripts; uses PyTorch SDPA")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the UNet (reports compile time)")
    g.add_argument("--dynamo_mode", choices=DYNAMO_MODES, default=None,
                   help="torch.compile mode (implies --torch_compile); reduce-overhead replays forward and backward "
                        "as CUDA graphs, the fastest on a GPU")
    g.add_argument("--dynamo_backend", type=str, default="inductor", help="torch.compile backend")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="record the U-Net's forward + loss + backward once per resolution bucket as a CUDA graph and "
                        "replay it: removes the host's launch cost without compiling (SDXL: several times faster); "
                        "with a capturable optimizer (CustomAdamW, fused AdamW), one process and no gradient "
                        "accumulation the clip and optimizer step are recorded too; CUDA, bf16 or fp32, U-Net-only "
                        "training (--network_train_unet_only)")
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format for the U-Net")
    g.add_argument("--detect_anomaly", action="store_true",
                   help="torch autograd anomaly detection (slow; finds where a NaN starts)")
    g.add_argument("--ddp_timeout", type=int, default=None,
                   help="minutes a process waits in a collective for the others before failing (accelerate's "
                        "default: 30)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", type=str, default="AdamW", help="registry name; 'list' prints them all")
    g.add_argument("--learning_rate", type=float, default=None, help="default: the optimizer's documented lr, else 1e-4")
    g.add_argument("--optimizer_args", type=str, nargs="*", default=None, help="key=value (python literals)")
    g.add_argument("--weight_decay", type=float, default=None, help="weight decay (default: the optimizer's)")
    g.add_argument("--optim_bits", type=int, default=None, choices=[8, 32], help="state precision where supported")

    g = p.add_argument_group("CustomAdamW (Hina)", "used with --optimizer_type CustomAdamW")
    for flag in CUSTOM_ADAMW_FLAGS:
        _add_flag(g, *flag)
    g = p.add_argument_group("Automagic", "used with --optimizer_type Automagic_Sinkgd / Automagic_CameAMP")
    for flag in AUTOMAGIC_FLAGS:
        _add_flag(g, *flag)

    g = p.add_argument_group("saving")
    g.add_argument("--output_dir", type=str, default=None, help="folder for the LoRA files, state and samples")
    g.add_argument("--output_name", type=str, default="last", help="file name of the LoRA, without extension")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=["ckpt", "pt", "safetensors"],
                   help="LoRA file format: safetensors (with metadata), or ckpt/pt (torch.save of the tensors only)")
    g.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                   help="dtype of the saved LoRA (default: the trained weights' dtype)")
    g.add_argument("--save_every_n_epochs", type=int, default=None, help="save a LoRA every N epochs")
    g.add_argument("--save_every_n_steps", type=int, default=None, help="save a LoRA every N steps")
    g.add_argument("--save_state", action="store_true", help="also save optimizer/scheduler/RNG state for --resume")
    g.add_argument("--resume", type=str, default=None, help="state folder written by --save_state")
    g.add_argument("--overwrite", action="store_true",
                   help="run again under an earlier run's --output_name: its files (LoRA, checkpoints, states, "
                        "samples, loss plot) are first moved to earlier-<name>-<time>/")

    g = p.add_argument_group("logging")
    g.add_argument("--logging_dir", type=str, default=None,
                   help="tracker logs go to <logging_dir>/<log_prefix><start time>/, as in sd-scripts (default: "
                        "<output_dir>/logs; TensorBoard needs no --log_with when this is given)")
    g.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all", "none"],
                   help="trackers: tensorboard (under --logging_dir), wandb, all; none turns them off (default: "
                        "tensorboard when --logging_dir is given)")
    g.add_argument("--log_prefix", type=str, default=None, help="put in front of the run's log folder name")
    g.add_argument("--log_every_n_steps", type=int, default=10, help="loss read back from the device every N steps")
    g.add_argument("--plot_every_n_steps", type=int, default=None, help="also write the loss/lr plot every N steps")

    g = p.add_argument_group("sampling")
    g.add_argument("--sample_every_n_steps", type=int, default=None, help="draw the sample prompts every N steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None,
                   help="draw the sample prompts every N epochs (replaces --sample_every_n_steps, as sd-scripts)")
    g.add_argument("--sample_prompts", type=str, default=None,
                   help="prompt file (.txt: one prompt per line with --n --w --h --d --s --l --ss ...; .toml; .json), "
                        "read and checked before training")
    g.add_argument("--sample_sampler", type=str, default="ddim", choices=list(SAMPLERS),
                   help="sampler (diffusers scheduler) of the sample images, as sd-scripts maps the names")
    g.add_argument("--sample_at_first", action="store_true", help="also draw the samples before the first step")

    from library.flags import captions, images, models_saving, objective, run, sampling

    objective.add_arguments(p)
    captions.add_arguments(p)
    images.add_arguments(p)
    run.add_arguments(p)
    models_saving.add_arguments(p)
    sampling.add_arguments(p)
    return p


def _flatten_toml(data: dict, path: Path) -> tuple[dict, dict | None]:
    flat: dict = {}
    optimizer_table = None
    for key, value in data.items():
        if key == "optimizer" and isinstance(value, dict):
            optimizer_table = dict(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, dict):
                    raise ConfigError(f"{path}: key '{key}.{k}' is a table; option tables may be nested one level only")
                flat[k] = v
        else:
            flat[key] = value
    return flat, optimizer_table


def _coerce(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """Check a TOML value against the option's kind, as argparse would check a command-line string."""
    where = f"{path}: key '{key}'"
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if isinstance(value, int) and value in (0, 1):  # the kohya_ss GUI writes some switches as 0 / 1
            return bool(value)
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        if action.type in (int, float):  # e.g. base_weights_multiplier = [0.5, 1]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
                raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
            return [action.type(v) for v in items]
        return [str(v) for v in items]
    if isinstance(value, (list, dict)):
        if action.type is _resolution and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        else:
            raise ConfigError(f"{where} must be a single value, got {value!r}")
    if action.type is int and isinstance(value, float):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(value if isinstance(value, str) or action.type in (int, float) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{where}: {value!r} is not a valid {getattr(action.type, '__name__', 'value')} ({exc})") from None
    if action.choices is not None and value not in action.choices:
        valid = ", ".join(str(c) for c in action.choices if c is not None)
        raise ConfigError(f"{where} = {value!r} is not valid; choose one of: {valid}")
    return value


def load_config_file(path_str: str, parser: argparse.ArgumentParser) -> tuple[dict, dict | None]:
    path = Path(path_str)
    if not path_str.endswith(".toml") and Path(path_str + ".toml").is_file():
        path = Path(path_str + ".toml")  # sd-scripts adds the extension: --config_file my_run reads my_run.toml
    if not path.is_file():
        raise ConfigError(f"--config_file {path_str}: file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config_file {path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"--config_file {path}: nested too deeply to read (tables or arrays inside each other "
                          "thousands of levels deep)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config_file {path}: not UTF-8 text") from None
    flat, optimizer_table = _flatten_toml(data, path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config_file")}
    values = {}
    gui_keys, unknown = [], []
    for key, value in flat.items():
        key = _EARLIER_NAMES.get(key, key)
        if key in actions:
            values[key] = _coerce(actions[key], key, value, path)
        elif key in KOHYA_GUI_KEYS:
            gui_keys.append(f"{key} ({KOHYA_GUI_KEYS[key]})")
        else:
            close = difflib.get_close_matches(key, actions.keys(), n=1)
            unknown.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    # sd-scripts takes any key into its namespace; a key no option reads is told, never a stop
    if gui_keys:
        logger.info("%s: kohya_ss GUI keys that train_network.py does not read either: %s", path, "; ".join(gui_keys))
    if unknown:
        logger.warning("%s: keys that are no option, not used: %s", path, ", ".join(unknown))
    return values, optimizer_table


def parse_args(argv: list[str] | None = None, *, prog: str = "train_network.py") -> argparse.Namespace:
    """Parse the command line, merging `--config_file` underneath it. Raises ConfigError on a bad file."""
    parser = build_parser(prog)
    pre, _ = parser.parse_known_args(argv)
    optimizer_table = None
    toml_keys: set[str] = set()
    if pre.config_file:
        values, optimizer_table = load_config_file(pre.config_file, parser)
        parser.set_defaults(**values)
        toml_keys = set(values)
    args = parser.parse_args(argv)
    if args.caption_extention is not None and args.caption_extension is None:  # sd-scripts' old spelling
        args.caption_extension = args.caption_extention
    args.optimizer_table = optimizer_table
    given = {token.split("=", 1)[0].removeprefix("--").removeprefix("no-") for token in
             (sys.argv[1:] if argv is None else argv) if token.startswith("--")}
    given = {_EARLIER_NAMES.get(key, key) for key in given}
    args.config_file_keys = sorted(toml_keys - given)  # the values the file set (the command line wins)
    resolve_optimizer_switches(args, optimizer_type_given="optimizer_type" in toml_keys | given)
    return args
