"""The training objective against float64 references written from sd-scripts' formulas (train_util's
get_noise_noisy_latents_and_timesteps / get_huber_threshold_if_needed / conditional_loss, custom_train_functions'
weights, noise and masks). Random draws: replayed from the same seed, or compared as distributions."""

from __future__ import annotations

import argparse
import math
import random

import numpy as np
import pytest
import torch

from library.cli import parse_args
from library.errors import ConfigError
from library.flags.objective import validate
from library.training import losses

CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
T = 1000


def ref_alphas_cumprod(zero_terminal_snr: bool) -> torch.Tensor:
    """sd-scripts' DDPMScheduler(scaled_linear) and, for zero terminal SNR, its beta rescale, in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    if zero_terminal_snr:
        s = ac.sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        s = (s - sT) * s0 / (s0 - sT)
        ac2 = s**2
        alphas = torch.cat([ac2[:1], ac2[1:] / ac2[:-1]])
        ac = torch.cumprod(alphas, 0)
    return ac


def ref_weights(t: torch.Tensor, *, v: bool, gamma=None, scale_v=False, v_like=None, debiased=False) -> torch.Tensor:
    """sd-scripts' post_process_loss factors: all_snr from the schedule before any rescale; cap 1000 where used."""
    ac = ref_alphas_cumprod(False)
    snr = (ac.sqrt() / (1 - ac).sqrt()) ** 2
    s = snr[t]
    capped = torch.minimum(s, torch.full_like(s, 1000.0))
    w = torch.ones_like(s)
    if gamma:
        w = w * torch.minimum(s, torch.full_like(s, gamma)) / ((s + 1) if v else s)
    if scale_v:
        w = w * capped / (capped + 1)
    if v_like:
        w = w + w / (capped / (capped + 1)) * v_like  # loss + loss / scale * v_pred_like_loss
    if debiased:
        w = w * (1 / (capped + 1) if v else 1 / torch.sqrt(capped))
    return w


TIMES = torch.tensor([0, 1, 10, 250, 600, 998, 999])


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_schedule_and_snr_table_are_sd_scripts(zero_terminal_snr):
    scheduler = losses.make_noise_scheduler(CONFIG, v_parameterization=True, zero_terminal_snr=zero_terminal_snr)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ref_alphas_cumprod(zero_terminal_snr),
                               rtol=2e-5, atol=1e-7)
    ac = ref_alphas_cumprod(False)
    torch.testing.assert_close(losses.snr_table(CONFIG).double(), ac / (1 - ac), rtol=1e-4, atol=0)


FLAG_SETS = [dict(gamma=5.0), dict(debiased=True), dict(gamma=5.0, debiased=True), dict(scale_v=True),
             dict(v_like=0.2), dict(gamma=1.0, scale_v=True, debiased=True)]


@pytest.mark.parametrize("v, flags", [(v, f) for v in (False, True) for f in FLAG_SETS
                                      if not (f.get("scale_v") and not v) and not (f.get("v_like") and v)])
def test_timestep_weights_match_sd_scripts(v, flags):
    opts = losses.LossOptions(v_prediction=v, min_snr_gamma=flags.get("gamma"),
                              scale_v_pred_loss_like_noise_pred=flags.get("scale_v", False),
                              v_pred_like_loss=flags.get("v_like"),
                              debiased_estimation_loss=flags.get("debiased", False))
    got = losses.timestep_weights(TIMES, losses.snr_table(CONFIG), opts)
    # rtol: sd-scripts' table is float32, whose 1 - alphas_cumprod near t = 0 carries ~1e-4 relative error
    torch.testing.assert_close(got.double(), ref_weights(TIMES, v=v, **flags), rtol=2e-4, atol=1e-9)


