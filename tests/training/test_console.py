"""What a user sees on the console: our first line before the heavy libraries load, and no third-party noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.training.conftest import train_argv

ROOT = Path(__file__).resolve().parents[2]

# Runs the real entry point; the handler notes, at the run's first log record, whether torch / diffusers had
# already been imported, then lets the record through to the console as usual.
_PROBE = """
import json, logging, sys
from library.training.entry import main
seen = []
class Probe(logging.Handler):
    def emit(self, record):
        if not seen:
            seen.append({"message": record.getMessage(), "torch": "torch" in sys.modules,
                         "diffusers": "diffusers" in sys.modules})
logging.getLogger("loraforge").addHandler(Probe())
code = main(json.loads(sys.argv[1]))
open(sys.argv[2], "w").write(json.dumps(seen[0]))
sys.exit(code)
"""

# Lines that libraries print on import or first use, and that mean nothing to a user (see library/quiet.py)
_NOISE = ("gemm_4bit_forward", "Failed to load", "Detected no triton", "register_constant", "Unable to import `torchao`",
          "FutureWarning", "deprecate(",
          "kept in float32", "requires torchvision", "_pytree")


def test_first_line_comes_before_heavy_imports_and_no_library_noise(tiny_dataset, tmp_path):
    first = tmp_path / "first.json"
    prompts = tmp_path / "prompts.txt"  # sampling too: diffusers' pipeline warns there
    prompts.write_text("a red circle --w 64 --h 64 --s 2\n", encoding="utf-8")
    argv = train_argv(tiny_dataset, tmp_path / "out", "--network_train_unet_only", "--sample_prompts", str(prompts),
                      "--sample_every_n_steps", "2", steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFUSERS_VERBOSITY", None)
    env.pop("TRANSFORMERS_VERBOSITY", None)
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv), str(first)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(first.read_text())
    assert record["message"].startswith("loraforge: a networks.lora LoRA on builtin:tiny-sd")
    assert not record["torch"] and not record["diffusers"]
    console = run.stdout + run.stderr
    assert console.lstrip().startswith("INFO loraforge: a networks.lora LoRA"), console[:500]
    noisy = [line for line in console.splitlines() if any(n in line for n in _NOISE)]
    assert not noisy, noisy
    lora_lines = [line for line in console.splitlines() if "LoRA: " in line]  # once, counting what trains
    assert lora_lines == ["INFO LoRA: 0 text encoder modules, 84 U-Net modules"], lora_lines


def test_mixed_precision_on_a_cpu_is_named_as_the_slow_choice(tiny_dataset, tmp_path):
    # its own process: accelerate keeps one precision per process
    argv = train_argv(tiny_dataset, tmp_path / "out", "--mixed_precision", "bf16", steps=1)
    run = subprocess.run([sys.executable, str(ROOT / "train_network.py"), *argv], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--mixed_precision bf16 on a CPU runs several times slower than fp32" in run.stderr
