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
