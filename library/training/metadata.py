"""The `ss_*` (kohya) and `modelspec.*` metadata written into the LoRA file, key for key as sd-scripts writes it.

sd-scripts turns every value into `str(value)`: an unset option reads "None", a switch "True"/"False", a
resolution "(512, 512)". An option that becomes a metadata key is one line of `OPTION_KEYS` (or `SWITCH_KEYS`
for keys sd-scripts writes as `bool(value)`); what the run itself decides (dataset, epochs, hashes) is built
in `build_metadata`. `--no_metadata` keeps the keys loaders need (`MINIMUM_KEYS`) plus `modelspec.*`.
"""

from __future__ import annotations

import argparse
import ast
import base64
import datetime
import hashlib
import json
import mimetypes
import os
import subprocess
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELSPEC_VERSION = "1.0.1"  # sd-scripts' sai_model_spec
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")

# ss_ key -> option; written as str(value)
OPTION_KEYS: dict[str, str] = {
    "ss_output_name": "output_name",
    "ss_learning_rate": "learning_rate",
    "ss_text_encoder_lr": "text_encoder_lr",
    "ss_unet_lr": "unet_lr",
    "ss_gradient_checkpointing": "gradient_checkpointing",
    "ss_gradient_accumulation_steps": "gradient_accumulation_steps",
    "ss_max_train_steps": "max_train_steps",
    "ss_lr_warmup_steps": "lr_warmup_steps",
    "ss_lr_scheduler": "lr_scheduler",
    "ss_network_module": "network_module",
    "ss_network_dim": "network_dim",
    "ss_network_alpha": "network_alpha",
    "ss_network_dropout": "network_dropout",
    "ss_mixed_precision": "mixed_precision",
    "ss_clip_skip": "clip_skip",
    "ss_max_token_length": "max_token_length",
    "ss_seed": "seed",
    "ss_lowram": "lowram",
    "ss_noise_offset": "noise_offset",
    "ss_multires_noise_iterations": "multires_noise_iterations",
    "ss_multires_noise_discount": "multires_noise_discount",
    "ss_adaptive_noise_scale": "adaptive_noise_scale",
    "ss_zero_terminal_snr": "zero_terminal_snr",
    "ss_training_comment": "training_comment",
    "ss_max_grad_norm": "max_grad_norm",
    "ss_caption_dropout_rate": "caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs",
    "ss_caption_tag_dropout_rate": "caption_tag_dropout_rate",
    "ss_face_crop_aug_range": "face_crop_aug_range",
    "ss_prior_loss_weight": "prior_loss_weight",
    "ss_min_snr_gamma": "min_snr_gamma",
    "ss_scale_weight_norms": "scale_weight_norms",
    "ss_ip_noise_gamma": "ip_noise_gamma",
    "ss_noise_offset_random_strength": "noise_offset_random_strength",
    "ss_ip_noise_gamma_random_strength": "ip_noise_gamma_random_strength",
    "ss_loss_type": "loss_type",
    "ss_huber_schedule": "huber_schedule",
    "ss_huber_scale": "huber_scale",
    "ss_huber_c": "huber_c",
    "ss_validation_seed": "validation_seed",
    "ss_validation_split": "validation_split",
    "ss_max_validation_steps": "max_validation_steps",
    "ss_validate_every_n_epochs": "validate_every_n_epochs",
    "ss_validate_every_n_steps": "validate_every_n_steps",
    "ss_resize_interpolation": "resize_interpolation",
}
# ss_ key -> option; written as str(bool(value))
SWITCH_KEYS: dict[str, str] = {
    "ss_full_fp16": "full_fp16",
    "ss_debiased_estimation": "debiased_estimation_loss",
    "ss_fp8_base": "fp8_base",
    "ss_fp8_base_unet": "fp8_base_unet",
}
# only when the run reads --train_data_dir (with --dataset_config, ss_datasets carries them per dataset)
FOLDER_RUN_KEYS: dict[str, str] = {"ss_batch_size_per_device": "train_batch_size", "ss_keep_tokens": "keep_tokens"}
FOLDER_RUN_SWITCHES: dict[str, str] = {"ss_color_aug": "color_aug", "ss_flip_aug": "flip_aug",
                                       "ss_random_crop": "random_crop", "ss_shuffle_caption": "shuffle_caption"}
