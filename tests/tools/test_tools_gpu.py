"""The tools on a GPU (`--device cuda`) give the CPU's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.tools.lora_files import read_lora
from networks import extract_lora_from_models, merge_lora, resize_lora
from tests.tools.helpers import load, lora_file, merge_argv, outputs, single_file

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_merge_resize_extract_on_cuda_match_cpu(tmp_path, monkeypatch):
    base_path = single_file(tmp_path, "sd1", monkeypatch)
    base = load(base_path, "sd1")
    lora = tmp_path / "l.safetensors"
    lora_file(base, lora, dim=8, alpha=4.0, conv_dim=2)
    merged = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"merged-{device}.safetensors"
        assert merge_lora.main(merge_argv(base_path, [lora], ["1"], out, "--device", device)) == 0
        merged[device] = outputs(load(out, "sd1"))
    for key in merged["cpu"]:
        torch.testing.assert_close(merged["cuda"][key], merged["cpu"][key], atol=1e-4, rtol=1e-3)

    for tool, args in (
        (resize_lora.main, ["--model", str(lora), "--new_rank", "3"]),
        (
            extract_lora_from_models.main,
            [
                "--model_org",
                str(base_path),
                "--model_tuned",
                str(tmp_path / "merged-cpu.safetensors"),
                "--dim",
                "8",
                "--conv_dim",
                "2",
                # sd-scripts' default clamp (0.99) takes a quantile of U·S and Vh entries, which depends on the
                # basis SVD picks inside a cluster of near-equal singular values, and CPU and GPU SVDs pick
                # different ones: compare the unclamped products, which do not depend on that choice
                "--clamp_quantile",
                "1",
            ],
        ),
    ):
        files = {}
        for device in ("cpu", "cuda"):
            files[device] = tmp_path / f"{tool.__module__}-{device}.safetensors"
            assert tool([*args, "--save_to", str(files[device]), "--device", device]) == 0
        (cpu, _), (gpu, _) = read_lora(files["cpu"]), read_lora(files["cuda"])
        for name, w in cpu.items():
            a = w.scale * (w.up.flatten(1) @ w.down.flatten(1))
            b = gpu[name].scale * (gpu[name].up.flatten(1) @ gpu[name].down.flatten(1))
            assert (a - b).norm() <= 1e-3 * a.norm() + 1e-6, name  # SVD signs may differ, products may not


def test_generate_on_cuda(tmp_path):
    assert (
        gen_img.main(
            [
                "--ckpt",
                "builtin:tiny-sd",
                "--prompt",
                "a cat --s 4 --w 64 --h 64 --d 3",
                "--device",
                "cuda",
                "--outdir",
                str(tmp_path),
                "--sequential_file_name",
            ]
        )
        == 0
    )
    image = Image.open(tmp_path / "im_000001.png")
    assert image.text["prompt"] == "a cat" and np.asarray(image).std() > 0
