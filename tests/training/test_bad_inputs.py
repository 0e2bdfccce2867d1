"""Issue 10: bad input never crashes the trainer.

Every case runs the real entry point and must stop before a model is loaded with exit code 2, one `error:` line
that names the offending file/flag/key/environment variable, and an output folder that stays empty.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.training.entry import main
from tests.training.conftest import make_images, train_argv

Case = Callable[[Path, Path, pytest.MonkeyPatch], tuple[list[str], str]]


def _set(argv: list[str], flag: str, *values: str) -> list[str]:
    """Replace a flag's value (or append the flag) in a copy of argv."""
    argv = list(argv)
    if flag in argv and len(values) == 1:
        argv[argv.index(flag) + 1] = values[0]
        return argv
    return argv + [flag, *values]


def _dataset_toml(tmp: Path, image_dir: Path, subset_extra: str = "", general: str = "resolution = 64\nbatch_size = 2\n",
                  name: str = "bad_ds.toml") -> Path:
    toml = tmp / name
    toml.write_text(f"[general]\n{general}\n[[datasets]]\n\n[[datasets.subsets]]\n"
                    f"image_dir = '{image_dir.as_posix()}'\ncaption_extension = '.txt'\n{subset_extra}", encoding="utf-8")
    return toml


def _with_images(tmp: Path, bad: Callable[[Path], str]) -> tuple[Path, str]:
    """Good images plus one bad file written by `bad`, which returns the name to look for in the error."""
    folder = make_images(tmp / "mixed", n=4)
    return _dataset_toml(tmp, folder), bad(folder)


def _config_file(tmp: Path, text: str) -> Path:
    path = tmp / "options.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _png_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(size: int = 96) -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)  # seeded: same bytes each run
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- files
def missing_dataset_toml(tmp, ds, mp):
    """--dataset_config names a file that does not exist"""
    return _set(train_argv(ds, tmp / "out"), "--dataset_config", str(tmp / "nope.toml")), "--dataset_config"


def missing_image_dir(tmp, ds, mp):
    """the dataset TOML's image_dir does not exist"""
    return train_argv(_dataset_toml(tmp, tmp / "no_such_images"), tmp / "out"), "no_such_images"


def empty_image_dir(tmp, ds, mp):
    """image_dir is an empty folder"""
    (tmp / "empty").mkdir()
    return train_argv(_dataset_toml(tmp, tmp / "empty"), tmp / "out"), "empty"


def only_non_images(tmp, ds, mp):
    """image_dir holds only .txt/.md files"""
    folder = tmp / "notes"
    folder.mkdir()
    for i in range(3):
        (folder / f"note{i}.txt").write_text("just text", encoding="utf-8")
    (folder / "readme.md").write_text("# hi", encoding="utf-8")
    return train_argv(_dataset_toml(tmp, folder), tmp / "out"), "notes"


def corrupt_png(tmp, ds, mp):
    """one PNG among good images has its pixel data zeroed"""
    def bad(folder):
        data = bytearray(_png_bytes())
        data[40:80] = b"\x00" * 40  # header survives, IDAT does not
        (folder / "broken.png").write_bytes(bytes(data))
        return "broken.png"
    toml, needle = _with_images(tmp, bad)
    return train_argv(toml, tmp / "out"), needle


