"""The project installs as a package: a wheel carries the code and the bundled model, and the docs' Python
snippet runs from any folder once it is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from library.training.entry import main
from tests.training.conftest import train_argv

ROOT = Path(__file__).resolve().parents[2]


def _quickstart_snippet() -> str:
    """The tiny-sd snippet of docs/quickstart.md, as a user would paste it."""
    page = (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    return next(b for b in blocks if "builtin:tiny-sd" in b)


def test_wheel_installs_and_the_docs_snippet_runs_outside_the_repository(tiny_dataset, tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("loraforge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("library/models/weights/tiny-sd.safetensors", "library/models/tokenizer/clip/vocab.json",
                   "library/models/configs/sdxl-base/unet/config.json", "networks/lora.py",
                   "library/training/entry.py"):
        assert needed in names

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=240)
    assert install.returncode == 0, install.stderr[-2000:]

    user = tmp_path / "elsewhere"
    assert main(train_argv(tiny_dataset, user / "out" / "demo", "--output_name", "demo", steps=2)) == 0
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _quickstart_snippet()], cwd=user, env=env, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (user / "demo_lora.png").stat().st_size > 0
