"""Time optimizer.step() on the SD1.5 (or SDXL) LoRA parameter set, against fused torch AdamW in the same run.

The parameter set is what `--network_dim 16` trains on SD1.5: lora_down/lora_up pairs on every attention
projection (to_q/k/v/out.0), proj_in/proj_out and ff.net.0.proj/ff.net.2 of each transformer block (16 blocks,
384 tensors, ~6.8M parameters). Shapes come from diffusers' UNet2DConditionModel built from the SD1.5 config on
the meta device, so no weights are needed. Gradients are random and fixed; the step alone is timed with CUDA
events (wall clock on CPU), after warm-up, as the median of N. ``--params sdxl`` takes the SDXL-base U-Net's
targets instead (1,444 tensors, 42.6M parameters at rank 16). On CUDA each row also reports memory per parameter:
what the optimizer keeps allocated between steps (state, working buffers), its peak during a step (plus the
step's temporaries) and the reserved memory it adds (CUDA-graph pools, the allocator's cache). On the CPU, where
the allocator keeps no statistics, kept and peak are counted exactly by bench/storage_ledger.py in a separate pass
(a fresh optimizer, three steps), so the timing is not slowed by the counting.

    python bench/optimizer_step.py                              # CUDA, default list
    python bench/optimizer_step.py --device cpu --quick         # smoke test
    python bench/optimizer_step.py --optimizers AdamW Lion --json out/opt.json
    python bench/optimizer_step.py --params sdxl --optimizers AdamW CustomAdamW AdamW8bit
    python bench/optimizer_step.py --record                     # capturable steps recorded, as --cuda_graphs does

``--record`` (CUDA) records the step of every capturable optimizer (library/optimizers/loop.py ``LoopNeeds``:
CustomAdamW, fused AdamW made capturable) once as a CUDA graph and times its replay, as the trainer's
``--cuda_graphs`` replays it inside the training step; the other rows stay eager and say so in their label.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.storage_ledger import optimizer_bytes  # noqa: E402
from library.optimizers.loop import LoopNeeds  # noqa: E402
from library.optimizers.registry import build_optimizer  # noqa: E402
from library.training.graphed_step import WARMUP_CALLS, on_side_stream  # noqa: E402

DEFAULT_OPTIMIZERS = [
    "AdamW",
    "CustomAdamW",
    "CustomAdamW8bit",
    "Automagic_Sinkgd",
    "Automagic_CameAMP",
    "AdamWSGG",
    "AdamWSAC",
    "Lion",
    "Prodigy",
    "AdamW8bit",
]
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "use_linear_projection": False,
}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
SDXL_CONFIG = Path(__file__).resolve().parents[1] / "library/models/configs/sdxl-base/unet/config.json"


def unet_config(params: str) -> dict:
    if params == "sd15":
        return SD15_UNET
    config = json.loads(SDXL_CONFIG.read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if not k.startswith("_")}


def lora_shapes(rank: int, params: str = "sd15") -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(kohya name, lora_down shape, lora_up shape) for every targeted module of the SD1.5 / SDXL UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(params))
    shapes = []
    for name, module in unet.named_modules():
        if ".transformer_blocks." not in name and not name.endswith(("proj_in", "proj_out")):
            continue
        if not name.endswith(TARGETS):
            continue
        kohya = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Conv2d):  # SD1.5 proj_in/out are 1x1 convs
            shapes.append((kohya, (rank, module.in_channels, 1, 1), (module.out_channels, rank, 1, 1)))
        elif isinstance(module, torch.nn.Linear):
            shapes.append((kohya, (rank, module.in_features), (module.out_features, rank)))
    return shapes


def parse_row(label: str) -> tuple[str, list[str]]:
    """``Name`` or ``Name:key=value,key=value`` (as --optimizer_args, which parses the values), e.g.
    ``Automagic_Sinkgd:cuda_graphs=False`` or ``Lion:betas=(0.9,0.99),weight_decay=0.1``."""
    name, _, options = label.partition(":")
    items = [item.strip() for item in re.split(r",(?=\s*\w+\s*=)", options) if item.strip()]
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--optimizers {label}: {item!r} is not key=value")
    return name, items


def make_params(rank: int, device: str, seed: int = 0,
                param_set: str = "sd15") -> tuple[list[torch.nn.Parameter], list[str]]:
    gen = torch.Generator().manual_seed(seed)
    params, names = [], []
    for kohya, down, up in lora_shapes(rank, param_set):
        params.append(torch.nn.Parameter((torch.randn(down, generator=gen) / down[1] ** 0.5).to(device)))
        params.append(torch.nn.Parameter((torch.randn(up, generator=gen) * 1e-3).to(device)))
        names += [f"{kohya}.lora_down.weight", f"{kohya}.lora_up.weight"]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device) * 1e-3
    return params, names


def recorded_step(optimizer: torch.optim.Optimizer) -> Callable[[], None] | None:
    """The replay of ``optimizer.step()`` recorded as a CUDA graph (after eager warm-up steps on a side stream),
    or None when the optimizer is not capturable."""
    needs = LoopNeeds(optimizer)
    if not needs.capturable:
        return None
    needs.prepare_capture()
    device = optimizer.param_groups[0]["params"][0].device
    for _ in range(WARMUP_CALLS):
        on_side_stream(device, optimizer.step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    return graph.replay


def time_steps(step: Callable[[], None], device: str, warmup: int, iters: int) -> float:
    """Median milliseconds per step()."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors held in optimizer.state (tensor subclasses counted by their inner tensors)."""
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            inner, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in inner)
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += size(value)
    return total


