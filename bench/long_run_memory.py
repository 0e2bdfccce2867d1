"""Long-run memory benchmark: is memory flat over thousands of training steps?

Runs the real trainer in-process (`LoRATrainer.setup()` + `train()`) on builtin:tiny-sd with the synthetic shapes
dataset (library/data/synthetic.py, written to a temporary folder), LoRA dim 4, AdamW, no intermediate saves.
A background thread samples the process RSS (psutil, else /proc/self/statm) and, on CUDA,
torch.cuda.memory_allocated / max_memory_allocated each time the trainer's step counter passes a multiple of
--every; the trainer is not modified.

After the warm-up steps (allocator pools, cuDNN/autotune caches, first epochs of the DataLoader) the samples are
fitted with a least-squares line. Criterion: memory is **flat** when the RSS slope is below 1 MiB per 1000 steps
(and, on CUDA, the allocated-memory slope too): a leak of one small tensor per step (e.g. a kept loss with its
graph, a growing log list) exceeds that within a few hundred steps.

    python bench/long_run_memory.py --device cuda --json $OUT/long_run_memory.json    # 5000 steps
    OMP_NUM_THREADS=1 python bench/long_run_memory.py --device cpu --quick              # smoke test, 200 steps
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MiB = 1 << 20
FLAT_MIB_PER_1K_STEPS = 1.0


def rss_reader():
    """A function returning this process's resident set size in bytes."""
    try:
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def from_statm() -> int:
            with open("/proc/self/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * page

        return from_statm


class Sampler(threading.Thread):
    """Polls the trainer's step counter; records memory once per --every steps without touching the loop."""

    def __init__(self, progress, every: int, stop_at: int, device: torch.device, poll_s: float = 0.002):
        super().__init__(daemon=True)
        self.progress, self.every, self.stop_at, self.device, self.poll_s = progress, every, stop_at, device, poll_s
        self.rss = rss_reader()
        self.samples: list[dict] = []
        self.done = threading.Event()

    def sample(self, step: int) -> None:
        row = {"step": step, "t": time.perf_counter(), "rss_mib": self.rss() / MiB}
        if self.device.type == "cuda":
            row["cuda_allocated_mib"] = torch.cuda.memory_allocated(self.device) / MiB
            row["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / MiB
        self.samples.append(row)

    def run(self) -> None:
        next_step = self.every
        while not self.done.is_set():
            step = self.progress.global_step
            if step >= self.stop_at:  # the final save and loss plot (matplotlib) are not the training loop
                return
            if step >= next_step:
                self.sample(step)
                next_step = (step // self.every + 1) * self.every
            time.sleep(self.poll_s)


def slope_per_1k(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of values against steps, in units per 1000 steps."""
    if len(steps) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64), 1)[0] * 1000)


def summarise(samples: list[dict], key: str, warmup: int) -> dict:
    kept = [s for s in samples if s["step"] > warmup and key in s]
    values = [s[key] for s in kept]
    if not values:
        return {}
    slope = slope_per_1k([s["step"] for s in kept], values)
    return {"first_mib": values[0], "last_mib": values[-1], "max_mib": max(values), "min_mib": min(values),
            "slope_mib_per_1k_steps": slope, "samples": len(values),
            "flat": bool(abs(slope) < FLAT_MIB_PER_1K_STEPS)}


def write_dataset(folder: Path, n_images: int, resolution: int, batch: int) -> Path:
    from library.data.synthetic import generate_shapes_dataset

    images = folder / "images"
    generate_shapes_dataset(images, n_images, size=resolution, seed=0)
    toml = folder / "dataset.toml"
    toml.write_text(f"[general]\nresolution = {resolution}\nbatch_size = {batch}\n\n[[datasets]]\n\n"
                    f"[[datasets.subsets]]\nimage_dir = '{images.as_posix()}'\ncaption_extension = '.txt'\n",
                    encoding="utf-8")
    return toml


def trainer_argv(dataset: Path, out: Path, steps: int, device: str, quick: bool) -> list[str]:
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--dataset_config", str(dataset),
            "--output_dir", str(out), "--output_name", "long_run", "--network_dim", "4", "--network_alpha", "4",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--max_train_steps", str(steps),
            "--log_every_n_steps", "50", "--seed", "0", "--log_with", "none"]
    if device == "cuda":
        argv += ["--mixed_precision", "bf16"]
    if quick:  # the U-Net step only: latents and caption embeddings are computed once
        argv += ["--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only"]
    return argv


def run(args: argparse.Namespace) -> dict:
    from library.cli import parse_args
    from library.training import progress
    from library.training.trainer import LoRATrainer

    progress.tqdm = functools.partial(progress.tqdm, mininterval=30.0)  # the bar only; a 5000-step log stays short
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="long_run_memory_") as tmp:
        tmp = Path(tmp)
        dataset = write_dataset(tmp, args.images, args.resolution, args.batch)
        targs = parse_args(trainer_argv(dataset, tmp / "out", args.steps, args.device, args.quick))
        if device.type == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate picks CUDA whenever it can see one
        trainer = LoRATrainer(targs)
        trainer.setup()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sampler = Sampler(trainer.progress, args.every, targs.max_train_steps, trainer.device)
        sampler.sample(0)
        sampler.start()
        start = time.perf_counter()
        try:
            trainer.train()
        finally:
            sampler.done.set()
            sampler.join()
        wall = time.perf_counter() - start
        end_rss = sampler.rss() / MiB
    samples = sampler.samples
    warmup = args.warmup if args.warmup is not None else max(args.every, args.steps // 10)
    result = {
        "benchmark": "long_run_memory", "device": str(trainer.device), "steps": trainer.progress.global_step,
        "warmup_steps": warmup, "every": args.every, "wall_s": wall, "steps_per_s": trainer.progress.global_step / wall,
        "criterion": f"flat when |slope| < {FLAT_MIB_PER_1K_STEPS} MiB per 1000 steps after warm-up (least squares)",
        "rss": summarise(samples, "rss_mib", warmup), "rss_after_final_save_mib": end_rss,
        "torch": torch.__version__, "python": platform.python_version(), "quick": args.quick,
        "config": {"model": "builtin:tiny-sd", "resolution": args.resolution, "batch": args.batch,
                   "images": args.images, "optimizer": "AdamW", "network_dim": 4},
        "samples": samples,
    }
    if trainer.device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(trainer.device)
        result["cuda_allocated"] = summarise(samples, "cuda_allocated_mib", warmup)
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(trainer.device) / MiB
    parts = [result["rss"]] + ([result["cuda_allocated"]] if "cuda_allocated" in result else [])
    result["verdict"] = "flat" if all(p.get("flat") for p in parts) else "growing"
    return result


def report(result: dict) -> str:
    lines = [f"long-run memory: {result['steps']} steps on {result.get('gpu', result['device'])}, "
             f"{result['steps_per_s']:.1f} steps/s, warm-up {result['warmup_steps']} steps"]
    for key in ("rss", "cuda_allocated"):
        s = result.get(key)
        if s:
            lines.append(f"  {key:15s} first {s['first_mib']:.1f}  last {s['last_mib']:.1f}  max {s['max_mib']:.1f} MiB; "
                         f"slope {s['slope_mib_per_1k_steps']:+.3f} MiB/1k steps over {s['samples']} samples")
    if "cuda_max_allocated_mib" in result:
        lines.append(f"  cuda max allocated {result['cuda_max_allocated_mib']:.1f} MiB")
    lines.append(f"  verdict: {result['verdict']} ({result['criterion']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default 5000 (200 with --quick)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU, 32x32 images, cached inputs, 200 steps (smoke test)")
    parser.add_argument("--every", type=int, default=None, help="sample memory every N steps (default steps/100)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the fit (default steps/10)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="write the result (with every sample) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.resolution, args.batch, args.images = "cpu", 32, 1, 8
    args.steps = args.steps or (200 if args.quick else 5000)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    args.every = args.every or max(1, args.steps // 100)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    result = run(args)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
