"""Training-step benchmark: a plain diffusers + peft LoRA step against loraforge's step.

SD1.5-architecture U-Net with random weights (no downloads), bf16, cached latents and text-encoder outputs
(batch 4 at 512x512 by default), DDPMScheduler with SD's settings. Rows:

  (a)  baseline           diffusers U-Net + peft LoRA (r=16 on the kohya targets), torch AdamW(fused=True), eager
  (a') baseline_compile   the same with torch.compile(unet)
  (b)  ours_*             networks.lora + library.training.losses + the optimizer registry's AdamW, in the
                          variants of VARIANTS (LoRA dtype, torch.compile mode, channels_last)
  (c)  opt:<name>         one (b) variant (--optimizer-base) with each optimizer of --optimizers

Every row is timed the same way: warm-up steps (compile and CUDA-graph capture happen there and are reported
as first_step_s / warmup_s), then --windows windows of --steps steps between CUDA events, no host sync inside
a window; ms_step is the median window. A row must also show real training: every lora_up tensor has a non-zero
gradient on the last warm-up step and the LoRA weights change during the timed steps. A failing row is
recorded with its error and the others still run; --json is rewritten after every row.

    python bench/train_step.py --json bench_train_step.json            # full run, CUDA
    python bench/train_step.py --device cpu --quick                    # smoke test, tiny U-Net
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Stable Diffusion 1.5's U-Net (runwayml/stable-diffusion-v1-5, unet/config.json), 860M parameters.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
# --quick: the same block types at toy width, runs in milliseconds on one CPU thread.
QUICK_UNET: dict[str, Any] = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32,
    "cross_attention_dim": 32, "attention_head_dim": 8,
}
# SD1.x scheduler settings (scheduler/scheduler_config.json), DDPM for training.
SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1, "timestep_spacing": "leading",
}
# kohya's U-Net LoRA targets (every Linear / 1x1 Conv2d inside Transformer2DModel) spelled for peft.
PEFT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
DEFAULT_OPTIMIZERS = "CustomAdamW,Automagic_Sinkgd,AdamWSGG"
ESTIMATED_TFLOP_PER_STEP = 7.2  # hand estimate for SD1.5, batch 4, 512x512, used when counting fails


@dataclass(frozen=True)
class Variant:
    """One configuration of loraforge's step."""

    lora_dtype: str  # "fp32": fp32 master LoRA weights under bf16 autocast; "bf16": everything bf16, no autocast
    compile_mode: str | None = None  # torch.compile mode; None = eager
    channels_last: bool = False
    description: str = ""
    host_inputs: bool = False  # feed each step the way trainer.compute_loss does (blocking host->device copies)
    cuda_graphs: bool = False  # the trainer's --cuda_graphs: forward + loss + backward replayed as one CUDA graph