def truncated_jpeg(tmp, ds, mp):
    """one JPEG cut to a third of its bytes"""
    def bad(folder):
        data = _jpeg_bytes()
        (folder / "cut.jpg").write_bytes(data[: len(data) // 3])
        return "cut.jpg"
    toml, needle = _with_images(tmp, bad)
    return train_argv(toml, tmp / "out"), needle


def tiny_image(tmp, ds, mp):
    """one 8x8 image"""
    def bad(folder):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "speck.png")
        return "speck.png"
    toml, needle = _with_images(tmp, bad)
    return train_argv(toml, tmp / "out"), needle


def caption_not_utf8(tmp, ds, mp):
    """one caption file in Latin-1 with stray bytes"""
    def bad(folder):
        (folder / "img00.txt").write_bytes("a caf\u00e9 in latin-1".encode("latin-1") + b"\xff\xfe")
        return "img00.txt"
    toml, needle = _with_images(tmp, bad)
    return train_argv(toml, tmp / "out"), needle


def sample_prompts_missing(tmp, ds, mp):
    """--sample_prompts names a missing file"""
    return train_argv(ds, tmp / "out", "--sample_prompts", str(tmp / "prompts.txt")), "--sample_prompts"


def sample_prompts_not_text(tmp, ds, mp):
    """--sample_prompts is a PNG"""
    prompts = tmp / "prompts.txt"
    prompts.write_bytes(_png_bytes())
    return train_argv(ds, tmp / "out", "--sample_prompts", str(prompts)), "--sample_prompts"


def sample_prompts_is_folder(tmp, ds, mp):
    """--sample_prompts is a folder"""
    (tmp / "prompts").mkdir()
    return train_argv(ds, tmp / "out", "--sample_prompts", str(tmp / "prompts")), "--sample_prompts"


def missing_network_weights(tmp, ds, mp):
    """--network_weights names a missing file"""
    return train_argv(ds, tmp / "out", "--network_weights", str(tmp / "lora.safetensors")), "--network_weights"


def network_weights_not_safetensors(tmp, ds, mp):
    """--network_weights is a text file named .safetensors"""
    weights = tmp / "lora.safetensors"
    weights.write_text("not a LoRA", encoding="utf-8")
    return train_argv(ds, tmp / "out", "--network_weights", str(weights)), "--network_weights"


def resume_missing(tmp, ds, mp):
    """--resume names a missing folder"""
    return train_argv(ds, tmp / "out", "--resume", str(tmp / "t-state")), "--resume"


def resume_not_a_state_folder(tmp, ds, mp):
    """--resume is a folder of photos"""
    (tmp / "holiday_photos").mkdir()
    (tmp / "holiday_photos" / "beach.jpg").write_bytes(_jpeg_bytes())
    return train_argv(ds, tmp / "out", "--resume", str(tmp / "holiday_photos")), "--resume"


def model_missing(tmp, ds, mp):
    """--pretrained_model_name_or_path names a missing .safetensors"""
    argv = _set(train_argv(ds, tmp / "out"), "--pretrained_model_name_or_path", str(tmp / "sd15.safetensors"))
    return argv, "--pretrained_model_name_or_path"


def model_is_text_file(tmp, ds, mp):
    """--pretrained_model_name_or_path is a .txt holding a URL"""
    model = tmp / "model.txt"
    model.write_text("https://example.invalid/sd15.safetensors\n", encoding="utf-8")
    return _set(train_argv(ds, tmp / "out"), "--pretrained_model_name_or_path", str(model)), "--pretrained_model_name_or_path"


def model_unknown_builtin(tmp, ds, mp):
    """--pretrained_model_name_or_path builtin:huge-sd"""
    argv = _set(train_argv(ds, tmp / "out"), "--pretrained_model_name_or_path", "builtin:huge-sd")
    return argv, "builtin:huge-sd"


def model_folder_not_diffusers(tmp, ds, mp):
    """--pretrained_model_name_or_path is an empty folder"""
    (tmp / "models").mkdir()
    argv = _set(train_argv(ds, tmp / "out"), "--pretrained_model_name_or_path", str(tmp / "models"))
    return argv, "--pretrained_model_name_or_path"


def output_disk_full(tmp, ds, mp):
    """the disk of --output_dir has no free space (disk_usage reports 0 bytes free)"""
    import shutil

    from library.training import validate

    real = shutil.disk_usage(tmp)
    mp.setattr(validate.shutil, "disk_usage", lambda path: real._replace(free=0))
    return train_argv(ds, tmp / "out"), "--output_dir"


# ------------------------------------------------------------------------------------------------- flags
def flag(name: str, value: str, needle: str | None = None, *extra: str) -> Case:
    def case(tmp, ds, mp):
        return _set(train_argv(ds, tmp / "out", *extra), name, value), needle or name
    case.__name__ = f"{name.lstrip('-')}={value}"
    return case


def flags(*extra: str, needle: str) -> Case:
    def case(tmp, ds, mp):
        return train_argv(ds, tmp / "out", *extra), needle
    return case


# ------------------------------------------------------------------------------------------------- TOML
def config_bad_syntax(tmp, ds, mp):
    """--config_file with an unclosed list"""
    cfg = _config_file(tmp, "learning_rate = 1e-3\nnetwork_dim = [4\n")
    return train_argv(ds, tmp / "out", "--config_file", str(cfg)), "options.toml"


def config_wrong_type(tmp, ds, mp):
    """--config_file with network_alpha = 'four'"""
    cfg = _config_file(tmp, "[network]\nnetwork_alpha = 'four'\n")
    argv = [a for a in train_argv(ds, tmp / "out") if a not in ("--network_alpha", "2")]
    return argv + ["--config_file", str(cfg)], "network_alpha"


def config_missing(tmp, ds, mp):
    """--config_file names a missing file"""
    return train_argv(ds, tmp / "out", "--config_file", str(tmp / "options.toml")), "--config_file"


def dataset_bad_syntax(tmp, ds, mp):
    """dataset TOML with an unclosed table header"""
    toml = tmp / "broken_ds.toml"
    toml.write_text("[general\nresolution = 64\n", encoding="utf-8")
    return _set(train_argv(ds, tmp / "out"), "--dataset_config", str(toml)), "broken_ds.toml"


def dataset_unknown_subset_key(tmp, ds, mp):
    """dataset TOML subset key num_repeat (typo)"""
    toml = _dataset_toml(tmp, make_images(tmp / "imgs", n=2), "num_repeat = 3\n")
    return _set(train_argv(ds, tmp / "out"), "--dataset_config", str(toml)), "num_repeat"


def dataset_negative_repeats(tmp, ds, mp):
    """dataset TOML num_repeats = -1"""
    toml = _dataset_toml(tmp, make_images(tmp / "imgs", n=2), "num_repeats = -1\n")
    return _set(train_argv(ds, tmp / "out"), "--dataset_config", str(toml)), "num_repeats"


def dataset_resolution_big(tmp, ds, mp):
    """dataset TOML resolution = 'big'"""
    toml = _dataset_toml(tmp, make_images(tmp / "imgs", n=2), general="resolution = \"big\"\nbatch_size = 2\n")
    return _set(train_argv(ds, tmp / "out"), "--dataset_config", str(toml)), "resolution"


def optimizer_table_unknown_kwarg(tmp, ds, mp):
    """[optimizer] table of --config_file with momentum_decay for AdamW"""
    cfg = _config_file(tmp, "[optimizer]\nname = 'AdamW'\nbetas = [0.9, 0.99]\nmomentum_decay = 0.5\n")
    return train_argv(ds, tmp / "out", "--config_file", str(cfg)), "momentum_decay"


# ------------------------------------------------------------------------------------------------- env vars
def env(var: str, value: str, optimizer: str) -> Case:
    def case(tmp, ds, mp):
        mp.setenv(var, value)
        return _set(train_argv(ds, tmp / "out"), "--optimizer_type", optimizer), var
    case.__name__ = f"{var}={value}"
    return case


CASES_BY_KIND: dict[str, dict[str, Case]] = {"files": {
    "missing dataset TOML": missing_dataset_toml,
    "missing image dir": missing_image_dir,
    "empty image dir": empty_image_dir,
    "folder of only non-images": only_non_images,
    "corrupt PNG": corrupt_png,
    "truncated JPEG": truncated_jpeg,
    "tiny image": tiny_image,
    "caption not UTF-8": caption_not_utf8,
    "missing --sample_prompts": sample_prompts_missing,
    "binary --sample_prompts": sample_prompts_not_text,
    "folder as --sample_prompts": sample_prompts_is_folder,
    "missing --network_weights": missing_network_weights,
    "text file as --network_weights": network_weights_not_safetensors,
    "missing --resume folder": resume_missing,
    "--resume folder without state": resume_not_a_state_folder,
    "model path missing": model_missing,
    "text file as model": model_is_text_file,
    "unknown builtin model": model_unknown_builtin,
    "empty folder as model": model_folder_not_diffusers,
    "no free space for the output": output_disk_full,
}, "flags": {
    "lr 0": flag("--learning_rate", "0"),
    "lr negative": flag("--learning_rate", "-0.5"),
    "lr negative, scientific notation": flag("--learning_rate", "-1e-4"),  # argparse reads it as a flag
    "dim 0": flag("--network_dim", "0"),
    "alpha 0": flag("--network_alpha", "0"),
    "dropout 1.5": flag("--network_dropout", "1.5"),
    "negative keep_tokens": flag("--keep_tokens", "-1"),
    "unknown scheduler": flag("--lr_scheduler", "cosine_annealing"),
    "unknown optimizer": flag("--optimizer_type", "AdamWW", "AdamWW"),
    "--use_spd with AdamW": flags("--use_spd", needle="use_spd"),
    "bad --optimizer_args syntax": flags("--optimizer_args", "betas", needle="--optimizer_args"),
    "unknown --optimizer_args key": flags("--optimizer_args", "momentum=0.9", needle="momentum"),
    "bad --network_args key": flags("--network_args", "conv_dimm=4", needle="conv_dimm"),
    "bad --network_args value": flags("--network_args", "rank_dropout=2", needle="rank_dropout"),
    "--full_fp16 without fp16": flags("--full_fp16", needle="--full_fp16"),
    "unet_only + text_encoder_only": flags("--network_train_unet_only", "--network_train_text_encoder_only",
                                           needle="--network_train_unet_only"),
    "--dataset_config + --train_data_dir": flags("--train_data_dir", "/tmp", needle="--train_data_dir"),
    "cache TE outputs while training TE": flags("--cache_text_encoder_outputs", needle="--cache_text_encoder_outputs"),
    "max_train_steps 0": flag("--max_train_steps", "0"),
    "negative lr_warmup_steps": flag("--lr_warmup_steps", "-5"),
    "resolution abc": flag("--resolution", "abc"),
    "mixed_precision fp8": flag("--mixed_precision", "fp8"),
    "network_dim not an integer": flag("--network_dim", "4.5"),
    "ddp_timeout 0": flag("--ddp_timeout", "0"),
    "--cuda_graphs on a CPU": flags("--cuda_graphs", "--network_train_unet_only", needle="--cuda_graphs"),
    "--cuda_graphs training the text encoder": flags("--cuda_graphs", needle="--network_train_unet_only"),
    "--cuda_graphs with fp16": flags("--cuda_graphs", "--network_train_unet_only", "--mixed_precision", "fp16",
                                     needle="fp16"),
    "--cuda_graphs with module_dropout": flags("--cuda_graphs", "--network_train_unet_only", "--network_args",
                                               "module_dropout=0.1", needle="module_dropout"),
    "--cuda_graphs, checkpointing and dropout": flags("--cuda_graphs", "--network_train_unet_only",
                                                      "--gradient_checkpointing", "--network_dropout", "0.1",
                                                      needle="--network_dropout"),
    "--cuda_graphs with reduce-overhead": flags("--cuda_graphs", "--network_train_unet_only", "--dynamo_mode",
                                                "reduce-overhead", needle="--dynamo_mode"),
}, "TOML": {
    "config TOML bad syntax": config_bad_syntax,
    "config TOML wrong type": config_wrong_type,
    "missing --config_file": config_missing,
    "dataset TOML bad syntax": dataset_bad_syntax,
    "dataset TOML unknown subset key": dataset_unknown_subset_key,
    "dataset num_repeats = -1": dataset_negative_repeats,
    "dataset resolution = big": dataset_resolution_big,
    "[optimizer] unknown kwarg": optimizer_table_unknown_kwarg,
}, "environment variables": {
    "SGG_N_CLUSTERS=abc": env("SGG_N_CLUSTERS", "abc", "AdamWSGG"),
    "SGG_SCALE_BOUND=(1,": env("SGG_SCALE_BOUND", "(1,", "AdamWSGG"),
    "SAC_SCALE_UPDATE_FREQ=-5": env("SAC_SCALE_UPDATE_FREQ", "-5", "AdamWSAC"),
}}
CASES: dict[str, Case] = {name: case for cases in CASES_BY_KIND.values() for name, case in cases.items()}

XFAIL: dict[str, str] = {}


def _params():
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[name])] if name in XFAIL else []
        yield pytest.param(case, id=name, marks=marks)


