"""Diffusion training objective: noising, eps / v-prediction targets, Min-SNR weighting.

Written against diffusers' DDPMScheduler so that the noise schedule is exactly the one the base model was trained with.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def make_noise_scheduler(config: dict, *, v_parameterization: bool, zero_terminal_snr: bool) -> DDPMScheduler:
    config = dict(config)
    config["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    if zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
    return DDPMScheduler.from_config(config)


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod).clamp_min(1e-8)


def sample_noise(latents: torch.Tensor, noise_offset: float | None) -> torch.Tensor:
    noise = torch.randn_like(latents)
    if noise_offset:
        # Offset noise (crosslabs): lets the model learn very dark / very bright images.
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype)
    return noise


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    *,
    loss_weights: torch.Tensor,
    min_snr_gamma: float | None,
    scale_v_pred_loss_like_noise_pred: bool,
) -> torch.Tensor:
    """Per-sample MSE, weighted; returns the batch mean (a 0-d tensor, never read back here)."""
    loss = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    loss = loss * loss_weights
    v_pred = scheduler.config.prediction_type == "v_prediction"
    if min_snr_gamma:
        s = snr(scheduler, timesteps)
        if v_pred:
            weight = torch.minimum(s, torch.full_like(s, min_snr_gamma)) / (s + 1.0)
        else:  # min(snr, gamma) / snr, written so that --zero_terminal_snr's snr = 0 at t = T gives 1, not 0/0
            weight = (min_snr_gamma / s).clamp(max=1.0)
        loss = loss * weight
    if scale_v_pred_loss_like_noise_pred and v_pred:
        s = snr(scheduler, timesteps)
        loss = loss * s / (s + 1.0)
    return loss.mean()


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise
