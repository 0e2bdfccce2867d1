"""Checks of the options that need no model: run first, so a typo never costs a model load or a training step."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import ConfigError
from library.flags.images import check_args as check_image_args
from library.training.compile import dynamo_records_cuda_graphs
from library.training.hub import check_hub
from library.training.lr_schedulers import check_lr_scheduler
from library.training.multiprocess import check_deepspeed
from library.training.trackers import check_trackers

_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")  # --save_model_as


_AT_LEAST_ONE = ("network_dim", "train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                 "log_every_n_steps", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")
_OPTIONAL_AT_LEAST_ONE = ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps",
                          "sample_every_n_epochs", "plot_every_n_steps", "clip_skip", "ddp_timeout")
_RATIOS = ("caption_dropout_rate", "network_dropout")


def _fail(flag: str, value, valid: str) -> None:
    raise ConfigError(f"--{flag} {value}: {valid}")


_SEED_RANGE = (0, 2**32 - 1)  # what NumPy's and Python's seeding take, as sd-scripts seeds all three
_NON_NEGATIVE = ("lr_scheduler_power", "max_data_loader_n_workers", "prior_loss_weight")


def _options_of(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def validate_finite(args: argparse.Namespace) -> None:
    """Every numeric option must be a finite number: one inf or nan makes every step and the LoRA NaN."""
    for name, value in _options_of(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                _fail(name, value, "must be a finite number")


def validate_numbers(args: argparse.Namespace) -> None:
    validate_finite(args)
    for name in _NON_NEGATIVE:
        v = getattr(args, name, None)
        if v is not None and v < 0:
            _fail(name, v, "must be >= 0")
    if not _SEED_RANGE[0] <= args.seed <= _SEED_RANGE[1]:
        _fail("seed", args.seed, f"must be from {_SEED_RANGE[0]} to {_SEED_RANGE[1]}")
    if args.learning_rate is not None and not args.learning_rate > 0:
        _fail("learning_rate", args.learning_rate, "must be > 0")
    # 0 leaves that part untrained, as in sd-scripts
    for name, values in (("unet_lr", [args.unet_lr]), ("text_encoder_lr", args.text_encoder_lr or [])):
        for v in values:
            if v is not None and not v >= 0:
                _fail(name, v, "must be >= 0 (0: that part is not trained)")
    if not args.network_alpha > 0:
        _fail("network_alpha", args.network_alpha, "must be > 0")
    for name in _AT_LEAST_ONE:
        v = getattr(args, name)
        if v < 1:
            _fail(name, v, "must be an integer >= 1")
    for name in _OPTIONAL_AT_LEAST_ONE:
        v = getattr(args, name)
        if v is not None and v < 1:
            _fail(name, v, "must be an integer >= 1")
    for name in _RATIOS:
        v = getattr(args, name)
        if v is not None and not 0.0 <= v < 1.0:
            _fail(name, v, "must be in [0, 1)")
    if args.keep_tokens < 0:
        _fail("keep_tokens", args.keep_tokens, "must be >= 0")
    if args.weight_decay is not None and args.weight_decay < 0:
        _fail("weight_decay", args.weight_decay, "must be >= 0")
    if args.max_grad_norm < 0:
        _fail("max_grad_norm", args.max_grad_norm, "must be >= 0 (0 disables clipping)")
    if args.noise_offset is not None and not 0 <= args.noise_offset <= 1:
        _fail("noise_offset", args.noise_offset, "must be in [0, 1] (typical: 0.05-0.1)")
    if args.min_snr_gamma is not None and not args.min_snr_gamma > 0:
        _fail("min_snr_gamma", args.min_snr_gamma, "must be > 0 (typical: 5)")
    if args.min_bucket_reso > args.max_bucket_reso:
        raise ConfigError(f"--min_bucket_reso {args.min_bucket_reso} is larger than --max_bucket_reso {args.max_bucket_reso}")
    check_lr_scheduler(args)


def validate_combinations(args: argparse.Namespace) -> None:
    if args.dataset_class:
        from library.flags.images import REFUSALS

        raise ConfigError(f"--dataset_class {args.dataset_class}: {REFUSALS['dataset_class']}")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise ConfigError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.dataset_config and args.train_data_dir:
        raise ConfigError("--dataset_config and --train_data_dir exclude each other: put the folders in the TOML")
    if not args.dataset_config and not args.train_data_dir and not args.in_json:
        raise ConfigError("no training data: give --dataset_config FILE.toml or --train_data_dir DIR")
    check_image_args(args)
    if args.full_fp16 and args.full_bf16:
        raise ConfigError("--full_fp16 and --full_bf16 exclude each other")
    if args.full_fp16 and args.mixed_precision != "fp16":
        raise ConfigError(f"--full_fp16 needs --mixed_precision fp16 (got {args.mixed_precision})")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise ConfigError(f"--full_bf16 needs --mixed_precision bf16 (got {args.mixed_precision})")
    if args.cache_text_encoder_outputs and not args.network_train_unet_only:
        raise ConfigError("--cache_text_encoder_outputs needs --network_train_unet_only (cached outputs cannot train the text encoder)")
    if args.cache_text_encoder_outputs and (args.shuffle_caption or args.caption_dropout_rate):
        raise ConfigError("--cache_text_encoder_outputs cannot be used with --shuffle_caption or --caption_dropout_rate")
    check_cuda_graph_args(args)
    if args.output_dir is None:
        raise ConfigError("--output_dir is required (where the LoRA, state and logs go)")
    if not args.output_name or any(c in args.output_name for c in "/\\"):
        raise ConfigError(f"--output_name {args.output_name!r}: must be a plain file name without folders")


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, before 1.6, a pickle starting with the protocol byte 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _safetensors_keys(path: Path) -> list[str] | None:
    """The tensor names from the header only (no tensor is read); None if it is not a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception:  # SafetensorError/OSError for any foreign or truncated file
        return None


