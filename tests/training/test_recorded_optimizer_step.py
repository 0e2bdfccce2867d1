"""--cuda_graphs with a capturable optimizer: clip, optimizer step and gradient reset recorded with the training step.

On CPU the recorder's CUDA parts are the eager stand-ins of test_graphed_step.py (a capture that leaves no trace, a
replay that reruns the body), so what runs here is the trainer's choice of path and the recorded body itself. The
test marked gpu records the real graph.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from library.cli import parse_args
from library.training.entry import main
from library.training.trainer import LoRATrainer
from tests.optimizers.capturable_checks import HostReadCheck
from tests.training.conftest import train_argv
from tests.training.test_graphed_step import EagerRecorder

RECORDED = "recording forward, loss, backward, gradient clipping, the optimizer step and the gradient reset"
EAGER_STEP = "the optimizer steps eagerly after each replay"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What a step writes besides the weights: the state (a capturable step count included)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _trainer(dataset, out, *flags: str, record: bool, optimizer: str = "CustomAdamW") -> LoRATrainer:
    argv = train_argv(dataset, out, "--network_train_unet_only", "--optimizer_type", optimizer,
                      "--max_grad_norm", "0.01", *flags, steps=4)  # a clip that acts on every step
    trainer = LoRATrainer(parse_args(argv))
    trainer.setup()
    if record:
        trainer.graphed = EagerRecorder(trainer._graph_body, trainer.trainable, trainer.device,
                                        written=lambda: _optimizer_tensors(trainer.base_optimizer))
    return trainer


def _lora_ups(path) -> torch.Tensor:
    weights = load_file(str(path))
    return torch.cat([weights[k].flatten() for k in sorted(weights) if "lora_up" in k])


def test_a_capturable_optimizer_steps_inside_the_recorded_step_and_trains_the_same_lora(tiny_dataset, tmp_path,
                                                                                         caplog):
    """The same CustomAdamW (SPD off: its two modes then give the same bits) stepping inside the recording, after
    it (cuda_graphs=False), or in the eager loop."""
    caplog.set_level(logging.INFO, logger="loraforge")
    runs = {
        "inside": ("use_spd=False",),
        "after": ("use_spd=False", "cuda_graphs=False"),
        "eager": ("use_spd=False",),
    }
    for label, optimizer_args in runs.items():
        caplog.clear()
        trainer = _trainer(tiny_dataset, tmp_path / label, "--optimizer_args", *optimizer_args,
                           record=label != "eager")
        if label == "inside":  # what the recording adds to forward and backward never reads a device value
            clip_and_step = trainer._clip_and_step

            def checked(clip_and_step=clip_and_step):
                with HostReadCheck():
                    clip_and_step()

            trainer._clip_and_step = checked
        trainer.train()
        logged = caplog.text
        if label == "inside":
            assert RECORDED in logged and trainer.graphed.recordings
            assert trainer.graphed.eager_calls and trainer.graphed.body_runs == 4 + 1  # 2 eager, 2 replays + record
            lr = trainer.base_optimizer.param_groups[0]["lr"]
            assert isinstance(lr, torch.Tensor) and lr.dim() == 0
        elif label == "after":
            assert EAGER_STEP in logged and "CustomAdamW does not keep its step count and lr on the device" in logged
    inside, after, eager = (_lora_ups(tmp_path / label / "t.safetensors") for label in runs)
    assert inside.abs().sum() > 0
    assert torch.equal(inside, after)  # where the step runs changes nothing
    torch.testing.assert_close(inside, eager, rtol=0, atol=1e-6)  # the recorded body's loss vs the eager loop's


@pytest.mark.parametrize("optimizer", ["Automagic_Sinkgd", "Automagic_CameAMP"])
def test_automagic_steps_inside_the_recorded_step_and_trains_the_eager_lora(tiny_dataset, tmp_path, caplog,
                                                                           optimizer):
    """Automagic in capturable mode (its default) recorded with the training step, against the eager loop; its two
    modes give the same bits, so stepping after the replay (cuda_graphs=False) trains the same LoRA."""
    caplog.set_level(logging.INFO, logger="loraforge")
    lora = {}
    for label, optimizer_args in (("inside", ()), ("after", ("--optimizer_args", "cuda_graphs=False")),
                                  ("eager", ())):
        caplog.clear()
        trainer = _trainer(tiny_dataset, tmp_path / label, "--learning_rate", "1e-2", *optimizer_args,
                           record=label != "eager", optimizer=optimizer)
        trainer.train()
        if label == "inside":
            assert RECORDED in caplog.text and trainer.graphed.recordings
            steps = {float(s["step"]) for s in trainer.base_optimizer.state.values()}
            assert steps == {4.0}
        elif label == "after":
            assert EAGER_STEP in caplog.text
        lora[label] = _lora_ups(tmp_path / label / "t.safetensors")
    assert lora["inside"].abs().sum() > 0
    assert torch.equal(lora["inside"], lora["after"])
    torch.testing.assert_close(lora["inside"], lora["eager"], rtol=0, atol=1e-6)


def test_the_optimizer_steps_after_the_replay_where_it_cannot_be_recorded(tiny_dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="loraforge")
    trainer = _trainer(tiny_dataset, tmp_path / "out", "--gradient_accumulation_steps", "2", record=True)
    assert trainer._record_optimizer_step() is False
    assert EAGER_STEP in caplog.text and "--gradient_accumulation_steps 2 steps every few batches" in caplog.text
    trainer.graphed = None  # without --cuda_graphs nothing is recorded and nothing is said
    caplog.clear()
    assert trainer._record_optimizer_step() is False and "--cuda_graphs" not in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="--cuda_graphs records CUDA graphs")
@pytest.mark.parametrize("optimizer", [["--optimizer_type", "CustomAdamW8bit"],
                                       ["--optimizer_type", "AdamW", "--lr_scheduler", "cosine"],
                                       ["--optimizer_type", "Automagic_Sinkgd", "--lr_scheduler", "cosine"],
                                       ["--optimizer_type", "Automagic_CameAMP", "--lr_scheduler", "cosine"]])
def test_cuda_graphs_record_the_optimizer_step_and_train_the_eager_lora(tiny_dataset, tmp_path, caplog, optimizer):
    caplog.set_level(logging.INFO, logger="loraforge")
    weights = {}
    for label, flags in (("eager", []), ("graphs", ["--cuda_graphs"])):
        caplog.clear()
        out = tmp_path / label
        argv = train_argv(tiny_dataset, out, "--mixed_precision", "bf16", "--network_train_unet_only", *optimizer,
                          *flags, steps=6)
        assert main(argv) == 0
        weights[label] = _lora_ups(out / "t.safetensors").float()
        if flags:
            assert RECORDED in caplog.text
    assert weights["graphs"].abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(weights["eager"], weights["graphs"], dim=0) > 0.999
