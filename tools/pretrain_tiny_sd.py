"""Pre-train `builtin:tiny-sd` on the synthetic shapes set, so the bundled default model draws what it is told.

Stages, all from `--seed`: (1) render the base shapes set in memory over a process pool (never the "zkw" concept:
the LoRA demo teaches that); (2) train the VAE for reconstruction (L1 + an edge term + a small KL); (3) encode the
set once, set the VAE's `scaling_factor` to 1/std of the latents (it travels in the weights' metadata), and train
UNet + CLIP text encoder jointly on the DDPM epsilon loss with caption dropout (so classifier-free guidance works),
AdamW, warmup + cosine, min-SNR weighting and an EMA; (4) save fp16 weights with `save_tiny_sd_weights`, reload
them through `build_tiny_sd_modules` and draw a sample grid with the trainer's own sampling code.

`--time_budget_s` bounds the whole run: each training stage ends at its step count or its share of the time,
whichever comes first, and its cosine schedule follows that same progress so the learning rate still anneals. For a
run that is repeatable step for step, pass the step counts the JSON reports and `--time_budget_s 0`.

    python tools/pretrain_tiny_sd.py --device cuda --out out/pretrain \\
        --weights_out library/models/weights/tiny-sd.safetensors
    python tools/pretrain_tiny_sd.py --quick --device cpu --out /tmp/pt   # smoke test, < 30 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Sample-grid prompts: (shape, texture, colour, background, size, position), redrawn as a reference row.
GRID_SPECS = [
    ("circle", "plain", "red", "blue", "large", "center"),
    ("star", "plain", "yellow", "black", "large", "center"),
    ("square", "plain", "green", "white", "medium", "top left"),
    ("triangle", "plain", "blue", "yellow", "large", "bottom"),
    ("cross", "plain", "white", "red", "medium", "right"),
    ("diamond", "striped", "purple", "gray", "large", "center"),
    ("circle", "dotted", "orange", "green", "large", "center"),
    ("square", "plain", "cyan", "brown", "small", "bottom right"),
]


@dataclass
class StageClock:
    """Progress of a training stage in [0, 1]: the larger of steps done and time used, so a time-capped stage
    still runs its whole cosine schedule."""

    steps: int
    budget_s: float  # <= 0: no time limit
    start: float = 0.0

    def begin(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        by_time = self.elapsed() / self.budget_s if self.budget_s > 0 else 0.0
        return min(1.0, max(step / self.steps, by_time))

    def done(self, step: int) -> bool:
        return step >= self.steps or self.progress(step) >= 1.0

    def set_lr(self, opt: torch.optim.Optimizer, base_lr: float, step: int, warmup: int) -> float:
        """Every group of `opt` to `lr_at` this step's progress; returns that lr."""
        lr = lr_at(base_lr, step, self.progress(step), warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr


def lr_at(base_lr: float, step: int, progress: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warmup, then cosine from `base_lr` to `floor * base_lr` over the stage's progress."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return base_lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class LossLog:
    """Mean loss since the last log point, read on the host only there (every `every` steps and at the end)."""

    def __init__(self, device: torch.device, every: int) -> None:
        self.every = every
        self.points: list[list[float]] = []  # [step, mean loss]
        self._running = torch.zeros((), device=device)
        self._count = 0

    def add(self, loss: torch.Tensor, step: int, last: bool) -> float | None:
        """Accumulate step `step`'s loss; at a log point return the mean since the previous one."""
        self._running += loss
        self._count += 1
        if step % self.every and not last:
            return None
        value = (self._running / self._count).item()
        self.points.append([step, value])
        self._running.zero_()
        self._count = 0
        return value


def _to_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _edge_l1(a, b):
    """L1 between horizontal and vertical finite differences: penalises blurred edges and stripes."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


class Ema:
    """Exponential moving average of parameters, with the usual (1 + t) / (10 + t) warmup of the decay."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    def copy_to_params(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)


def train_vae(vae, images, args, device, clock: StageClock, log) -> tuple[list[list[float]], int]:
    """Reconstruction training on uint8 images held on the device; returns (losses, steps)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    losses = LossLog(device, args.log_every)
    vae.train()
    clock.begin()
    step = 0
    while not clock.done(step):
        lr = clock.set_lr(opt, args.vae_lr, step, args.warmup)
        idx = torch.randint(0, images.shape[0], (args.vae_batch,), device=device, generator=gen)
        x = _to_pixels(images[idx])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, device=device, generator=gen)
            recon = vae.decode(z).sample
        recon = recon.float()
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        loss = (recon - x).abs().mean() + args.edge_weight * _edge_l1(recon, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        value = losses.add(loss.detach(), step, clock.done(step))
        if value is not None:
            log(f"vae  step {step:6d}  loss {value:.4f}  kl {kl.item():.2f}  lr {lr:.2e}  "
                f"{clock.elapsed():.0f}s  {step / max(clock.elapsed(), 1e-9):.1f} it/s")
    vae.eval()
    return losses.points, step


def encode_dataset(vae, images, batch: int, device, seed: int, bf16: bool):
    """Latents (unscaled, sampled from the posterior as the LoRA trainer does) for every image."""
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    out = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, images.shape[0], batch):
            posterior = vae.encode(_to_pixels(images[start : start + batch])).latent_dist
            mean, std = posterior.mean.float(), posterior.std.float()
            out.append(mean + std * torch.randn(mean.shape, device=device, generator=gen))
    return torch.cat(out)


def train_unet(unet, text_encoder, latents, token_ids, empty_ids, scheduler_config, args, device,
               clock: StageClock, log) -> tuple[list[list[float]], int]:
    """Joint UNet + text encoder DDPM epsilon training on cached latents; returns (losses, steps)."""
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double().to(device)
    snr = (alphas_cumprod / (1 - alphas_cumprod)).float()
    sqrt_ac, sqrt_1m_ac = alphas_cumprod.sqrt().float(), (1 - alphas_cumprod).sqrt().float()

    embeddings = text_encoder.get_input_embeddings().weight
    decayed = [p for p in (*unet.parameters(), *text_encoder.parameters()) if p.ndim >= 2 and p is not embeddings]
    plain = [p for p in (*unet.parameters(), *text_encoder.parameters()) if p.ndim < 2 or p is embeddings]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}],
                            lr=args.unet_lr, betas=(0.9, 0.99))
    ema = Ema([*unet.parameters(), *text_encoder.parameters()], args.ema_decay) if args.ema_decay > 0 else None
    gen = torch.Generator(device=device).manual_seed(args.seed + 3)
    n, timesteps_n = latents.shape[0], scheduler_config["num_train_timesteps"]
    losses = LossLog(device, args.log_every)
    unet.train()
    text_encoder.train()
    clock.begin()
    step = 0
    while not clock.done(step):
        lr = clock.set_lr(opt, args.unet_lr, step, args.warmup)
        idx = torch.randint(0, n, (args.unet_batch,), device=device, generator=gen)
        x0 = latents[idx]
        drop = torch.rand(args.unet_batch, device=device, generator=gen) < args.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None, :], token_ids[idx])
        t = torch.randint(0, timesteps_n, (args.unet_batch,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        noisy = sqrt_ac[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            hidden = text_encoder(ids).last_hidden_state
            pred = unet(noisy, t, hidden).sample
        per_sample = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
        weight = snr[t].clamp(max=args.min_snr_gamma) / snr[t] if args.min_snr_gamma > 0 else 1.0
        loss = (per_sample * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        opt.step()
        if ema is not None:
            ema.update(step)
        step += 1
        # the unweighted epsilon MSE: comparable across settings
        value = losses.add(per_sample.detach().mean(), step, clock.done(step))
        if value is not None:
            log(f"unet step {step:6d}  eps mse {value:.4f}  lr {lr:.2e}  {clock.elapsed():.0f}s  "
                f"{step / max(clock.elapsed(), 1e-9):.1f} it/s")
    if ema is not None:
        ema.copy_to_params()
    unet.eval()
    text_encoder.eval()
    return losses.points, step


def sample_grid(weights: Path, config_dir: Path, device, seeds: list[int], steps: int, cfg: float, size: int,
                specs=GRID_SPECS):
    """Reload the saved weights through the loader and draw every grid prompt with the trainer's sampler."""
    from library.data.synthetic import base_caption, render_shape
    from library.models.builtin import build_tiny_sd_modules
    from library.models.common import assemble, ddpm_scheduler_config, sd_tokenizers
    from library.training.sample_prompts import SamplePrompt
    from library.training.sampling import generate
    from tools.demo import labelled_grid

    text_encoder, vae, unet, raw = build_tiny_sd_modules(config_dir, weights=weights)
    model = assemble("sd1", sd_tokenizers("sd1"), [text_encoder.to(device)], vae.to(device), unet.to(device),
                     ddpm_scheduler_config(raw, v_parameterization=False), str(weights), torch.float32)
    prompts = [base_caption(*spec) for spec in specs]
    rows = [[render_shape(size, *spec) for spec in specs]]
    for seed in seeds:
        batch = [SamplePrompt(p, width=size, height=size, steps=steps, scale=cfg, seed=seed) for p in prompts]
        rows.append(generate(model, batch, "ddim", device, seed))
    return labelled_grid(rows, ["target", *[f"seed {s}" for s in seeds]], prompts), prompts


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python tools/pretrain_tiny_sd.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "out" / "pretrain", help="folder for the grid, JSON and log")
    p.add_argument("--weights_out", type=Path, default=None,
                   help="where the fp16 safetensors goes (default: <out>/tiny-sd.safetensors)")
    p.add_argument("--config_dir", type=Path, default=None,
                   help="model configs (default: the bundled tiny-sd); to try a larger architecture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true",
                   help="32 images at 32 px, a few steps, no time limit: a CPU smoke test")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast dtype of the forward passes (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--time_budget_s", type=float, default=480.0,
                   help="wall time for the whole run after start-up; 0 = no limit (default 480)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="render processes")
    p.add_argument("--n_images", type=int, default=40000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--vae_steps", type=int, default=6000)
    p.add_argument("--vae_batch", type=int, default=128)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--vae_share", type=float, default=0.2, help="fraction of the training time for the VAE")
    p.add_argument("--kl_weight", type=float, default=1e-5, help="weight of the per-element KL")
    p.add_argument("--edge_weight", type=float, default=0.5, help="weight of the finite-difference L1 term")
    p.add_argument("--unet_steps", type=int, default=30000)
    p.add_argument("--unet_batch", type=int, default=256)
    p.add_argument("--unet_lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300, help="warmup steps of each stage")
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--min_snr_gamma", type=float, default=5.0, help="min-SNR loss weighting; 0 = off")
    p.add_argument("--ema_decay", type=float, default=0.999, help="EMA of UNet + text encoder; 0 = off")
    p.add_argument("--sample_steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--sample_seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--grid_prompts", type=int, default=len(GRID_SPECS), help="how many of the grid prompts to draw")
    p.add_argument("--log_every", type=int, default=200)
    p.add_argument("--save_reserve_s", type=float, default=30.0, help="time kept back for saving and sampling")
    args = p.parse_args(argv)
    if args.quick:  # 32 px keeps the UNet's full-resolution attention cheap on a CPU
        args.n_images, args.size, args.vae_steps, args.unet_steps = 32, 32, 6, 30
        args.vae_batch, args.unet_batch, args.warmup, args.log_every = 4, 4, 5, 5
        args.sample_steps, args.sample_seeds, args.grid_prompts = 3, [0], 2
        args.workers, args.time_budget_s = 1, 0.0
    for name in ("n_images", "vae_steps", "unet_steps", "vae_batch", "unet_batch", "log_every", "sample_steps",
                 "grid_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if not 0 < args.vae_share < 1:
        p.error(f"--vae_share {args.vae_share}: must be in (0, 1)")
    if not 0 <= args.caption_dropout < 1:
        p.error(f"--caption_dropout {args.caption_dropout}: must be in [0, 1)")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema_decay {args.ema_decay}: must be in [0, 1)")
    if args.time_budget_s < 0:
        p.error(f"--time_budget_s {args.time_budget_s}: must be >= 0 (0 = no limit)")
    return args


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)

    from library.data.synthetic import render_arrays
    from library.models.builtin import TINY_SD_CONFIG_DIR, build_tiny_sd_modules, save_tiny_sd_weights
    from library.models.common import sd_tokenizers

    args.out.mkdir(parents=True, exist_ok=True)
    weights_out = args.weights_out or args.out / "tiny-sd.safetensors"
    config_dir = args.config_dir or TINY_SD_CONFIG_DIR
    log_file = (args.out / "pretrain.log").open("w", encoding="utf-8")

    def log(message: str) -> None:
        line = f"[{time.perf_counter() - t_start:6.1f}s] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")

    def remaining() -> float:
        return args.time_budget_s - (time.perf_counter() - t_start) - args.save_reserve_s

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    timings: dict[str, float] = {}
    log(f"pretrain tiny-sd: seed {args.seed}, device {device}, {'bf16' if args.bf16 else 'fp32'}, "
        f"{args.n_images} images, budget {args.time_budget_s:.0f}s")

    t = time.perf_counter()
    images_np, captions = render_arrays(args.seed, 0, args.n_images, args.size, args.workers)
    timings["render_s"] = time.perf_counter() - t
    log(f"rendered {len(captions)} images in {timings['render_s']:.1f}s, e.g. '{captions[0]}'")

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    text_encoder, vae, unet, scheduler_config = build_tiny_sd_modules(config_dir, weights=None)
    text_encoder.to(device)
    vae.to(device)
    unet.to(device)
    images = torch.from_numpy(images_np).to(device)

    if args.time_budget_s > 0:
        train_time = remaining()
        if train_time <= 0:
            raise SystemExit(f"--time_budget_s {args.time_budget_s}: nothing left for training after rendering")
        vae_budget = args.vae_share * train_time
    else:
        vae_budget = 0.0
    vae_clock = StageClock(args.vae_steps, vae_budget)
    vae_losses, vae_steps = train_vae(vae, images, args, device, vae_clock, log)
    timings["vae_s"] = vae_clock.elapsed()

    t = time.perf_counter()
    raw_latents = encode_dataset(vae, images, 512, device, args.seed, args.bf16)
    latent_std, latent_mean = raw_latents.std().item(), raw_latents.mean().item()
    scaling_factor = 1.0 / latent_std
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = raw_latents * scaling_factor
    del raw_latents
    tokenizer = sd_tokenizers("sd1")[0]
    unique = sorted(set(captions))
    table = tokenizer(unique + [""], padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
    where = {c: i for i, c in enumerate(unique)}
    token_ids = table[torch.tensor([where[c] for c in captions], device=device)]
    empty_ids = table[-1]
    timings["encode_s"] = time.perf_counter() - t
    log(f"latents {tuple(latents.shape)}: raw mean {latent_mean:.3f} std {latent_std:.3f} -> scaling_factor "
        f"{scaling_factor:.5f}; {len(unique)} distinct captions")

    unet_budget = remaining() if args.time_budget_s > 0 else 0.0
    if args.time_budget_s > 0 and unet_budget <= 0:
        raise SystemExit(f"--time_budget_s {args.time_budget_s}: no time left for the UNet stage")
    unet_clock = StageClock(args.unet_steps, unet_budget)
    unet_losses, unet_steps = train_unet(unet, text_encoder, latents, token_ids, empty_ids, scheduler_config, args,
                                         device, unet_clock, log)
    timings["unet_s"] = unet_clock.elapsed()

    t = time.perf_counter()
    save_tiny_sd_weights(weights_out, text_encoder, vae, unet, dtype=torch.float16)
    timings["save_s"] = time.perf_counter() - t
    size_mb = weights_out.stat().st_size / 2**20
    log(f"saved {weights_out} ({size_mb:.2f} MiB, fp16)")

    t = time.perf_counter()
    grid, prompts = sample_grid(weights_out, config_dir, device, args.sample_seeds, args.sample_steps, args.cfg,
                                args.size, GRID_SPECS[: args.grid_prompts])
    grid_path = args.out / "pretrain_samples.png"
    grid.save(grid_path)
    timings["samples_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    log(f"sample grid {grid_path} (rows: target, then seeds {args.sample_seeds}; DDIM {args.sample_steps} steps, "
        f"cfg {args.cfg})")

    report = {
        "seed": args.seed, "device": str(device), "n_images": args.n_images, "size": args.size,
        "config_dir": str(config_dir), "weights": str(weights_out), "weights_mib": size_mb,
        "vae": {"steps": vae_steps, "batch": args.vae_batch, "losses": vae_losses},
        "latent_raw_mean": latent_mean, "latent_raw_std": latent_std, "scaling_factor": scaling_factor,
        "unet": {"steps": unet_steps, "batch": args.unet_batch, "losses": unet_losses},
        "reproduce": f"--seed {args.seed} --n_images {args.n_images} --vae_steps {vae_steps}"
                     f" --unet_steps {unet_steps} --time_budget_s 0",
        "grid": str(grid_path), "grid_prompts": prompts, "sample_seeds": args.sample_seeds, "timings_s": timings,
    }
    (args.out / "pretrain.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    log(f"done in {timings['total_s']:.0f}s: {json.dumps(timings)}")
    log_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
