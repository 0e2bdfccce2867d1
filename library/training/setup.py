"""Small factories that build each training component from the options (dataset, model, network, optimizer, lr).

Each takes the parsed options and returns one component, so the recipe in `trainer.py` reads as a list of steps.
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
import os

import torch

from library.errors import ConfigError
from library.optimizers.loop import LoopNeeds

logger = logging.getLogger("loraforge")


def weight_dtype_for(args: argparse.Namespace) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)


# ----------------------------------------------------------------------------------------------- data
def dataset_defaults(args: argparse.Namespace):
    from library.config.dataset_config import DatasetDefaults
    from library.flags.captions import caption_defaults

    return DatasetDefaults(
        resolution=tuple(args.resolution), batch_size=args.train_batch_size, enable_bucket=args.enable_bucket,
        min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps, bucket_no_upscale=args.bucket_no_upscale,
        caption_extension=args.caption_extension, shuffle_caption=args.shuffle_caption, keep_tokens=args.keep_tokens,
        caption_dropout_rate=args.caption_dropout_rate, flip_aug=args.flip_aug,
        random_crop=args.random_crop, color_aug=args.color_aug, face_crop_aug_range=args.face_crop_aug_range,
        resize_interpolation=args.resize_interpolation, cache_info=args.cache_info, num_repeats=args.dataset_repeats,
        validation_split=args.validation_split, validation_seed=args.validation_seed,
        alpha_mask=args.alpha_mask, conditioning_data_dir=args.conditioning_data_dir,
        **caption_defaults(args),
    )


def build_dataset(args: argparse.Namespace, split: str = "train"):
    """Load and validate the dataset (every image decoded once) before any model is loaded. `split="validation"`:
    the images held out by validation_split, or None when no dataset holds any out."""
    from library.config.dataset_config import (
        check_mask_sources,
        config_from_in_json,
        config_from_train_data_dir,
        load_dataset_config,
    )
    from library.data.dataset import CaptionedImageDataset

    defaults = dataset_defaults(args)
    if args.dataset_config:
        config = load_dataset_config(args.dataset_config, defaults)
    elif args.in_json:
        config = config_from_in_json(args.in_json, args.train_data_dir, defaults)
    else:
        config = config_from_train_data_dir(args.train_data_dir, args.reg_data_dir, defaults)
    check_mask_sources(config, args.masked_loss)
    if split == "validation":
        if not any(bp.validation_split > 0 for bp in config.datasets):
            return None
        dataset = CaptionedImageDataset(config, seed=args.seed, skip_bad_images=args.skip_bad_images,
                                        split="validation", fast_decode=args.fast_image_decode)
        logger.info("validation dataset: %d images", len(dataset))
        return dataset
    dataset = CaptionedImageDataset(config, seed=args.seed, skip_bad_images=args.skip_bad_images,
                                    fast_decode=args.fast_image_decode)
    varying = dataset.random_caption_subsets() if args.cache_text_encoder_outputs else []
    if varying:
        raise ConfigError(f"--cache_text_encoder_outputs: the captions of {varying[0]} change between steps (shuffle, "
                          "caption or tag dropout, token warm-up or wildcards), so their encoding cannot be cached; "
                          "turn those off or drop --cache_text_encoder_outputs")
    s = dataset.summary()
    logger.info("dataset %s: %d images (%d regularisation), %d samples with repeats, %d batches per epoch%s", s["source"],
                s["num_train_images"], s["num_reg_images"], s["num_samples"], s["num_batches"],
                f"; skipped {len(s['skipped'])} unreadable images" if s.get("skipped") else "")
    for d in s.get("datasets", []):
        for sub in d.get("subsets", []):
            logger.info("  %s: %d images x %d repeats, captions %s, buckets %s", sub["image_dir"], sub["img_count"],
                        sub["num_repeats"], sub.get("caption_extension"), d.get("buckets"))
    return dataset


# ----------------------------------------------------------------------------------------------- model
def load_model(args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype):
    from library.models.loader import detect_model_type, load_sd_model

    source = args.pretrained_model_name_or_path
    if not args.v2 and not args.sdxl and detect_model_type(source) == "sdxl":
        logger.info("%s is an SDXL model: training it as SDXL (as sdxl_train_network.py / --sdxl would)", source)
        args.sdxl = True
    mmap = not args.disable_mmap_load_safetensors
    model = load_sd_model(source, v2=args.v2, v_parameterization=args.v_parameterization, sdxl=args.sdxl, mmap=mmap)
    if args.vae:
        from library.models.vae import load_vae

        model.vae = load_vae(args.vae, model.vae, mmap=mmap)
        logger.info("VAE replaced by %s", args.vae)
    if args.tokenizer_cache_dir:
        from library.models.tokenizer_cache import use_tokenizer_cache

        model.tokenizers = use_tokenizer_cache(model.model_type, model.tokenizers, args.tokenizer_cache_dir)
    check_clip_skip(args.clip_skip, model)
    for module in (model.unet, model.vae, *model.text_encoders):
        module.requires_grad_(False)
        module.eval()
    model.vae.to(device, dtype=vae_dtype_for(args, model.model_type, weight_dtype))
    # the U-Net reaches the device after the latent / text-encoder caches are built (LoRATrainer.setup), so the
    # caching passes never hold it there too: the low-VRAM recipe's peak is the training step's. --lowram moves
    # it at once instead, as sd-scripts loads to VRAM, so host memory never holds it beside the next part
    model.unet.to(device if args.lowram else "cpu", dtype=weight_dtype)
    for te in model.text_encoders:
        te.to(device, dtype=weight_dtype)
    if args.xformers or args.mem_eff_attn:
        flag = "--xformers" if args.xformers else "--mem_eff_attn"
        logger.info("%s: using PyTorch scaled-dot-product attention (memory-efficient kernels, no extra package)", flag)
    logger.info("model: %s (%s%s)", model.source, model.model_type, ", v-prediction" if model.v_parameterization else "")
    return model


def check_clip_skip(clip_skip: int | None, model) -> None:
    """--clip_skip N reads the N-th last layer: it must exist in every text encoder."""
    layers = min(te.config.num_hidden_layers for te in model.text_encoders)
    if clip_skip is not None and clip_skip > layers:
        raise ConfigError(f"--clip_skip {clip_skip}: the text encoder of {model.source} has {layers} layers; "
                          f"use 1 to {layers} (2 is usual for anime models)")


def warn_long_captions(dataset, tokenizer, source: str, max_token_length: int | None = None,
                       weighted: bool = False) -> None:
    """The text encoder reads 75 tokens (or --max_token_length); a longer caption is cut there, silently in
    sd-scripts. One line per dataset says how many."""
    from library.training.prompt_tokens import parse_prompt_attention

    room = max_token_length or tokenizer.model_max_length - 2
    for index, captions in dataset.captions_by_dataset().items():
        texts = [[piece for piece, _ in parse_prompt_attention(c)] if weighted else [c] for c in captions]
        lengths = [sum(len(ids) - 2 for ids in tokenizer(pieces, truncation=False, verbose=False)["input_ids"])
                   if pieces else 0 for pieces in texts]
        cut = sum(n > room for n in lengths)
        if cut:
            logger.warning("%s dataset %d: %d of %d captions are longer than %d tokens and are cut there (longest: "
                           "%d)", source, index, cut, len(captions), room, max(lengths))


def vae_dtype_for(args: argparse.Namespace, model_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """float32 with --no_half_vae, and for SDXL's VAE, which overflows in fp16; else the mixed-precision dtype."""
    return torch.float32 if args.no_half_vae or model_type == "sdxl" else weight_dtype