def _check_network_weights(value: str) -> None:
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"--network_weights {value}: file not found")
    if path.suffix.lower() == ".safetensors":
        keys = _safetensors_keys(path)
        if keys is None:
            raise ConfigError(f"--network_weights {value}: not a readable safetensors file (truncated or another format)")
        network_key = ("lora_", "oft_", "unet.", "text_encoder", "base_model.model.")
        if not any(k.startswith(network_key) for k in keys):
            raise ConfigError(f"--network_weights {value}: no lora_*/oft_* (kohya, LyCORIS) or unet./text_encoder. "
                              "(diffusers) tensors; not a network file")
    elif not _looks_like_torch_file(path):
        raise ConfigError(f"--network_weights {value}: neither a .safetensors file nor a torch.save'd state dict")
    _check_finite_weights(value)


def _check_finite_weights(value: str) -> None:
    """A LoRA holding inf/nan would make the first step NaN and every file saved after it."""
    from library.errors import LoraForgeError
    from networks.lora import read_lora_file

    try:
        weights = read_lora_file(value)
    except LoraForgeError as exc:
        raise ConfigError(f"--network_weights {value}: {exc}") from None
    bad = [k for k, t in weights.items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ConfigError(f"--network_weights {value}: {len(bad)} tensors hold inf/nan (first: {bad[0]}); "
                          "it is the LoRA of a diverged run, pick an earlier file")


def _check_model(model: str) -> None:
    from library.models.builtin import BUILTIN_NAMES

    flag = "--pretrained_model_name_or_path"
    if model.startswith("builtin:"):
        if model not in BUILTIN_NAMES:
            raise ConfigError(f"{flag} {model}: unknown built-in model; valid: {', '.join(BUILTIN_NAMES)}")
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(f"{flag} {model}: no such file or folder "
                          "(give a diffusers folder, a .safetensors/.ckpt file, or builtin:tiny-sd)")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"{flag} {model}: folder has no model_index.json; expected a diffusers model folder "
                              "(model_index.json, unet/, vae/, text_encoder/, scheduler/)")
        return
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        if _safetensors_keys(path) is None:
            raise ConfigError(f"{flag} {model}: not a readable safetensors file (truncated or another format)")
    elif suffix in _TORCH_SUFFIXES:
        if not _looks_like_torch_file(path):
            raise ConfigError(f"{flag} {model}: not a torch.save'd checkpoint (neither a zip archive nor a pickle)")
    else:
        raise ConfigError(f"{flag} {model}: unsupported file type '{suffix}'; expected .safetensors, "
                          f"{', '.join(_TORCH_SUFFIXES)} or a diffusers folder")


def validate_paths(args: argparse.Namespace) -> None:
    for flag in ("logging_dir", "output_dir"):
        value = getattr(args, flag)
        if value and Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(f"--{flag} {value}: is a file; give a folder (it is created when missing)")
    if args.dataset_config and not Path(args.dataset_config).is_file():
        raise ConfigError(f"--dataset_config {args.dataset_config}: file not found")
    if args.network_weights:
        _check_network_weights(args.network_weights)
    for flag in ("train_data_dir", "reg_data_dir"):
        value = getattr(args, flag)
        if value and not Path(value).is_dir():
            raise ConfigError(f"--{flag} {value}: folder not found")
    _check_model(args.pretrained_model_name_or_path)