def test_zero_terminal_snr_weights_come_from_the_schedule_before_the_rescale():
    """With --zero_terminal_snr the weights stay those of the plain schedule (finite at t = 999), as sd-scripts;
    the rescaled table would weigh v-prediction by up to 0.1 less, and that must not happen."""
    opts = losses.LossOptions(v_prediction=True, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True)
    got = losses.timestep_weights(TIMES, losses.snr_table(CONFIG), opts).double()
    ac = ref_alphas_cumprod(True)
    rescaled = ac / (1 - ac)
    s = rescaled[TIMES]
    rescaled_w = torch.minimum(s, torch.tensor(5.0, dtype=torch.float64)) / (s + 1) * s / (s + 1)
    assert (got - rescaled_w).abs().max() > 0.02
    torch.testing.assert_close(got, ref_weights(TIMES, v=True, gamma=5.0, scale_v=True), rtol=2e-4, atol=1e-9)


def test_no_weighting_flags_means_no_weights():
    assert losses.timestep_weights(TIMES, losses.snr_table(CONFIG), losses.LossOptions()) is None


# ------------------------------------------------------------------------------------------------ loss types
def ref_huber_c(t: torch.Tensor, schedule: str, c: float, scale: float, zero_terminal_snr: bool) -> torch.Tensor:
    t = t.double()
    if schedule == "exponential":
        return torch.exp(math.log(c) / T * t) * scale
    if schedule == "snr":
        ac = ref_alphas_cumprod(zero_terminal_snr)[t.long()]
        sigma = ((1 - ac) / ac) ** 0.5
        return (1 - c) / (1 + sigma) ** 2 + c
    return torch.full_like(t, c * scale)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_huber_thresholds_match_sd_scripts(schedule, zero_terminal_snr):
    scheduler = losses.make_noise_scheduler(CONFIG, v_parameterization=False, zero_terminal_snr=zero_terminal_snr)
    opts = losses.LossOptions(loss_type="huber", huber_schedule=schedule, huber_c=0.2, huber_scale=1.5)
    got = losses.huber_threshold(TIMES, scheduler.alphas_cumprod, opts, T)
    torch.testing.assert_close(got.double(), ref_huber_c(TIMES, schedule, 0.2, 1.5, zero_terminal_snr),
                               rtol=1e-4, atol=1e-6)
    assert losses.huber_threshold(TIMES, scheduler.alphas_cumprod, losses.LossOptions(loss_type="l1"), T) is None


def ref_elementwise(pred, target, loss_type, c):
    d = pred.double() - target.double()
    if loss_type == "l2":
        return d**2
    if loss_type == "l1":
        return d.abs()
    c = c.double().view(-1, 1, 1, 1)
    base = torch.sqrt(d**2 + c**2) - c
    return 2 * c * base if loss_type == "huber" else 2 * base


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_whole_loss_matches_sd_scripts_process_batch(loss_type):
    """conditional_loss -> mask (area) -> mean per sample -> x loss_weights -> post_process_loss -> mean."""
    gen = torch.Generator().manual_seed(0)
    b = len(TIMES)
    pred, target = torch.randn(b, 4, 8, 8, generator=gen) * 2, torch.randn(b, 4, 8, 8, generator=gen)
    mask = torch.rand(b, 1, 64, 64, generator=gen)
    sample_w = torch.tensor([1.0, 0.5, 1.0, 1.0, 0.3, 1.0, 1.0])
    scheduler = losses.make_noise_scheduler(CONFIG, v_parameterization=False, zero_terminal_snr=False)
    opts = losses.LossOptions(loss_type=loss_type, huber_schedule="snr", min_snr_gamma=5.0,
                              debiased_estimation_loss=True)
    c = losses.huber_threshold(TIMES, scheduler.alphas_cumprod, opts, T)
    got = losses.diffusion_loss(pred, target, sample_weights=sample_w, huber_c=c, mask=mask, loss_type=loss_type,
                                weights=losses.timestep_weights(TIMES, losses.snr_table(CONFIG), opts))

    c_ref = ref_huber_c(TIMES, "snr", 0.1, 1.0, False)
    elem = ref_elementwise(pred, target, loss_type, c_ref)
    mask_ref = mask.double().reshape(b, 1, 8, 8, 8, 8).mean(dim=(3, 5))  # area interpolation = 8x8 block means
    per_sample = (elem * mask_ref).mean(dim=(1, 2, 3)) * sample_w.double()
    want = (per_sample * ref_weights(TIMES, v=False, gamma=5.0, debiased=True)).mean()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=0)
    plain = losses.diffusion_loss(pred, target, sample_weights=sample_w, loss_type="l2")
    assert not torch.isclose(got, plain)  # the options change the loss


