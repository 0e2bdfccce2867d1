"""sd-scripts' model, saving and metadata options: parsed from the command line and --config_file, refused as
sd-scripts refuses them, and the pure rules behind them (checkpoint names, retention, start step)."""

from __future__ import annotations

import argparse

import pytest

from library.cli import parse_args
from library.errors import ConfigError
from library.training import checkpoints

# option -> (command-line words, expected value); TOML gets the same value
OPTIONS = {
    "vae": (["vae.safetensors"], "vae.safetensors"),
    "no_half_vae": ([], True),
    "tokenizer_cache_dir": (["tok"], "tok"),
    "lowram": ([], True),
    "highvram": ([], True),
    "mem_eff_attn": ([], True),
    "fp8_base": ([], True),
    "fp8_base_unet": ([], True),
    "base_weights": (["a.safetensors", "b.safetensors"], ["a.safetensors", "b.safetensors"]),
    "base_weights_multiplier": (["0.5", "-1"], [0.5, -1.0]),
    "disable_mmap_load_safetensors": ([], True),
    "cache_text_encoder_outputs_to_disk": ([], True),
    "cpu_offload_checkpointing": ([], True),
    "fused_backward_pass": ([], True),
    "save_model_as": (["ckpt"], "ckpt"),
    "save_last_n_epochs": (["3"], 3),
    "save_last_n_epochs_state": (["2"], 2),
    "save_last_n_steps": (["30"], 30),
    "save_last_n_steps_state": (["20"], 20),
    "save_n_epoch_ratio": (["5"], 5),
    "save_state_on_train_end": ([], True),
    "initial_step": (["7"], 7),
    "initial_epoch": (["2"], 2),
    "skip_until_initial_step": ([], True),
    "training_comment": (["a comment"], "a comment"),
    "no_metadata": ([], True),
    "metadata_title": (["T"], "T"),
    "metadata_author": (["me"], "me"),
    "metadata_description": (["d"], "d"),
    "metadata_license": (["MIT"], "MIT"),
    "metadata_tags": (["a,b"], "a,b"),
    "metadata_usage_hint": (["say cat"], "say cat"),
    "metadata_thumbnail": (["data:image/png;base64,AA=="], "data:image/png;base64,AA=="),
    "metadata_merged_from": (["x, y"], "x, y"),
    "metadata_trigger_phrase": (["cat"], "cat"),
    "metadata_preprocessor": (["canny"], "canny"),
    "metadata_is_negative_embedding": (["False"], "False"),
}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value).replace("'", '"')
    return str(value)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_parses_from_the_command_line_and_the_config_file(name, tmp_path):
    words, expected = OPTIONS[name]
    assert getattr(parse_args([f"--{name}", *words]), name) == expected
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"{name} = {_toml(expected)}\n", encoding="utf-8")
    assert getattr(parse_args(["--config_file", str(cfg)]), name) == expected


@pytest.mark.parametrize("fmt", ["ckpt", "pt", "safetensors"])
def test_save_model_as_takes_sd_scripts_choices(fmt):
    assert parse_args(["--save_model_as", fmt]).save_model_as == fmt


def _checked(tmp_path, *extra: str):
    from library.flags.models_saving import check_arguments

    args = parse_args(["--output_dir", str(tmp_path), "--train_data_dir", str(tmp_path), *extra])
    check_arguments(args)
    return args


