"""bench/optimizers_lora.py on its --quick CPU plan (one subprocess run), plus its pure helpers and the classifier."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import optimizers_lora as bench  # noqa: E402
from bench import shape_classifier as sc  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str]:
    """One --quick run with Lion, an unknown name (must become an error row) and AdamW (which must run first)."""
    tmp = tmp_path_factory.mktemp("optimizers_lora")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "bench" / "optimizers_lora.py"), "--device", "cpu", "--quick",
           "--optimizers", "Lion,NoSuchOptimizer,AdamW", "--workdir", str(tmp / "work"),
           "--json", str(tmp / "out.json"), "--markdown", str(tmp / "out.md")]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text()), (tmp / "out.md").read_text()


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_run_rows_have_finite_measurements(quick_run):
    result, table = quick_run
    rows = {r["optimizer"]: r for r in result["rows"]}
    assert [r["optimizer"] for r in result["rows"]] == ["AdamW", "Lion", "NoSuchOptimizer"]  # AdamW first
    steps = result["meta"]["steps"]
    for name in ("AdamW", "Lion"):
        r = rows[name]
        assert r["error"] is None, r.get("traceback")
        assert [s for s, _ in r["eval_curve"]] == [0, 2, 4] and r["steps_done"] == steps
        assert all(finite(loss) and loss > 0 for _, loss in r["eval_curve"])
        assert r["final_eval_loss"] == r["eval_curve"][-1][1]
        for key in ("heart_frac", "color_acc", "bg_acc", "all_acc"):
            assert 0.0 <= r[key] <= 1.0
        assert finite(r["ms_step"]) and finite(r["opt_ms"]) and 0 < r["opt_ms"] < r["ms_step"]
        assert r["trainable_params"] > 0 and r["lr"] == bench.default_lr(name)
        assert "--optimizer_type" in r["argv"] and r["argv"][r["argv"].index("--optimizer_type") + 1] == name
        assert f"| {name} |" in table
    # every run starts from the same base model: the step-0 eval is the same number
    assert rows["AdamW"]["eval_curve"][0] == rows["Lion"]["eval_curve"][0]
    # the reference trains: its held-out loss falls, and it reaches its own half-way loss at half way
    adamw = rows["AdamW"]
    assert adamw["eval_curve"][-1][1] < adamw["eval_curve"][0][1]
    assert result["summary"]["target_loss"] == adamw["eval_curve"][1][1]
    assert adamw["steps_to_target"] == steps // 2 and adamw["convergence_vs_ref"] == 1.0
    # two fp32 moments per parameter (+ one step counter per tensor): 8 bytes and a little
    assert 8.0 <= adamw["state_bytes_per_param"] < 8.1
    # Lion keeps one fp32 momentum
    assert 4.0 <= rows["Lion"]["state_bytes_per_param"] < 4.1


def test_failing_optimizer_is_an_error_row_and_the_others_run(quick_run):
    result, table = quick_run
    bad = next(r for r in result["rows"] if r["optimizer"] == "NoSuchOptimizer")
    assert "NoSuchOptimizer" in bad["error"]
    assert "heart_frac" not in bad
    assert "| NoSuchOptimizer |" in table and sum(r["error"] is None for r in result["rows"]) == 2


def test_quick_classifier_is_above_chance_on_its_held_out_split(quick_run):
    acc = quick_run[0]["meta"]["classifier_heldout"]
    chance = 1 / len(sc.SHAPE_CLASSES)
    assert acc["shape_acc"] > chance + 0.05, acc
    assert acc["bg_acc"] > 1 / len(sc.COLOR_CLASSES) + 0.05, acc


def test_parse_caption_reads_the_generator_captions(tmp_path):
    from library.data.synthetic import generate_shapes_dataset

    for concept in (False, True):
        for path in generate_shapes_dataset(tmp_path / str(concept), 12, 16, seed=3, concept=concept):
            caption = path.with_suffix(".txt").read_text(encoding="utf-8")
            shape, color, bg = sc.parse_caption(caption)
            assert (shape == "heart") == concept and color != bg
            assert color in caption.split(" on ")[0] and f"{bg} background" in caption
    assert sc.parse_caption("a red striped circle on a blue background, small, top left") == ("circle", "red", "blue")
    assert sc.parse_caption("an orange zkw on a gray background") == ("heart", "orange", "gray")
    with pytest.raises(ValueError, match="caption"):
        sc.parse_caption("a photo of a cat")


def test_classifier_save_load_round_trip_and_class_check(tmp_path):
    torch.manual_seed(0)
    model = sc.ShapeClassifier(32).eval()
    x = torch.rand(3, 3, 32, 32)
    sc.save(model, tmp_path / "c.safetensors")
    loaded = sc.load(tmp_path / "c.safetensors")
    with torch.no_grad():
        for head, logits in model(x).items():
            assert torch.equal(logits, loaded(x)[head])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "bad.safetensors"),
              metadata={"size": "32", "shapes": "circle,heart", "colors": "red"})
    with pytest.raises(ValueError, match="do not match"):
        sc.load(tmp_path / "bad.safetensors")


def test_score_counts_matches_per_head():
    torch.manual_seed(0)
    model = sc.ShapeClassifier(16).eval()
    images = torch.rand(5, 3, 16, 16)
    pred = sc.predict(model, images)
    wrong_bg = ["red" if c != "red" else "blue" for c in pred["bg"]]
    s = sc.score(model, images, pred["shape"], pred["color"], wrong_bg)
    assert s == {"shape_acc": 1.0, "color_acc": 1.0, "bg_acc": 0.0, "all_acc": 0.0}
    s = sc.score(model, images, pred["shape"][0], pred["color"], pred["bg"])  # one name for every image
    assert s["shape_acc"] == pred["shape"].count(pred["shape"][0]) / 5


def test_target_and_steps_to_target():
    rows = [
        {"optimizer": "Lion", "lr": 1e-4, "error": None, "eval_curve": [[0, 1.0], [10, 0.7], [20, 0.5], [30, 0.4]]},
        {"optimizer": "AdamW", "lr": 1e-3, "error": None, "eval_curve": [[0, 1.0], [10, 0.8], [20, 0.6], [30, 0.55]]},
        {"optimizer": "Slow", "lr": 1e-3, "error": None, "eval_curve": [[0, 1.0], [10, 0.9], [20, 0.9], [30, 0.85]]},
        {"optimizer": "Broken", "lr": 1e-3, "error": "boom"},
    ]
    summary = bench.summarise(rows, 40)
    assert summary["reference"] == "AdamW lr=0.001" and summary["target_loss"] == 0.6  # AdamW at step 20 of 40
    by = {r["optimizer"]: r for r in rows}
    assert by["AdamW"]["steps_to_target"] == 20 and by["AdamW"]["convergence_vs_ref"] == 1.0
    assert by["Lion"]["steps_to_target"] == 20  # 0.5 at step 20 (0.7 at 10 misses 0.6)
    assert by["Slow"]["steps_to_target"] is None and by["Slow"]["convergence_vs_ref"] is None
    assert by["Lion"]["final_eval_loss_vs_ref"] == pytest.approx(0.4 / 0.55)
    assert by["Broken"]["steps_to_target"] is None and by["Broken"]["final_eval_loss"] is None


def test_sample_prompts_are_fixed_and_use_two_colours():
    a, b = bench.sample_prompts(10, 0), bench.sample_prompts(10, 0)
    assert a == b and len(a) == 10
    for prompt, color, bg in a:
        assert color != bg and prompt.endswith(f" {color} zkw on {'an' if bg == 'orange' else 'a'} {bg} background")
        assert sc.parse_caption(prompt) == ("heart", color, bg)  # the generator's caption form