VARIANTS: dict[str, Variant] = {
    "ours_fp32": Variant("fp32", description="fp32 LoRA + bf16 autocast, eager (the trainer's --mixed_precision bf16)"),
    "ours_bf16": Variant("bf16", description="bf16 LoRA, no autocast, eager (--full_bf16)"),
    "ours_fp32_compile": Variant("fp32", "default", description="fp32 LoRA + autocast, torch.compile"),
    "ours_bf16_compile": Variant("bf16", "default", description="bf16 LoRA, torch.compile"),
    "ours_bf16_compile_cl": Variant("bf16", "default", True, description="bf16 LoRA, torch.compile, channels_last"),
    "ours_bf16_cudagraphs": Variant("bf16", "reduce-overhead",
                                    description="bf16 LoRA, torch.compile mode=reduce-overhead (CUDA graphs)"),
    "ours_fp32_cudagraphs": Variant("fp32", "reduce-overhead",
                                    description="fp32 LoRA + autocast, torch.compile mode=reduce-overhead"),
    "ours_fp32_cudagraphs_cl": Variant("fp32", "reduce-overhead", True,
                                       description="fp32 LoRA + autocast, reduce-overhead, channels_last"),
    "ours_bf16_cudagraphs_cl": Variant("bf16", "reduce-overhead", True,
                                       description="bf16 LoRA, reduce-overhead (CUDA graphs), channels_last"),
    "ours_bf16_graphs": Variant("bf16", cuda_graphs=True,
                                description="bf16 LoRA, eager kernels replayed as one CUDA graph (--cuda_graphs)"),
    "ours_fp32_graphs": Variant("fp32", cuda_graphs=True,
                                description="fp32 LoRA + autocast, replayed as one CUDA graph (--cuda_graphs)"),
    "ours_bf16_autotune": Variant("bf16", "max-autotune-no-cudagraphs",
                                  description="bf16 LoRA, torch.compile mode=max-autotune-no-cudagraphs (slow compile)"),
    "ours_bf16_compile_hostinputs": Variant(
        "bf16", "default", host_inputs=True,
        description="ours_bf16_compile fed as trainer.compute_loss feeds it: pinned fp32 latents .to(device) and "
                    "is_reg via torch.as_tensor(..., device) every step (each a blocking copy + stream sync)"),
}
BASELINES = {
    "baseline": "diffusers U-Net + peft LoRA (fp32) + bf16 autocast + AdamW(fused), eager",
    "baseline_compile": "the baseline with torch.compile(unet)",
}
DEFAULT_CONFIGS = ("baseline", "baseline_compile", "ours_fp32", "ours_bf16", "ours_fp32_compile", "ours_bf16_compile",
                   "ours_bf16_compile_cl", "ours_bf16_cudagraphs", "ours_fp32_cudagraphs")


@dataclass
class Bench:
    """The workload and the timing plan, shared by every row."""

    device: torch.device
    unet_config: dict[str, Any]
    batch: int
    latent_hw: int
    text_len: int
    rank: int
    alpha: float
    lr: float
    warmup: int
    steps: int
    windows: int
    seed: int
    compile_backend: str
    latents: torch.Tensor = field(init=False)
    text: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.batch, self.unet_config["in_channels"], self.latent_hw, self.latent_hw)
        # cached VAE latents (already scaled by 0.18215) and cached CLIP last hidden states
        self.latents = torch.randn(shape, generator=g).to(self.device, torch.bfloat16)
        text_shape = (self.batch, self.text_len, self.unet_config["cross_attention_dim"])
        self.text = torch.randn(text_shape, generator=g).to(self.device, torch.bfloat16)


@dataclass
class Setup:
    """What a row trains: `forward_backward()` leaves gradients on `params`; the optimizer is swappable."""

    forward_backward: Callable[[], torch.Tensor]
    optimizer: torch.optim.Optimizer | None
    params: list[torch.Tensor]
    names: list[str]
    up_marker: str  # substring naming the zero-initialised LoRA factor ("lora_up" / "lora_B")
    info: dict[str, Any]
    before_step: Callable[[], None] = lambda: None
    network: Any = None  # networks.lora.LoRANetwork for our rows (the (c) rows rebuild optimizers from it)
    keep: tuple = ()  # modules the closures use, kept alive for the row's lifetime


# ---------------------------------------------------------------------------------------------- building
def build_unet(bench: Bench, channels_last: bool = False, device: torch.device | None = None):
    """Seeded random SD U-Net, frozen, bf16; the same weights for every row."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(bench.seed)
    with torch.device(device or bench.device):
        unet = UNet2DConditionModel(**bench.unet_config)
    unet.to(dtype=torch.bfloat16)
    unet.requires_grad_(False)
    unet.train()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def maybe_compile(module: torch.nn.Module, mode: str | None, bench: Bench) -> torch.nn.Module:
    if mode is None:
        return module
    return torch.compile(module, mode=None if mode == "default" else mode, backend=bench.compile_backend)


def cudagraph_step_marker(mode: str | None) -> Callable[[], None]:
    """CUDA-graph trees must know where an iteration starts (outputs of the last replay may be overwritten)."""
    if mode == "reduce-overhead":
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def autocast_context(enabled: bool, device: torch.device, cuda_graphs: bool) -> Callable[[], Any]:
    """bf16 autocast for fp32-LoRA rows; without its weight-cast cache under --cuda_graphs, as the trainer does."""
    if not enabled:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not cuda_graphs)


def graphed_or_eager(body: Callable[..., tuple[torch.Tensor, ...]], inputs: Callable[[], tuple[torch.Tensor, ...]],
                     params: list[torch.Tensor], device: torch.device, cuda_graphs: bool) -> Callable[[], torch.Tensor]:
    """The row's forward_backward: ``body`` on this step's inputs, eagerly or through the trainer's GraphedStep."""
    if not cuda_graphs:
        return lambda: body(*inputs())[0]
    from library.training.graphed_step import GraphedStep

    graphed = GraphedStep(body, params, device)
    return lambda: graphed(*inputs())[0]


