"""Several processes (gloo on CPU): gradients are averaged across ranks, and a 2-process run trains end to end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from library.training.multiprocess import GradientAverager
from library.training.trainer import LoRATrainer
from tests.training.conftest import train_argv

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, nprocs: int = 2, limit: float = 120.0) -> None:
    """mp.spawn with a deadline: a deadlocked rank fails the test instead of hanging the run."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__}: ranks still running after {limit:.0f} s")


def _init(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    a = torch.nn.Parameter(torch.zeros(3, 2))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    a.grad = torch.full((3, 2), float(rank + 1))
    b.grad = torch.arange(4, dtype=torch.float64) * (rank + 1)
    GradientAverager([a, b], world)()
    # --ddp_gradient_as_bucket_view --ddp_static_graph: gradients become views of one persistent buffer, whose
    # layout is built on the first step only
    c, d = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    averager = GradientAverager([c, d], world, gradient_as_bucket_view=True, static_graph=True)
    steps = []
    for step in range(2):
        c.grad, d.grad = torch.full((3,), float(rank + step)), torch.full((2, 2), float(10 * rank))
        averager()
        steps.append((c.grad.clone(), d.grad.clone(), c.grad.data_ptr() == averager.buffer.data_ptr(),
                      d.grad.data_ptr() == averager.buffer[3:].data_ptr()))
    torch.save({"a": a.grad, "b": b.grad, "steps": steps, "layouts": averager.layouts_built},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_average_gradients_matches_the_mean_over_ranks(tmp_path):
    _spawn(_worker, 2, _free_port(), str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["a"], torch.full((3, 2), 1.5))
        assert got["b"].dtype == torch.float64 and torch.equal(got["b"], torch.arange(4, dtype=torch.float64) * 1.5)
        for step, (c, d, c_is_view, d_is_view) in enumerate(got["steps"]):
            assert torch.equal(c, torch.full((3,), 0.5 + step)) and torch.equal(d, torch.full((2, 2), 5.0))
            assert c_is_view and d_is_view
        assert got["layouts"] == 1


def _health_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    trainer = LoRATrainer.__new__(LoRATrainer)  # only the fields the decision reads
    trainer.world = world
    # rank 0's loss went NaN, rank 1 alone received SIGTERM
    trainer.stop_signal = "SIGTERM" if rank == 1 else None
    loss = torch.tensor(float("nan") if rank == 0 else 1.0)
    finite, stop = trainer._agree_on_health(loss)
    torch.save({"finite": finite, "stop": stop, "signal": trainer.stop_signal}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_takes_the_same_stop_and_divergence_decision(tmp_path):
    """One rank saving alone would wait in the save's barrier while the other waits in the next all-reduce."""
    _spawn(_health_worker, 2, _free_port(), str(tmp_path))
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [(g["finite"], g["stop"]) for g in got] == [(False, True), (False, True)]
    assert got[1]["signal"] == "SIGTERM" and got[0]["signal"] == "a signal to another process"


# objective options that draw per process or change the weights after each step (the ranks must stay in step)
OBJECTIVE = ("--loss_type", "smooth_l1", "--noise_offset", "0.05", "--multires_noise_iterations", "2",
             "--debiased_estimation_loss", "--scale_weight_norms", "0.01")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="torchrun not installed")
def test_two_process_training_runs_with_gloo(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    # no ACCELERATE_USE_CPU: on a machine without CUDA the trainer itself joins the ranks through gloo
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # its own session, so a timeout kills torchrun's ranks too (they hold the pipes; killing torchrun alone
    # would leave them running)
    proc = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()),
                             str(ROOT / "train_network.py"), *train_argv(tiny_dataset, out, "--ddp_timeout", "2", *OBJECTIVE, steps=4)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"2-process training still running after 240 s:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert "4 steps, 2 per epoch" in stderr  # 8 images, batch 2, split over 2 processes
    assert "processes: 2; effective batch: 2 per process x 2 processes x 1 accumulation steps" in stderr
    lora = load_file(str(out / "t.safetensors"))
    assert any(k.endswith("lora_up.weight") and lora[k].abs().sum() > 0 for k in lora)
