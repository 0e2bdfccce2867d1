"""bench/optimizer_step.py on the CPU: every row measured against the baseline, settings per row, failures as rows."""

from __future__ import annotations

import pytest

from tests.test_bench_smoke import ROOT, run_bench

SCRIPT = ROOT / "bench" / "optimizer_step.py"


@pytest.mark.slow
def test_rows_with_settings_are_built_with_them_and_a_bad_row_is_reported(tmp_path):
    results, stdout = run_bench(tmp_path, "--device", "cpu", "--rank", "1", "--optimizers",
                                "Automagic_Sinkgd:cuda_graph=True", "CustomAdamW:use_spd=False", "NoSuchOptimizer",
                                script=SCRIPT)
    rows = {r["optimizer"]: r for r in results["results"]}
    assert results["meta"]["tensors"] == 384 and rows["torch AdamW fused (baseline)"]["ms"] > 0
    assert rows["Automagic_Sinkgd:cuda_graph=True"]["ratio_to_fused_adamw"] > 0
    # SPD keeps θ₀: 4 more bytes per parameter than with it off (12)
    assert rows["CustomAdamW:use_spd=False"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.1)
    # on the CPU the ledger counts what stays allocated: the state and per-tensor values only
    assert rows["CustomAdamW:use_spd=False"]["kept_bytes_per_param"] == pytest.approx(8.0, abs=0.2)
    assert rows["CustomAdamW:use_spd=False"]["peak_bytes_per_param"] > 8.0
    assert rows["NoSuchOptimizer"]["ms"] is None and "NoSuchOptimizer" in rows["NoSuchOptimizer"]["error"]


def test_a_setting_without_a_value_is_refused(tmp_path):
    from bench.optimizer_step import parse_row

    assert parse_row("Lion:betas=(0.9, 0.99),weight_decay=0.1") == ("Lion", ["betas=(0.9, 0.99)", "weight_decay=0.1"])
    assert parse_row("AdamW") == ("AdamW", [])
    with pytest.raises(SystemExit, match="use_tam"):
        parse_row("CustomAdamW:use_tam")
