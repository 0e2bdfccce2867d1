"""The example scripts in configs/examples/ run as written: 2 steps on builtin:tiny-sd, the LoRA file appears.

Each script is run with bash from the repository root (as the docs tell users), with its variables pointed at a
tiny generated dataset and a temporary output folder. About 7 s per script on one CPU core.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "configs" / "examples"
# script -> (output name the script uses, extra variables)
TRAINING_SCRIPTS = {
    "sd15_lora.sh": ("sd15_lora", {"DIM": "4"}),
    "customadamw_preset.sh": ("customadamw", {"DIM": "4", "WD_TRANSITION": "1"}),
    "automagic.sh": ("automagic", {"DIM": "4", "WARMUP": "2"}),
    "opentome_sgg.sh": ("opentome_sgg", {"SGG_N_CLUSTERS": "3"}),
    "accelerate_multi_gpu.sh": ("multi_gpu", {"NUM_PROCESSES": "2", "PRECISION": "no"}),
}


@pytest.fixture(scope="module")
def dataset_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from library.data.synthetic import generate_shapes_dataset

    root = tmp_path_factory.mktemp("example_data")
    generate_shapes_dataset(root / "images", 8, 64, concept=True)
    toml = root / "dataset.toml"
    toml.write_text(
        "[general]\nresolution = 64\nbatch_size = 2\ncaption_extension = \".txt\"\n\n"
        f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"{(root / 'images').as_posix()}\"\n",
        encoding="utf-8",
    )
    return toml


def _run(script: str, out: Path, dataset: Path, extra: dict[str, str]) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "MODEL": "builtin:tiny-sd",
        "DATASET": str(dataset),
        "STEPS": "2",
        "OUT": str(out),
        **extra,
    }
    return subprocess.run(["bash", str(EXAMPLES / script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.parametrize("script", sorted(TRAINING_SCRIPTS))
def test_example_script_trains_a_lora(script: str, dataset_toml: Path, tmp_path: Path) -> None:
    name, extra = TRAINING_SCRIPTS[script]
    if script == "accelerate_multi_gpu.sh" and shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the accelerate CLI is not installed next to this Python")
    result = _run(script, tmp_path / "out", dataset_toml, extra)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    lora = tmp_path / "out" / f"{name}.safetensors"
    assert lora.is_file(), f"{script}: no {lora}; outputs: {sorted(p.name for p in (tmp_path / 'out').iterdir())}"
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_max_train_steps"] == "2"
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert (tmp_path / "out" / f"{name}-state").is_dir()  # every script saves state for --resume
    if script == "accelerate_multi_gpu.sh":  # really NUM_PROCESSES processes, also without a GPU
        assert "processes: 2; effective batch: 2 per process x 2 processes" in result.stderr


def test_sdxl_script_flags_parse_and_it_refuses_an_sd1_model(dataset_toml: Path, tmp_path: Path) -> None:
    """builtin:tiny-sd is SD1, so the SDXL script cannot train it; it must get past argument parsing (every flag
    in the script exists) and stop at model loading with the one-line error, exit code 2."""
    result = _run("sdxl_lora.sh", tmp_path / "out", dataset_toml, {"PRECISION": "no"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "unrecognized arguments" not in result.stderr and "usage:" not in result.stderr
    assert "error: builtin:tiny-sd: is an SD1 model" in result.stderr
    assert "select SDXL; train it with train_network.py and neither --v2 nor --sdxl" in result.stderr


def test_sdxl_script_adds_cuda_graphs_with_bf16_which_a_cpu_refuses_in_one_line(dataset_toml: Path,
                                                                               tmp_path: Path) -> None:
    result = _run("sdxl_lora.sh", tmp_path / "out", dataset_toml, {"PRECISION": "bf16"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --cuda_graphs records CUDA graphs")
