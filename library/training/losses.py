"""Diffusion training objective, with sd-scripts' formulas: noise (offset, adaptive, pyramid, input perturbation),
timesteps, eps / v-prediction targets, element-wise losses (l2, l1, Huber with its schedules), loss masks and
the per-timestep weights (Min-SNR, v-scaling, v-like loss, debiased estimation).

Written against diffusers' DDPMScheduler so that the noise schedule is exactly the one the base model was trained
with. Every function is plain tensor maths without host synchronisation, so the whole step can be recorded as a
CUDA graph; the one host-side draw (the pyramid's sizes) is refused with --cuda_graphs by the option checks.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

SNR_CAP = 1000.0  # sd-scripts caps the SNR at 1000 where it divides by it (t = 0 of a zero-terminal schedule)


@dataclass(frozen=True)
class NoiseOptions:
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NoiseOptions:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LossOptions:
    v_prediction: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, v_prediction: bool) -> LossOptions:
        names = [n for n in cls.__dataclass_fields__ if n != "v_prediction"]
        return cls(v_prediction=v_prediction, **{name: getattr(args, name) for name in names})


# ------------------------------------------------------------------------------------------------ schedule
def make_noise_scheduler(config: dict, *, v_parameterization: bool, zero_terminal_snr: bool) -> DDPMScheduler:
    config = dict(config)
    config["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    config["rescale_betas_zero_snr"] = bool(zero_terminal_snr)  # Lin et al. 2023, as sd-scripts rescales
    return DDPMScheduler.from_config(config)


def snr_table(config: dict) -> torch.Tensor:
    """SNR of every timestep of the schedule *before* any zero-terminal-SNR rescale, as sd-scripts computes the
    table that its Min-SNR / v-scaling / debiased weights read (it is built before the betas are rescaled)."""
    plain = dict(config)
    plain["rescale_betas_zero_snr"] = False
    alphas_cumprod = DDPMScheduler.from_config(plain).alphas_cumprod
    return (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


# ------------------------------------------------------------------------------------------------ noise
def sample_timesteps(batch: int, opts: NoiseOptions, num_train_timesteps: int, device) -> torch.Tensor:
    """Uniform in [min_timestep, max_timestep); min == max gives max_timestep, as sd-scripts."""
    lo = 0 if opts.min_timestep is None else opts.min_timestep
    hi = num_train_timesteps if opts.max_timestep is None else opts.max_timestep
    if lo < hi:
        return torch.randint(lo, hi, (batch,), device=device)
    return torch.full((batch,), hi, dtype=torch.long, device=device)


def sample_noise(latents: torch.Tensor, opts: NoiseOptions) -> torch.Tensor:
    """The noise the target is built from: Gaussian, plus offset noise, then the pyramid (sd-scripts' order; the
    pyramid's level sizes come from Python's `random`, seeded per process like sd-scripts')."""
    noise = torch.randn_like(latents)
    if opts.noise_offset:
        noise = noise + offset_noise(latents, opts)
    if opts.multires_noise_iterations:
        noise = pyramid_noise(noise, opts.multires_noise_iterations, opts.multires_noise_discount, random.random)
    return noise


def offset_noise(latents: torch.Tensor, opts: NoiseOptions) -> torch.Tensor:
    """Offset noise (crosslabs): one N(0, 1) value per image and channel, times the strength — drawn in
    [0, noise_offset) per batch with the random strength, plus |channel mean| x adaptive_noise_scale, floored at 0."""
    strength: float | torch.Tensor = opts.noise_offset
    if opts.noise_offset_random_strength:
        strength = torch.rand(1, device=latents.device) * opts.noise_offset
    if opts.adaptive_noise_scale is not None:
        channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        strength = (strength + opts.adaptive_noise_scale * channel_mean).clamp_min(0.0)
    return strength * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                  dtype=latents.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  uniform: Callable[[], float]) -> torch.Tensor:
    """Multi-resolution noise (Whitaker 2023) as sd-scripts: level i adds bilinearly upsampled noise of size
    (H, W) / r^i, r uniform in [2, 4) per level, weighted discount^i; stops at a 1-pixel side; unit std overall."""
    b, c, h, w = noise.shape
    total = noise
    for i in range(iterations):
        r = uniform() * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = torch.randn(b, c, hn, wn, device=noise.device, dtype=noise.dtype)
        total = total + torch.nn.functional.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return total / total.std()