def merge_base_weights(args: argparse.Namespace, network_module, model, device: torch.device) -> None:
    """--base_weights: each LoRA file merged into the base model with its --base_weights_multiplier (1.0 when
    missing), as sd-scripts does before the trained network is created; on the GPU with --lowram."""
    text_encoder = model.text_encoders if len(model.text_encoders) > 1 else model.text_encoders[0]
    multipliers = args.base_weights_multiplier or []
    for i, path in enumerate(args.base_weights or []):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        module, weights = network_module.create_network_from_weights(multiplier, path, model.vae, text_encoder,
                                                                     model.unet, for_inference=True)
        module.merge_to(text_encoder, model.unet, weights, model.unet.dtype, device if args.lowram else "cpu")
        logger.info("merged %s into the base model with multiplier %s", path, multiplier)


def store_base_in_fp8(args: argparse.Namespace, model, weight_dtype: torch.dtype) -> None:
    """--fp8_base (U-Net and text encoders) / --fp8_base_unet (U-Net only): frozen weights held in float8."""
    from library.models.fp8 import store_in_fp8

    if not (args.fp8_base or args.fp8_base_unet):
        return
    parts = [model.unet] + (model.text_encoders if args.fp8_base and not args.fp8_base_unet else [])
    layers = sum(store_in_fp8(part, weight_dtype) for part in parts)
    logger.info("base weights in float8 (e4m3), computed in %s: %d layers of the %s", str(weight_dtype)[6:], layers,
                "U-Net and text encoders" if len(parts) > 1 else "U-Net")


# ----------------------------------------------------------------------------------------------- network
_MAX_ARG_CHARS = 4096  # no network setting is longer; a huge value is a pasted file, not a setting


