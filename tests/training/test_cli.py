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
        ("network_dim = 'four'\n", "key 'network_dim'"),
        ("network_dim = 4.5\n", "must be an integer"),
        ("shuffle_caption = 2\n", "must be true or false"),
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


# a --config_file as the kohya_ss GUI writes it for train_network.py (sorted keys, GUI-only keys included)
KOHYA_GUI_TOML = """
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
caption_extension = ".txt"
clip_skip = 1
enable_bucket = true
epoch = 10
gradient_accumulation_steps = 1
learning_rate = 0.0001
logging_dir = "/data/log"
loraplus_lr_ratio = 16
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 10
lr_scheduler_power = 1
lr_warmup_steps = 0.1
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
mixed_precision = "bf16"
network_alpha = 1
network_args = ["conv_dim=4", "conv_alpha=1"]
network_dim = 8
network_module = "networks.lora"
noise_offset_type = "Original"
optimizer_args = ["weight_decay=0.5"]
optimizer_type = "Prodigy"
output_name = "my_lora"
persistent_data_loader_workers = 1
prior_loss_weight = 1
resolution = "512,512"
save_every_n_epochs = 1
save_precision = "fp16"
seed = 1234
text_encoder_lr = [5e-05]
train_batch_size = 2
unet_lr = 0.0001
wandb_run_name = "my_lora"
network_dimm = 4
"""


def test_kohya_gui_config_loads_as_in_sd_scripts(tmp_path, caplog):
    cfg = write(tmp_path, KOHYA_GUI_TOML)
    with caplog.at_level("INFO", logger="loraforge"):
        args = parse_args(["--config_file", cfg])
    assert args.persistent_data_loader_workers is True and args.text_encoder_lr == [5e-05]
    assert args.lr_warmup_steps == 0.1 and args.lr_scheduler_args == [] and args.optimizer_args == ["weight_decay=0.5"]
    assert args.resolution == (512, 512) and args.network_dim == 8 and args.max_grad_norm == 1.0
    gui = [r.getMessage() for r in caplog.records if "kohya_ss GUI keys" in r.getMessage()]
    assert len(gui) == 1 and "epoch (" in gui[0] and "noise_offset_type (" in gui[0]
    assert "--network_args loraplus_lr_ratio=R" in gui[0]
    unknown = [r.getMessage() for r in caplog.records if "keys that are no option" in r.getMessage()]
    assert len(unknown) == 1 and "network_dimm (did you mean network_dim?)" in unknown[0]
    assert "\n" not in unknown[0] and "epoch" not in unknown[0]


def test_several_unknown_keys_are_one_warning_never_a_stop(tmp_path, caplog):
    cfg = write(tmp_path, "learnig_rate = 1e-3\nnetwork_dimm = 4\ntotally_unknown = 1\nnetwork_dim = 16\n")
    with caplog.at_level("WARNING", logger="loraforge"):
        args = parse_args(["--config_file", cfg])
    assert args.network_dim == 16
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1
    for part in ("learnig_rate (did you mean learning_rate?)", "network_dimm (did you mean network_dim?)",
                 "totally_unknown", "run.toml"):
        assert part in lines[0]


def test_unknown_flag_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--lerning_rate", "1e-4", "--network_dim", "4"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("train_network.py: error: unrecognized arguments: --lerning_rate 1e-4")
    assert "--lerning_rate -> --learning_rate" in err


def test_sdxl_script_names_itself_in_errors():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "sdxl_train_network.py"), "--network_dim", "four"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2 and lines == [
        "sdxl_train_network.py: error: argument --network_dim: invalid int value: 'four'"]


def test_config_file_name_without_extension_as_sd_scripts(tmp_path):
    write(tmp_path, "network_dim = 12\n", name="my_run.toml")
    assert parse_args(["--config_file", str(tmp_path / "my_run")]).network_dim == 12


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


def test_sd_scripts_old_caption_extention_spelling_is_read_as_caption_extension():
    assert parse_args(["--caption_extention", ".txt"]).caption_extension == ".txt"
    assert parse_args(["--caption_extention", ".txt", "--caption_extension", ".cap"]).caption_extension == ".cap"


def test_help_gives_every_option_a_text_and_its_default_once(capsys):
    parser = build_parser()
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert missing == []
    text = parser.format_help()
    assert "{None" not in text and "(default: None)" not in text
    flat = " ".join(text.split())
    assert "(default: True) (default:" not in flat and flat.count("--network_dim NETWORK_DIM LoRA rank (default: 4)") == 1