def perturbed_noise(noise: torch.Tensor, opts: NoiseOptions) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023): the noise the U-Net's input is made with; the target keeps `noise`."""
    if not opts.ip_noise_gamma:
        return noise
    strength: float | torch.Tensor = opts.ip_noise_gamma
    if opts.ip_noise_gamma_random_strength:
        strength = torch.rand(1, device=noise.device) * opts.ip_noise_gamma
    return noise + strength * torch.randn_like(noise)


# ------------------------------------------------------------------------------------------------ loss
def huber_threshold(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, opts: LossOptions,
                    num_train_timesteps: int) -> torch.Tensor | None:
    """Per-sample Huber c (sd-scripts' schedules); None for l2 / l1. `alphas_cumprod`: the schedule in use."""
    if opts.loss_type not in ("huber", "smooth_l1"):
        return None
    c = opts.huber_c
    if opts.huber_schedule == "exponential":
        alpha = -math.log(c) / num_train_timesteps
        return torch.exp(-alpha * timesteps) * opts.huber_scale
    if opts.huber_schedule == "snr":
        ac = alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    return torch.full(timesteps.shape, c * opts.huber_scale, device=timesteps.device)


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    diff = pred - target
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    c = huber_c.view(-1, *([1] * (pred.ndim - 1)))
    smooth = torch.sqrt(diff**2 + c**2) - c
    return 2 * c * smooth if loss_type == "huber" else 2 * smooth


def apply_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Loss x mask, the mask [B, 1, H, W] in [0, 1] area-averaged down to the loss's size (sd-scripts)."""
    mask = torch.nn.functional.interpolate(mask.to(loss.dtype), size=loss.shape[2:], mode="area")
    return loss * mask


def timestep_weights(timesteps: torch.Tensor, snr: torch.Tensor, opts: LossOptions) -> torch.Tensor | None:
    """The product of sd-scripts' per-sample weights, read from its SNR table (`snr_table`); None: all ones.

    Min-SNR-gamma (Hang et al. 2023): min(snr, g)/snr (eps) or min(snr, g)/(snr+1) (v), snr uncapped;
    v-scaling: s/(s+1); v-like loss: 1 + k (s+1)/s; debiased: 1/sqrt(s) (eps) or 1/(s+1) (v); s = min(snr, 1000).
    """
    if not (opts.min_snr_gamma or opts.scale_v_pred_loss_like_noise_pred or opts.v_pred_like_loss
            or opts.debiased_estimation_loss):
        return None
    s = snr.to(timesteps.device)[timesteps]
    capped = s.clamp(max=SNR_CAP)
    weight = torch.ones_like(s)
    if opts.min_snr_gamma:
        weight = weight * s.clamp(max=opts.min_snr_gamma) / (s + 1 if opts.v_prediction else s)
    if opts.scale_v_pred_loss_like_noise_pred:
        weight = weight * capped / (capped + 1)
    if opts.v_pred_like_loss:
        weight = weight * (1 + opts.v_pred_like_loss * (capped + 1) / capped)
    if opts.debiased_estimation_loss:
        weight = weight / (capped + 1 if opts.v_prediction else capped.sqrt())
    return weight


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, *, sample_weights: torch.Tensor,
                   huber_c: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None, loss_type: str = "l2") -> torch.Tensor:
    """Element-wise loss, masked, averaged per sample, times the sample's (prior-loss) weight and its timestep
    weight, then the batch mean: a 0-d tensor, never read back here."""
    loss = elementwise_loss(pred.float(), target.float(), loss_type, huber_c)
    if mask is not None:
        loss = apply_mask(loss, mask)
    loss = loss.mean(dim=tuple(range(1, loss.ndim))) * sample_weights
    if weights is not None:
        loss = loss * weights
    return loss.mean()