def parse_key_values(items: list[str] | None, flag: str) -> dict:
    """`k=v` pairs; values are Python literals when they parse as one, plain strings otherwise (never eval)."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item[:40]!r}: expected key=value")
        if len(raw) > _MAX_ARG_CHARS:
            raise ConfigError(f"{flag} {key.strip()[:40]}=...: the value has {len(raw)} characters "
                              f"(at most {_MAX_ARG_CHARS})")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = raw.strip()
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} {key.strip()}={raw.strip()}: must be a finite number")
        out[key.strip()] = value
    return out


def build_network(args: argparse.Namespace, network_module, model, train_text_encoder: bool, train_unet: bool):
    """Create the network, hook it in, and load --network_weights (also with --dim_from_weights, as sd-scripts).

    With --dim_from_weights the file decides the rank: the log states the network's (the file's) dim/alpha.
    """
    net_kwargs = parse_key_values(args.network_args, "--network_args")
    text_encoder = model.text_encoders if len(model.text_encoders) > 1 else model.text_encoders[0]
    if args.network_weights and args.dim_from_weights:
        network, _ = network_module.create_network_from_weights(1.0, args.network_weights, model.vae, text_encoder,
                                                                model.unet, **net_kwargs)
        dim, alpha = getattr(network, "lora_dim", "?"), getattr(network, "alpha", "?")
    else:
        network = network_module.create_network(1.0, args.network_dim, args.network_alpha, model.vae, text_encoder,
                                                 model.unet, neuron_dropout=args.network_dropout, **net_kwargs)
        dim, alpha = args.network_dim, args.network_alpha
    network.apply_to(text_encoder, model.unet, train_text_encoder, train_unet)
    if args.network_weights:
        info = network.load_weights(args.network_weights)
        logger.info("loaded network weights %s: %s", args.network_weights, info)
    n = sum(p.numel() for p in network.parameters() if p.requires_grad)
    logger.info("network: %s dim %s alpha %s, %d trainable parameters", args.network_module, dim, alpha, n)
    return network


# ----------------------------------------------------------------------------------------------- optimizer
def _optimizer_inputs(args: argparse.Namespace) -> dict:
    from library.cli import OPTIMIZER_FLAG_DESTS
    from library.optimizers.args import parse_optimizer_args

    cli_kwargs = {k: getattr(args, k) for k in OPTIMIZER_FLAG_DESTS if getattr(args, k, None) is not None}
    from_file = {"lr" if k == "learning_rate" else k for k in getattr(args, "config_file_keys", [])}
    return dict(cli_kwargs=cli_kwargs, optimizer_args=parse_optimizer_args(args.optimizer_args or []),
                toml_table=getattr(args, "optimizer_table", None), environ=dict(os.environ),
                from_config_file=from_file)


def optimizer_name(args: argparse.Namespace) -> str:
    table = getattr(args, "optimizer_table", None) or {}
    if "name" in table and args.optimizer_type == "AdamW" and "optimizer_type" not in getattr(args, "config_file_keys", []):
        return str(table["name"])  # OpenToMe style: [optimizer] name = "AdamWSGG"
    return args.optimizer_type


def check_optimizer_settings(args: argparse.Namespace):
    """Resolve the name and every setting against a dummy parameter, so a bad flag fails before the model loads."""
    from library.optimizers.registry import build_optimizer, resolve

    name = optimizer_name(args)
    spec = resolve(name)
    dummy = torch.nn.Parameter(torch.zeros(8, 8))
    groups = [{"params": [dummy], "names": ["lora_unet_probe.lora_down.weight"]}]
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        build_optimizer(name, groups, lr=args.learning_rate, **_optimizer_inputs(args))
    finally:
        logging.disable(previous)
    return spec


def effective_lr(args: argparse.Namespace, inputs: dict, spec) -> float:
    """--learning_rate > --optimizer_args lr > [optimizer] lr > the optimizer's documented lr > 1e-4."""
    for source in (args.learning_rate, inputs["optimizer_args"].get("lr"), (inputs["toml_table"] or {}).get("lr"),
                   spec.defaults.get("lr")):
        if source is not None:
            return float(source)
    return 1e-4


def build_optimizer_for(args: argparse.Namespace, network) -> tuple[torch.optim.Optimizer, str]:
    from library.optimizers.registry import build_optimizer, resolve

    name = optimizer_name(args)
    spec = resolve(name)
    inputs = _optimizer_inputs(args)
    default_lr = effective_lr(args, inputs, spec)
    te_lr = args.text_encoder_lr or None  # sd-scripts: an empty list is no value
    if te_lr and len(te_lr) > 1 and hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        groups = network.prepare_optimizer_params_with_multiple_te_lrs(te_lr, args.unet_lr, default_lr)
    else:
        if te_lr and len(te_lr) > 1 and not getattr(network, "accepts_text_encoder_lr_list", False):
            logger.warning("--text_encoder_lr %s: %s takes one text-encoder lr; using %s for every encoder, as "
                           "sd-scripts does", te_lr, args.network_module, te_lr[0])
        if te_lr and (len(te_lr) == 1 or not getattr(network, "accepts_text_encoder_lr_list", False)):
            te_lr = te_lr[0]
        groups = network.prepare_optimizer_params(te_lr, args.unet_lr, default_lr)
    if isinstance(groups, tuple):  # sd-scripts modules may return (params, descriptions)
        groups = groups[0]
    optimizer, sources = build_optimizer(name, groups, lr=args.learning_rate, **inputs)
    for warning in LoopNeeds(optimizer).setup_warnings(args.network_args or []):
        logger.warning(warning)
    desc = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    values = optimizer.defaults
    settings = ", ".join(f"{k}={values.get(k, '?')}" for k in sorted(sources))
    return optimizer, desc + (f"({settings})" if settings else "")
