"""Where a training step's time goes: torch.profiler over a few steps of one bench/train_step.py row.

Prints (and writes as JSON) the wall time per step, the summed GPU kernel time per step, the number of kernels
per step and the top kernels, so "launch-bound" vs "GPU-bound" is read off directly.

    python bench/profile_step.py --configs baseline,ours_bf16,ours_bf16_compile --json $OUT/profile.json
    python bench/profile_step.py --model sdxl --configs baseline,ours_bf16 --json $OUT/profile_sdxl.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench import sdxl_step  # noqa: E402
from bench import train_step as ts  # noqa: E402


def kernel_summary(prof: profile, steps: int, top: int) -> dict[str, Any]:
    """GPU kernel time and count per step, and the `top` kernels by time, from a finished profiler."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith("Optimizer.")]  # torch.optim's GPU-side range annotation is not a kernel
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "gpu_kernel_ms_step": sum(e.device_time for e in kernels) / steps / 1e3,
        "kernels_per_step": len(kernels) / steps,
        "top": [{"kernel": k[:120], "ms_step": sum(v) / steps / 1e3, "calls_step": len(v) / steps} for k, v in ranked],
    }


def build_setup(name: str, bench: ts.Bench) -> ts.Setup:
    """The row as bench/train_step.py (SD1.5) or bench/sdxl_step.py (SDXL) builds it."""
    if isinstance(bench, sdxl_step.SDXLBench):
        return sdxl_step.build_row(name, bench)
    if name in ts.BASELINES:
        return ts.setup_baseline(bench, None if name == "baseline" else "default")
    return ts.setup_ours(bench, ts.VARIANTS[name])


def profile_row(name: str, bench: ts.Bench, steps: int, top: int) -> dict[str, Any]:
    setup = build_setup(name, bench)
    for _ in range(bench.warmup):
        ts.train_step(setup)
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            ts.train_step(setup)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    row = {"name": name, "wall_ms_step": wall * 1e3, **kernel_summary(prof, steps, top)}
    print(f"{name}: wall {row['wall_ms_step']:.1f} ms/step, GPU kernels {row['gpu_kernel_ms_step']:.1f} ms/step, "
          f"{row['kernels_per_step']:.0f} kernels/step", flush=True)
    for t in row["top"]:
        print(f"    {t['ms_step']:7.3f} ms  x{t['calls_step']:5.0f}  {t['kernel']}")
    del setup
    ts.release_memory(bench.device)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("sd15", "sdxl"), default="sd15",
                   help="sd15: bench/train_step.py's rows (batch 4, 512x512); sdxl: bench/sdxl_step.py's rows "
                        "(batch 1, 1024x1024, gradient checkpointing)")
    p.add_argument("--configs", default="baseline,ours_bf16,ours_bf16_compile")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/profile_step.py needs CUDA", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    cuda = torch.device("cuda")
    if args.model == "sdxl":
        config = sdxl_step.sdxl_unet_config()
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        bench: ts.Bench = sdxl_step.SDXLBench(cuda, config, 1, 128, 77, 16, 16.0, 1e-4, 3, 10, 5, 0, "inductor",
                                              pooled)
    else:
        bench = ts.Bench(cuda, ts.SD15_UNET, 4, 64, 77, 16, 16.0, 1e-4, 3, 10, 5, 0, "inductor")
    rows = []
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        try:
            rows.append(profile_row(name, bench, args.steps, args.top))
        except Exception as exc:  # one failing row must not lose the others
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
            print(f"{name}: ERROR {rows[-1]['error']}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
