"""resize_lora.py, svd_merge_lora.py, extract_lora_from_models.py, check_lora_weights.py through their command
lines: the numbers their definitions give, sd-scripts' metadata, files diffusers loads."""

from __future__ import annotations

import pytest
import safetensors
import torch

from library.tools.lora_files import read_lora
from library.tools.sdxl_names import to_diffusers_names
from networks import (
    check_lora_weights,
    extract_lora_from_models,
    merge_lora,
    resize_lora,
    sdxl_merge_lora,
    svd_merge_lora,
)
from networks.files import safetensors_hashes
from tests.networks.test_lora_diffusers import sd_pipeline
from tests.tools.helpers import load, lora_file, outputs_with_lora, single_file
from tests.tools.test_lora_math import truncation


def dense(w) -> torch.Tensor:
    up = w.up.reshape(w.up.shape[0], w.rank).double()
    return w.scale * torch.einsum("or,r...->o...", up, w.down.double())


def metadata(path) -> dict:
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata()


@torch.no_grad()
def assert_diffusers_reads_like_us(path, model) -> None:
    """diffusers' load_lora_weights changes the U-Net as our network hooked from the same file does."""
    from tests.tools.helpers import outputs

    expected = outputs_with_lora(model, path)
    pipe = sd_pipeline(model.unet, model.text_encoders[0])
    pipe.load_lora_weights(str(path))

    class Model:
        unet, text_encoders = pipe.unet, [pipe.text_encoder]

    got = outputs(Model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=2e-5, rtol=1e-4)
    pipe.unload_lora_weights()


def test_resize_truncates_each_update_and_updates_metadata(tmp_path):
    model = load("builtin:tiny-sd", "sd1")
    src = tmp_path / "r8.safetensors"
    lora_file(model, src, dim=8, alpha=4.0, conv_dim=4)
    out = tmp_path / "r3.safetensors"
    assert (
        resize_lora.main(
            [
                "--model",
                str(src),
                "--save_to",
                str(out),
                "--new_rank",
                "3",
                "--new_conv_rank",
                "2",
                "--save_precision",
                "float",
            ]
        )
        == 0
    )
    before, _ = read_lora(src)
    after, _ = read_lora(out)
    for name, w in before.items():
        r = 2 if w.down.ndim == 4 and w.down.shape[2:] != (1, 1) else 3
        assert after[name].rank == r
        expected = truncation(dense(w), r)  # float64 reference; the tool computes in float32
        assert (dense(after[name]) - expected).norm() / expected.norm() < 1e-4, name
    meta = metadata(out)
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == str(4.0 / 8 * 3)
    assert meta["ss_training_comment"].startswith("dimension is resized from 8 to 3 (conv: 2)")
    state = safetensors.torch.load_file(out)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == safetensors_hashes(state, meta)
    assert_diffusers_reads_like_us(out, model)

    dyn = tmp_path / "dyn.safetensors"
    assert (
        resize_lora.main(
            [
                "--model",
                str(src),
                "--save_to",
                str(dyn),
                "--new_rank",
                "8",
                "--dynamic_method",
                "sv_fro",
                "--dynamic_param",
                "0.9",
            ]
        )
        == 0
    )
    assert metadata(dyn)["ss_network_dim"] == "Dynamic"
    assert len({w.rank for w in read_lora(dyn)[0].values()}) > 1  # each module its own rank


def test_svd_merge_of_two_ranks(tmp_path):
    model = load("builtin:tiny-sd", "sd1")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora_file(model, a, dim=4, alpha=2.0, conv_dim=None, seed=1)
    lora_file(model, b, dim=2, alpha=1.0, conv_dim=None, seed=2)
    out = tmp_path / "ab.safetensors"
    assert (
        svd_merge_lora.main(
            ["--models", str(a), str(b), "--ratios", "1.0", "0.5", "--new_rank", "6", "--save_to", str(out)]
        )
        == 0
    )
    (ma, _), (mb, _), (merged, meta) = read_lora(a), read_lora(b), read_lora(out)
    for name in ma:
        expected = dense(ma[name]) + 0.5 * dense(mb[name])  # rank <= 6: the SVD keeps it whole...
        error = (dense(merged[name]) - expected).norm() / expected.norm()
        assert 0 < error < 0.4, (
            name,
            float(error),
        )  # ...but for the clip of the factors at their 0.99 quantile
    assert meta["ss_network_dim"] == "6" and meta["ss_network_args"] == '{"conv_dim": 6, "conv_alpha": 6}'
    assert_diffusers_reads_like_us(out, model)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_extract_recovers_the_merged_lora(tmp_path, monkeypatch, kind):
    base_path = single_file(tmp_path, kind, monkeypatch)
    base = load(base_path, kind)
    known = tmp_path / "known.safetensors"
    lora_file(base, known, dim=4, alpha=2.0, conv_dim=2)
    tuned = tmp_path / "tuned.safetensors"
    merge = sdxl_merge_lora.main if kind == "sdxl" else merge_lora.main
    assert (
        merge(
            ["--sd_model", str(base_path), "--models", str(known), "--ratios", "1", "--save_to", str(tuned)]
        )
        == 0
    )
    out = tmp_path / "extracted.safetensors"
    flags = ["--sdxl"] if kind == "sdxl" else []
    assert (
        extract_lora_from_models.main(
            [
                *flags,
                "--model_org",
                str(base_path),
                "--model_tuned",
                str(tuned),
                "--save_to",
                str(out),
                "--dim",
                "4",
                "--conv_dim",
                "2",
                "--clamp_quantile",
                "1",
            ]
        )
        == 0
    )
    (want, _), (got, meta) = read_lora(known), read_lora(out)
    if kind == "sdxl":  # written with sd-scripts' SAI names
        assert any(n.startswith("lora_unet_output_blocks_") for n in got)
        got = to_diffusers_names(got)
    assert got.keys() == want.keys()
    for name, w in want.items():
        expected = dense(w)
        error = (dense(got[name]) - expected).norm() / expected.norm()
        assert error < 1e-4, (name, float(error))
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2.0"}'
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if kind == "sdxl" else "sd_v1")
    if kind == "sd1":
        assert_diffusers_reads_like_us(out, base)


