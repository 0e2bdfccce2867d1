"""Each family of loss / noise / timestep / mask / max-norm options changes the LoRA a tiny training run writes (a
flag that were ignored would leave it bit for bit the baseline's: CPU runs are deterministic), under --cache_latents
and gradient accumulation, and lands in the file's metadata under sd-scripts' ss_* name and value format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.cli import parse_args
from library.training.entry import main
from library.training.progress import Progress
from library.training.trainer import LoRATrainer
from tests.training.conftest import train_argv
from tests.training.test_graphed_step import EagerRecorder

SHARED = ("--cache_latents", "--gradient_accumulation_steps", "2", "--max_data_loader_n_workers", "0")


def _rgba_images(folder: Path, masks: Path, n: int = 4) -> None:
    """Random-colour images whose alpha is opaque on the left 5/8 only, captioned, and the same masks as images."""
    folder.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
        arr[..., 3] = 0
        arr[:, :40, 3] = 255
        Image.fromarray(arr, "RGBA").save(folder / f"{i}.png")
        Image.fromarray(arr[..., 3]).convert("RGB").save(masks / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"noise picture {i}", encoding="utf-8")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One baseline and one run per option family, trained once for every test of this module."""
    root = tmp_path_factory.mktemp("objective")
    _rgba_images(root / "img", root / "masks")
    toml = root / "d.toml"
    toml.write_text(f"[general]\nresolution = 64\nbatch_size = 2\n[[datasets]]\n[[datasets.subsets]]\n"
                    f"image_dir = '{(root / 'img').as_posix()}'\n", encoding="utf-8")
    cond = root / "cond.toml"
    cond.write_text(toml.read_text() + f"conditioning_data_dir = '{(root / 'masks').as_posix()}'\n", encoding="utf-8")
    families = {
        "baseline": (toml, ()),
        "loss": (toml, ("--loss_type", "huber", "--huber_schedule", "exponential", "--huber_c", "0.2")),
        "noise": (toml, ("--noise_offset", "0.1", "--noise_offset_random_strength", "--adaptive_noise_scale", "0.05",
                         "--multires_noise_iterations", "3", "--multires_noise_discount", "0.4",
                         "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength")),
        "timesteps": (toml, ("--min_timestep", "500", "--max_timestep", "600")),
        "weighting": (toml, ("--min_snr_gamma", "5", "--debiased_estimation_loss", "--v_pred_like_loss", "0.1")),
        "alpha_mask": (toml, ("--alpha_mask",)),
        "conditioning": (cond, ("--masked_loss",)),
        "max_norm": (toml, ("--scale_weight_norms", "0.002")),
    }
    out = {}
    logged: list[tuple[dict, dict]] = []  # (tracker logs, progress-bar fields) of the max-norm run

    def log(self, step, loss, lr_logs, postfix=None, **where):  # where: the epoch and position of the log
        logged.append((dict(lr_logs), dict(postfix or {})))

    for name, (dataset, flags) in families.items():
        folder = root / name
        with pytest.MonkeyPatch.context() as patch:
            if name == "max_norm":
                patch.setattr(Progress, "log", log)
            assert main(train_argv(dataset, folder, *SHARED, *flags, steps=3)) == 0, name
        out[name] = folder / "t.safetensors"
    out["max_norm_logs"] = logged
    return out


def _max_difference(a: Path, b: Path) -> float:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("family", ["loss", "noise", "timesteps", "weighting", "alpha_mask", "conditioning",
                                    "max_norm"])
def test_each_option_family_changes_the_trained_lora(runs, family):
    assert _max_difference(runs[family], runs["baseline"]) > 1e-6


def test_the_baseline_is_deterministic(runs, tmp_path):
    """The comparison above means something only if a repeated baseline is identical."""
    toml = runs["baseline"].parent.parent / "d.toml"
    assert main(train_argv(toml, tmp_path / "again", *SHARED, steps=3)) == 0
    assert _max_difference(tmp_path / "again" / "t.safetensors", runs["baseline"]) == 0


def test_scale_weight_norms_caps_every_module(runs):
    sd = load_file(str(runs["max_norm"]))
    for key in (k for k in sd if k.endswith(".lora_down.weight")):
        module = key[: -len(".lora_down.weight")]
        down, up = sd[key].flatten(1).double(), sd[f"{module}.lora_up.weight"].flatten(1).double()
        scale = sd[f"{module}.alpha"].double() / down.shape[0]
        assert torch.linalg.matrix_norm(up @ down * scale) <= 0.002 * (1 + 1e-4), module


