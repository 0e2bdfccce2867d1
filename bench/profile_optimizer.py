"""Where one optimizer step's time goes on the GPU: kernels per step, GPU time vs host time, top kernels.

    python bench/profile_optimizer.py CustomAdamW Automagic_Sinkgd --json $OUT/profile_optimizer.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.optimizer_step import make_params  # noqa: E402
from bench.profile_step import kernel_summary  # noqa: E402
from library.optimizers.registry import build_optimizer  # noqa: E402


def profile_optimizer(name: str, steps: int, top: int) -> dict:
    params, names = make_params(16, "cuda")
    if name == "torch_fused":
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    else:
        optimizer, _ = build_optimizer(name, [{"params": params, "names": names}], lr=1e-4)
    for _ in range(5):
        optimizer.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        host_ms = (time.perf_counter() - start) * 1e3 / steps
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    syncs = sum(1 for e in prof.events() if e.name in ("aten::_local_scalar_dense", "cudaStreamSynchronize",
                                                        "cudaDeviceSynchronize")) / steps
    row = {"optimizer": name, "wall_ms": wall_ms, "host_ms": host_ms, "syncs": syncs, **kernel_summary(prof, steps, top)}
    print(f"{name}: wall {wall_ms:.2f} ms, host {host_ms:.2f} ms, GPU {row['gpu_kernel_ms_step']:.2f} ms, "
          f"{row['kernels_per_step']:.0f} kernels, {syncs:.0f} syncs per step")
    for t in row["top"]:
        print(f"    {t['ms_step']:7.3f} ms x{t['calls_step']:4.0f}  {t['kernel']}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("optimizers", nargs="*", default=["torch_fused", "CustomAdamW", "Automagic_Sinkgd"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/profile_optimizer.py needs CUDA", file=sys.stderr)
        return 2
    rows = [profile_optimizer(name, args.steps, args.top) for name in args.optimizers]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