def lora_counts(params: list[torch.Tensor]) -> dict[str, int]:
    return {"lora_tensors": len(params), "lora_params": sum(p.numel() for p in params)}


def setup_baseline(bench: Bench, compile_mode: str | None) -> Setup:
    """The plain loop of diffusers' train_text_to_image_lora.py: peft adapter, fp32 LoRA, autocast, fused AdamW."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    unet = build_unet(bench)
    unet.add_adapter(LoraConfig(r=bench.rank, lora_alpha=bench.alpha, init_lora_weights=True,
                                target_modules=list(PEFT_TARGETS)))
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    for _, p in named:
        p.data = p.data.float()  # diffusers' cast_training_params: fp32 trainable weights
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=bench.lr, fused=bench.device.type == "cuda")
    scheduler = DDPMScheduler(**SD_SCHEDULER)
    model = maybe_compile(unet, compile_mode, bench)
    latents, text, device = bench.latents, bench.text, bench.device

    def forward_backward() -> torch.Tensor:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(noisy, timesteps, text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        return loss.detach()

    info = {"lora": "peft", "lora_dtype": "fp32", "autocast": True, "compile": compile_mode, "channels_last": False,
            "optimizer": "torch.optim.AdamW(fused=True)" if device.type == "cuda" else "torch.optim.AdamW",
            **lora_counts(params)}
    return Setup(forward_backward, optimizer, params, names, "lora_B", info, keep=(unet, model))


def create_our_network(unet, bench: Bench):
    from networks import lora

    network = lora.create_network(1.0, bench.rank, bench.alpha, None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return network


def build_registry_optimizer(name: str, network, bench: Bench) -> torch.optim.Optimizer:
    """As the trainer does: network param groups (with names) into the registry; SGG_*/SAC_* env vars apply."""
    from library.optimizers.registry import build_optimizer, resolve

    groups = network.prepare_optimizer_params(None, bench.lr, bench.lr)
    spec = resolve(name)
    fused = spec.name == "AdamW" and bench.device.type == "cuda"
    optimizer, _ = build_optimizer(name, groups, lr=bench.lr, cli_kwargs={},
                                   optimizer_args={"fused": True} if fused else None, toml_table=None,
                                   environ=dict(os.environ))
    return optimizer


def cached_inputs(bench: Bench, variant: Variant) -> Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(latents, text, per-sample loss weights) of a step: resident on the device, or fed like the trainer."""
    device, batch = bench.device, bench.batch
    if variant.host_inputs:
        host_latents = bench.latents.float().cpu()
        if device.type == "cuda":
            host_latents = host_latents.pin_memory()  # the trainer's DataLoader pins its batches
        is_reg = [False] * batch

        def from_host():
            latents = host_latents.to(device, torch.bfloat16)
            reg = torch.as_tensor(is_reg, device=device)
            weights = torch.where(reg, torch.full_like(reg, 1.0, dtype=torch.float32), 1.0)
            return latents, bench.text, weights

        return from_host
    latents = bench.latents.contiguous(memory_format=torch.channels_last) if variant.channels_last else bench.latents
    weights = torch.ones(batch, device=device)  # no regularisation images in the batch
    return lambda: (latents, bench.text, weights)


