"""Saves are atomic and interruptions save: tested with real processes killed mid-save and real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.training.conftest import train_argv

ROOT = Path(__file__).resolve().parents[2]


def test_kill_9_during_a_save_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "lora.safetensors"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from library.training.atomic import atomic_file
        target = Path({str(target)!r})
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"good previous file")
        with atomic_file(target) as tmp:
            with open(tmp, "wb") as f:
                for _ in range(1000):
                    f.write(b"x" * 65536); f.flush()
                    print("writing", flush=True)
                    time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(5):
        assert proc.stdout.readline().startswith("writing")
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"good previous file"


@pytest.mark.slow
def test_sigint_saves_lora_and_state_then_says_how_to_resume(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(tiny_dataset, out, "--save_state", steps=100000)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_network.py"), *argv], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    for line in proc.stderr:
        if line.startswith("INFO training:") or time.time() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, rest
    assert "--resume" in rest and str(out / "t-state") in rest
    assert (out / "t.safetensors").stat().st_size > 0
    assert (out / "t-state").is_dir()
    assert (out / "t_loss.png").stat().st_size > 0  # the plot is written on Ctrl-C too


def test_training_in_process_gives_the_callers_signal_handlers_back(tiny_dataset, tmp_path):
    """Ctrl-C means "save" only while training: afterwards SIGTERM must again do what the caller set up."""
    from library.training.entry import main

    def callers(signum, frame):
        pass

    before = {sig: signal.signal(sig, callers) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(train_argv(tiny_dataset, tmp_path / "out", steps=1)) == 0
        assert signal.getsignal(signal.SIGINT) is callers and signal.getsignal(signal.SIGTERM) is callers
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------------- full disk
def _run_python(script: str, *, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    prelude = f"import sys, resource, signal\nsys.path.insert(0, {str(ROOT)!r})\n" \
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past RLIMIT_FSIZE fail with EFBIG instead\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _error_line(stderr: str) -> str:
    """The one `error:` line (the progress bar, left open by the failed step, may precede it on its line)."""
    lines = [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if ".tmp" in p.name or ".old-" in p.name)


def test_file_size_limit_during_a_replace_keeps_the_previous_file_and_folder(tmp_path):
    """Real EFBIG from the kernel through both writers the trainer uses (safetensors and torch.save)."""
    proc = _run_python(f"""
        import torch, safetensors.torch
        from pathlib import Path
        from library.errors import ConfigError
        from library.training.atomic import atomic_dir, atomic_file
        out = Path({str(tmp_path)!r})
        with atomic_file(out / "lora.safetensors") as tmp:
            safetensors.torch.save_file({{"w": torch.ones(100)}}, str(tmp))
        with atomic_dir(out / "state") as tmp:
            torch.save({{"m": torch.ones(100)}}, tmp / "optimizer.bin")
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, resource.RLIM_INFINITY))
        for write in (lambda tmp: safetensors.torch.save_file({{"w": torch.zeros(50_000)}}, str(tmp)),
                      lambda tmp: torch.save({{"w": torch.zeros(50_000)}}, tmp)):
            try:
                with atomic_file(out / "lora.safetensors") as tmp:
                    write(tmp)
            except ConfigError as exc:
                print(exc)
        try:
            with atomic_dir(out / "state") as tmp:
                torch.save({{"m": torch.zeros(50_000)}}, tmp / "optimizer.bin")
        except ConfigError as exc:
            print(exc)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = proc.stdout.splitlines()
    assert len(messages) == 3, proc.stdout
    for message, name in zip(messages, ("lora.safetensors", "lora.safetensors", "state"), strict=True):
        assert f"could not write {tmp_path / name}: File too large" in message
        assert "previous" in message and "unchanged" in message and "ulimit -f" in message
    import torch
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "lora.safetensors")["w"], torch.ones(100))
    assert torch.equal(torch.load(tmp_path / "state" / "optimizer.bin")["m"], torch.ones(100))
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_disk_filling_up_between_checkpoints_stops_naming_the_file_and_keeps_the_last_ones(tiny_dataset, tmp_path):
    """The trainer's real save path; the hook only decides when the "disk" fills: after the first checkpoint
    (LoRA + state) the file-size limit drops to half a LoRA file, so the next save gets EFBIG from the kernel."""
    out = tmp_path / "out"
    argv = train_argv(tiny_dataset, out, "--save_every_n_steps", "1", "--save_state", steps=4)
    proc = _run_python(f"""
        from library.training import trainer
        from library.training.entry import main
        real_save = trainer.LoRATrainer.save
        def save_then_fill_the_disk(self, name, **kwargs):
            path = real_save(self, name, **kwargs)
            resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size // 2, resource.RLIM_INFINITY))
            return path
        trainer.LoRATrainer.save = save_then_fill_the_disk
        sys.exit(main({argv!r}))
    """)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _error_line(proc.stderr)
    assert f"could not write {out / 't-step00000002.safetensors'}: File too large" in line, line
    assert "no partial file is left; raise the file size limit (ulimit -f) or pick another --output_dir" in line
    from safetensors.torch import load_file

    first = load_file(out / "t-step00000001.safetensors")
    assert any(k.endswith(".lora_down.weight") for k in first)
    # the state folder of that save is still whole: its network is the step-1 LoRA
    from library.training import state_io

    state = out / "t-step00000001-state"
    parts = state_io.read_state(state, state_io.read_manifest(state))
    network = parts["network"]
    assert network.keys() == first.keys() and all(torch.equal(network[k], first[k]) for k in first)
    assert parts["progress"]["global_step"] == 1
    saved = sorted(p.name for p in out.iterdir() if "_loss." not in p.name)  # the loss record/plot are not saves
    assert saved == ["t-step00000001-state", "t-step00000001.safetensors"]
    assert _leftovers(out) == []


