"""bench/long_run_memory.py: the real trainer runs to the end while memory is sampled, and the report's numbers
follow from those samples (fit, first/last/max, verdict against the stated criterion)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "long_run_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("long_run_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *args: str, timeout: int = 170) -> tuple[dict, str]:
    out = tmp_path / "long_run.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _check_report(result: dict, key: str, stdout: str) -> None:
    kept = [s for s in result["samples"] if s["step"] > result["warmup_steps"]]
    values = [s[key] for s in kept]
    summary = result[key.removesuffix("_mib")]
    slope = np.polyfit([s["step"] for s in kept], values, 1)[0] * 1000
    assert summary["samples"] == len(kept) >= 50
    assert summary["slope_mib_per_1k_steps"] == pytest.approx(slope, rel=1e-9, abs=1e-9)
    assert (summary["first_mib"], summary["last_mib"], summary["max_mib"]) == (values[0], values[-1], max(values))
    assert summary["flat"] == (abs(slope) < 1.0)
    assert f"slope {slope:+.3f} MiB/1k steps" in stdout


def test_quick_run_trains_every_step_and_reports_what_it_sampled(tmp_path):
    result, stdout = _run(tmp_path, "--quick")
    assert result["steps"] == 200 and result["device"] == "cpu" and result["quick"]
    steps = [s["step"] for s in result["samples"]]
    assert steps[0] == 0 and 190 <= steps[-1] < 200 and steps == sorted(steps)
    assert all(s["rss_mib"] > 50 for s in result["samples"])  # torch alone is more than this
    _check_report(result, "rss_mib", stdout)
    assert result["verdict"] == ("flat" if result["rss"]["flat"] else "growing")
    assert f"verdict: {result['verdict']}" in stdout and "1.0 MiB per 1000 steps" in stdout


def test_slope_and_verdict_follow_the_criterion():
    bench = _bench()
    steps = list(range(0, 5001, 50))
    leak = [{"step": s, "rss_mib": 500 + 0.004 * s} for s in steps]  # 4 MiB per 1000 steps
    flat = [{"step": s, "rss_mib": 500 + (0.3 if s % 100 else -0.3)} for s in steps]  # noise, no trend
    growing = bench.summarise(leak, "rss_mib", warmup=500)
    assert growing["slope_mib_per_1k_steps"] == pytest.approx(4.0) and not growing["flat"]
    assert growing["samples"] == len([s for s in steps if s > 500]) and growing["first_mib"] == pytest.approx(502.2)
    steady = bench.summarise(flat, "rss_mib", warmup=500)
    assert abs(steady["slope_mib_per_1k_steps"]) < 0.05 and steady["flat"]
    assert math.isnan(bench.slope_per_1k([1], [1.0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_also_reports_allocated_memory(tmp_path):
    result, stdout = _run(tmp_path, "--device", "cuda", "--steps", "500", timeout=300)
    assert result["steps"] == 500 and result["device"].startswith("cuda")
    _check_report(result, "cuda_allocated_mib", stdout)
    assert result["cuda_max_allocated_mib"] >= result["cuda_allocated"]["max_mib"]