def setup_ours(bench: Bench, variant: Variant, optimizer_name: str = "AdamW") -> Setup:
    """loraforge's step: the trainer's compute_loss + backward; no host sync unless `host_inputs`."""
    from library.training import losses

    lora_dtype = torch.float32 if variant.lora_dtype == "fp32" else torch.bfloat16
    autocast = variant.lora_dtype == "fp32"
    unet = build_unet(bench, variant.channels_last)
    network = create_our_network(unet, bench)
    network.to(bench.device, dtype=lora_dtype)
    if variant.channels_last:
        network.to(memory_format=torch.channels_last)
    network.train()
    optimizer = build_registry_optimizer(optimizer_name, network, bench)
    scheduler = losses.make_noise_scheduler(SD_SCHEDULER, v_parameterization=False, zero_terminal_snr=False)
    model = maybe_compile(unet, variant.compile_mode, bench)
    device = bench.device
    amp = autocast_context(autocast, device, variant.cuda_graphs)
    inputs = cached_inputs(bench, variant)

    def body(latents: torch.Tensor, text: torch.Tensor, loss_weights: torch.Tensor) -> tuple[torch.Tensor]:
        noise = losses.sample_noise(latents, losses.NoiseOptions())
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with amp():
            pred = model(noisy, timesteps, text).sample
        target = losses.training_target(scheduler, latents, noise, timesteps)
        loss = losses.diffusion_loss(pred, target, sample_weights=loss_weights)
        loss.backward()
        return (loss.detach(),)

    named = list(network.named_parameters())
    forward_backward = graphed_or_eager(body, inputs, [p for _, p in named], device, variant.cuda_graphs)
    info = {"lora": "networks.lora", "lora_dtype": variant.lora_dtype, "autocast": autocast,
            "compile": variant.compile_mode, "channels_last": variant.channels_last,
            "cuda_graphs": variant.cuda_graphs,
            "optimizer": f"{optimizer_name} -> {type(optimizer).__module__}.{type(optimizer).__name__}",
            **lora_counts([p for _, p in named])}
    return Setup(forward_backward, optimizer, [p for _, p in named], [n for n, _ in named], "lora_up", info,
                 before_step=cudagraph_step_marker(variant.compile_mode), network=network, keep=(unet, model))


