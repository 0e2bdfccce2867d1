"""gen_img.py / generate: gen_img.py's prompt options, several LoRAs, every model source, PNG metadata."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import gen_img
from library.errors import ConfigError
from library.tools.generate import PromptJob, parse_prompt
from tests.models.tiny import make_tiny
from tests.tools.helpers import load, lora_file, single_file


def test_prompt_options_follow_gen_img():
    job = parse_prompt(
        "a red cat --n blurry, dog --w 96 --h 64 --d 3,4 --l 5.5 --s 12 --ss k_euler_a --am 0.5,1",
        PromptJob(prompt=""),
        "test",
    )
    assert (job.prompt, job.negative, job.width, job.height) == ("a red cat", "blurry, dog", 96, 64)
    assert (job.seeds, job.scale, job.steps, job.sampler, job.multipliers) == (
        [3, 4],
        5.5,
        12,
        "euler_a",
        [0.5, 1.0],
    )
    with pytest.raises(ConfigError, match="--x"):
        parse_prompt("cat --x 1", PromptJob(prompt=""), "prompts.txt:3")
    with pytest.raises(ConfigError, match="prompts.txt:1.*--w"):
        parse_prompt("cat --w wide", PromptJob(prompt=""), "prompts.txt:1")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)


def test_generate_with_two_loras_from_a_prompt_file(tmp_path):
    model = load("builtin:tiny-sd", "sd1")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora_file(model, a, conv_dim=None, seed=1)
    lora_file(model, b, conv_dim=2, seed=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# comment\na photo of sks --n ugly --w 64 --h 48 --d 11 --s 2 --l 4\n"
        "a drawing --w 64 --h 64 --d 12 --s 2 --ss euler --am 0,0\n",
        encoding="utf-8",
    )
    common = [
        "--ckpt",
        "builtin:tiny-sd",
        "--from_file",
        str(prompts),
        "--sequential_file_name",
        "--device",
        "cpu",
    ]
    out = tmp_path / "with"
    assert (
        gen_img.main(
            [
                *common,
                "--outdir",
                str(out),
                "--network_module",
                "networks.lora",
                "--network_weights",
                str(a),
                str(b),
                "--network_mul",
                "0.8",
                "1.0",
            ]
        )
        == 0
    )
    first, second = out / "im_000001.png", out / "im_000002.png"
    image = Image.open(first)
    assert image.size == (64, 48)
    assert image.text["prompt"] == "a photo of sks" and image.text["negative-prompt"] == "ugly"
    assert (image.text["seed"], image.text["steps"], image.text["scale"], image.text["sampler"]) == (
        "11",
        "2",
        "4.0",
        "ddim",
    )
    assert image.text["networks"] == "a.safetensors:0.8, b.safetensors:1"
    assert Image.open(second).text["sampler"] == "euler"

    plain = tmp_path / "plain"
    prompts.write_text(prompts.read_text().replace(" --am 0,0", ""), encoding="utf-8")  # no LoRA to weigh
    assert gen_img.main([*common, "--outdir", str(plain)]) == 0
    assert np.abs(pixels(first) - pixels(plain / "im_000001.png")).max() > 0  # the LoRAs change the image
    np.testing.assert_array_equal(pixels(second), pixels(plain / "im_000002.png"))  # --am 0,0: as without


def test_generate_from_a_single_file_and_a_diffusers_folder(tmp_path, monkeypatch):
    path = single_file(tmp_path, "sd1", monkeypatch)
    folder = make_tiny("sd1").save_pipeline(tmp_path / "folder")  # the same seed: the same weights
    for ckpt, out in ((path, tmp_path / "a"), (folder, tmp_path / "b")):
        assert (
            gen_img.main(
                [
                    "--ckpt",
                    str(ckpt),
                    "--prompt",
                    "a cat --s 2",
                    "--W",
                    "32",
                    "--H",
                    "32",
                    "--seed",
                    "5",
                    "--outdir",
                    str(out),
                    "--sequential_file_name",
                ]
            )
            == 0
        )
    a, b = Image.open(tmp_path / "a" / "im_000001.png"), Image.open(tmp_path / "b" / "im_000001.png")
    assert a.text["prompt"] == "a cat" and a.text["seed"] == "5"
    np.testing.assert_allclose(pixels(a.filename), pixels(b.filename), atol=1)


def test_generate_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["--ckpt", "builtin:tiny-sd", "--prompt", "cat --q 1"], "--q"),
        (
            [
                "--ckpt",
                "builtin:tiny-sd",
                "--prompt",
                "cat",
                "--network_module",
                "networks.lora",
                "--network_weights",
                str(tmp_path / "none.safetensors"),
            ],
            "none.safetensors",
        ),
        (["--ckpt", "builtin:tiny-sd", "--prompt", "cat", "--sampler", "plms"], "plms"),
        (["--ckpt", "builtin:tiny-sd", "--prompt", "cat", "--fp16", "--device", "cpu"], "--fp16"),
    ]
    for args, named in cases:
        assert gen_img.main([*args, "--outdir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and named in err, err
    assert not (tmp_path / "o").exists()
