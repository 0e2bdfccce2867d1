"""Several processes (gloo on CPU): gradients are averaged across ranks, and a 2-process run trains end to end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from library.training.trainer import average_gradients
from tests.training.conftest import train_argv

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    a = torch.nn.Parameter(torch.zeros(3, 2))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    a.grad = torch.full((3, 2), float(rank + 1))
    b.grad = torch.arange(4, dtype=torch.float64) * (rank + 1)
    average_gradients([a, b], world)
    torch.save({"a": a.grad, "b": b.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_average_gradients_matches_the_mean_over_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["a"], torch.full((3, 2), 1.5))
        assert got["b"].dtype == torch.float64 and torch.equal(got["b"], torch.arange(4, dtype=torch.float64) * 1.5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="torchrun not installed")
def test_two_process_training_runs_with_gloo(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()),
                           str(ROOT / "train_network.py"), *train_argv(tiny_dataset, out, steps=4)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 steps, 2 per epoch" in proc.stderr  # 8 images, batch 2, split over 2 processes
    lora = load_file(str(out / "t.safetensors"))
    assert any(k.endswith("lora_up.weight") and lora[k].abs().sum() > 0 for k in lora)