# ---------------------------------------------------------------------------------------------- measuring
class Clock:
    """CUDA events on a GPU (read once, after the last window), the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def release_memory(device: torch.device, reset_compiled: bool = True) -> None:
    """Between rows: drop compiled graphs (and their CUDA-graph pools) and cached blocks."""
    if reset_compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def gradient_check(setup: Setup) -> dict[str, Any]:
    """Host reads, once, outside the timed windows: every zero-initialised factor must get a gradient."""
    nonzero = [p.grad is not None and bool(p.grad.count_nonzero()) for p in setup.params]
    ups = [nz for nz, n in zip(nonzero, setup.names, strict=True) if setup.up_marker in n]
    out: dict[str, Any] = {"grad_nonzero_frac": sum(nonzero) / len(nonzero)}
    if not ups or not all(ups):
        out["error"] = f"{sum(not u for u in ups)} of {len(ups)} {setup.up_marker} tensors got no gradient"
    return out


def train_step(setup: Setup, after_backward: Callable[[], Any] | None = None) -> torch.Tensor:
    setup.before_step()
    loss = setup.forward_backward()
    if after_backward is not None:
        after_backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return loss


def measure(setup: Setup, bench: Bench) -> dict[str, Any]:
    """Warm-up (compile, capture, gradient check), then timed windows; one host sync at the end.

    A failed validity check is returned as `error` next to the figures (which are then not compared).
    """
    from torch._dynamo.utils import counters

    clock = Clock(bench.device)
    result: dict[str, Any] = {}
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)  # after building: the peak of training, not of init
    graph_breaks_before = sum(counters["graph_break"].values())
    cudagraph_skips_before = counters["inductor"]["cudagraph_skips"]
    start = time.perf_counter()
    for i in range(bench.warmup):
        last = i == bench.warmup - 1
        train_step(setup, (lambda: result.update(gradient_check(setup))) if last else None)
        if i == 0:
            clock.sync()
            result["first_step_s"] = time.perf_counter() - start
    clock.sync()
    result["warmup_s"] = time.perf_counter() - start
    result["graph_breaks"] = sum(counters["graph_break"].values()) - graph_breaks_before
    # > 0 on a reduce-overhead row means inductor fell back to running without CUDA graphs
    result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - cudagraph_skips_before

    before = [p.detach().clone() for p in setup.params]
    windows = []
    host_start = time.perf_counter()
    loss = None
    for _ in range(bench.windows):
        step_marks = [clock.mark()]
        mid_marks: list = []  # end of forward+backward: the rest of a step is the optimizer
        for _ in range(bench.steps):
            loss = train_step(setup, lambda marks=mid_marks: marks.append(clock.mark()))
            step_marks.append(clock.mark())
        windows.append((step_marks, mid_marks))
    clock.sync()
    host_s = time.perf_counter() - host_start

    window_ms = [clock.ms(s[0], s[-1]) / bench.steps for s, _ in windows]
    fwd_bwd_ms = [clock.ms(s[i], m[i]) for s, m in windows for i in range(bench.steps)]
    opt_ms = [clock.ms(m[i], s[i + 1]) for s, m in windows for i in range(bench.steps)]
    ms_step = statistics.median(window_ms)
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, setup.params, strict=True)]
    final_loss = float(loss)
    result.update({
        "ms_step": ms_step,
        "ms_step_windows": window_ms,
        "ms_step_min": min(window_ms),
        "wall_ms_step": host_s * 1e3 / (bench.windows * bench.steps),
        "fwd_bwd_ms": statistics.median(fwd_bwd_ms),
        "opt_ms": statistics.median(opt_ms),
        "images_per_s": bench.batch * 1e3 / ms_step,
        # warm-up time beyond that of steady steps: compilation, autotuning, CUDA-graph capture
        "compile_s": result["warmup_s"] - bench.warmup * ms_step / 1e3 if setup.info.get("compile") else None,
        "params_changed_frac": sum(changed) / len(changed),
        "final_loss": final_loss,
    })
    if bench.device.type == "cuda":
        result["peak_vram_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
    if not any(changed):
        result.setdefault("error", "no LoRA weight changed during the timed steps")
    if not math.isfinite(final_loss):
        result.setdefault("error", f"the loss is {final_loss}")
    return result


def count_step_flops(bench: Bench) -> tuple[float, str]:
    """FLOPs of one forward+backward, counted with FlopCounterMode on a meta-device copy (no GPU time spent).

    The base weights are frozen, so backward computes input gradients only (about one more forward) plus the
    small LoRA weight gradients. On meta, attention runs SDPA's math path; flash attention does the same matmuls.
    Also returns the U-Net's attention processor class (diffusers' default, SDPA: AttnProcessor2_0).
    """
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    unet = build_unet(bench, device=meta)
    network = create_our_network(unet, bench)
    network.to(meta, dtype=torch.bfloat16)
    latents = torch.empty_like(bench.latents, device=meta)
    text = torch.empty_like(bench.text, device=meta)
    timesteps = torch.zeros(bench.batch, dtype=torch.long, device=meta)
    with FlopCounterMode(display=False) as counter:
        pred = unet(latents, timesteps, text).sample
        F.mse_loss(pred.float(), latents.float()).backward()
    processor = type(next(iter(unet.attn_processors.values()))).__name__
    return float(counter.get_total_flops()), processor


# ---------------------------------------------------------------------------------------------- rows
def run_row(row: dict[str, Any], bench: Bench, make_setup: Callable[[], Setup],
            reset_compiled: bool = True) -> dict[str, Any]:
    """Build and measure one row; any failure becomes the row's `error` instead of ending the run."""
    release_memory(bench.device, reset_compiled)
    setup = None
    try:
        setup = make_setup()
        row.update(setup.info)
        row.update(measure(setup, bench))
    except Exception as exc:  # a failing configuration must not lose the others
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        row["traceback"] = traceback.format_exc().splitlines()[-8:]
    finally:
        del setup
        release_memory(bench.device, reset_compiled)
    if "error" in row:
        print(f"  {row['name']}: ERROR {row['error']}", flush=True)
    else:
        print(f"  {row['name']}: {row['ms_step']:.2f} ms/step, {row['images_per_s']:.2f} img/s", flush=True)
    return row


