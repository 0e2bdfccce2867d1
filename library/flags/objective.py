"""sd-scripts' loss, noise, timestep and masked-loss options, with sd-scripts' names, defaults and meanings.

`validate(args)` checks them before any model is loaded; library/training/losses.py does the maths.
"""

from __future__ import annotations

import argparse
import logging

from library.errors import ConfigError

logger = logging.getLogger("loraforge")

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
NUM_TRAIN_TIMESTEPS = 1000  # every SD1/SD2/SDXL schedule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("loss, noise and timesteps (sd-scripts)")
    g.add_argument("--loss_type", choices=LOSS_TYPES, default="l2",
                   help="element-wise loss between prediction and target: l2 (MSE), l1, huber "
                        "(2c(sqrt(d^2+c^2)-c)) or smooth_l1 (2(sqrt(d^2+c^2)-c))")
    g.add_argument("--huber_schedule", choices=HUBER_SCHEDULES, default="snr",
                   help="how the Huber threshold c varies with the timestep (huber / smooth_l1 only): constant "
                        "c*scale, exponential c^(t/T)*scale, or snr (1-c)/(1+sigma_t)^2+c")
    g.add_argument("--huber_c", type=float, default=0.1, help="Huber threshold parameter c (huber / smooth_l1)")
    g.add_argument("--huber_scale", type=float, default=1.0,
                   help="scale of the constant and exponential Huber thresholds")
    g.add_argument("--noise_offset_random_strength", action="store_true",
                   help="each batch draws its noise offset strength uniformly in [0, --noise_offset]")
    g.add_argument("--adaptive_noise_scale", type=float, default=None,
                   help="add |mean of each latent channel| x this to --noise_offset (needs --noise_offset)")
    g.add_argument("--multires_noise_iterations", type=int, default=None,
                   help="multi-resolution (pyramid) noise with this many levels (6-10 usual)")
    g.add_argument("--multires_noise_discount", type=float, default=0.3,
                   help="weight discount per level of --multires_noise_iterations")
    g.add_argument("--ip_noise_gamma", type=float, default=None,
                   help="input-perturbation noise (Ning et al. 2023): the U-Net sees noise + gamma * extra noise, "
                        "the target stays the plain noise (0.1 usual)")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                   help="each batch draws its input-perturbation strength uniformly in [0, --ip_noise_gamma]")
    g.add_argument("--min_timestep", type=int, default=None, help="smallest training timestep (0-999; default 0)")
    g.add_argument("--max_timestep", type=int, default=None,
                   help="timesteps are drawn below this (1-1000; default 1000); equal to --min_timestep: always it")
    g.add_argument("--v_pred_like_loss", type=float, default=None,
                   help="add this x a v-prediction-like loss, loss x (1 + x (snr+1)/snr) (epsilon models only)")
    g.add_argument("--debiased_estimation_loss", action="store_true",
                   help="weight the loss by 1/sqrt(snr) (epsilon) or 1/(snr+1) (v-prediction), snr capped at 1000")
    g.add_argument("--masked_loss", action="store_true",
                   help="multiply the loss by a mask: the conditioning_data_dir image's red channel, or the alpha "
                        "channel with --alpha_mask")
    g.add_argument("--alpha_mask", action="store_true",
                   help="the images' alpha channel is the loss mask (1 where opaque); the colour channels are used "
                        "as stored, not composited on white")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="folder of mask images named as the training images (with --train_data_dir; in a dataset "
                        "TOML use the subset key conditioning_data_dir)")
    g.add_argument("--scale_weight_norms", type=float, default=None,
                   help="after each step, scale down every LoRA module whose ||scale * up @ down|| exceeds this "
                        "(max-norm regularisation; 1 is a good start); logs keys scaled and the mean norm")


def validate(args: argparse.Namespace) -> None:
    """sd-scripts' checks of these options, plus ranges that would otherwise fail mid-run; one line each."""
    t_max = NUM_TRAIN_TIMESTEPS
    if args.min_timestep is not None and not 0 <= args.min_timestep < t_max:
        raise ConfigError(f"--min_timestep {args.min_timestep}: must be in [0, {t_max - 1}]")
    if args.max_timestep is not None and not 1 <= args.max_timestep <= t_max:
        raise ConfigError(f"--max_timestep {args.max_timestep}: must be in [1, {t_max}]")
    lo = 0 if args.min_timestep is None else args.min_timestep
    hi = t_max if args.max_timestep is None else args.max_timestep
    if lo > hi:
        raise ConfigError(f"--min_timestep {lo} is larger than --max_timestep {hi}")
    if args.loss_type in ("huber", "smooth_l1") and not args.huber_c > 0:
        raise ConfigError(f"--huber_c {args.huber_c}: must be > 0 with --loss_type {args.loss_type} (0.1 usual)")
    if args.adaptive_noise_scale is not None and args.noise_offset is None:
        raise ConfigError("--adaptive_noise_scale needs --noise_offset (it is added to the offset)")
    if args.multires_noise_iterations is not None and args.multires_noise_iterations < 0:
        raise ConfigError(f"--multires_noise_iterations {args.multires_noise_iterations}: must be >= 0")
    if args.ip_noise_gamma is not None and args.ip_noise_gamma < 0:
        raise ConfigError(f"--ip_noise_gamma {args.ip_noise_gamma}: must be >= 0 (0.1 usual)")
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        raise ConfigError("--scale_v_pred_loss_like_noise_pred needs --v_parameterization")
    if args.v_pred_like_loss and args.v_parameterization:
        raise ConfigError("--v_pred_like_loss cannot be used with --v_parameterization (the loss already is v)")
    if args.scale_weight_norms is not None and not args.scale_weight_norms > 0:
        raise ConfigError(f"--scale_weight_norms {args.scale_weight_norms}: must be > 0 (1 is a good start)")
    if args.conditioning_data_dir and not args.masked_loss:
        raise ConfigError("--conditioning_data_dir holds loss masks: add --masked_loss to use them")
    if args.conditioning_data_dir and args.dataset_config:
        raise ConfigError("--conditioning_data_dir goes with --train_data_dir; with --dataset_config set "
                          "conditioning_data_dir on the subsets in the TOML")
    if args.zero_terminal_snr and not args.v_parameterization:
        logger.warning("--zero_terminal_snr without --v_parameterization: an epsilon model cannot predict from pure "
                       "noise at the last timestep; training may behave unexpectedly (as sd-scripts warns)")
    if args.cuda_graphs and args.multires_noise_iterations:
        raise ConfigError("--cuda_graphs cannot record --multires_noise_iterations: each step draws its noise "
                          "pyramid's sizes on the host; drop one of the two")
