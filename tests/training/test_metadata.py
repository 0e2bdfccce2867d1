"""ss_* and modelspec.* metadata against sd-scripts' value formats, built from a real dataset (no model needed)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from library.cli import parse_args
from library.training import metadata
from library.training.setup import build_dataset
from tests.training.conftest import make_images


def _facts(args, *, model_type="sd1", v=False, processes=1) -> metadata.RunFacts:
    dataset = build_dataset(args)
    return metadata.RunFacts(
        model_type=model_type, v_parameterization=v, session_id=7, started_at=1.5,
        dataset_summary=dataset.summary(), from_dataset_config=bool(args.dataset_config),
        num_batches_per_epoch=dataset.summary()["num_batches"], num_epochs=3, num_processes=processes,
        optimizer_class="torch.optim.adamw.AdamW", network_kwargs={"conv_dim": "4", "dropout": None})


@pytest.fixture
def two_datasets(tmp_path) -> Path:
    train, reg, wide = make_images(tmp_path / "cat", n=4), make_images(tmp_path / "reg", n=2), \
        make_images(tmp_path / "wide", n=3)
    toml = tmp_path / "data.toml"
    toml.write_text(
        "[general]\ncaption_extension = '.txt'\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 2\n"
        f"[[datasets.subsets]]\nimage_dir = '{train.as_posix()}'\nnum_repeats = 3\n"
        f"[[datasets.subsets]]\nimage_dir = '{reg.as_posix()}'\nis_reg = true\nclass_tokens = 'cat'\n"
        "[[datasets]]\nresolution = [96, 64]\nbatch_size = 3\nenable_bucket = true\nmin_bucket_reso = 32\n"
        "max_bucket_reso = 128\nbucket_reso_steps = 32\n"
        f"[[datasets.subsets]]\nimage_dir = '{wide.as_posix()}'\nnum_repeats = 2\nflip_aug = true\n"
        f"[[datasets.subsets]]\nimage_dir = '{train.as_posix()}'\n",
        encoding="utf-8")
    return toml


def test_dataset_config_run_records_what_each_dataset_trained(two_datasets, tmp_path):
    args = parse_args(["--dataset_config", str(two_datasets), "--output_dir", str(tmp_path / "o"),
                       "--network_args", "conv_dim=4", "--optimizer_args", "weight_decay=0.05", "betas=(0.9,0.99)",
                       "--training_comment", "hello", "--lowram"])
    md = metadata.build_metadata(args, _facts(args))
    assert "ss_resolution" not in md and "ss_batch_size_per_device" not in md  # as sd-scripts: per dataset
    datasets = json.loads(md["ss_datasets"])
    assert [d["resolution"] for d in datasets] == [[64, 64], [96, 64]]
    assert [d["batch_size_per_device"] for d in datasets] == [2, 3]
    assert [d["num_train_images"] for d in datasets] == [4 * 3, 3 * 2 + 4]  # images x repeats
    assert [d["num_reg_images"] for d in datasets] == [2, 0]
    assert datasets[0]["bucket_info"] is None and datasets[0]["is_dreambooth"] is True
    buckets = datasets[1]["bucket_info"]["buckets"]
    assert sum(b["count"] for b in buckets.values()) == 10  # every sample, repeats included
    assert all(b["resolution"][0] * b["resolution"][1] <= 96 * 64 for b in buckets.values())
    assert datasets[1]["bucket_info"]["mean_img_ar_error"] >= 0
    subsets = datasets[0]["subsets"]
    assert [(s["image_dir"], s["img_count"], s["num_repeats"], s["is_reg"]) for s in subsets] == \
        [("cat", 4, 3, False), ("reg", 2, 1, True)]
    assert subsets[1]["class_tokens"] == "cat" and datasets[1]["subsets"][0]["flip_aug"] is True
    # the same folder in two datasets becomes "cat (2)"; regularisation folders are left out, as sd-scripts
    assert json.loads(md["ss_dataset_dirs"]) == {"cat": {"n_repeats": 3, "img_count": 4}, "wide": {
        "n_repeats": 2, "img_count": 3}, "cat (2)": {"n_repeats": 1, "img_count": 4}}
    assert md["ss_num_train_images"] == str(12 + 10) and md["ss_num_reg_images"] == "2"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "dropout": None}
    assert md["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.05,betas=(0.9, 0.99))"
    assert md["ss_training_comment"] == "hello" and md["ss_lowram"] == "True"
    assert md["ss_text_encoder_lr"] == "None" and md["ss_clip_skip"] == "None"  # unset: str(None), as sd-scripts
    assert md["ss_full_fp16"] == "False" and md["ss_fp8_base"] == "False" and md["ss_v2"] == "False"
    assert md["ss_num_epochs"] == "3" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_sd_model_name"] == "builtin:tiny-sd" and "ss_sd_model_hash" not in md
    assert set(json.loads(md["ss_tag_frequency"])) == {"cat", "reg", "wide"}


def test_folder_run_records_the_single_dataset_keys(tmp_path):
    make_images(tmp_path / "data" / "3_cat", n=4)
    make_images(tmp_path / "regs" / "1_cat", n=2)
    args = parse_args(["--train_data_dir", str(tmp_path / "data"), "--reg_data_dir", str(tmp_path / "regs"),
                       "--resolution", "64", "--train_batch_size", "2", "--gradient_accumulation_steps", "3",
                       "--caption_extension", ".txt", "--output_dir", str(tmp_path / "o"), "--v2",
                       "--v_parameterization", "--flip_aug"])
    md = metadata.build_metadata(args, _facts(args, model_type="sd2", v=True, processes=2))
    assert md["ss_resolution"] == "(64, 64)" and md["ss_batch_size_per_device"] == "2"
    assert md["ss_total_batch_size"] == str(2 * 2 * 3)  # batch x processes x accumulation
    assert md["ss_dataset_dirs"] == json.dumps({"3_cat": {"n_repeats": 3, "img_count": 4}})
    assert md["ss_reg_dataset_dirs"] == json.dumps({"1_cat": {"n_repeats": 1, "img_count": 2}})
    assert md["ss_bucket_info"] == "null" and md["ss_enable_bucket"] == "False" and md["ss_flip_aug"] == "True"
    assert md["ss_num_train_images"] == "12" and "ss_datasets" not in md and "ss_network_args" not in md
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2_v"


def test_model_and_vae_files_are_named_by_basename_with_sd_scripts_hashes(tiny_dataset, tmp_path):
    model, vae = tmp_path / "m" / "base.safetensors", tmp_path / "v.safetensors"
    model.parent.mkdir()
    data = bytes(range(256)) * 4500  # past the 1 MiB offset the legacy hash reads
    model.write_bytes(data)
    vae.write_bytes(b"vae")
    args = parse_args(["--dataset_config", str(tiny_dataset), "--output_dir", str(tmp_path / "o"),
                       "--pretrained_model_name_or_path", str(model), "--vae", str(vae)])
    md = metadata.build_metadata(args, _facts(args))
    assert md["ss_sd_model_name"] == "base.safetensors" and md["ss_vae_name"] == "v.safetensors"
    assert md["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert md["ss_new_vae_hash"] == hashlib.sha256(b"vae").hexdigest()
    assert md["ss_vae_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # nothing at 1 MiB in a tiny file
    folder_args = parse_args(["--dataset_config", str(tiny_dataset), "--pretrained_model_name_or_path", str(tmp_path)])
    assert metadata.model_file_keys("sd_model", "ss_sd_model_name", folder_args.pretrained_model_name_or_path)[
        "ss_sd_model_hash"] == "IsADirectory"  # as sd-scripts' hash of a diffusers folder


def test_each_save_stamps_steps_and_epoch_and_no_metadata_keeps_the_minimum(tiny_dataset, tmp_path):
    args = parse_args(["--dataset_config", str(tiny_dataset), "--output_dir", str(tmp_path / "o")])
    md = metadata.build_metadata(args, _facts(args))
    stamped = metadata.stamp(md, steps=12, epoch=2, no_metadata=False)
    assert stamped["ss_steps"] == "12" and stamped["ss_epoch"] == "2" and float(stamped["ss_training_finished_at"]) > 0
    minimum = metadata.stamp(md, steps=12, epoch=2, no_metadata=True)
    assert set(minimum) == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                            "ss_network_alpha"}  # ss_network_args too when --network_args is given


def test_modelspec_keys_follow_sd_scripts_spec(tmp_path):
    thumb = tmp_path / "t.png"
    thumb.write_bytes(b"\x89PNG fake")
    args = parse_args(["--output_name", "cat", "--metadata_author", "me", "--metadata_tags", "a,b",
                       "--metadata_usage_hint", "say cat", "--metadata_thumbnail", str(thumb), "--clip_skip", "2",
                       "--metadata_trigger_phrase", "cat", "--metadata_license", "MIT"])
    spec = metadata.modelspec(args, model_type="sd1", v_parameterization=False, resolution=(768, 512),
                              implementation_version="loraforge/x", timestamp=1700000000.7)
    assert spec["modelspec.sai_model_spec"] == "1.0.1"
    assert spec["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert spec["modelspec.implementation"] == "diffusers" and spec["modelspec.title"] == "cat"
    assert spec["modelspec.resolution"] == "768x512" and spec["modelspec.prediction_type"] == "epsilon"
    assert spec["modelspec.encoder_layer"] == "2" and spec["modelspec.author"] == "me"
    assert spec["modelspec.tags"] == "a,b" and spec["modelspec.usage_hint"] == "say cat"
    assert spec["modelspec.trigger_phrase"] == "cat" and spec["modelspec.license"] == "MIT"
    assert spec["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    import datetime

    assert spec["modelspec.date"] == datetime.datetime.fromtimestamp(1700000000).isoformat()
    assert "modelspec.description" not in spec and "modelspec.timestep_range" not in spec  # unset: absent
    xl = metadata.modelspec(parse_args(["--metadata_title", "T"]), model_type="sdxl", v_parameterization=False,
                            resolution=(1024, 1024), implementation_version="loraforge/x")
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and xl["modelspec.title"] == "T"
    assert xl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    v = metadata.modelspec(args, model_type="sd2", v_parameterization=True, resolution=(768, 768),
                           implementation_version="loraforge/x")
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and v["modelspec.prediction_type"] == "v"


def test_dim_from_weights_records_the_files_rank_and_alpha(tiny_dataset, tmp_path):
    import safetensors.torch

    import networks.lora as lora
    from library.models.loader import load_sd_model
    from library.training.trainer import dim_from_weights_metadata

    model = load_sd_model("builtin:tiny-sd")
    source = lora.create_network(1.0, 8, 4.0, model.vae, model.text_encoders[0], model.unet)
    path = tmp_path / "start.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    args = parse_args(["--dataset_config", str(tiny_dataset), "--output_dir", str(tmp_path / "o"), "--network_weights",
                       str(path), "--dim_from_weights", "--network_dim", "32", "--network_alpha", "16"])
    network, _ = lora.create_network_from_weights(1.0, str(path), model.vae, model.text_encoders[0], model.unet)
    found = dim_from_weights_metadata(args, network)
    assert found == {"network_dim": 8, "network_alpha": 4.0}
    facts = _facts(args)
    md = metadata.build_metadata(args, metadata.RunFacts(**{**facts.__dict__, **found}))
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "4.0"  # not --network_dim 32 / alpha 16