# ------------------------------------------------------------------------------------------------- free space
def test_free_space_estimate_covers_what_a_real_run_writes(tiny_dataset, tmp_path, monkeypatch):
    """Run for real, then compare both estimates (before the model loads, and from the built network) with what
    was written: never below it, over only by the per-file allowance for headers and metadata."""
    from library.training import validate
    from library.training.entry import main

    out = tmp_path / "out"
    estimates = []  # the trainer checks twice: before the model loads, and once the network is built
    monkeypatch.setattr(validate, "check_free_space", lambda output_dir, estimate: estimates.append(estimate))
    assert main(train_argv(tiny_dataset, out, "--save_every_n_steps", "2", "--save_state", steps=5)) == 0
    loras = sorted(out.glob("*.safetensors"))
    assert [p.name for p in loras] == ["t-step00000002.safetensors", "t-step00000004.safetensors", "t.safetensors"]
    state = sum(f.stat().st_size for f in (out / "t-step00000002-state").rglob("*") if f.is_file())
    assert len(estimates) == 2
    for estimate in estimates:
        assert estimate.lora_files == 3 and estimate.state_copies == 3  # t-step2-state, t-step4-state, t-state
        assert max(p.stat().st_size for p in loras) <= estimate.lora_bytes <= loras[0].stat().st_size + (1 << 20)
        assert state <= estimate.state_bytes <= state + (1 << 20)


@pytest.mark.parametrize(("flags", "steps_per_epoch", "start_step", "files"), [
    ({"max_train_steps": 100, "save_every_n_steps": 10}, None, 0, 11),  # steps 10..100 and the final file
    ({"max_train_steps": 100, "save_every_n_steps": 10}, None, 45, 7),  # resumed at 45: 50..100 and the final
    ({"max_train_epochs": 4, "save_every_n_epochs": 1}, 10, 0, 4),  # after epochs 1, 2, 3 and the final
    ({"max_train_epochs": 4, "save_every_n_epochs": 2}, None, 0, 2),  # epochs are known before batching
    ({"max_train_epochs": 4, "save_every_n_steps": 5}, None, 0, 1),  # steps are not: a lower bound
    ({"max_train_epochs": 4, "save_every_n_steps": 5}, 10, 0, 9),  # 5, 10, ..., 40 and the final
])
def test_planned_lora_files_match_the_trainers_save_points(flags, steps_per_epoch, start_step, files):
    import argparse

    from library.training.validate import planned_lora_files

    args = argparse.Namespace(**{"max_train_steps": 1600, "max_train_epochs": None, "save_every_n_steps": None,
                                 "save_every_n_epochs": None, **flags})
    assert planned_lora_files(args, steps_per_epoch, start_step) == files
