"""bench/sdxl_step.py end to end on its toy --quick SDXL-shaped U-Net (CPU), and on CUDA where there is one."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import test_bench_smoke as smoke
from tests.test_bench_smoke import rows_by_name

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sdxl_step.py"


def run_bench(tmp_path: Path, *args: str, timeout: int = 300) -> tuple[dict, str]:
    return smoke.run_bench(tmp_path, *args, timeout=timeout, script=SCRIPT)


def assert_trained(row: dict) -> None:
    assert "error" not in row, row.get("error")
    assert row["ms_step"] > 0 and row["ms_step"] == pytest.approx(statistics.median(row["ms_step_windows"]))
    assert row["grad_nonzero_frac"] >= 0.5  # every zero-initialised factor got a gradient on the last warm-up step
    assert row["params_changed_frac"] == 1.0 and math.isfinite(row["final_loss"])
    assert row["gradient_checkpointing"] is True


def test_quick_cpu_run_trains_every_row(tmp_path):
    results, stdout = run_bench(tmp_path, "--device", "cpu",
                                "--configs", "baseline,ours_fp32,ours_bf16,ours_bf16_compile,lowvram")
    rows = rows_by_name(results)
    meta = results["meta"]
    assert meta["unet"] == "quick" and meta["latents"] == [1, 4, 16, 16] and meta["text"] == [1, 77, 64]
    assert meta["added_cond"] == {"text_embeds": [1, 32], "time_ids": [1, 6]}
    assert meta["text_encoders_on_device"] is False and meta["flops_per_step"] > 1e7

    for name in ("baseline", "ours_fp32", "ours_bf16", "lowvram"):
        assert_trained(rows[name])
        assert rows[name]["tflops"] == pytest.approx(meta["flops_per_step"] / (rows[name]["ms_step"] / 1e3) / 1e12)
    base = rows["baseline"]
    assert base["lora"] == "peft" and base["vs_baseline"] == pytest.approx(1.0)
    # peft's target list and kohya's target classes pick the same layers of an SDXL-shaped U-Net
    for name in ("ours_fp32", "ours_bf16", "lowvram"):
        assert (rows[name]["lora_tensors"], rows[name]["lora_params"]) == (base["lora_tensors"], base["lora_params"])
        assert rows[name]["vs_baseline"] == pytest.approx(base["ms_step"] / rows[name]["ms_step"])
    assert rows["ours_bf16"]["lora_dtype"] == "bf16" and rows["ours_fp32"]["autocast"] is True
    assert "AdamW8bit" in rows["lowvram"]["optimizer"] and rows["lowvram"]["group"] == "lv"
    assert "not measured on CPU" in rows["ours_bf16_compile"]["skipped"]
    assert results["best"] in ("ours_fp32", "ours_bf16")
    assert "LoRA tensors per row" in stdout and "s/step" in stdout


def test_unknown_row_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--configs", "baseline,warp_drive"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--configs: unknown 'warp_drive'" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_cuda_run_reports_memory_and_targets(tmp_path):
    results, _ = run_bench(tmp_path, "--device", "cuda", "--warmup", "3",
                           "--configs", "baseline,ours_bf16,ours_bf16_compile,lowvram", timeout=900)
    rows = rows_by_name(results)
    for name in ("baseline", "ours_bf16", "ours_bf16_compile", "lowvram"):
        assert_trained(rows[name])
        assert 0 < rows[name]["peak_vram_gib"] <= rows[name]["peak_reserved_gib"]
        assert rows[name]["vram_vs_baseline"] > 0
    assert rows["ours_bf16_compile"]["graph_breaks"] == 0
    assert results["low_vram_target"]["met"] is True  # a toy model is far below 8 GiB
    assert set(results["speed_target"]) >= {"speedup", "met", "best_within_baseline_memory"}
