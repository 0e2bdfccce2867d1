"""bench/train_step.py end to end on its tiny --quick configuration (CPU), and on CUDA where there is one."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "train_step.py"


def run_bench(tmp_path: Path, *args: str, timeout: int = 300, script: Path = SCRIPT) -> tuple[dict, str]:
    """`script --quick --json` in `tmp_path` on one CPU thread: (its JSON, its stdout); it must exit 0."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def rows_by_name(results: dict) -> dict[str, dict]:
    return {r["name"]: r for r in results["rows"]}


def assert_trained(row: dict, batch: int, flops: float) -> None:
    """A measured row: consistent figures, real gradients, weights that moved, a finite loss."""
    assert "error" not in row, row.get("error")
    assert row["ms_step"] > 0 and len(row["ms_step_windows"]) == 2
    assert row["ms_step"] == pytest.approx(statistics.median(row["ms_step_windows"]))
    assert row["images_per_s"] == pytest.approx(batch * 1000 / row["ms_step"])
    assert row["opt_ms"] > 0 and row["fwd_bwd_ms"] > 0  # medians of different sets: no ordering on a loaded CPU
    assert row["tflops"] == pytest.approx(flops / (row["ms_step"] / 1e3) / 1e12)
    assert row["grad_nonzero_frac"] >= 0.5  # every lora_up after one warm-up step (lora_down needs up != 0 first)
    assert row["params_changed_frac"] == 1.0
    assert math.isfinite(row["final_loss"])


def test_quick_cpu_run_measures_every_row_and_records_failures(tmp_path):
    have_peft = True
    try:
        import peft  # noqa: F401
    except ImportError:
        have_peft = False
    results, stdout = run_bench(tmp_path, "--device", "cpu",
                                "--optimizers", "CustomAdamW,Automagic_Sinkgd,AdamWSGG,NoSuchOptimizer")
    rows = rows_by_name(results)
    meta = results["meta"]
    batch = meta["batch"]
    flops = meta["flops_per_step"]
    assert batch == 2 and meta["latents"] == [2, 4, 16, 16] and meta["text"] == [2, 77, 32]
    # the tiny U-Net's forward is ~0.5 GFLOP at 16x16 latents; forward+backward of a frozen net is about twice that
    assert 2e8 < flops < 1e10 and "meta-device" in meta["flops_method"]
    assert meta["attention_processor"] == "AttnProcessor2_0"

    for name in ("ours_fp32", "ours_bf16"):
        assert_trained(rows[name], batch, flops)
        assert rows[name]["group"] == "b"
    assert rows["ours_fp32"]["lora_dtype"] == "fp32" and rows["ours_fp32"]["autocast"] is True
    assert rows["ours_bf16"]["lora_dtype"] == "bf16" and rows["ours_bf16"]["autocast"] is False
    for name in ("baseline_compile", "ours_fp32_compile", "ours_bf16_compile", "ours_bf16_cudagraphs"):
        assert "not measured on CPU" in rows[name]["skipped"]

    if have_peft:
        base = rows["baseline"]
        assert_trained(base, batch, flops)
        assert base["vs_baseline"] == pytest.approx(1.0)
        # peft's target list and kohya's target classes pick the same layers
        assert (base["lora_tensors"], base["lora_params"]) == (rows["ours_fp32"]["lora_tensors"],
                                                               rows["ours_fp32"]["lora_params"])
        ours = rows["ours_bf16"]
        assert ours["vs_baseline"] == pytest.approx(ours["images_per_s"] / base["images_per_s"])
        assert results["best"]["name"] in ("ours_fp32", "ours_bf16")
    else:
        assert rows["baseline"]["skipped"] == "peft is not installed"

    # (c): AdamW reference first, every named optimizer measured, an unknown name an error row (no crash)
    c_rows = [r for r in results["rows"] if r["group"] == "c"]
    assert [r["name"] for r in c_rows] == ["opt:AdamW", "opt:CustomAdamW", "opt:Automagic_Sinkgd", "opt:AdamWSGG",
                                           "opt:NoSuchOptimizer"]
    assert all(r["base"] == "ours_fp32" for r in c_rows)
    assert_trained(rows["opt:AdamW"], batch, flops)
    assert rows["opt:AdamW"]["vs_adamw_same_setup"] == pytest.approx(1.0)
    for name in ("opt:CustomAdamW", "opt:Automagic_Sinkgd", "opt:AdamWSGG"):
        row = rows[name]
        assert ("error" in row) or row["ms_step"] > 0, row
        assert name.split(":")[1] in row.get("optimizer", name)
    bad = rows["opt:NoSuchOptimizer"]
    assert "NoSuchOptimizer" in bad["error"] and "ms_step" not in bad
    assert "ERROR" in stdout and "ms/step" in stdout and "opt:NoSuchOptimizer" in stdout


def test_bad_arguments_are_refused_before_any_model_is_built(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--configs", "ours_fp32,warp_drive"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "--configs: unknown 'warp_drive'" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_cuda_run_compiles_and_captures(tmp_path):
    results, _ = run_bench(tmp_path, "--device", "cuda", "--warmup", "4",
                           "--configs", "baseline,ours_bf16,ours_bf16_compile,ours_bf16_cudagraphs",
                           "--optimizers", "CustomAdamW", timeout=900)
    rows = rows_by_name(results)
    flops = results["meta"]["flops_per_step"]
    for name in ("baseline", "ours_bf16", "ours_bf16_compile", "ours_bf16_cudagraphs", "opt:AdamW", "opt:CustomAdamW"):
        assert_trained(rows[name], 2, flops)
        assert rows[name]["grad_nonzero_frac"] == 1.0
        assert rows[name]["peak_vram_gib"] > 0
    assert rows["ours_bf16_compile"]["graph_breaks"] == 0
    assert rows["ours_bf16_cudagraphs"]["cudagraph_skips"] == 0
    assert rows["ours_bf16_compile"]["compile_s"] > 0