@dataclass
class CaseRun:
    argv: list[str]
    needle: str
    code: int
    stderr: list[str]


def run_case(case: Case, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> CaseRun:
    """Build the case's files in `tmp`, then run the real entry point with every model load refused."""
    dataset = _dataset_toml(tmp, make_images(tmp / "images"), name="dataset.toml")
    argv, needle = case(tmp, dataset, monkeypatch)
    _load_guard(monkeypatch)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own type/choice errors
            code = exc.code
    return CaseRun(argv, needle, code, err.getvalue().strip().splitlines())


def _load_guard(monkeypatch):
    """Any model load is a bug here: every case must fail before it."""
    import library.models.loader as loader
    import library.training.setup as setup
    import library.training.trainer as trainer  # imported before patching: it binds `load_model` by name

    def refuse(*a, **k):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(loader, "load_sd_model", refuse)
    monkeypatch.setattr(setup, "load_model", refuse)
    monkeypatch.setattr(trainer, "load_model", refuse)


@pytest.mark.parametrize("case", _params())
def test_bad_input_is_one_named_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch):
    run = run_case(case, tmp_path, monkeypatch)
    assert run.code == 2, run.stderr
    assert run.stderr, "no message"
    last = run.stderr[-1]
    assert last.startswith(("error: ", "train_network.py: error: ")), run.stderr
    assert run.needle in last, (run.needle, last)
    assert len(last) < 600, last  # one readable line, not a dump
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_existing_output_without_overwrite_is_refused_and_kept(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "t-state").mkdir(parents=True)
    (out / "t-state" / "optimizer.bin").write_bytes(b"earlier")
    _load_guard(monkeypatch)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(train_argv(tiny_dataset, out))
    err = err.getvalue().strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "--overwrite" in err[-1] and "t-state" in err[-1], err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["t-state", "t-state/optimizer.bin"]


def test_too_little_free_space_names_the_estimate_before_the_model_loads(tiny_dataset, tmp_path, monkeypatch):
    import shutil

    from library.training import validate

    out = tmp_path / "out"
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: real._replace(free=300_000))
    _load_guard(monkeypatch)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(train_argv(tiny_dataset, out, "--save_every_n_steps", "2", "--save_state", steps=6))
    line = err.getvalue().strip().splitlines()[-1]
    assert code == 2
    assert line.startswith(f"error: --output_dir {out}: 0.3 MiB free, this run writes about "), line
    assert "4 LoRA files of" in line and "4 state folders of" in line  # steps 2, 4, 6 and the final
    assert not out.exists()
