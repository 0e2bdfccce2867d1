"""sd-scripts / LyCORIS network command lines run unchanged on the real trainer, and --network_weights /
--dim_from_weights continue from the file with its own dim and alpha."""

from __future__ import annotations

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from library.training.entry import main
from tests.training.conftest import train_argv


@pytest.mark.parametrize(
    "network",
    [
        ("--network_module", "lycoris.kohya", "--network_args", "algo=loha", "use_tucker=True", "conv_dim=2"),
        ("--network_module", "networks.lora", "--network_args", "down_lr_weight=cosine", "mid_lr_weight=0.5",
         "up_lr_weight=1,1,0"),
    ],
    ids=["lycoris-loha", "lora-blockwise"],
)
def test_network_command_trains_and_continues_with_the_files_dims(tiny_dataset, tmp_path, network):
    first = tmp_path / "first"
    assert main(train_argv(tiny_dataset, first, *network, "--network_dim", "8", "--network_alpha", "3",
                           steps=1)) == 0
    path = first / "t.safetensors"
    saved = load_file(str(path))
    assert saved
    second = tmp_path / "second"
    argv = train_argv(tiny_dataset, second, *network, "--network_weights", str(path), "--dim_from_weights",
                      steps=1)  # train_argv's --network_dim 4 / alpha 2 are overridden by the file's
    assert main(argv + ["--learning_rate", "1e-12"]) == 0  # a step too small to move: the file is the loaded one
    again = load_file(str(second / "t.safetensors"))
    assert again.keys() == saved.keys()
    assert max((again[k] - saved[k]).abs().max().item() for k in saved) < 1e-6
    assert max(saved[k].abs().max().item() for k in saved if not k.endswith(".alpha")) > 1e-3
    with safe_open(str(second / "t.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "8" and float(meta["ss_network_alpha"]) == 3.0
