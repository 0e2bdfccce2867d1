"""--torch_compile / --dynamo_mode / --dynamo_backend: wired into the training step, CUDA-graph modes refused on CPU."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from library.training.entry import main
from tests.training.conftest import train_argv


def test_cuda_graph_mode_on_cpu_is_a_one_line_error_before_loading(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(train_argv(tiny_dataset, out, "--dynamo_mode", "reduce-overhead", steps=2))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "--dynamo_mode reduce-overhead" in err[-1] and "CUDA" in err[-1]
    assert not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("flags", [["--torch_compile", "--dynamo_backend", "eager"],
                                   ["--dynamo_mode", "default", "--dynamo_backend", "aot_eager"]])
def test_compiled_unet_trains_and_saves(tiny_dataset, tmp_path, caplog, flags):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(train_argv(tiny_dataset, out, *flags, steps=2)) == 0
    assert any("torch.compile" in r.getMessage() and "first step" in r.getMessage() for r in caplog.records)
    weights = load_file(out / "t.safetensors")
    assert any(k.startswith("lora_unet_") for k in weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_training_matches_eager_losses(tiny_dataset, tmp_path):
    """--dynamo_mode reduce-overhead trains the same LoRA as eager (same seed), up to compiled-kernel rounding."""
    weights = {}
    for label, flags in (("eager", []), ("graphs", ["--dynamo_mode", "reduce-overhead"])):
        out = tmp_path / label
        assert main(train_argv(tiny_dataset, out, "--mixed_precision", "bf16", *flags, steps=4)) == 0
        weights[label] = load_file(out / "t.safetensors")
    assert weights["eager"].keys() == weights["graphs"].keys()
    ups = sorted(k for k in weights["eager"] if "lora_up" in k)  # zero at init: all they hold is what training did
    eager, graphs = (torch.cat([weights[run][k].float().flatten() for k in ups]) for run in ("eager", "graphs"))
    assert torch.isfinite(graphs).all() and graphs.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(eager, graphs, dim=0) > 0.9