def skipped(name: str, group: str, reason: str) -> dict[str, Any]:
    print(f"  {name}: skipped ({reason})", flush=True)
    return {"name": name, "group": group, "skipped": reason}


def graphs_skip_reason(cuda_graphs: bool, bench: Bench) -> str | None:
    if cuda_graphs and bench.device.type != "cuda":
        return "--cuda_graphs records CUDA graphs: needs a CUDA device"
    return None


def compile_skip_reason(mode: str | None, bench: Bench) -> str | None:
    if mode is None:
        return None
    if bench.device.type == "cpu" and bench.compile_backend == "inductor":
        return "torch.compile is not measured on CPU (pass --compile-backend aot_eager to trace it anyway)"
    if mode == "reduce-overhead" and bench.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


def config_row(name: str, bench: Bench) -> dict[str, Any]:
    if name in BASELINES:
        mode = "default" if name == "baseline_compile" else None
        group = "a'" if mode else "a"
        reason = compile_skip_reason(mode, bench)
        try:
            import peft  # noqa: F401
        except ImportError:
            reason = "peft is not installed"
        if reason:
            return skipped(name, group, reason)
        print(f"  {name} ...", flush=True)
        return run_row({"name": name, "group": group, "description": BASELINES[name]}, bench,
                       lambda: setup_baseline(bench, mode))
    variant = VARIANTS[name]
    reason = compile_skip_reason(variant.compile_mode, bench) or graphs_skip_reason(variant.cuda_graphs, bench)
    if reason:
        return skipped(name, "b", reason)
    print(f"  {name} ...", flush=True)
    return run_row({"name": name, "group": "b", "description": variant.description}, bench,
                   lambda: setup_ours(bench, variant))


def optimizer_rows(names: list[str], base: str, bench: Bench) -> list[dict[str, Any]]:
    """(c): one U-Net + network (compiled once) shared by every optimizer; LoRA weights reset between them.

    AdamW runs first as the reference of the same setup. Compile time lands in the first row only.
    """
    variant = VARIANTS[base]
    reason = compile_skip_reason(variant.compile_mode, bench)
    if reason:
        return [skipped(f"opt:{n}", "c", reason) for n in ["AdamW", *names]]
    release_memory(bench.device)
    try:
        shared = setup_ours(bench, variant, "AdamW")
    except Exception as exc:
        error = f"building {base}: {type(exc).__name__}: {exc}".splitlines()[0][:500]
        return [{"name": f"opt:{n}", "group": "c", "error": error} for n in ["AdamW", *names]]
    shared.optimizer = None
    initial = [p.detach().clone() for p in shared.params]
    rows = [optimizer_row(name, shared, initial, base, bench) for name in ["AdamW", *names]]
    shared.keep = ()
    release_memory(bench.device)
    return rows


def optimizer_row(name: str, shared: Setup, initial: list[torch.Tensor], base: str, bench: Bench) -> dict[str, Any]:
    """One (c) row: the shared setup, its LoRA weights back at `initial`, a fresh registry optimizer."""
    print(f"  opt:{name} (on {base}) ...", flush=True)

    def make() -> Setup:
        with torch.no_grad():
            for p, w in zip(shared.params, initial, strict=True):
                p.copy_(w)
                p.grad = None
        shared.optimizer = build_registry_optimizer(name, shared.network, bench)
        cls = type(shared.optimizer)
        shared.info["optimizer"] = f"{name} -> {cls.__module__}.{cls.__name__}"
        return shared

    row = {"name": f"opt:{name}", "group": "c", "base": base, "description": f"{name} from the registry on {base}"}
    row = run_row(row, bench, make, reset_compiled=False)
    shared.optimizer = None  # free its state before the next row's peak is measured
    return row


# ---------------------------------------------------------------------------------------------- report
def add_ratios(rows: list[dict[str, Any]], flops: float | None) -> None:
    """images/s relative to (a) and (a'), to AdamW of the same setup for (c); achieved TFLOP/s."""
    speed = {r["name"]: r["images_per_s"] for r in rows if "images_per_s" in r and "error" not in r}
    for row in rows:
        ips = row.get("images_per_s") if "error" not in row else None
        if ips is None:
            continue
        for key, ref in (("vs_baseline", "baseline"), ("vs_baseline_compile", "baseline_compile")):
            row[key] = ips / speed[ref] if ref in speed else None
        if row["group"] == "c":
            row["vs_adamw_same_setup"] = ips / speed["opt:AdamW"] if "opt:AdamW" in speed else None
        row["tflops"] = flops / (row["ms_step"] / 1e3) / 1e12 if flops else None