def test_check_lora_weights_lists_every_factor(tmp_path, capsys):
    model = load("builtin:tiny-sd", "sd1")
    path = tmp_path / "l.safetensors"
    network = lora_file(model, path, conv_dim=None)
    assert check_lora_weights.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    factors = [k for k in network.state_dict() if k.endswith(("lora_down.weight", "lora_up.weight"))]
    assert lines[0] == f"number of LoRA modules: {len(factors)}"
    key, shape, mean, low = lines[1].split(",")
    value = network.state_dict()[key].abs()
    assert shape == str(tuple(value.shape)).replace(", ", "-")
    assert abs(float(mean) - float(value.mean())) < 1e-6 and abs(float(low) - float(value.min())) < 1e-6


def test_tool_errors_are_one_line_exit_2(tmp_path, capsys):
    model = load("builtin:tiny-sd", "sd1")
    path = tmp_path / "l.safetensors"
    lora_file(model, path, conv_dim=None)
    cases = [
        (resize_lora.main, ["--model", str(path), "--save_to", str(tmp_path / "o.txt")], "--save_to"),
        (
            resize_lora.main,
            [
                "--model",
                str(path),
                "--save_to",
                str(tmp_path / "o.safetensors"),
                "--dynamic_method",
                "sv_fro",
            ],
            "--dynamic_param",
        ),
        (
            resize_lora.main,
            ["--model", str(tmp_path / "missing.safetensors"), "--save_to", str(tmp_path / "o.safetensors")],
            "missing.safetensors",
        ),
        (
            svd_merge_lora.main,
            [
                "--models",
                str(path),
                "--ratios",
                "1",
                "--save_to",
                str(tmp_path / "o.safetensors"),
                "--lbws",
                "[1,1,1,1,1,1,1,1,1,1,1,1]",
            ],
            "--lbws",
        ),
        (
            extract_lora_from_models.main,
            [
                "--model_org",
                "builtin:tiny-sd",
                "--model_tuned",
                "builtin:tiny-sd",
                "--save_to",
                str(tmp_path / "e.safetensors"),
                "--device",
                "cuda:99",
            ],
            "--device",
        ),
    ]
    for main, args, named in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and named in err, err
    assert not list(tmp_path.glob("o.*")) and not (tmp_path / "e.safetensors").exists()


def test_sdxl_svd_merge_reads_both_namings_and_writes_sai_names(tmp_path, monkeypatch):
    from networks.sdxl_keys import unet_key_to_diffusers

    model = load(single_file(tmp_path, "sdxl", monkeypatch), "sdxl")
    ours, sai = tmp_path / "ours.safetensors", tmp_path / "sai.safetensors"
    lora_file(model, ours, dim=2, alpha=2.0, conv_dim=None, seed=1)
    lora_file(model, sai, dim=2, alpha=2.0, conv_dim=None, seed=1, sai_names=True)  # the same weights
    out = tmp_path / "merged.safetensors"
    assert (
        svd_merge_lora.main(
            [
                "--models",
                str(ours),
                str(sai),
                "--ratios",
                "0.5",
                "0.5",
                "--new_rank",
                "2",
                "--save_to",
                str(out),
            ]
        )
        == 0
    )
    (merged, meta), (original, _) = read_lora(out), read_lora(ours)
    assert any(n.startswith("lora_unet_input_blocks_") for n in merged)
    assert not any(n.startswith("lora_unet_down_blocks_") for n in merged)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    for name, w in merged.items():  # half of each, added: the original update (up to the 0.99 clip)
        expected = dense(original[unet_key_to_diffusers(name)])
        assert (dense(w) - expected).norm() / expected.norm() < 0.4, name


@torch.no_grad()
def test_sdxl_lora_with_sai_names_loads_in_diffusers(tmp_path, monkeypatch):
    """An SDXL LoRA the tools write (SAI names) changes diffusers' SDXL pipeline as our network does."""
    from diffusers import DDPMScheduler

    from library.training.sampling import build_pipeline
    from tests.tools.helpers import outputs

    model = load(single_file(tmp_path, "sdxl", monkeypatch), "sdxl")
    src, out = tmp_path / "ours.safetensors", tmp_path / "sai.safetensors"
    lora_file(model, src, dim=4, alpha=2.0, conv_dim=2)
    assert sdxl_merge_lora.main(["--models", str(src), "--ratios", "1", "--save_to", str(out)]) == 0  # a copy
    with safetensors.safe_open(str(out), "pt") as f:
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
    expected = outputs_with_lora(model, tmp_path / "ours.safetensors")
    pipe = build_pipeline(model, DDPMScheduler.from_config(model.scheduler_config))
    pipe.load_lora_weights(str(out))

    class Model:
        unet, text_encoders = pipe.unet, [pipe.text_encoder, pipe.text_encoder_2]

    got = outputs(Model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=2e-5, rtol=1e-4, msg=key)