def validate_network_args(args: argparse.Namespace) -> None:
    """Check --network_args keys and values now, through the module's own check, not after the model is loaded."""
    from library.training.setup import parse_key_values

    kwargs = parse_key_values(args.network_args, "--network_args")
    module = import_network_module(args.network_module)
    check = getattr(module, "check_network_args", None)
    if check is not None:  # a foreign sd-scripts module: its create_network is the only judge
        check(kwargs, args.network_dropout)
    if args.cuda_graphs:
        if getattr(module, "CUDA_GRAPHS", None) is not True:
            why = getattr(module, "CUDA_GRAPHS", None) or "it does not declare its forward free of host decisions"
            raise ConfigError(f"--cuda_graphs cannot record --network_module {args.network_module}: {why}")
        check_cuda_graph_dropout(args, kwargs)


def check_cuda_graph_args(args: argparse.Namespace) -> None:
    """--cuda_graphs records the U-Net step only, with a loss that needs no scaler: say what does not fit."""
    if not args.cuda_graphs:
        return
    if not args.network_train_unet_only:
        raise ConfigError("--cuda_graphs records the U-Net's step only: add --network_train_unet_only (a trained "
                          "text encoder would run outside the graph)")
    if args.mixed_precision == "fp16":
        raise ConfigError("--cuda_graphs works with --mixed_precision bf16 or no, not fp16 (its loss scaler "
                          "decides on the host each step)")
    if dynamo_records_cuda_graphs(args):
        raise ConfigError(f"--cuda_graphs and --dynamo_mode {args.dynamo_mode} both record CUDA graphs: use one "
                          "(--dynamo_mode default or max-autotune-no-cudagraphs combine with --cuda_graphs)")


def check_cuda_graph_dropout(args: argparse.Namespace, network_kwargs: dict) -> None:
    """A recorded graph replays one fixed decision: module_dropout draws on the host; with gradient checkpointing,
    the recomputed forward would draw new dropout masks (the RNG state cannot be saved inside a graph)."""
    if network_kwargs.get("module_dropout"):
        raise ConfigError("--cuda_graphs cannot replay module_dropout (--network_args): it is decided on the host "
                          "each step; drop one of the two")
    dropouts = {"--network_dropout": args.network_dropout, "rank_dropout": network_kwargs.get("rank_dropout")}
    used = [name for name, value in dropouts.items() if value]
    if used and args.gradient_checkpointing:
        raise ConfigError(f"--cuda_graphs with --gradient_checkpointing cannot use {' / '.join(used)}: the "
                          "recomputed forward would draw other dropout masks; drop the dropout or one of the two flags")


# network modules users name as sd-scripts does, served by our wrapper of the same package
NETWORK_MODULE_ALIASES = {"lycoris.kohya": "networks.lycoris_kohya"}


def import_network_module(name: str):
    try:
        module = importlib.import_module(NETWORK_MODULE_ALIASES.get(name, name))
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--network_module {name}: cannot import ({exc}); e.g. networks.lora") from None
    if not hasattr(module, "create_network"):
        raise ConfigError(f"--network_module {name}: has no create_network(); not a network module")
    return module


def output_files_exist(output_dir: Path, output_name: str) -> list[Path]:
    candidates = [output_dir / f"{output_name}{ext}" for ext in LORA_SUFFIXES] + [output_dir / f"{output_name}-state"]
    found = [p for p in candidates if p.exists()]
    for ext in LORA_SUFFIXES:
        found += sorted(output_dir.glob(f"{output_name}-*{ext}"))
    return found


def validate_args(args: argparse.Namespace) -> None:
    from library.flags import models_saving, objective

    validate_numbers(args)
    objective.validate(args)
    models_saving.check_arguments(args)
    validate_combinations(args)
    validate_paths(args)
    validate_network_args(args)
    check_trackers(args)
    check_deepspeed(args)
    check_hub(args)
    check_free_space_before_load(args)


# ----------------------------------------------------------------------------------------------- disk space
_MiB = 1 << 20
_ADAM_MOMENTS = 2  # optimizer.bin holds ~2 fp32 tensors per trainable parameter for the Adam family
_FILE_OVERHEAD = _MiB  # per file: safetensors header, ss_* metadata (tag frequencies grow with the dataset), RNG state


