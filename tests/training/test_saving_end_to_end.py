"""Real tiny runs: sd-scripts' checkpoint names and removals, file formats, metadata of the saved files, the
start step, and the model options inside a training run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from library.cli import parse_args
from library.training.entry import main
from library.training.trainer import LoRATrainer
from tests.training.conftest import make_images, train_argv


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.slow
def test_step_checkpoints_keep_the_last_n_steps_and_record_what_was_trained(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    assert main(train_argv(tiny_dataset, out, "--save_every_n_steps", "1", "--save_last_n_steps", "1", "--save_state",
                           "--save_last_n_steps_state", "1", "--training_comment", "first try", "--metadata_title",
                           "Cat", "--lowram", "--network_args", "conv_dim=2", steps=4)) == 0
    # steps 1..4 saved (the last step too, as sd-scripts); each save retires the one older than the last step
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(("_loss.png", "_loss.csv", "logs"))) == [
        "t-state", "t-step00000003-state", "t-step00000003.safetensors", "t-step00000004-state",
        "t-step00000004.safetensors", "t.safetensors"]
    md = _metadata(out / "t.safetensors")
    assert md["ss_steps"] == "4" and md["ss_epoch"] == md["ss_num_epochs"] == "1"
    assert md["ss_training_comment"] == "first try" and md["modelspec.title"] == "Cat" and md["ss_lowram"] == "True"
    (dataset,) = json.loads(md["ss_datasets"])
    assert dataset["resolution"] == [64, 64] and dataset["batch_size_per_device"] == 2  # not the CLI defaults
    assert md["modelspec.resolution"] == "64x64" and md["ss_num_train_images"] == "8"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "dropout": None}
    step = _metadata(out / "t-step00000003.safetensors")
    assert step["ss_steps"] == "3" and step["ss_epoch"] == "1"
    with open(out / "t.safetensors", "rb") as f:  # sshs_model_hash: sha256 of the tensor bytes after the header
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        assert md["sshs_model_hash"] == __import__("hashlib").sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_ckpt_epoch_files_with_save_n_epoch_ratio_and_the_state_at_the_end_only(tmp_path):
    make_images(tmp_path / "data" / "1_cat", n=4)
    out = tmp_path / "out"
    argv = ["--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--train_batch_size", "2",
            "--caption_extension", ".txt", "--output_dir", str(out), "--output_name", "t", "--network_dim", "2",
            "--max_train_epochs", "4", "--save_n_epoch_ratio", "4", "--save_last_n_epochs", "1",
            "--save_model_as", "ckpt", "--save_state_on_train_end", "--seed", "1"]
    assert main(argv) == 0
    # ratio 4 of 4 epochs: a file every epoch (1, 2, 3); keep the last one; the state only at the end
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(("_loss.png", "_loss.csv", "logs"))) == [
        "t-000003.ckpt", "t-state", "t.ckpt"]
    state = torch.load(out / "t.ckpt", weights_only=True)  # sd-scripts' ckpt LoRA: torch.save of the tensors
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_initial_epoch_without_skip_only_starts_the_epoch_count_later(tiny_dataset, tmp_path):
    plain = LoRATrainer(parse_args(train_argv(tiny_dataset, tmp_path / "o2", "--initial_epoch", "2", steps=9)))
    plain.setup()  # without --skip_until_initial_step no data is skipped and the step count starts at 0
    assert (plain.progress.global_step, plain.progress.epoch, plain.progress.batches_done_in_epoch) == (0, 1, 0)


@pytest.mark.slow
def test_initial_step_skip_and_model_options_in_a_run(tiny_dataset, tmp_path, monkeypatch):
    offloads = []
    real = torch.autograd.graph.save_on_cpu

    def recording(*args, **kwargs):
        offloads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", recording)
    out = tmp_path / "out"
    argv = train_argv(tiny_dataset, out, "--initial_step", "3", "--skip_until_initial_step", "--mixed_precision",
                      "bf16", "--fp8_base_unet", "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only",
                      "--gradient_checkpointing", "--cpu_offload_checkpointing", "--no_metadata", steps=5)
    trainer = LoRATrainer(parse_args(argv))
    trainer.setup()
    # 4 batches of 2 per epoch: step 3 is 3 batches into the first epoch, drawn and discarded
    assert (trainer.progress.global_step, trainer.progress.epoch, trainer.progress.batches_done_in_epoch) == (3, 0, 3)
    assert any(p.dtype == torch.float8_e4m3fn for p in trainer.model.unet.parameters())
    assert sorted(p.name for p in (tmp_path / "images").glob("*_te_outputs.npz"))[:1] == ["img00_te_outputs.npz"]
    trainer.train()
    assert trainer.progress.global_step == 5 and trainer.lr_scheduler.last_epoch == 2  # two steps trained
    assert offloads  # the U-Net's saved activations went through save_on_cpu
    md = _metadata(out / "t.safetensors")
    assert {k for k in md if k.startswith("ss_")} == {"ss_v2", "ss_base_model_version", "ss_network_module",
                                                      "ss_network_dim", "ss_network_alpha"}
    assert md["modelspec.sai_model_spec"] == "1.0.1" and "sshs_model_hash" in md