def test_scale_weight_norms_logs_as_sd_scripts(runs):
    logs = runs["max_norm_logs"]
    assert len(logs) == 3  # --log_every_n_steps 1
    for tracker, bar in logs:
        assert tracker["max_norm/keys_scaled"] > 0 and 0 < tracker["norm/avg_key_norm"] <= 0.002 * (1 + 1e-4)
        assert tracker["max_norm/max_key_norm"] <= 0.002 * (1 + 1e-4)
        assert set(bar) == {"Keys Scaled", "Average key norm"}


def test_metadata_uses_sd_scripts_names_and_values(runs):
    base = _metadata(runs["baseline"])
    assert (base["ss_loss_type"], base["ss_huber_schedule"], base["ss_huber_c"], base["ss_huber_scale"]) == (
        "l2", "snr", "0.1", "1.0")
    assert base["ss_multires_noise_discount"] == "0.3" and base["ss_debiased_estimation"] == "False"
    assert base["ss_zero_terminal_snr"] == "False" and base["ss_noise_offset_random_strength"] == "False"
    assert "modelspec.timestep_range" not in base and base["ss_scale_weight_norms"] == "None"  # str(None), as sd-scripts
    loss = _metadata(runs["loss"])
    assert (loss["ss_loss_type"], loss["ss_huber_schedule"], loss["ss_huber_c"]) == ("huber", "exponential", "0.2")
    noise = _metadata(runs["noise"])
    assert (noise["ss_noise_offset"], noise["ss_adaptive_noise_scale"], noise["ss_multires_noise_iterations"],
            noise["ss_multires_noise_discount"], noise["ss_ip_noise_gamma"]) == ("0.1", "0.05", "3", "0.4", "0.1")
    assert noise["ss_noise_offset_random_strength"] == "True" and noise["ss_ip_noise_gamma_random_strength"] == "True"
    assert _metadata(runs["timesteps"])["modelspec.timestep_range"] == "500,600"
    assert _metadata(runs["weighting"])["ss_debiased_estimation"] == "True"
    assert _metadata(runs["max_norm"])["ss_scale_weight_norms"] == "0.002"


GRAPHED_OPTIONS = ("--loss_type", "huber", "--noise_offset", "0.1", "--noise_offset_random_strength",
                   "--adaptive_noise_scale", "0.05", "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength",
                   "--min_timestep", "100", "--max_timestep", "900", "--min_snr_gamma", "5",
                   "--debiased_estimation_loss", "--alpha_mask", "--scale_weight_norms", "1")


def test_the_recorded_step_takes_the_mask_and_options_as_the_eager_step_does(runs, tmp_path):
    """The --cuda_graphs body on CPU, with the recorder's eager stand-ins: masks (and their absence) travel as a
    graph input, the options' random draws are undone after the warm-ups, so the LoRA equals the eager one."""
    toml = runs["baseline"].parent.parent / "d.toml"
    for label in ("eager", "recorded"):
        trainer = LoRATrainer(parse_args(train_argv(toml, tmp_path / label, *GRAPHED_OPTIONS,
                                                    "--network_train_unet_only", steps=3)))
        trainer.setup()
        if label == "recorded":
            trainer.graphed = EagerRecorder(trainer._graph_body, trainer.trainable, trainer.device)
        trainer.train()
    assert trainer.graphed.recordings and trainer.graphed.body_runs > 3
    assert _max_difference(tmp_path / "eager" / "t.safetensors", tmp_path / "recorded" / "t.safetensors") < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="--cuda_graphs records CUDA graphs")
def test_cuda_graphs_record_the_options_and_train_the_eager_lora(runs, tmp_path):
    """Every option but the pyramid noise is recorded in the graph (no host value, no host sync): the graphed run
    draws the same noise and trains the LoRA the eager run trains."""
    toml = runs["baseline"].parent.parent / "d.toml"
    trained = {}
    for label, flags in (("eager", ()), ("graphs", ("--cuda_graphs",))):
        out = tmp_path / label
        assert main(train_argv(toml, out, *SHARED, *GRAPHED_OPTIONS, "--network_train_unet_only",
                               "--mixed_precision", "bf16", *flags, steps=6)) == 0
        trained[label] = load_file(str(out / "t.safetensors"))
    ups = sorted(k for k in trained["eager"] if "lora_up" in k)
    eager, graphs = (torch.cat([trained[r][k].float().flatten() for k in ups]) for r in ("eager", "graphs"))
    assert graphs.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(eager, graphs, dim=0) > 0.999
