"""The trainer as a user meets it: builtin:tiny-sd, a dataset TOML, a LoRA file, resume, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.cli import parse_args
from library.data.dataset import collate
from library.training.entry import main
from library.training.trainer import LoRATrainer, TrainingStopped
from tests.training.conftest import train_argv


def make_trainer(argv) -> LoRATrainer:
    trainer = LoRATrainer(parse_args(argv))
    trainer.setup()
    return trainer


@torch.no_grad()
def fixed_eval_loss(trainer: LoRATrainer) -> float:
    """Loss on fixed images, noise and timesteps, so 'the loss falls' is not at the mercy of sampling noise."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
        latents = trainer._latents(batch)
        cond = trainer._conditioning(batch)
        total = 0.0
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn_like(latents)
            timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
            pred = trainer._unet_forward(latents, noise, timesteps, cond)
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / 5


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_a_kohya_lora(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    trainer = make_trainer(train_argv(tiny_dataset, out, steps=40))
    before = fixed_eval_loss(trainer)
    trainer.train()
    after = fixed_eval_loss(trainer)
    assert after < before * 0.97, (before, after)

    path = out / "t.safetensors"
    sd = load_file(str(path))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in sd)
    assert any(k.startswith("lora_te_") for k in sd)
    downs = [k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")]
    assert all(f"{m}.alpha" in sd and f"{m}.lora_up.weight" in sd for m in downs)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_steps"] == "40" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_tag_frequency"])  # the dataset's captions are summarised
    assert (out / "t_loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_continues_exactly(tiny_dataset, tmp_path):
    """N steps, Ctrl-C (state saved), resume, M more steps == N+M straight steps, bit for bit (CPU, fp32)."""
    a, b, straight, resumed = _interrupt_and_resume(tiny_dataset, tmp_path, ())
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.lr_scheduler.get_last_lr() == resumed.lr_scheduler.get_last_lr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="--cuda_graphs records CUDA graphs")
def test_resume_with_cuda_graphs_continues_the_run(tiny_dataset, tmp_path):
    """The resumed run records its graph again; recording must not shift the random stream (noise, timesteps),
    so the result equals the straight run up to cuDNN's choice of kernels in a new process."""
    flags = ("--cuda_graphs", "--network_train_unet_only", "--mixed_precision", "bf16")
    a, b, _, _ = _interrupt_and_resume(tiny_dataset, tmp_path, flags)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-6, msg=k)


def _interrupt_and_resume(tiny_dataset, tmp_path, flags):
    """7 straight steps in a/; in b/ 3 steps, SIGINT (state saved), resume to 7; both LoRA files and trainers."""
    extra = ("--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--save_state", *flags)
    straight = make_trainer(train_argv(tiny_dataset, tmp_path / "a", *extra, steps=7))
    straight.train()

    first = make_trainer(train_argv(tiny_dataset, tmp_path / "b", *extra, steps=7))
    after_step = first._hessian_update  # runs right after each optimizer step

    def step_then_interrupt():
        after_step()
        if first.progress.global_step == 3:
            first.stop_signal = "SIGINT"  # what the SIGINT handler sets

    first._hessian_update = step_then_interrupt
    with pytest.raises(TrainingStopped) as stop:
        first.train()
    assert stop.value.exit_code == 130 and "--resume" in str(stop.value)
    state = tmp_path / "b" / "t-state"
    assert state.is_dir()

    resumed = make_trainer(train_argv(tiny_dataset, tmp_path / "b", *extra, "--resume", str(state), steps=7))
    assert resumed.progress.global_step == 3
    resumed.train()
    a = load_file(str(tmp_path / "a" / "t.safetensors"))
    b = load_file(str(tmp_path / "b" / "t.safetensors"))
    assert a.keys() == b.keys()
    return a, b, straight, resumed


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"--dataset_config": "/nope/ds.toml"}, "--dataset_config /nope/ds.toml: file not found"),
        ({"--optimizer_type": "AdamWW"}, "AdamWW"),
        ({"--lr_scheduler": "cosine_restarts"}, "--lr_scheduler cosine_restarts"),
        ({"--network_module": "networks.nope"}, "--network_module networks.nope"),
        ({"--learning_rate": "-1"}, "--learning_rate -1.0: must be > 0"),
        ({"--network_dim": "0"}, "--network_dim 0: must be an integer >= 1"),
        ({"--pretrained_model_name_or_path": "/nope/model.safetensors"}, "no such file"),
        ({"--caption_dropout_rate": "1.5"}, "must be in [0, 1)"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_dataset, tmp_path, capsys, change, needle):
    argv = train_argv(tiny_dataset, tmp_path / "out")
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err
    assert not (tmp_path / "out").exists()


def test_second_run_into_same_output_is_refused_without_overwrite(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "t.safetensors").write_bytes(b"previous run")
    assert main(train_argv(tiny_dataset, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "t.safetensors").read_bytes() == b"previous run"


def test_optimizer_list_prints_every_family(capsys):
    assert main(["--optimizer_type", "list"]) == 0
    text = capsys.readouterr().out
    for name in ("AdamW", "CustomAdamW", "Automagic_Sinkgd", "AdamWSGG", "adamw_torch_fused", "Prodigy"):
        assert name in text