# ------------------------------------------------------------------------------------------------ noise
def test_timesteps_are_uniform_in_the_range_and_fixed_when_equal():
    torch.manual_seed(0)
    t = losses.sample_timesteps(100_000, losses.NoiseOptions(min_timestep=200, max_timestep=400), T, "cpu")
    assert t.min() == 200 and t.max() == 399
    counts = torch.bincount(t - 200, minlength=200).double()
    chi2 = ((counts - 500) ** 2 / 500).sum().item()
    assert chi2 < 200 + 5 * math.sqrt(400), chi2  # chi-square with 199 degrees of freedom
    full = losses.sample_timesteps(100_000, losses.NoiseOptions(), T, "cpu")
    assert full.min() == 0 and full.max() == 999
    fixed = losses.sample_timesteps(8, losses.NoiseOptions(min_timestep=300, max_timestep=300), T, "cpu")
    assert fixed.tolist() == [300] * 8


def test_offset_noise_with_adaptive_scale_replays_sd_scripts():
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)) + torch.tensor([0.5, -2, 0, 1])[
        None, :, None, None]
    for adaptive in (0.3, -1.0):
        opts = losses.NoiseOptions(noise_offset=0.1, adaptive_noise_scale=adaptive)
        torch.manual_seed(5)
        got = losses.sample_noise(latents, opts)
        torch.manual_seed(5)
        base = torch.randn_like(latents).double()
        z = torch.randn(3, 4, 1, 1).double()
        strength = (0.1 + adaptive * latents.double().mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
        torch.testing.assert_close(got.double(), base + strength * z, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got.double(), base)


def quantiles(x: np.ndarray) -> np.ndarray:
    return np.quantile(x, [0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98])


def test_random_strengths_draw_the_distribution_sd_scripts_draws():
    """noise_offset_random_strength: offset = U(0, a) x N(0, 1) (one strength per batch); the same for
    ip_noise_gamma_random_strength. 100k samples against a float64 sample of the formula."""
    torch.manual_seed(0)
    latents = torch.zeros(1, 5, 1, 1)  # 5 values share a strength: 20k strengths, 100k samples
    offset_opts = losses.NoiseOptions(noise_offset=0.1, noise_offset_random_strength=True)
    offsets = torch.cat([losses.offset_noise(latents, offset_opts).flatten() for _ in range(20_000)]).double().numpy()
    ip_opts = losses.NoiseOptions(ip_noise_gamma=0.2, ip_noise_gamma_random_strength=True)
    ips = torch.cat([losses.perturbed_noise(latents, ip_opts).flatten() for _ in range(20_000)]).double().numpy()
    rng = np.random.default_rng(0)
    for got, a in ((offsets, 0.1), (ips, 0.2)):
        ref = rng.uniform(0, a, 1_000_000) * rng.standard_normal(1_000_000)
        np.testing.assert_allclose(quantiles(got), quantiles(ref), atol=0.02 * a)
        assert abs(np.mean(got**2) - a**2 / 3) < 0.03 * a**2  # E[(U z)^2] = a^2 / 3
    fixed = torch.cat([losses.offset_noise(latents, losses.NoiseOptions(noise_offset=0.1)).flatten()
                       for _ in range(1000)]).double().numpy()
    assert abs(np.mean(fixed**2) - 0.01) < 0.0005  # without the random strength: 0.1 x N(0, 1)


def test_input_perturbation_noise_replays_sd_scripts_and_keeps_the_target():
    noise = torch.randn(2, 4, 8, 8)
    torch.manual_seed(3)
    got = losses.perturbed_noise(noise, losses.NoiseOptions(ip_noise_gamma=0.1))
    torch.manual_seed(3)
    torch.testing.assert_close(got.double(), noise.double() + 0.1 * torch.randn_like(noise).double())
    torch.manual_seed(3)
    got = losses.perturbed_noise(noise, losses.NoiseOptions(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True))
    torch.manual_seed(3)
    s = torch.rand(1).double() * 0.1
    torch.testing.assert_close(got.double(), noise.double() + s * torch.randn_like(noise).double())
    assert losses.perturbed_noise(noise, losses.NoiseOptions()) is noise


def test_pyramid_noise_replays_sd_scripts():
    """pyramid_noise_like: r = 2 + 2 U per level, size int(side / r^i), bilinear upsample, discount^i, stop at a
    1-pixel side, divide by the std."""
    base = torch.randn(2, 4, 24, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(9)
    got = losses.pyramid_noise(base.clone(), 6, 0.3, random.Random(4).random)
    torch.manual_seed(9)
    host = random.Random(4)
    ref = base.double().clone()
    b, c, w, h = base.shape  # (sd-scripts' names)
    up = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(6):
        r = host.random() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        ref += up(torch.randn(b, c, wn, hn).double()) * 0.3**i
        if wn == 1 or hn == 1:
            break
    ref = ref / ref.std()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ options
def test_options_parse_with_sd_scripts_defaults_and_from_config_file(tmp_path):
    args = parse_args([])
    assert (args.loss_type, args.huber_schedule, args.huber_c, args.huber_scale) == ("l2", "snr", 0.1, 1.0)
    assert args.multires_noise_discount == 0.3 and args.min_timestep is None and not args.masked_loss
    toml = tmp_path / "c.toml"
    toml.write_text('loss_type = "smooth_l1"\nhuber_schedule = "exponential"\nhuber_c = 0.2\nip_noise_gamma = 0.1\n'
                    "min_timestep = 100\nmax_timestep = 900\ndebiased_estimation_loss = true\nmasked_loss = true\n"
                    "scale_weight_norms = 1.0\nmultires_noise_iterations = 6\n", encoding="utf-8")
    args = parse_args(["--config_file", str(toml)])
    assert (args.loss_type, args.huber_schedule, args.huber_c, args.ip_noise_gamma) == ("smooth_l1", "exponential",
                                                                                        0.2, 0.1)
    assert (args.min_timestep, args.max_timestep, args.debiased_estimation_loss) == (100, 900, True)
    assert args.masked_loss and args.scale_weight_norms == 1.0 and args.multires_noise_iterations == 6


@pytest.mark.parametrize("argv, message", [
    (["--min_timestep", "500", "--max_timestep", "400"], "--min_timestep 500 is larger than --max_timestep 400"),
    (["--max_timestep", "1001"], "--max_timestep 1001: must be in [1, 1000]"),
    (["--adaptive_noise_scale", "0.1"], "--adaptive_noise_scale needs --noise_offset"),
    (["--scale_v_pred_loss_like_noise_pred"], "needs --v_parameterization"),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"], "--v_pred_like_loss cannot be used with"),
    (["--loss_type", "huber", "--huber_c", "0"], "--huber_c 0.0: must be > 0"),
    (["--cuda_graphs", "--multires_noise_iterations", "6"], "--cuda_graphs cannot record --multires_noise_iterations"),
    (["--conditioning_data_dir", "x"], "add --masked_loss"),
    (["--scale_weight_norms", "0"], "--scale_weight_norms 0.0: must be > 0"),
])
def test_bad_combinations_stop_in_one_line(argv, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        validate(parse_args(argv))
    assert "\n" not in str(info.value)


def test_option_dataclasses_read_every_field_from_the_namespace():
    args = argparse.Namespace(**vars(parse_args(["--noise_offset", "0.1", "--loss_type", "l1"])))
    assert losses.NoiseOptions.from_args(args).noise_offset == 0.1
    assert losses.LossOptions.from_args(args, v_prediction=True) == losses.LossOptions(v_prediction=True,
                                                                                     loss_type="l1")
