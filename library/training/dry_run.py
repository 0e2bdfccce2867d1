"""--dry_run: every check the run would make, then its plan, without loading a model or training a step.

The peak-VRAM figure is an estimate, not a measurement: frozen weights and the LoRA's weights, gradients and
optimizer state are counted exactly from the model's configs; activations per image come from the peaks measured
on an H100 (docs/performance.md, docs/sdxl.md: SD1.5 at 512 px and SDXL at 1024 px, with and without gradient
checkpointing), scaled by pixel count and the U-Net's channel width.
"""

from __future__ import annotations

import argparse
import math
import os
import re

_GiB = 1 << 30
# GiB of activations per image in bf16 at the model family's base resolution: (without, with) checkpointing
_ACTIVATIONS = {"sd1": (512, 0.93, 0.12), "sd2": (512, 0.93, 0.12), "sdxl": (1024, 6.8, 0.87)}
_BASE_CHANNELS = 320  # first U-Net block width of SD1.5 / SDXL, where the activations were measured
_PRECISION_BYTES = {"no": 4, "fp16": 2, "bf16": 2}


def optimizer_state_bytes(spec) -> float:
    """Bytes of optimizer state per trainable parameter, as the registry documents it (8: Adam's two moments)."""
    found = re.match(r"\s*([0-9.]+)", spec.state_bytes or "")
    return float(found.group(1)) if found else 8.0


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def peak_vram_bytes(args: argparse.Namespace, *, model_type: str, unet, encoders, vae, lora_parameters: int,
                    state_bytes: float, batch: int, resolution: tuple[int, int]) -> int:
    """Frozen model + LoRA (weights, gradients, optimizer state) + activations of one step."""
    dtype = _PRECISION_BYTES[args.mixed_precision]
    frozen = _count(unet) * (1 if args.fp8_base or args.fp8_base_unet else dtype)
    if not (args.cache_text_encoder_outputs and args.network_train_unet_only):  # else moved off the device
        frozen += sum(_count(te) for te in encoders) * (1 if args.fp8_base else dtype)
    if not (args.cache_latents or args.cache_latents_to_disk):
        frozen += _count(vae) * (4 if model_type == "sdxl" or args.no_half_vae else dtype)
    lora_bytes = 2 if args.full_bf16 or args.full_fp16 else 4
    lora = lora_parameters * (2 * lora_bytes + state_bytes)
    base, plain, checkpointed = _ACTIVATIONS[model_type]
    per_image = (checkpointed if args.gradient_checkpointing else plain) * _GiB
    width = unet.config.block_out_channels[0] / _BASE_CHANNELS
    pixels = resolution[0] * resolution[1] / base**2
    activations = per_image * batch * pixels * width * (2 if args.mixed_precision == "no" else 1)
    return int(frozen + lora + activations)


def plan(trainer) -> str:
    """The run as it would go, after `trainer.check()` passed."""
    from library.models.loader import detect_model_type
    from library.training.validate import lora_parameters_from_configs, model_on_meta_device

    a, dataset = trainer.args, trainer.dataset
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    batches = len(dataset.batch_sampler(seed=a.seed)) // processes
    steps_per_epoch = max(1, math.ceil(batches / a.gradient_accumulation_steps))
    steps = a.max_train_epochs * steps_per_epoch if a.max_train_epochs else a.max_train_steps
    summary = dataset.summary()
    batch = max(d["batch_size"] for d in summary["datasets"])
    model_type = "sdxl" if a.sdxl else "sd2" if a.v2 else detect_model_type(a.pretrained_model_name_or_path)
    lines = [
        "dry run: all checks passed; nothing was loaded or trained",
        f"  model: {a.pretrained_model_name_or_path} ({model_type or 'type read at load'})",
        f"  data: {summary['num_train_images']} images ({summary['num_reg_images']} regularisation), "
        f"{summary['num_samples']} samples with repeats, buckets "
        + ", ".join(f"{k} x{v}" for d in summary["datasets"] for k, v in d["buckets"].items()),
        f"  steps: {steps} ({math.ceil(steps / steps_per_epoch)} epochs of {steps_per_epoch}); effective batch "
        f"{batch} x {processes} processes x {a.gradient_accumulation_steps} accumulation = "
        f"{batch * processes * a.gradient_accumulation_steps}",
        f"  network: {a.network_module} dim {a.network_dim} alpha {a.network_alpha}; optimizer {trainer.spec.name}",
        f"  outputs: {trainer.output_dir / a.output_name}.{a.save_model_as}"
        + (f", samples of {len(trainer.prompts)} prompts" if trainer.prompts else ""),
    ]
    model = model_on_meta_device(a.pretrained_model_name_or_path)
    lora_parameters = lora_parameters_from_configs(a)
    if model is not None and lora_parameters is not None and model_type in _ACTIVATIONS:
        unet, encoders, vae = model
        resolution = max((tuple(d["resolution"]) for d in summary["datasets"]), key=lambda r: r[0] * r[1])
        peak = peak_vram_bytes(a, model_type=model_type, unet=unet, encoders=encoders, vae=vae,
                               lora_parameters=lora_parameters, state_bytes=optimizer_state_bytes(trainer.spec),
                               batch=batch, resolution=resolution)
        lines.append(f"  LoRA: {lora_parameters:,} trainable parameters; peak VRAM about {peak / _GiB:.1f} GiB "
                     f"(estimate: weights, LoRA state and activations at {resolution[0]}x{resolution[1]})")
    return "\n".join(lines)
