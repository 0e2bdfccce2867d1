"""Command line and --config_file TOML: sd-scripts names, TOML merging, CLI precedence, clear errors."""

import pytest

from library.cli import build_parser, parse_args
from library.errors import ConfigError


def write(tmp_path, text, name="run.toml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_sd_scripts_option_names_parse():
    args = parse_args(["--resolution", "768,512", "--network_dim", "16", "--network_args", "conv_dim=4", "conv_alpha=1",
                       "--mixed_precision", "bf16", "--lr_scheduler", "cosine_with_restarts", "--use_spd", "--no-use_tam"])
    assert args.resolution == (768, 512)
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert args.use_spd is True and args.use_tam is False
    assert args.use_grams is None  # not given: the optimizer's documented default applies later


def test_config_file_values_and_cli_override(tmp_path):
    cfg = write(tmp_path, 'network_dim = 32\nlearning_rate = 3e-4\n[training]\nmax_train_steps = 77\nuse_spd = false\n'
                          'resolution = [640, 448]\n')
    args = parse_args(["--config_file", cfg, "--network_dim", "8"])
    assert args.network_dim == 8  # command line wins
    assert args.learning_rate == 3e-4 and args.max_train_steps == 77 and args.use_spd is False
    assert args.resolution == (640, 448)


def test_config_file_optimizer_table_is_kept_for_the_registry(tmp_path):
    cfg = write(tmp_path, '[optimizer]\nname = "AdamWSGG"\nlr = 3e-4\nweight_decay = 1e-2\n')
    args = parse_args(["--config_file", cfg])
    assert args.optimizer_table == {"name": "AdamWSGG", "lr": 3e-4, "weight_decay": 1e-2}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("network_dimm = 4\n", "unknown key 'network_dimm'; did you mean network_dim"),
        ("network_dim = 'four'\n", "key 'network_dim'"),
        ("network_dim = 4.5\n", "must be an integer"),
        ("shuffle_caption = 1\n", "must be true or false"),
        ("mixed_precision = 'fp8'\n", "choose one of: no, fp16, bf16"),
        ("network_dim = \n", "invalid TOML"),
    ],
)
def test_config_file_errors_name_file_and_key(tmp_path, text, needle):
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        parse_args(["--config_file", cfg])
    assert needle in str(err.value) and "run.toml" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="file not found"):
        parse_args(["--config_file", "/nonexistent/run.toml"])


def test_help_is_grouped_and_shows_documented_defaults():
    text = build_parser().format_help()
    for group in ("model:", "dataset:", "network:", "training:", "optimizer:", "CustomAdamW (Hina):", "Automagic:",
                  "saving:", "logging:", "sampling:"):
        assert group in text
    assert "(default: 1000)" in text  # --wd_transition_steps
    assert "--no-use_spd" in text


def test_optimizer_settings_from_a_config_file_are_labelled_with_their_source(tmp_path, caplog):
    import logging

    import torch

    from library.optimizers.registry import build_optimizer
    from library.training.setup import _optimizer_inputs

    cfg = write(tmp_path, 'optimizer_type = "CustomAdamW"\nlearning_rate = 3e-4\nspd_lambda = 0.05\nuse_tam = false\n')
    args = parse_args(["--config_file", cfg, "--use_tam"])  # the command line wins over the file's use_tam
    assert args.config_file_keys == ["learning_rate", "optimizer_type", "spd_lambda"]
    param = torch.nn.Parameter(torch.zeros(4, 4))
    with caplog.at_level(logging.INFO, logger="library.optimizers.registry"):
        _, sources = build_optimizer("CustomAdamW", [{"params": [param], "names": ["lora_unet_x.lora_down.weight"]}],
                                     lr=args.learning_rate, **_optimizer_inputs(args))
    assert sources["lr"] == sources["spd_lambda"] == "--config_file"
    assert sources["use_tam"] == "CLI flag"
    assert "spd_lambda = 0.05 (--config_file)" in caplog.text
