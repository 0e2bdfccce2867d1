"""sd-scripts' model-loading, saving and metadata options, and the checks that need no model.

Each option keeps sd-scripts' name, type and default. `check_arguments` runs with the other option checks, before
the dataset or a model is read, so a combination sd-scripts refuses stops in one line.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from library.errors import ConfigError

logger = logging.getLogger("loraforge")

# modelspec.* fields beyond title/author/description/license/tags, written as modelspec.<field> (sd-scripts'
# sai_model_spec: every --metadata_<field> that is set lands in the file)
EXTRA_MODELSPEC_FIELDS = ("usage_hint", "thumbnail", "merged_from", "trigger_phrase", "preprocessor",
                          "is_negative_embedding")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models (sd-scripts)")
    g.add_argument("--vae", type=str, default=None,
                   help="VAE to use instead of the model's: a .safetensors/.ckpt file (original or diffusers keys) "
                        "or a diffusers folder")
    g.add_argument("--no_half_vae", action="store_true",
                   help="keep the VAE in float32 under --mixed_precision fp16/bf16 (SDXL's VAE always is)")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="tokenizer folder for offline training: read from it when it holds the tokenizer, else the "
                        "bundled one is written there")
    g.add_argument("--lowram", action="store_true",
                   help="low host RAM: the U-Net goes to the GPU as it loads and --base_weights merge on the GPU")
    g.add_argument("--highvram", action="store_true",
                   help="ample VRAM: keep the CUDA cache after latent / text-encoder caching instead of emptying it")
    g.add_argument("--mem_eff_attn", action="store_true",
                   help="memory-efficient attention: PyTorch's scaled-dot-product attention (already the default)")
    g.add_argument("--fp8_base", action="store_true",
                   help="store the frozen U-Net and text-encoder Linear/Conv weights in float8 (e4m3), upcast one "
                        "layer at a time; needs --mixed_precision fp16 or bf16")
    g.add_argument("--fp8_base_unet", action="store_true",
                   help="as --fp8_base for the U-Net only; text encoders stay in the mixed-precision dtype")
    g.add_argument("--base_weights", type=str, nargs="*", default=None,
                   help="LoRA files merged into the base model before training")
    g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None,
                   help="one multiplier per --base_weights file (missing ones are 1.0)")
    g.add_argument("--disable_mmap_load_safetensors", action="store_true",
                   help="read a .safetensors model into memory at once instead of memory-mapping it (faster on WSL)")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="cache text-encoder outputs as <image>_te_outputs.npz next to the images (implies "
                        "--cache_text_encoder_outputs)")
    g.add_argument("--cpu_offload_checkpointing", action="store_true",
                   help="with --gradient_checkpointing, keep the U-Net's saved activations in host memory")
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="accepted as sd-scripts' train_network.py accepts it: Adafactor and "
                        "--gradient_accumulation_steps 1 only; a LoRA trains with the ordinary step")

    g = parser.add_argument_group("saving (sd-scripts)")
    g.add_argument("--save_last_n_epochs", type=int, default=None,
                   help="keep only the last N epoch files of --save_every_n_epochs (older ones are removed)")
    g.add_argument("--save_last_n_epochs_state", type=int, default=None,
                   help="keep only the last N epoch state folders (default: --save_last_n_epochs)")
    g.add_argument("--save_last_n_steps", type=int, default=None,
                   help="keep the step files of --save_every_n_steps from the last N steps only")
    g.add_argument("--save_last_n_steps_state", type=int, default=None,
                   help="keep the step state folders from the last N steps only (default: --save_last_n_steps)")
    g.add_argument("--save_n_epoch_ratio", type=int, default=None,
                   help="save about N epoch files in all: sets --save_every_n_epochs to floor(epochs / N) or 1")
    g.add_argument("--save_state_on_train_end", action="store_true",
                   help="save the training state (<output_name>-state) at the end only")
    g.add_argument("--initial_step", type=int, default=None,
                   help="step the run starts at (counts toward --max_train_steps; overrides --initial_epoch)")
    g.add_argument("--initial_epoch", type=int, default=None, help="epoch the run starts at, 1 = the first")
    g.add_argument("--skip_until_initial_step", action="store_true",
                   help="draw and discard the batches before --initial_step, so the run sees the data it would have")

    g = parser.add_argument_group("metadata (sd-scripts)")
    g.add_argument("--training_comment", type=str, default=None, help="comment stored as ss_training_comment")
    g.add_argument("--no_metadata", action="store_true",
                   help="write only the ss_* keys loaders need (network module, dim, alpha, args, base model) "
                        "and modelspec.*")
    g.add_argument("--metadata_title", type=str, default=None, help="modelspec.title (default: --output_name)")
    g.add_argument("--metadata_author", type=str, default=None, help="modelspec.author")
    g.add_argument("--metadata_description", type=str, default=None, help="modelspec.description")
    g.add_argument("--metadata_license", type=str, default=None, help="modelspec.license")
    g.add_argument("--metadata_tags", type=str, default=None, help="modelspec.tags, comma separated")
    g.add_argument("--metadata_usage_hint", type=str, default=None, help="modelspec.usage_hint")
    g.add_argument("--metadata_thumbnail", type=str, default=None,
                   help="modelspec.thumbnail: a data URL, or an image file written as one")
    g.add_argument("--metadata_merged_from", type=str, default=None, help="modelspec.merged_from")
    g.add_argument("--metadata_trigger_phrase", type=str, default=None, help="modelspec.trigger_phrase")
    g.add_argument("--metadata_preprocessor", type=str, default=None, help="modelspec.preprocessor")
    g.add_argument("--metadata_is_negative_embedding", type=str, default=None,
                   help="modelspec.is_negative_embedding")


def check_arguments(args: argparse.Namespace) -> None:
    """The combinations sd-scripts refuses, and files that must exist, before anything heavy is read; turns on
    what an option implies (--cache_text_encoder_outputs_to_disk -> --cache_text_encoder_outputs, as sd-scripts)."""
    if args.cache_text_encoder_outputs_to_disk and not args.cache_text_encoder_outputs:
        logger.warning("--cache_text_encoder_outputs_to_disk is given, so --cache_text_encoder_outputs is on too")
        args.cache_text_encoder_outputs = True
    for name in ("save_last_n_epochs", "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state",
                 "save_n_epoch_ratio"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name} {value}: must be >= 0")
    if args.initial_step is not None and args.initial_step < 0:
        raise ConfigError(f"--initial_step {args.initial_step}: must be >= 0 (0 is the first step)")
    if args.initial_step and not args.max_train_epochs and args.initial_step >= args.max_train_steps:
        raise ConfigError(f"--initial_step {args.initial_step}: must be below --max_train_steps {args.max_train_steps}, "
                          "as sd-scripts requires")
    if args.initial_epoch is not None and args.initial_epoch < 1:
        raise ConfigError(f"--initial_epoch {args.initial_epoch}: must be >= 1 (1 is the first epoch)")
    if (args.fp8_base or args.fp8_base_unet) and args.mixed_precision == "no":
        flag = "--fp8_base" if args.fp8_base else "--fp8_base_unet"
        raise ConfigError(f"{flag} needs --mixed_precision fp16 or bf16 (float8 weights are upcast to that dtype), "
                          "as sd-scripts requires")
    if args.fused_backward_pass:
        check_fused_backward_pass(args)
    if args.cpu_offload_checkpointing and args.cuda_graphs:
        raise ConfigError("--cpu_offload_checkpointing cannot be recorded by --cuda_graphs (each step copies to new "
                          "host buffers); drop one of them")
    if args.cpu_offload_checkpointing and not args.gradient_checkpointing:
        logger.warning("--cpu_offload_checkpointing does nothing without --gradient_checkpointing (as in sd-scripts)")
    if args.vae is not None and not Path(args.vae).exists():
        raise ConfigError(f"--vae {args.vae}: no such file or folder (give a .safetensors/.ckpt VAE or a diffusers "
                          "folder)")
    for path in args.base_weights or []:
        if not Path(path).is_file():
            raise ConfigError(f"--base_weights {path}: file not found (give kohya-format LoRA files)")
    multipliers = args.base_weights_multiplier or []
    if len(multipliers) > len(args.base_weights or []):
        raise ConfigError(f"--base_weights_multiplier has {len(multipliers)} values for "
                          f"{len(args.base_weights or [])} --base_weights files")
    if args.metadata_thumbnail and not args.metadata_thumbnail.startswith("data:") \
            and not Path(args.metadata_thumbnail).is_file():
        raise ConfigError(f"--metadata_thumbnail {args.metadata_thumbnail}: file not found (give an image file or "
                          "a data: URL)")


def check_fused_backward_pass(args: argparse.Namespace) -> None:
    """sd-scripts' optimizer check: the fused pass exists for Adafactor with no gradient accumulation."""
    from library.optimizers.registry import resolve

    if resolve(args.optimizer_type).name.lower() != "adafactor":
        raise ConfigError(f"--fused_backward_pass works only with --optimizer_type Adafactor (got "
                          f"{args.optimizer_type}), as in sd-scripts")
    if args.gradient_accumulation_steps != 1:
        raise ConfigError(f"--fused_backward_pass does not work with --gradient_accumulation_steps "
                          f"{args.gradient_accumulation_steps} (needs 1), as in sd-scripts")