@pytest.mark.parametrize(("extra", "needle"), [
    (["--fp8_base"], "--fp8_base needs --mixed_precision fp16 or bf16"),
    (["--fp8_base_unet"], "--fp8_base_unet needs --mixed_precision fp16 or bf16"),
    (["--fused_backward_pass"], "--fused_backward_pass works only with --optimizer_type Adafactor"),
    (["--fused_backward_pass", "--optimizer_type", "Adafactor", "--gradient_accumulation_steps", "2"],
     "--fused_backward_pass does not work with --gradient_accumulation_steps 2"),
    (["--vae", "missing.safetensors"], "--vae missing.safetensors: no such file or folder"),
    (["--base_weights", "missing.safetensors"], "--base_weights missing.safetensors: file not found"),
    (["--initial_epoch", "0"], "--initial_epoch 0: must be >= 1"),
    (["--initial_step", "10", "--max_train_steps", "10"], "--initial_step 10: must be below --max_train_steps 10"),
    (["--save_last_n_steps", "-1"], "--save_last_n_steps -1: must be >= 0"),
    (["--metadata_thumbnail", "nothere.png"], "--metadata_thumbnail nothere.png: file not found"),
])
def test_refused_combinations_are_one_line_naming_the_flag(tmp_path, extra, needle):
    with pytest.raises(ConfigError) as err:
        _checked(tmp_path, *extra)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_allowed_combinations_pass_and_disk_cache_implies_the_cache(tmp_path):
    _checked(tmp_path, "--fused_backward_pass", "--optimizer_type", "Adafactor")
    _checked(tmp_path, "--fp8_base", "--mixed_precision", "bf16")
    args = _checked(tmp_path, "--cache_text_encoder_outputs_to_disk")
    assert args.cache_text_encoder_outputs is True  # as sd-scripts turns it on


def test_refusals_stop_the_entry_point_with_exit_2(tmp_path, capsys):
    from library.training.entry import main

    code = main(["--output_dir", str(tmp_path), "--train_data_dir", str(tmp_path), "--fp8_base"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --fp8_base needs --mixed_precision")


# ------------------------------------------------------------------------------------------------ names and rules
def test_checkpoint_names_are_sd_scripts():
    assert checkpoints.epoch_name("cat", 3) == "cat-000003"
    assert checkpoints.step_name("cat", 250) == "cat-step00000250"
    assert checkpoints.state_name(checkpoints.step_name("cat", 250)) == "cat-step00000250-state"
    assert checkpoints.state_name("cat") == "cat-state"


def _kept_steps(every: int, last_n: int, until: int) -> list[int]:
    files: set[int] = set()
    for step in range(every, until + 1, every):
        files.add(step)
        old = checkpoints.step_to_remove(step, every, last_n)
        files.discard(old)
    return sorted(files)


def test_step_retention_keeps_the_files_of_the_last_n_steps():
    # sd-scripts' own example: every 10, last 30 -> at step 50 the step-10 file goes, 20..50 stay
    assert checkpoints.step_to_remove(50, 10, 30) == 10
    assert _kept_steps(10, 30, 100) == [70, 80, 90, 100]
    assert _kept_steps(2, 2, 8) == [6, 8]  # 8 - 2 - 1 = 5 -> the multiple of 2 at or below: 4
    assert checkpoints.step_to_remove(3, 1, None) is None


def test_epoch_retention_keeps_last_n_saves():
    assert checkpoints.epoch_to_remove(6, 2, 2) == 2  # saves at 2, 4, 6: the one 2*2 epochs older goes
    assert checkpoints.epoch_to_remove(3, 1, 5) is None
    assert checkpoints.state_last_n(0, 4) == 4 and checkpoints.state_last_n(2, 4) == 2


@pytest.mark.parametrize(("epochs", "ratio", "every"), [(10, 3, 3), (10, 20, 1), (4, 2, 2), (7, None, 5)])
def test_save_n_epoch_ratio_sets_the_epoch_interval(epochs, ratio, every):
    args = argparse.Namespace(save_n_epoch_ratio=ratio, save_every_n_epochs=5)
    assert checkpoints.save_every_n_epochs(args, epochs) == every


def test_initial_step_from_step_or_epoch():
    ns = argparse.Namespace(initial_step=None, initial_epoch=3, gradient_accumulation_steps=2)
    assert checkpoints.initial_step(ns, steps_per_epoch=5) == 10
    ns.initial_step = 7  # wins over --initial_epoch, as in sd-scripts
    assert checkpoints.initial_step(ns, steps_per_epoch=5) == 7
