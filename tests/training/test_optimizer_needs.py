"""What an optimizer asks of the training loop reaches it in a real run: SophiaG's Hessian pass every k steps."""

from __future__ import annotations

import pytest
import torch

from library.cli import parse_args
from library.training.trainer import LoRATrainer
from tests.training.conftest import train_argv


@pytest.mark.slow
def test_sophia_gets_its_hessian_pass_every_k_steps_in_training(tiny_dataset, tmp_path, monkeypatch):
    argv = train_argv(tiny_dataset, tmp_path / "out", steps=4)
    argv[argv.index("AdamW")] = "SophiaG"
    trainer = LoRATrainer(parse_args([*argv, "--optimizer_args", "hessian_update_interval=2"]))
    trainer.setup()
    calls = []
    update = trainer.base_optimizer.update_hessian
    monkeypatch.setattr(trainer.base_optimizer, "update_hessian",
                        lambda batch_size: (calls.append(batch_size), update(batch_size=batch_size)))
    trainer.train()
    assert len(calls) == 2  # after steps 2 and 4
    hessians = [s["hessian"] for s in trainer.base_optimizer.state.values()]
    assert hessians and any(bool(torch.any(h != 0)) for h in hessians)