def sanitize(value: str) -> str:
    """Metadata must be plain printable text: drop control characters."""
    return "".join(ch for ch in value if ch in "\n\t" or unicodedata.category(ch)[0] != "C")


@dataclass(frozen=True)
class RunFacts:
    """What the run decided, beyond the options."""

    model_type: str  # "sd1" | "sd2" | "sdxl"
    v_parameterization: bool
    session_id: int
    started_at: float
    dataset_summary: dict
    from_dataset_config: bool
    num_batches_per_epoch: int
    num_epochs: int
    num_processes: int
    optimizer_class: str  # module.Class
    network_kwargs: dict
    network_dim: int | None = None  # the network's own, when --dim_from_weights took it from the file
    network_alpha: float | None = None


def base_model_version(model_type: str, v_parameterization: bool) -> str:
    """sd-scripts' model version string: sdxl_base_v1-0, or sd_v1 / sd_v2 with _v for v-prediction."""
    if model_type == "sdxl":
        return "sdxl_base_v1-0"
    return ("sd_v2" if model_type == "sd2" else "sd_v1") + ("_v" if v_parameterization else "")


def optimizer_metadata(optimizer_class: str, optimizer_args: list[str] | None) -> str:
    """sd-scripts' ss_optimizer: `module.Class` plus `(k=v,...)` of --optimizer_args, values as Python reads them."""
    pairs = []
    for item in optimizer_args or []:
        key, _, raw = item.partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        pairs.append(f"{key}={value}")
    return optimizer_class + (f"({','.join(pairs)})" if pairs else "")


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old model hash: sha256 of the 64 KiB at offset 1 MiB, 8 hex digits (sd-scripts' model_hash)."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"
    except (IsADirectoryError, PermissionError):
        return "IsADirectory"


def file_sha256(path: str | Path) -> str:
    """A1111's new model hash: sha256 of the whole file (sd-scripts' calculate_sha256)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return "NOFILE"
    except (IsADirectoryError, PermissionError):
        return "IsADirectory"
    return digest.hexdigest()


def model_file_keys(prefix: str, name_key: str, value: str | None) -> dict[str, str]:
    """`<prefix>_hash`, `new_<prefix>_hash` and the base name when `value` is a path; the name as given otherwise."""
    if value is None:
        return {}
    if not os.path.exists(value):
        return {name_key: value}
    return {f"ss_{prefix}_hash": legacy_model_hash(value), f"ss_new_{prefix}_hash": file_sha256(value),
            name_key: os.path.basename(value)}


def source_revision() -> str:
    """The git commit of this code (sd-scripts records its own as ss_sd_scripts_commit_hash)."""
    try:
        out = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                      stderr=subprocess.DEVNULL, timeout=5)
        return out.decode("ascii").strip()
    except (OSError, subprocess.SubprocessError):
        return "(unknown)"


def _folder_name(subset: dict) -> str:
    """How sd-scripts names a subset in ss_dataset_dirs: its folder, or its fine-tuning metadata file."""
    return Path(subset.get("metadata_file") or subset["image_dir"]).name


def dataset_keys(args: argparse.Namespace, facts: RunFacts) -> dict[str, Any]:
    """ss_datasets (with --dataset_config) or the single-folder keys (with --train_data_dir), as sd-scripts."""
    s = facts.dataset_summary
    if facts.from_dataset_config:
        datasets, dirs, tags = [], {}, {}
        for d in s["datasets"]:
            subsets = []
            for sub in d["subsets"]:
                name = _folder_name(sub)
                subsets.append({
                    "img_count": sub["img_count"], "num_repeats": sub["num_repeats"],
                    "color_aug": bool(sub["color_aug"]), "flip_aug": bool(sub["flip_aug"]),
                    "random_crop": bool(sub.get("random_crop")), "shuffle_caption": bool(sub["shuffle_caption"]),
                    "keep_tokens": sub["keep_tokens"], "keep_tokens_separator": sub.get("keep_tokens_separator", ""),
                    "secondary_separator": sub.get("secondary_separator", ""), "enable_wildcard": sub["enable_wildcard"],
                    "caption_prefix": sub.get("caption_prefix"), "caption_suffix": sub.get("caption_suffix"),
                    "resize_interpolation": sub["resize_interpolation"], "image_dir": name, "class_tokens": sub["class_tokens"],
                    "is_reg": sub["is_reg"],
                })
                if not sub["is_reg"]:  # the same folder twice becomes "name (2)"
                    key, i = name, 2
                    while key in dirs:
                        key, i = f"{name} ({i})", i + 1
                    dirs[key] = {"n_repeats": sub["num_repeats"], "img_count": sub["img_count"]}
            datasets.append({
                "is_dreambooth": True, "batch_size_per_device": d["batch_size"],
                "num_train_images": d["num_train_images_x_repeats"], "num_reg_images": d["num_reg_images_x_repeats"],
                "resolution": list(d["resolution"]), "enable_bucket": d["enable_bucket"],
                "min_bucket_reso": d["min_bucket_reso"], "max_bucket_reso": d["max_bucket_reso"],
                "tag_frequency": d["tag_frequency"], "bucket_info": d["bucket_info"], "resize_interpolation": None,
                "subsets": subsets,
            })
            for folder, freq in d["tag_frequency"].items():
                tags.setdefault(folder, freq)
        return {"ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(tags),
                "ss_dataset_dirs": json.dumps(dirs)}
    d = s["datasets"][0]
    train_dirs, reg_dirs = {}, {}
    for sub in d["subsets"]:
        (reg_dirs if sub["is_reg"] else train_dirs)[_folder_name(sub)] = {
            "n_repeats": sub["num_repeats"], "img_count": sub["img_count"]}
    keys: dict[str, Any] = {k: getattr(args, o) for k, o in FOLDER_RUN_KEYS.items()}
    keys.update({k: bool(getattr(args, o)) for k, o in FOLDER_RUN_SWITCHES.items()})
    keys.update({
        "ss_total_batch_size": args.train_batch_size * facts.num_processes * args.gradient_accumulation_steps,
        "ss_resolution": tuple(d["resolution"]), "ss_enable_bucket": bool(d["enable_bucket"]),
        "ss_bucket_no_upscale": bool(d["bucket_no_upscale"]), "ss_min_bucket_reso": d["min_bucket_reso"],
        "ss_max_bucket_reso": d["max_bucket_reso"], "ss_dataset_dirs": json.dumps(train_dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs), "ss_tag_frequency": json.dumps(d["tag_frequency"]),
        "ss_bucket_info": json.dumps(d["bucket_info"]),
    })
    return keys


def build_metadata(args: argparse.Namespace, facts: RunFacts) -> dict[str, str]:
    """The ss_* keys fixed for the whole run; `stamp` adds what changes with each save."""
    s = facts.dataset_summary
    md: dict[str, Any] = {"ss_session_id": facts.session_id, "ss_training_started_at": facts.started_at}
    md.update({k: getattr(args, o) for k, o in OPTION_KEYS.items()})
    md.update({k: bool(getattr(args, o)) for k, o in SWITCH_KEYS.items()})
    te_lr = args.text_encoder_lr  # one value: the number sd-scripts records; one per encoder: the list that trained
    md["ss_text_encoder_lr"] = te_lr[0] if isinstance(te_lr, list) and len(te_lr) == 1 else te_lr or None
    md.update({
        "ss_v2": facts.model_type == "sd2",
        "ss_num_train_images": s["num_train_images_x_repeats"],
        "ss_num_validation_images": s.get("num_validation_images", 0),
        "ss_cache_latents": bool(args.cache_latents or args.cache_latents_to_disk),  # the one implies the other
        "ss_num_reg_images": s["num_reg_images_x_repeats"],
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_base_model_version": base_model_version(facts.model_type, facts.v_parameterization),
        "ss_sd_scripts_commit_hash": source_revision(),
        "ss_optimizer": optimizer_metadata(facts.optimizer_class, args.optimizer_args),
    })
    if facts.network_dim is not None:
        md["ss_network_dim"], md["ss_network_alpha"] = facts.network_dim, facts.network_alpha
    md.update(dataset_keys(args, facts))
    if args.network_args:
        md["ss_network_args"] = json.dumps(facts.network_kwargs)
    md.update(model_file_keys("sd_model", "ss_sd_model_name", args.pretrained_model_name_or_path))
    md.update(model_file_keys("vae", "ss_vae_name", args.vae))
    return {k: sanitize(str(v)) for k, v in md.items()}


def stamp(metadata: dict[str, str], *, steps: int, epoch: int, no_metadata: bool) -> dict[str, str]:
    """The keys of one save: finish time, steps and the (1-based) epoch; only MINIMUM_KEYS with --no_metadata."""
    if no_metadata:
        return {k: metadata[k] for k in MINIMUM_KEYS if k in metadata}
    return {**metadata, "ss_training_finished_at": str(time.time()), "ss_steps": str(steps), "ss_epoch": str(epoch)}


# ----------------------------------------------------------------------------------------------- modelspec
_ARCHITECTURES = {"sdxl": "stable-diffusion-xl-v1-base", "sd2": "stable-diffusion-v2-512", "sd1": "stable-diffusion-v1"}


def architecture(model_type: str, v_parameterization: bool) -> str:
    """The model spec's architecture of the base model (the LoRA's is this + "/lora")."""
    if model_type == "sd2" and v_parameterization:
        return "stable-diffusion-v2-768-v"
    return _ARCHITECTURES[model_type]


def file_to_data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


def modelspec(args: argparse.Namespace, *, model_type: str, v_parameterization: bool, resolution: tuple[int, int],
              implementation_version: str, timestamp: float | None = None) -> dict[str, str]:
    """sd-scripts' modelspec.* keys of a LoRA (Stability AI's model spec, version `MODELSPEC_VERSION`)."""
    timestamp = time.time() if timestamp is None else timestamp
    arch = architecture(model_type, v_parameterization)
    spec: dict[str, str | None] = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if model_type == "sdxl"
        else "diffusers",
        "modelspec.title": args.metadata_title if args.metadata_title is not None else args.output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.description": args.metadata_description,
        "modelspec.author": args.metadata_author,
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.license": args.metadata_license,
        "modelspec.tags": args.metadata_tags,
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.timestep_range": _timestep_range(args),
        "modelspec.encoder_layer": None if args.clip_skip is None else str(args.clip_skip),
        "modelspec.implementation_version": implementation_version,
    }
    from library.flags.models_saving import EXTRA_MODELSPEC_FIELDS

    for name in EXTRA_MODELSPEC_FIELDS:
        value = getattr(args, f"metadata_{name}")
        if name == "thumbnail" and value is not None and not value.startswith("data:"):
            value = file_to_data_url(value)
        spec[f"modelspec.{name}"] = value
    return {k: sanitize(v) for k, v in spec.items() if v is not None}


def _timestep_range(args: argparse.Namespace) -> str | None:
    low, high = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    if low is None and high is None:
        return None
    return f"{0 if low is None else low},{1000 if high is None else high}"
