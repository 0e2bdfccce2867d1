"""SDXL training-step benchmark: a plain diffusers + peft LoRA step against loraforge's SDXL step.

SDXL-architecture U-Net from the bundled config (library/models/configs/sdxl-base/unet, 2.6B parameters, random
seeded weights, no download), 1024x1024 (128x128 latents), batch 1, bf16, gradient checkpointing, cached
text-encoder outputs (random [1, 77, 2048] hidden states, [1, 1280] pooled embedding, size/crop time ids): no
text encoder or VAE is on the GPU, as in the trainer with --cache_text_encoder_outputs --cache_latents. Rows:

  (a)   baseline        diffusers U-Net + peft LoRA (r=16 on kohya's U-Net targets), fp32 LoRA under bf16
                        autocast, torch AdamW(fused=True), gradient checkpointing, eager: the
                        train_text_to_image_lora_sdxl.py loop
  (b)   ours_*          networks.lora + library.training.losses + the registry's AdamW (bf16 / fp32 LoRA,
                        torch.compile, channels_last, with or without gradient checkpointing)
  (lv)  lowvram*        the documented low-VRAM recipe (docs/sdxl.md): bf16 weights and LoRA, AdamW8bit,
                        gradient checkpointing, cached text-encoder outputs and latents

Timing, validity checks (every lora_up gets a gradient, the LoRA weights move, the loss is finite) and memory
release between rows are bench/train_step.py's. Peak VRAM is reported as allocated and reserved; the JSON is
rewritten after each row.

    python bench/sdxl_step.py --json $OUT/sdxl_step.json     # CUDA, default rows, < 8 minutes on one H100
    python bench/sdxl_step.py --device cpu --quick          # smoke test: toy SDXL-shaped U-Net
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import train_step as ts  # noqa: E402

SDXL_CONFIGS = ROOT / "library" / "models" / "configs" / "sdxl-base"
# --quick: SDXL's block layout (no attention in the first level, 1-2 transformer layers, text_time embedding)
# at toy width; milliseconds per step on one CPU thread.
QUICK_UNET: dict[str, Any] = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64], "layers_per_block": 1, "transformer_layers_per_block": [1, 2],
    "cross_attention_dim": 64, "attention_head_dim": [2, 4], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # pooled text embedding (32) + 6 time ids x 8
}
LOW_VRAM_LIMIT_GIB = 8.0
SPEED_TARGET = 2.0  # >= 2x the baseline's speed at <= its peak memory


@dataclass(frozen=True)
class Row:
    """One configuration of a step."""

    group: str  # "a" (baseline), "b" (ours, fast), "lv" (ours, low VRAM)
    lora_dtype: str  # "fp32": fp32 LoRA under bf16 autocast; "bf16": everything bf16, no autocast
    compile_mode: str | None = None
    channels_last: bool = False
    checkpointing: bool = True
    optimizer: str = "AdamW"
    cuda_graphs: bool = False  # the trainer's --cuda_graphs
    description: str = ""


ROWS: dict[str, Row] = {
    "baseline": Row("a", "fp32", description="diffusers U-Net + peft LoRA (fp32) + bf16 autocast + AdamW(fused), "
                                             "gradient checkpointing, eager"),
    "baseline_compile": Row("a", "fp32", "default", description="the baseline with torch.compile(unet)"),
    "ours_fp32": Row("b", "fp32", description="fp32 LoRA + bf16 autocast, eager (--mixed_precision bf16)"),
    "ours_bf16": Row("b", "bf16", description="bf16 LoRA, no autocast, eager (--full_bf16)"),
    "ours_bf16_compile": Row("b", "bf16", "default", description="bf16 LoRA, torch.compile (--torch_compile)"),
    "ours_bf16_compile_cl": Row("b", "bf16", "default", True, description="bf16 LoRA, torch.compile, channels_last"),
    "ours_bf16_compile_nogc": Row("b", "bf16", "default", checkpointing=False,
                                  description="bf16 LoRA, torch.compile, no gradient checkpointing (speed for memory)"),
    "ours_fp32_cudagraphs": Row("b", "fp32", "reduce-overhead",
                                description="fp32 LoRA + autocast, --dynamo_mode reduce-overhead (CUDA graphs)"),
    "ours_bf16_cudagraphs": Row("b", "bf16", "reduce-overhead",
                                description="bf16 LoRA, --dynamo_mode reduce-overhead (CUDA graphs)"),
    "ours_bf16_graphs": Row("b", "bf16", cuda_graphs=True,
                            description="bf16 LoRA, eager kernels replayed as one CUDA graph "
                                        "(--full_bf16 --cuda_graphs)"),
    "ours_fp32_graphs": Row("b", "fp32", cuda_graphs=True,
                            description="fp32 LoRA + autocast, replayed as one CUDA graph (--cuda_graphs)"),
    "ours_bf16_graphs_nogc": Row("b", "bf16", checkpointing=False, cuda_graphs=True,
                                 description="bf16 LoRA, --cuda_graphs, no gradient checkpointing"),
    "ours_bf16_compile_graphs": Row("b", "bf16", "default", cuda_graphs=True,
                                    description="bf16 LoRA, torch.compile (default mode) + --cuda_graphs"),
    "lowvram_graphs": Row("lv", "bf16", optimizer="AdamW8bit", cuda_graphs=True,
                          description="the low-VRAM recipe + --cuda_graphs"),
    "ours_bf16_graphs_customadamw": Row("b", "bf16", optimizer="CustomAdamW", cuda_graphs=True,
                                        description="bf16 LoRA, --cuda_graphs, CustomAdamW (defaults, graphed step)"),
    "ours_fp32_graphs_customadamw": Row("b", "fp32", optimizer="CustomAdamW", cuda_graphs=True,
                                        description="fp32 LoRA + autocast, --cuda_graphs, CustomAdamW"),
    "ours_bf16_graphs_sinkgd": Row("b", "bf16", optimizer="Automagic_Sinkgd", cuda_graphs=True,
                                   description="bf16 LoRA, --cuda_graphs, Automagic_Sinkgd"),
    "lowvram_graphs_customadamw8bit": Row("lv", "bf16", optimizer="CustomAdamW8bit", cuda_graphs=True,
                                          description="the low-VRAM recipe with CustomAdamW8bit, --cuda_graphs"),
    "lowvram": Row("lv", "bf16", optimizer="AdamW8bit",
                   description="docs/sdxl.md low-VRAM recipe: bf16 weights + LoRA, AdamW8bit, gradient checkpointing, "
                               "cached text-encoder outputs and latents (no text encoder / VAE on the GPU)"),
    "lowvram_compile": Row("lv", "bf16", "default", optimizer="AdamW8bit",
                           description="the low-VRAM recipe + torch.compile"),
}
DEFAULT_ROWS = ("baseline", "ours_fp32", "ours_bf16", "ours_bf16_compile", "lowvram")


@dataclass
class SDXLBench(ts.Bench):
    """train_step's workload plus SDXL's added conditioning: pooled text embedding and size/crop time ids."""

    pooled_dim: int
    added: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        g = torch.Generator().manual_seed(self.seed + 1)
        pooled = torch.randn(self.batch, self.pooled_dim, generator=g)
        side = float(self.latent_hw * 8)  # original = target = the training resolution, no crop
        time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * self.batch)
        self.added = {"text_embeds": pooled.to(self.device, torch.bfloat16),
                      "time_ids": time_ids.to(self.device, torch.bfloat16)}


def sdxl_unet_config() -> dict[str, Any]:
    config = json.loads((SDXL_CONFIGS / "unet" / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if not k.startswith("_")}


def scheduler_config() -> dict[str, Any]:
    """SDXL's own DDPM settings (scaled_linear 0.00085..0.012, epsilon), from the bundled scheduler config."""
    from library.models.common import ddpm_scheduler_config

    raw = json.loads((SDXL_CONFIGS / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return ddpm_scheduler_config(raw, v_parameterization=False)


def build_unet(bench: SDXLBench, row: Row, device: torch.device | None = None):
    from library.training.graphed_step import checkpoint_without_rng_state

    unet = ts.build_unet(bench, row.channels_last, device)
    if row.checkpointing:  # as the trainer: a graph being recorded cannot read the RNG state checkpointing saves
        unet.enable_gradient_checkpointing(checkpoint_without_rng_state if row.cuda_graphs else None)
    return unet


# ---------------------------------------------------------------------------------------------- rows
def setup_baseline(bench: SDXLBench, row: Row) -> ts.Setup:
    """diffusers' train_text_to_image_lora_sdxl.py step: peft adapter, fp32 LoRA, autocast, fused AdamW."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    unet = build_unet(bench, row)
    unet.add_adapter(LoraConfig(r=bench.rank, lora_alpha=bench.alpha, init_lora_weights="gaussian",
                                target_modules=list(ts.PEFT_TARGETS)))
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    for _, p in named:
        p.data = p.data.float()  # diffusers' cast_training_params
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=bench.lr, fused=bench.device.type == "cuda")
    scheduler = DDPMScheduler.from_config(scheduler_config())
    model = ts.maybe_compile(unet, row.compile_mode, bench)
    latents, text, added, device = bench.latents, bench.text, bench.added, bench.device

    def forward_backward() -> torch.Tensor:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(noisy, timesteps, text, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        return loss.detach()

    info = {"lora": "peft", "lora_dtype": "fp32", "autocast": True, "compile": row.compile_mode,
            "channels_last": False, "gradient_checkpointing": row.checkpointing,
            "optimizer": "torch.optim.AdamW(fused=True)" if device.type == "cuda" else "torch.optim.AdamW",
            **ts.lora_counts(params)}
    return ts.Setup(forward_backward, optimizer, params, names, "lora_B", info, keep=(unet, model))


def setup_ours(bench: SDXLBench, row: Row) -> ts.Setup:
    """loraforge's SDXL step as the trainer runs it: patched U-Net, our loss, a registry optimizer."""
    from library.training import losses

    lora_dtype = torch.float32 if row.lora_dtype == "fp32" else torch.bfloat16
    autocast = row.lora_dtype == "fp32"
    unet = build_unet(bench, row)
    network = ts.create_our_network(unet, bench)
    network.to(bench.device, dtype=lora_dtype)
    if row.channels_last:
        network.to(memory_format=torch.channels_last)
    network.train()
    optimizer = ts.build_registry_optimizer(row.optimizer, network, bench)
    scheduler = losses.make_noise_scheduler(scheduler_config(), v_parameterization=False, zero_terminal_snr=False)
    model = ts.maybe_compile(unet, row.compile_mode, bench)
    device, added = bench.device, bench.added
    latents = bench.latents.contiguous(memory_format=torch.channels_last) if row.channels_last else bench.latents
    weights = torch.ones(bench.batch, device=device)
    amp = ts.autocast_context(autocast, device, row.cuda_graphs)

    def body(latents: torch.Tensor, text: torch.Tensor, text_embeds: torch.Tensor,
             time_ids: torch.Tensor) -> tuple[torch.Tensor]:
        noise = losses.sample_noise(latents, losses.NoiseOptions())
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with amp():
            pred = model(noisy, timesteps, text, added_cond_kwargs={"text_embeds": text_embeds,
                                                                    "time_ids": time_ids}).sample
        target = losses.training_target(scheduler, latents, noise, timesteps)
        loss = losses.diffusion_loss(pred, target, sample_weights=weights)
        loss.backward()
        return (loss.detach(),)

    named = list(network.named_parameters())
    inputs = (latents, bench.text, added["text_embeds"], added["time_ids"])
    forward_backward = ts.graphed_or_eager(body, lambda: inputs, [p for _, p in named], device, row.cuda_graphs)
    info = {"lora": "networks.lora", "lora_dtype": row.lora_dtype, "autocast": autocast, "compile": row.compile_mode,
            "channels_last": row.channels_last, "gradient_checkpointing": row.checkpointing,
            "cuda_graphs": row.cuda_graphs,
            "optimizer": f"{row.optimizer} -> {type(optimizer).__module__}.{type(optimizer).__name__}",
            **ts.lora_counts([p for _, p in named])}
    return ts.Setup(forward_backward, optimizer, [p for _, p in named], [n for n, _ in named], "lora_up", info,
                    before_step=ts.cudagraph_step_marker(row.compile_mode), network=network, keep=(unet, model))


def build_row(name: str, bench: SDXLBench) -> ts.Setup:
    """The setup of row ``name`` (also bench/profile_step.py --model sdxl's)."""
    row = ROWS[name]
    setup = (setup_baseline if row.group == "a" else setup_ours)(bench, row)
    # the fp32 -> bf16 cast of the U-Net left ~10 GiB of cached blocks: free them, or they would count
    # as this row's peak reserved memory
    ts.release_memory(bench.device, reset_compiled=False)
    return setup


def run(name: str, bench: SDXLBench) -> dict[str, Any]:
    row = ROWS[name]
    reason = ts.compile_skip_reason(row.compile_mode, bench) or ts.graphs_skip_reason(row.cuda_graphs, bench)
    if row.group == "a":
        try:
            import peft  # noqa: F401
        except ImportError:
            reason = "peft is not installed"
    if reason:
        return ts.skipped(name, row.group, reason)
    print(f"  {name} ...", flush=True)
    result = ts.run_row({"name": name, "group": row.group, "description": row.description}, bench,
                        lambda: build_row(name, bench))
    if bench.device.type == "cuda" and "ms_step" in result:
        # the peak since measure() reset the counters after building the row (cached blocks included)
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(bench.device) / 2**30
    return result


# ---------------------------------------------------------------------------------------------- report
def count_step_flops(bench: SDXLBench) -> float:
    """FLOPs of forward + backward of U-Net + LoRA, counted on a meta-device copy (no GPU time)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    unet = ts.build_unet(bench, device=meta)
    network = ts.create_our_network(unet, bench)
    network.to(meta, dtype=torch.bfloat16)
    added = {k: torch.empty_like(v, device=meta) for k, v in bench.added.items()}
    latents = torch.empty_like(bench.latents, device=meta)
    timesteps = torch.zeros(bench.batch, dtype=torch.long, device=meta)
    with FlopCounterMode(display=False) as counter:
        pred = unet(latents, timesteps, torch.empty_like(bench.text, device=meta), added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), latents.float()).backward()
    return float(counter.get_total_flops())


def add_ratios(results: dict[str, Any]) -> None:
    """Speed and peak memory relative to (a); whether the issue's two targets are met."""
    rows = results["rows"]
    valid = {r["name"]: r for r in rows if "ms_step" in r and "error" not in r}
    base = valid.get("baseline")
    flops = results["meta"].get("flops_per_step")
    for r in valid.values():
        r["tflops"] = flops / (r["ms_step"] / 1e3) / 1e12 if flops else None
        if base:
            r["vs_baseline"] = base["ms_step"] / r["ms_step"]
            if "peak_vram_gib" in r and "peak_vram_gib" in base:
                r["vram_vs_baseline"] = r["peak_vram_gib"] / base["peak_vram_gib"]
    fast = [r for r in valid.values() if r["group"] == "b"]
    best = min(fast, key=lambda r: r["ms_step"]) if fast else None
    results["best"] = best and best["name"]
    if base and best and "peak_vram_gib" in best:
        within = [r for r in fast if r["peak_vram_gib"] <= base["peak_vram_gib"]]
        top = min(within, key=lambda r: r["ms_step"]) if within else None
        results["speed_target"] = {
            "target": f">= {SPEED_TARGET}x baseline speed at <= baseline peak allocated",
            "best_within_baseline_memory": top and top["name"],
            "speedup": top and top["vs_baseline"],
            "met": bool(top and top["vs_baseline"] >= SPEED_TARGET),
        }
    low = [r for r in valid.values() if r["group"] == "lv" and "peak_reserved_gib" in r]
    if low:
        lowest = min(low, key=lambda r: r["peak_reserved_gib"])
        results["low_vram_target"] = {"target": f"peak reserved < {LOW_VRAM_LIMIT_GIB} GiB", "row": lowest["name"],
                                      "peak_reserved_gib": lowest["peak_reserved_gib"],
                                      "met": lowest["peak_reserved_gib"] < LOW_VRAM_LIMIT_GIB}


def print_table(results: dict[str, Any]) -> None:
    head = (f"{'config':<24}{'s/step':>8}{'opt ms':>8}{'x(a)':>7}{'TFLOP/s':>9}{'peak GiB':>9}{'rsvd GiB':>9}"
            f"{'mem x(a)':>9}{'compile s':>10}{'LoRA t':>7}  note")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results["rows"]:
        if "ms_step" not in r:
            note = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR {r.get('error')}"
            print(f"{r['name']:<24}{'':>76}  {note}"[:220])
            continue
        note = f"ERROR {r['error']}" if "error" in r else r.get("optimizer", "")
        print(f"{r['name']:<24}{r['ms_step'] / 1e3:>8.3f}{ts.fmt(r.get('opt_ms'), '.2f'):>8}"
              f"{ts.fmt(r.get('vs_baseline'), '.2f'):>7}{ts.fmt(r.get('tflops'), '.3g'):>9}"
              f"{ts.fmt(r.get('peak_vram_gib'), '.2f'):>9}{ts.fmt(r.get('peak_reserved_gib'), '.2f'):>9}"
              f"{ts.fmt(r.get('vram_vs_baseline'), '.2f'):>9}{ts.fmt(r.get('compile_s'), '.1f'):>10}"
              f"{r.get('lora_tensors', 0):>7}  {note}"[:220])
    for key in ("speed_target", "low_vram_target"):
        if results.get(key):
            print(f"{key}: {results[key]}")


# ---------------------------------------------------------------------------------------------- CLI
SIZED = {"batch_size": (1, 1), "resolution": (1024, 128), "warmup": (3, 1), "steps": (5, 2), "windows": (3, 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ts.bench_parser(__doc__, "toy SDXL-shaped U-Net at 128x128, few steps (runs on CPU)", SIZED, list(ROWS),
                        DEFAULT_ROWS)
    args = p.parse_args(argv)
    ts.check_bench_args(p, args, SIZED, list(ROWS))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = ts.bench_device(args.device)
    unet_config = QUICK_UNET if args.quick else sdxl_unet_config()
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    bench = SDXLBench(device, unet_config, args.batch_size, args.resolution // 8, 77, args.rank, args.alpha, args.lr,
                      args.warmup, args.steps, args.windows, args.seed, args.compile_backend, pooled)
    meta = ts.environment(bench, args, sys.argv[1:] if argv is None else argv)
    meta.update({"unet": "quick" if args.quick else "sdxl-base",
                 "added_cond": {k: list(v.shape) for k, v in bench.added.items()},
                 "text_encoders_on_device": False, "vae_on_device": False})
    results: dict[str, Any] = {"meta": meta, "rows": [], "best": None}
    try:
        meta["flops_per_step"] = count_step_flops(bench)
    except Exception as exc:
        meta["flops_per_step"] = None
        meta["flops_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(f"SDXL train-step bench on {meta.get('gpu', device)}: batch {bench.batch} at {args.resolution}x"
          f"{args.resolution}, rank {args.rank}, {bench.windows}x{bench.steps} timed steps per row", flush=True)
    for name in args.configs:
        results["rows"].append(run(name, bench))
        add_ratios(results)
        ts.write_json(results, args.json)
    counts = {r["name"]: r["lora_tensors"] for r in results["rows"] if "lora_tensors" in r}
    print(f"LoRA tensors per row: {counts}")
    print_table(results)
    if args.json:
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
