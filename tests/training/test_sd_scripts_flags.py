"""Every option of sd-scripts' train_network.py / sdxl_train_network.py (tests/data/sd_scripts_flags.csv) parses
from the command line and from --config_file; the few that cannot work on this machine stop in one line."""

from __future__ import annotations

import ast
import csv
import logging
from pathlib import Path

import pytest

from library.cli import build_parser, parse_args
from library.flags import refusals
from library.training.entry import main
from tests.training.conftest import train_argv

FLAGS_CSV = Path(__file__).resolve().parents[1] / "data" / "sd_scripts_flags.csv"
ROWS = list(csv.DictReader(FLAGS_CSV.open(encoding="utf-8")))


# values that must be of a particular form (the rest take a sample of their sd-scripts type)
SAMPLES = {"--resolution": "512,768", "--lr_scheduler": "cosine", "--optimizer_type": "Lion",
           "--save_model_as": "safetensors", "--face_crop_aug_range": "2.0,4.0", "--lr_scheduler_type": "StepLR",
           "--pretrained_model_name_or_path": "m"}
TYPE_SAMPLES = {"int": 2, "float": 0.5, "int_or_float": 0.25, "str": "x", "Path": "x"}

def sample(row: dict) -> object:
    """A valid value of the option as sd-scripts declares it (True for a switch)."""
    if row["sd_type"] == "StoreTrue":
        return True
    if row["flag"] in SAMPLES:
        return SAMPLES[row["flag"]]
    if row["sd_choices"]:
        choices = [c for c in ast.literal_eval(row["sd_choices"]) if c not in (None, "None")]
        value = choices[0]
        return int(value) if row["sd_type"] == "int" else value
    return TYPE_SAMPLES[row["sd_type"]]


def command_line(row: dict) -> list[str]:
    value = sample(row)
    return [row["flag"]] if value is True else [row["flag"], str(value)]


def test_every_sd_scripts_flag_is_an_option_here():
    assert len(ROWS) == 196 and len({r["flag"] for r in ROWS}) == 196
    known = {s for a in build_parser()._actions for s in a.option_strings}
    assert [r["flag"] for r in ROWS if r["flag"] not in known] == []


@pytest.mark.parametrize("row", ROWS, ids=[r["flag"] for r in ROWS])
def test_every_flag_parses_from_the_command_line_and_the_config_file(row, tmp_path, caplog):
    dest = row["flag"][2:]
    value = sample(row)
    if dest == "config_file":  # the file itself: an empty one parses
        (tmp_path / "x").write_text("", encoding="utf-8")
        assert parse_args(["--config_file", str(tmp_path / "x")]).config_file == str(tmp_path / "x")
        return
    args = parse_args(command_line(row))
    assert getattr(args, dest) not in (None, False, "") or value in (0, "x"), (dest, getattr(args, dest))

    toml_value = [value] if row["sd_nargs"] == "*" and value is not True else value
    literal = repr(toml_value).replace("True", "true") if not isinstance(toml_value, str) else f'"{toml_value}"'
    config = tmp_path / "run.toml"
    config.write_text(f"{dest} = {literal}\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        from_file = parse_args(["--config_file", str(config)])
    assert "no option" not in caplog.text
    assert getattr(from_file, dest) == getattr(args, dest)


REFUSED = sorted(f"--{name}" for name in refusals())


@pytest.mark.parametrize("flag", REFUSED)
def test_refused_flags_stop_in_one_line_before_the_model(flag, tiny_dataset, tmp_path, capsys):
    row = next(r for r in ROWS if r["flag"] == flag)
    code = main(train_argv(tiny_dataset, tmp_path / "out", *command_line(row), steps=1))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and flag in err[0]


def test_docs_cli_lists_every_sd_scripts_flag_and_what_happens_to_it():
    page = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text(encoding="utf-8")
    for row in ROWS:
        status = "refused" if row["flag"] in REFUSED else "honoured"
        assert f"| `{row['flag']}` | " in page and f"| {status} |" in page.split(f"| `{row['flag']}` | ", 1)[1] \
            .split("\n", 1)[0], row["flag"]