class MemoryMeter:
    """CUDA memory an optimizer adds, per parameter: kept between steps, peak within a step, reserved."""

    def __init__(self, device: str, n_params: int) -> None:
        self.cuda = device.startswith("cuda")
        self.n = n_params
        if self.cuda:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.allocated = torch.cuda.memory_allocated()
            self.reserved = torch.cuda.memory_reserved()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict:
        if not self.cuda:
            return {}
        torch.cuda.synchronize()
        return {
            "kept_bytes_per_param": (torch.cuda.memory_allocated() - self.allocated) / self.n,
            "peak_bytes_per_param": (torch.cuda.max_memory_allocated() - self.allocated) / self.n,
            "reserved_bytes_per_param": (torch.cuda.max_memory_reserved() - self.reserved) / self.n,
        }


def bench_one(label: str, make_optimizer, params, device: str, warmup: int, iters: int,
              record: bool = False) -> dict:
    n = sum(p.numel() for p in params)
    meter = MemoryMeter(device, n)
    try:
        optimizer = make_optimizer()
        if hasattr(optimizer, "train"):
            optimizer.train()
        step = recorded_step(optimizer) if record else None
        if record:
            label += " (recorded)" if step is not None else " (eager: not capturable)"
        ms = time_steps(step or optimizer.step, device, warmup, iters)
        memory = meter.read()
        if not memory:
            kept, peak = optimizer_bytes(make_optimizer, params)
            memory = {"kept_bytes_per_param": kept, "peak_bytes_per_param": peak}
        return {
            "optimizer": label,
            "ms": ms,
            "state_bytes_per_param": state_bytes(optimizer) / n,
            **memory,
            "error": None,
        }
    except Exception as exc:  # an optimizer that is missing or broken is a row, not a crash
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return {"optimizer": label, "ms": None, "state_bytes_per_param": None, "error": detail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS,
                        help="registry names, each optionally with constructor settings: Name:key=value,...")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--params", choices=("sd15", "sdxl"), default="sd15",
                        help="the LoRA parameter set: SD1.5's U-Net targets or SDXL-base's")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="2 warm-up steps, 5 timed steps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--record", action="store_true",
                        help="record each capturable optimizer's step as a CUDA graph and time the replay (CUDA)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.iters = 2, 5
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu")
    if args.record and not args.device.startswith("cuda"):
        parser.error("--record records CUDA graphs: use --device cuda")

    params, names = make_params(args.rank, args.device, param_set=args.params)
    n_params = sum(p.numel() for p in params)
    label = {"sd15": "SD1.5", "sdxl": "SDXL"}[args.params]
    print(f"{label} LoRA rank {args.rank}: {len(params)} tensors, {n_params / 1e6:.2f}M parameters on {args.device}")

    results = [
        bench_one(
            "torch AdamW fused (baseline)",
            lambda: torch.optim.AdamW(params, lr=args.lr, fused=True),
            params,
            args.device,
            args.warmup,
            args.iters,
            args.record,
        )
    ]
    for label in args.optimizers:
        name, settings = parse_row(label)

        def make(name: str = name, settings: list[str] = settings) -> torch.optim.Optimizer:
            groups = [{"params": params, "names": names}]
            return build_optimizer(name, groups, lr=args.lr, optimizer_args=settings)[0]

        results.append(bench_one(label, make, params, args.device, args.warmup, args.iters, args.record))

    base = results[0]["ms"]
    cuda = args.device.startswith("cuda")
    head = f"{'optimizer':32s} {'ms/step':>9s} {'x fused':>8s} {'state B/param':>14s} {'kept B/p':>9s} {'peak B/p':>9s}"
    print(head + (f" {'rsvd B/p':>9s}" if cuda else ""))
    for r in results:
        if r["error"]:
            print(f"{r['optimizer']:32s} {'error':>9s}  {r['error']}")
            continue
        ratio = r["ms"] / base if base else float("nan")
        r["ratio_to_fused_adamw"] = ratio
        line = (f"{r['optimizer']:32s} {r['ms']:9.3f} {ratio:8.2f} {r['state_bytes_per_param']:14.2f}"
                f" {r['kept_bytes_per_param']:9.2f} {r['peak_bytes_per_param']:9.2f}")
        if cuda:
            line += f" {r['reserved_bytes_per_param']:9.2f}"
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
            "rank": args.rank,
            "param_set": args.params,
            "tensors": len(params),
            "parameters": n_params,
            "warmup": args.warmup,
            "iters": args.iters,
            "recorded": args.record,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
