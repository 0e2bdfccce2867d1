"""`ss_*` (kohya) and `modelspec.*` metadata written into the LoRA file, as sd-scripts does."""

from __future__ import annotations

import json
import time
import unicodedata
from typing import Any

ARCHITECTURES = {
    ("sd1", False): ("stable-diffusion-v1", "sd_v1"),
    ("sd2", False): ("stable-diffusion-v2-512", "sd_v2"),
    ("sd2", True): ("stable-diffusion-v2-768-v", "sd_v2"),
    ("sdxl", False): ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
}


def sanitize(value: Any, limit: int = 65536) -> str:
    """Metadata must be plain printable text: drop control characters, cap the length."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return text[:limit]


def build_metadata(args, *, model_type: str, v_parameterization: bool, session_id: int, started_at: float,
                   dataset_summary: dict, optimizer_desc: str, steps: int, epoch: int) -> dict[str, str]:
    arch, base = ARCHITECTURES.get((model_type, v_parameterization and model_type == "sd2"), ARCHITECTURES[("sd1", False)])
    w, h = args.resolution
    md: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": time.time(),
        "ss_output_name": args.output_name,
        "ss_sd_model_name": args.pretrained_model_name_or_path,
        "ss_base_model_version": base,
        "ss_v2": model_type == "sd2",
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_network_args": json.dumps(args.network_args or []),
        "ss_optimizer": optimizer_desc,
        "ss_learning_rate": args.learning_rate,
        "ss_unet_lr": args.unet_lr,
        # one value as sd-scripts records it (a number); one per encoder as the list that trained
        "ss_text_encoder_lr": args.text_encoder_lr[0] if len(args.text_encoder_lr or []) == 1 else args.text_encoder_lr
        or None,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_steps": steps,
        "ss_epoch": epoch,
        "ss_seed": args.seed,
        "ss_mixed_precision": args.mixed_precision,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_batch_size_per_device": args.train_batch_size,
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_noise_offset": args.noise_offset,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_noise_offset_random_strength": args.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": args.huber_scale,
        "ss_huber_c": args.huber_c,
        "ss_resolution": f"({w}, {h})",
        "ss_num_train_images": dataset_summary.get("num_train_images"),
        "ss_num_reg_images": dataset_summary.get("num_reg_images"),
        "ss_tag_frequency": json.dumps(dataset_summary.get("tag_frequency", {}), ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dataset_summary.get("dataset_dirs", {}), ensure_ascii=False),
        **image_metadata(args, dataset_summary),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if model_type == "sdxl" else "diffusers",
        "modelspec.title": args.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.timestep_range": timestep_range(args),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return {k: sanitize(v) for k, v in md.items() if v is not None}


def image_metadata(args, dataset_summary: dict) -> dict[str, Any]:
    """sd-scripts' image, bucket and validation keys (ss_bucket_info: the first dataset's buckets)."""
    datasets = dataset_summary.get("datasets") or [{}]
    first = datasets[0]
    face = getattr(args, "face_crop_aug_range", None)
    return {
        "ss_color_aug": bool(getattr(args, "color_aug", False)),
        "ss_random_crop": bool(getattr(args, "random_crop", False)),
        "ss_face_crop_aug_range": f"{face[0]},{face[1]}" if face else None,
        "ss_resize_interpolation": getattr(args, "resize_interpolation", None),
        "ss_cache_latents": bool(getattr(args, "cache_latents", False)),
        "ss_enable_bucket": first.get("enable_bucket"),
        "ss_bucket_no_upscale": first.get("bucket_no_upscale"),
        "ss_min_bucket_reso": first.get("min_bucket_reso"),
        "ss_max_bucket_reso": first.get("max_bucket_reso"),
        "ss_bucket_info": json.dumps(first["bucket_info"]) if first.get("bucket_info") else None,
        "ss_num_validation_images": dataset_summary.get("num_validation_images", 0),
        "ss_validation_seed": getattr(args, "validation_seed", None),
        "ss_validation_split": getattr(args, "validation_split", None),
        "ss_max_validation_steps": getattr(args, "max_validation_steps", None),
        "ss_validate_every_n_epochs": getattr(args, "validate_every_n_epochs", None),
        "ss_validate_every_n_steps": getattr(args, "validate_every_n_steps", None),
    }


def timestep_range(args) -> str | None:
    """sd-scripts' "min,max" of --min_timestep / --max_timestep (0 and 1000 filling the one not given)."""
    if args.min_timestep is None and args.max_timestep is None:
        return None
    lo = 0 if args.min_timestep is None else args.min_timestep
    return f"{lo},{1000 if args.max_timestep is None else args.max_timestep}"
