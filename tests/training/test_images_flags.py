"""The image/validation options end to end on builtin:tiny-sd: validation loss logged as sd-scripts logs it,
an --in_json fine-tuning dataset training a step, --debug_dataset printing without training, and the metadata."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from library.training import validation_loss
from library.training.entry import main
from library.training.validation_loss import LossRecorder, ValidationLoss, validation_timesteps
from tests.training.conftest import make_images, train_argv


def test_validation_timesteps_and_recorder_as_sd_scripts():
    assert validation_timesteps(1000) == [200, 400, 600, 800]
    assert validation_timesteps(1000, 100, 900) == [260, 420, 580, 740]  # linspace(100, 900, 6)[1:-1], truncated
    rec = LossRecorder()
    for step, loss in enumerate((1.0, 2.0, 3.0)):
        rec.add(epoch=0, step=step, loss=loss)
    rec.add(epoch=0, step=0, loss=6.0)  # epoch 0 appends, whatever the step
    assert rec.moving_average == pytest.approx(3.0)
    rec.add(epoch=1, step=0, loss=2.0)  # later epochs overwrite the entry at `step`
    assert rec.moving_average == pytest.approx((2 + 2 + 3 + 6) / 4)
    rec.add(epoch=1, step=5, loss=4.0)  # a new step index pads with zeros
    assert len(rec.losses) == 6 and rec.moving_average == pytest.approx((2 + 2 + 3 + 6 + 4) / 6)


def test_validation_pass_restores_the_generators_and_uses_fixed_timesteps():
    seen = []

    def loss_at(batch, t):
        seen.append((batch, t, torch.rand(()).item()))
        return torch.tensor(float(t) / 1000)

    v = ValidationLoss(3, seed=9, num_train_timesteps=1000, max_steps=2, every_n_steps=5)
    torch.manual_seed(0)
    expected_next = torch.rand(()).item()
    torch.manual_seed(0)
    logs = v.run("step", 0, ["b0", "b1", "b2"], loss_at, torch.device("cpu"))
    assert torch.rand(()).item() == expected_next  # training's stream is untouched
    assert [(b, t) for b, t, _ in seen] == [(b, t) for b in ("b0", "b1") for t in (200, 400, 600, 800)]
    torch.manual_seed(9)
    assert seen[0][2] == torch.rand(()).item()  # the pass itself runs seeded with the validation seed
    assert logs == {"loss/validation/step_average": pytest.approx(0.5),
                    "loss/validation/step_divergence": pytest.approx(0.5)}
    assert v.due_after_step(10) and not v.due_after_step(7) and v.due_after_epoch(1)


def _toml(tmp_path, extra=""):
    images = make_images(tmp_path / "images", n=8)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"[general]\nresolution = 64\nbatch_size = 2\n{extra}\n[[datasets]]\n\n[[datasets.subsets]]\n"
                    f"image_dir = '{images.as_posix()}'\ncaption_extension = '.txt'\n", encoding="utf-8")
    return toml


def test_training_logs_validation_loss_and_records_metadata(tmp_path, monkeypatch):
    logged = []
    original = validation_loss.ValidationLoss.run

    def run(self, kind, epoch, batches, loss_at, device):
        logs = original(self, kind, epoch, batches, loss_at, device)
        logged.append((kind, logs))
        return logs

    monkeypatch.setattr(validation_loss.ValidationLoss, "run", run)
    out = tmp_path / "out"
    argv = train_argv(_toml(tmp_path), out, "--validation_split", "0.25", "--validate_every_n_steps", "2",
                      "--validation_seed", "5", "--color_aug", steps=4)
    assert main(argv) == 0
    # 8 images: 6 train (3 batches of 2 a epoch), 2 held out; 4 steps = one epoch + 1 step
    kinds = [k for k, _ in logged]
    assert kinds == ["step", "epoch", "step", "epoch"]
    for _, logs in logged:
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
        assert set(logs) <= {"loss/validation/step_average", "loss/validation/step_divergence",
                             "loss/validation/epoch_average", "loss/validation/epoch_divergence"}
    with safe_open(str(out / "t.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_num_validation_images"] == "2" and md["ss_validation_split"] == "0.25"
    assert md["ss_validation_seed"] == "5" and md["ss_validate_every_n_steps"] == "2"
    subset = json.loads(md["ss_datasets"])[0]["subsets"][0]  # a --dataset_config run: per subset, as sd-scripts
    assert subset["color_aug"] is True and subset["random_crop"] is False
    assert json.loads(md["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 6}}


def test_in_json_dataset_trains_a_step(tmp_path):
    images = make_images(tmp_path / "images", n=4)
    meta = {f"img{i:02d}.png": {"caption": f"shape {i}", "tags": "circle"} for i in range(4)}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--in_json", str(tmp_path / "meta.json"),
            "--train_data_dir", str(images), "--dataset_repeats", "2", "--resolution", "64", "--output_dir", str(out),
            "--output_name", "ft", "--network_dim", "4", "--max_train_steps", "1", "--cache_latents",
            "--vae_batch_size", "3"]
    assert main(argv) == 0
    with safe_open(str(out / "ft.safetensors"), "pt") as f:
        md = f.metadata()
    assert json.loads(md["ss_dataset_dirs"]) == {"meta.json": {"n_repeats": 2, "img_count": 4}}
    assert md["ss_cache_latents"] == "True"


def test_debug_dataset_prints_samples_and_trains_nothing(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    assert main(train_argv(_toml(tmp_path), out, "--debug_dataset", "--flip_aug")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "epoch 1: 4 batches, 8 samples"
    assert len(lines) == 9 and all("bucket 64x64" in line and "caption: a " in line for line in lines[1:])
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("flags", "message"), [
    (["--vae_batch_size", "0"], "--vae_batch_size 0: must be >= 1"),
    (["--validation_split", "1"], "--validation_split 1.0: must be in [0, 1)"),
    (["--face_crop_aug_range", "4,2"], "expected 0 < MIN <= MAX"),
    (["--resize_interpolation", "sinc"], "invalid choice: 'sinc'"),
])
def test_bad_values_stop_in_one_line(tmp_path, capsys, flags, message):
    try:
        rc = main(train_argv(_toml(tmp_path), tmp_path / "out", *flags))
    except SystemExit as exc:  # argparse's own one-line usage error
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cache_latents_refuses_color_aug(tmp_path, capsys):
    assert main(train_argv(_toml(tmp_path), tmp_path / "out", "--cache_latents", "--color_aug")) == 2
    assert "latent caching cannot be used with color_aug" in capsys.readouterr().err