def best_row(rows: list[dict[str, Any]], lora_dtype: str | None = None) -> dict[str, Any] | None:
    """The fastest valid (b) row, optionally of one LoRA dtype (bf16 weights make small AdamW updates round away)."""
    ours = [r for r in rows if r["group"] == "b" and "images_per_s" in r and "error" not in r
            and lora_dtype in (None, r.get("lora_dtype"))]
    if not ours:
        return None
    best = max(ours, key=lambda r: r["images_per_s"])
    return {k: best.get(k) for k in ("name", "description", "images_per_s", "ms_step", "vs_baseline",
                                     "vs_baseline_compile", "peak_vram_gib")}


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[str, Any]) -> None:
    head = (f"{'config':<28}{'ms/step':>9}{'opt ms':>8}{'img/s':>8}{'x(a)':>7}{'x(a)c':>7}{'TFLOP/s':>9}"
            f"{'peak GiB':>9}{'compile s':>10}  note")
    print("\n" + head)
    print("-" * len(head))
    for r in results["rows"]:
        note = f"ERROR {r['error']}" if "error" in r else r.get("optimizer", "")
        if "error" in r and "ms_step" not in r:
            print(f"{r['name']:<28}{'':>79}  {note}"[:220])
            continue
        if "skipped" in r:
            print(f"{r['name']:<28}{'':>79}  skipped: {r['skipped']}")
            continue
        print(f"{r['name']:<28}{fmt(r.get('ms_step'), '.1f'):>9}{fmt(r.get('opt_ms'), '.2f'):>8}"
              f"{fmt(r.get('images_per_s'), '.2f'):>8}{fmt(r.get('vs_baseline'), '.2f'):>7}"
              f"{fmt(r.get('vs_baseline_compile'), '.2f'):>7}{fmt(r.get('tflops'), '.3g'):>9}"
              f"{fmt(r.get('peak_vram_gib'), '.2f'):>9}{fmt(r.get('compile_s'), '.1f'):>10}  {note}"[:220])
    meta = results["meta"]
    flops = meta.get("flops_per_step")
    print(f"\nFLOPs/step: {fmt(flops and flops / 1e12, '.3g')} TFLOP ({meta.get('flops_method')}); "
          f"hand estimate {ESTIMATED_TFLOP_PER_STEP} TFLOP")
    for key, label in (("best", "best of ours"), ("best_fp32_lora", "best with fp32 LoRA weights")):
        b = results.get(key)
        if b:
            print(f"{label}: {b['name']} {b['images_per_s']:.2f} img/s = {fmt(b['vs_baseline'], '.2f')}x (a), "
                  f"{fmt(b['vs_baseline_compile'], '.2f')}x (a')")


def write_json(results: dict[str, Any], path: str | None) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, target)