@dataclass(frozen=True)
class OutputEstimate:
    """What a run writes into --output_dir: every kept LoRA file and state folder (a replaced one counts twice)."""

    lora_bytes: int
    lora_files: int
    state_bytes: int = 0
    state_copies: int = 0

    @property
    def total(self) -> int:
        return self.lora_bytes * self.lora_files + self.state_bytes * self.state_copies

    def describe(self) -> str:
        text = f"{self.lora_files} LoRA file{'s' if self.lora_files != 1 else ''} of {_size(self.lora_bytes)}"
        if self.state_copies:
            text += f" + {self.state_copies} state folder{'s' if self.state_copies != 1 else ''} of {_size(self.state_bytes)}"
        return text


def _size(n: int) -> str:
    return f"{n / _MiB:.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


def planned_lora_files(args: argparse.Namespace, steps_per_epoch: int | None = None, start_step: int = 0, *,
                       state: bool = False) -> int:
    """The final LoRA plus the checkpoints the run holds at its fullest, counted from `start_step`; with
    `state`, the state folders instead (their own --save_last_n_*_state).

    --save_last_n_steps/epochs cap the count (one more while a save precedes its removal). Before the dataset
    is batched (`steps_per_epoch` None) only what the flags fix is counted: a lower bound.
    """
    keep_steps = getattr(args, "save_last_n_steps", None)
    keep_epochs = getattr(args, "save_last_n_epochs", None)
    if state:
        keep_steps = getattr(args, "save_last_n_steps_state", None) or keep_steps
        keep_epochs = getattr(args, "save_last_n_epochs_state", None) or keep_epochs
    steps = args.max_train_steps
    if args.max_train_epochs and steps_per_epoch:
        steps = args.max_train_epochs * steps_per_epoch
    elif args.max_train_epochs:
        steps = None
    files = 1
    if args.save_every_n_steps and steps:
        saves = max(0, steps // args.save_every_n_steps - start_step // args.save_every_n_steps)
        files += saves if keep_steps is None else min(saves, keep_steps // args.save_every_n_steps + 2)
    epochs = args.max_train_epochs or (math.ceil(steps / steps_per_epoch) if steps and steps_per_epoch else None)
    if args.save_every_n_epochs and epochs:
        done = start_step // steps_per_epoch if steps_per_epoch else 0
        saves = max(0, (epochs - 1) // args.save_every_n_epochs - done // args.save_every_n_epochs)
        files += saves if keep_epochs is None else min(saves, keep_epochs + 1)
    return files


def _saved_element_size(args: argparse.Namespace, param_dtype: torch.dtype | None = None) -> int:
    explicit = {"fp16": 2, "bf16": 2, "float": 4}.get(args.save_precision or "")
    if explicit:
        return explicit
    if param_dtype is not None:
        return param_dtype.itemsize
    return 2 if args.full_fp16 or args.full_bf16 else 4


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _architecture_dir(model: str) -> Path | None:
    """The folder of JSON configs that describes the base model's layers, readable without its weights."""
    from library.models.builtin import BUILTIN_NAMES, TINY_SD_CONFIG_DIR

    if model in BUILTIN_NAMES:
        return TINY_SD_CONFIG_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.suffix.lower() == ".safetensors":
        from library.models.loader import detect_model_type
        from library.models.single_file import bundled_config_dir

        model_type = detect_model_type(path)  # header only; None for a file the loader will report
        if model_type is not None:
            return bundled_config_dir(model_type, v_parameterization=False)  # v-prediction: same layers
    return None  # .ckpt: its keys need the whole pickle; the check after the network is built covers it


def model_on_meta_device(model: str):
    """(U-Net, [text encoders], VAE) of the base model built from its configs on the meta device: shapes and
    parameter counts without reading or allocating a weight; None when its configs cannot be read here."""
    folder = _architecture_dir(model)
    if folder is None:
        return None
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    try:
        unet_config = UNet2DConditionModel.load_config(folder / "unet")
        vae_config = AutoencoderKL.load_config(folder / "vae")
        te_configs = [CLIPTextConfig.from_pretrained(folder / sub) for sub in ("text_encoder", "text_encoder_2")
                      if (folder / sub).is_dir()]
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        encoders = [CLIPTextModel(te_configs[0]), *(CLIPTextModelWithProjection(c) for c in te_configs[1:])]
        vae = AutoencoderKL.from_config(vae_config)
    return unet, encoders, vae


def lora_parameters_from_configs(args: argparse.Namespace) -> int | None:
    """LoRA parameter count of the network this run builds, from the model's configs on the meta device.

    No weight is read or allocated, so it takes well under a second even for SDXL. None when the model's
    configs cannot be read here (the loader will report that properly) or the network module does not declare
    `BUILDS_ON_META_DEVICE = True` (a create_network may read weights, which meta-device modules do not have).
    """
    module = import_network_module(args.network_module)
    if not getattr(module, "BUILDS_ON_META_DEVICE", False):
        return None
    model = model_on_meta_device(args.pretrained_model_name_or_path)
    if model is None:
        return None
    from library.training.setup import parse_key_values

    unet, encoders, _ = model
    with torch.device("meta"):
        network = module.create_network(1.0, args.network_dim, args.network_alpha, None,
                                        encoders if len(encoders) > 1 else encoders[0], unet,
                                        neuron_dropout=args.network_dropout,
                                        **parse_key_values(args.network_args, "--network_args"))
    skip = "lora_te" if args.network_train_unet_only else "lora_unet" if args.network_train_text_encoder_only else None
    return sum(v.numel() for k, v in network.state_dict().items() if skip is None or not k.startswith(skip))


def estimate_outputs(args: argparse.Namespace, *, lora_parameters: int, trainable_parameters: int | None = None,
                     param_dtype: torch.dtype | None = None, steps_per_epoch: int | None = None,
                     start_step: int = 0) -> OutputEstimate:
    """Bytes the run will write; the state is the network in fp32 plus Adam-sized optimizer moments."""
    files = planned_lora_files(args, steps_per_epoch, start_step)
    lora_bytes = lora_parameters * _saved_element_size(args, param_dtype) + _FILE_OVERHEAD
    if not (args.save_state or getattr(args, "save_state_on_train_end", False)):
        return OutputEstimate(lora_bytes, files)
    trainable = lora_parameters if trainable_parameters is None else trainable_parameters
    state_bytes = lora_parameters * (param_dtype.itemsize if param_dtype else 4) + _ADAM_MOMENTS * 4 * trainable \
        + _FILE_OVERHEAD
    if args.resume:  # the folder we resume from has the real sizes of this optimizer's state
        state_bytes = max(state_bytes, _folder_bytes(Path(args.resume)))
    folders = planned_lora_files(args, steps_per_epoch, start_step, state=True) if args.save_state else 1
    existing = Path(args.output_dir) / f"{args.output_name}-state"  # replaced at the end: both exist a moment
    return OutputEstimate(lora_bytes, files, state_bytes, folders + existing.exists())


def check_free_space(output_dir: Path, estimate: OutputEstimate) -> None:
    """Stop now rather than at a save hours later; measured on the nearest existing folder of `output_dir`."""
    folder = Path(output_dir).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < estimate.total:
        raise ConfigError(f"--output_dir {output_dir}: {_size(free)} free, this run writes about {_size(estimate.total)} "
                          f"({estimate.describe()}); free some space, pick another --output_dir, or save less often")


def check_free_space_before_load(args: argparse.Namespace) -> None:
    """The cheap estimate: the network counted from the model's configs, checkpoints the flags fix."""
    if args.network_weights and args.dim_from_weights:
        count = None  # the file decides the shape; the check after the network is built counts it
    else:
        count = lora_parameters_from_configs(args)
    if count is not None:
        check_network_fits_memory(args, count)
        check_free_space(Path(args.output_dir), estimate_outputs(args, lora_parameters=count))


_TRAINING_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two Adam moments


def _memory_bytes() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def check_network_fits_memory(args: argparse.Namespace, lora_parameters: int) -> None:
    """A LoRA whose training state alone exceeds the machine's memory would die out of memory after the load."""
    need = lora_parameters * _TRAINING_BYTES_PER_PARAM
    have, what = _memory_bytes()
    if need > have:
        raise ConfigError(f"--network_dim {args.network_dim}: the LoRA has {lora_parameters:,} parameters, about "
                          f"{_size(need)} to train (weights, gradients, optimizer moments), more than this machine's "
                          f"{_size(have)} of {what}; use a smaller --network_dim")


def check_free_space_for_network(args: argparse.Namespace, network: torch.nn.Module, steps_per_epoch: int,
                                 start_step: int = 0) -> None:
    """The exact estimate, once the network is built and the epochs are batched: call before the first step."""
    tensors = network.state_dict().values()
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    dtype = next((p.dtype for p in network.parameters()), None)
    estimate = estimate_outputs(args, lora_parameters=sum(t.numel() for t in tensors), trainable_parameters=trainable,
                                param_dtype=dtype, steps_per_epoch=steps_per_epoch, start_step=start_step)
    check_free_space(Path(args.output_dir), estimate)