def environment(bench: Bench, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import diffusers

    meta: dict[str, Any] = {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "device": str(bench.device), "unet": "quick" if args.quick else "sd15", "batch": bench.batch,
        "resolution": bench.latent_hw * 8, "latents": list(bench.latents.shape), "text": list(bench.text.shape),
        "rank": bench.rank, "alpha": bench.alpha, "lr": bench.lr, "warmup": bench.warmup, "steps": bench.steps,
        "windows": bench.windows, "compile_backend": bench.compile_backend, "argv": argv,
    }
    with contextlib.suppress(ImportError):
        import peft

        meta["peft"] = peft.__version__
    if bench.device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(bench.device)
        meta["cuda"] = torch.version.cuda
    return meta


# ---------------------------------------------------------------------------------------------- CLI
SIZED_HELP = {"batch_size": "images per step", "resolution": "image side in pixels",
              "warmup": "warm-up steps per row", "steps": "steps per timed window", "windows": "timed windows per row"}


def bench_parser(doc: str, quick_help: str, sized: dict[str, tuple[int, int]],
                 configs: list[str], default_configs: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options every bench script shares; `sized` maps each of SIZED_HELP to its (default, --quick default)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--json", metavar="PATH", help="write every figure here (rewritten after each row)")
    p.add_argument("--configs", default=",".join(default_configs),
                   help=f"comma list of rows to run; known: {', '.join(configs)}")
    for key, (full, quick) in sized.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"{SIZED_HELP[key]}; default {full} ({quick} with --quick)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager to debug)")
    return p


def check_bench_args(p: argparse.ArgumentParser, args: argparse.Namespace, sized: dict[str, tuple[int, int]],
                     configs: list[str]) -> None:
    """Fill the --quick-dependent defaults, split --configs, and refuse values no row could run with."""
    for key, (full, quick) in sized.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in configs]
    if unknown:
        p.error(f"--configs: unknown {unknown[0]!r}; known: {', '.join(configs)}")
    if args.resolution % 8:
        p.error(f"--resolution {args.resolution}: must be a multiple of 8 (latents are 1/8 of the image)")
    for key in (*sized, "rank"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 1")


def bench_device(name: str) -> torch.device:
    """The device, with diffusers' and dynamo's harmless noise silenced and cuDNN autotuning on for every row."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    # diffusers' upsampler calls an lru_cache'd version check that dynamo traces through; harmless, noisy
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


SIZED = {"batch_size": (4, 2), "resolution": (512, 128), "warmup": (5, 1), "steps": (10, 2), "windows": (5, 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    configs = [*BASELINES, *VARIANTS]
    p = bench_parser(__doc__, "tiny U-Net, batch 2, few steps (smoke test; runs on CPU)", SIZED, configs,
                     DEFAULT_CONFIGS)
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                   help="(c) registry names, comma list ('' for none); AdamW is added as the reference")
    p.add_argument("--optimizer-base", default=None,
                   help="the (b) variant the (c) rows run on (default ours_fp32_compile, ours_fp32 without compile)")
    args = p.parse_args(argv)
    check_bench_args(p, args, SIZED, configs)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip() and o.strip() != "AdamW"]
    if args.optimizer_base is not None and args.optimizer_base not in VARIANTS:
        p.error(f"--optimizer-base: unknown {args.optimizer_base!r}; known: {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = bench_device(args.device)
    bench = Bench(device, QUICK_UNET if args.quick else SD15_UNET, args.batch_size, args.resolution // 8, 77,
                  args.rank, args.alpha, args.lr, args.warmup, args.steps, args.windows, args.seed,
                  args.compile_backend)
    meta = environment(bench, args, sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {"meta": meta, "rows": [], "best": None, "best_fp32_lora": None}
    try:
        meta["flops_per_step"], meta["attention_processor"] = count_step_flops(bench)
        meta["flops_method"] = "FlopCounterMode, fwd+bwd of U-Net+LoRA on a meta-device copy"
    except Exception as exc:
        meta["flops_per_step"] = ESTIMATED_TFLOP_PER_STEP * 1e12 if not args.quick else None
        meta["flops_method"] = f"issue 8 estimate (counting failed: {type(exc).__name__}: {exc})"[:300]
    flops = meta["flops_per_step"]
    print(f"train-step bench on {meta.get('gpu', device)}: batch {bench.batch} at "
          f"{args.resolution}x{args.resolution}, {bench.windows}x{bench.steps} timed steps per row", flush=True)

    def record(row: dict[str, Any]) -> None:
        results["rows"].append(row)
        add_ratios(results["rows"], flops)
        results["best"] = best_row(results["rows"])
        results["best_fp32_lora"] = best_row(results["rows"], "fp32")
        write_json(results, args.json)

    for name in args.configs:
        record(config_row(name, bench))
    if args.optimizers:
        base = args.optimizer_base
        if base is None:
            base = "ours_fp32_compile" if compile_skip_reason("default", bench) is None else "ours_fp32"
        for row in optimizer_rows(args.optimizers, base, bench):
            record(row)
    print_table(results)
    if args.json:
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
