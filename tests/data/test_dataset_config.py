import argparse
import logging
from pathlib import Path

import pytest

from library.config.dataset_config import (
    DatasetDefaults,
    config_from_train_data_dir,
    load_dataset_config,
)
from library.errors import ConfigError, DatasetError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, text, name="ds.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("a", "b", "reg"):
        (tmp_path / d).mkdir()
    return tmp_path


def test_precedence_subset_dataset_general_cli(dirs):
    path = _write(dirs, """
[general]
shuffle_caption = true
keep_tokens = 1
resolution = [768, 512]
caption_extension = "txt"

[[datasets]]
keep_tokens = 2
batch_size = 3

  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 3
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true

[[datasets]]
resolution = 256
  [[datasets.subsets]]
  image_dir = "b"
""")
    cfg = load_dataset_config(path, DatasetDefaults(batch_size=7, flip_aug=True, resolution=(512, 512)))
    assert cfg.source == str(path)
    d0, d1 = cfg.datasets
    assert d0.resolution == (768, 512) and d0.batch_size == 3
    assert d1.resolution == (256, 256) and d1.batch_size == 7  # CLI value where no table sets it
    a, reg = d0.subsets
    assert a.image_dir == dirs / "a" and a.num_repeats == 10 and a.keep_tokens == 3
    assert reg.keep_tokens == 2 and reg.is_reg and reg.num_repeats == 1
    assert d1.subsets[0].keep_tokens == 1
    assert a.shuffle_caption and a.flip_aug and a.caption_extension == ".txt"  # dot added
    assert a.name == "datasets[0].subsets[0]"


def test_unknown_key_names_file_path_value_and_suggestion(dirs):
    path = _write(dirs, """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "b"
  num_repeat = 10
""")
    with pytest.raises(ConfigError) as err:
        load_dataset_config(path)
    msg = str(err.value)
    assert str(path) in msg and "datasets[0].subsets[1].num_repeat" in msg
    assert "10" in msg and "did you mean 'num_repeats'?" in msg
    assert "\n" not in msg


def test_unknown_key_without_close_match_lists_valid_keys(dirs):
    path = _write(dirs, '[general]\nzzzz = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(ConfigError, match=r"general\.zzzz: unknown key 'zzzz' \(value 1\); valid keys here: .*batch_size"):
        load_dataset_config(path)


@pytest.mark.parametrize("line, key, valid", [
    ('num_repeats = "10"', "num_repeats", "an integer >= 1"),
    ("num_repeats = 0", "num_repeats", "an integer >= 1"),
    ("flip_aug = 1", "flip_aug", "true or false"),
    ("caption_dropout_rate = 1.5", "caption_dropout_rate", r"a number in \[0, 1\]"),
    ("keep_tokens = -1", "keep_tokens", "an integer >= 0"),
    ("caption_extension = 3", "caption_extension", "a file extension"),
])
def test_wrong_subset_values(dirs, line, key, valid):
    path = _write(dirs, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n{line}\n')
    with pytest.raises(ConfigError, match=rf"ds\.toml: datasets\[0\]\.subsets\[0\]\.{key}: bad value .*expected {valid}"):
        load_dataset_config(path)


@pytest.mark.parametrize("value", ['"512"', "[512]", "[512, 512, 3]", "500", "[true, 512]", "0"])
def test_wrong_resolution(dirs, value):
    path = _write(dirs, f'[[datasets]]\nresolution = {value}\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.resolution: bad value .*multiple of 8 or a \[width, height\]"):
        load_dataset_config(path)


def test_keys_at_the_wrong_level(dirs):
    path = _write(dirs, '[general]\nimage_dir = "a"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(ConfigError, match=r"general\.image_dir: image_dir = 'a' is only valid in \[\[datasets\.subsets\]\]"):
        load_dataset_config(path)
    path = _write(dirs, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nresolution = 512\n')
    with pytest.raises(ConfigError, match=r"subsets\[0\]\.resolution: .*dataset key: set it in \[general\] or \[\[datasets\]\]"):
        load_dataset_config(path)


def test_structure_errors(dirs):
    with pytest.raises(ConfigError, match=r"dataset: unknown top-level key .*did you mean 'datasets'"):
        load_dataset_config(_write(dirs, '[[dataset]]\nimage_dir = "a"\n'))
    with pytest.raises(ConfigError, match=r"datasets: expected at least one \[\[datasets\]\]"):
        load_dataset_config(_write(dirs, "[general]\nbatch_size = 2\n"))
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.subsets: expected at least one"):
        load_dataset_config(_write(dirs, "[[datasets]]\nbatch_size = 2\n"))
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.subsets\[0\]\.image_dir: missing"):
        load_dataset_config(_write(dirs, "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n"))
    with pytest.raises(ConfigError, match=r"subsets\[0\]\.metadata_file: file 'm.json' not found"):
        load_dataset_config(_write(dirs, '[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "m.json"\n'))


def test_bad_toml_syntax_names_file_and_line(dirs):
    path = _write(dirs, '[general]\nbatch_size = 2\nshuffle_caption = \n')
    with pytest.raises(ConfigError, match=r"ds\.toml:3: invalid TOML at line 3"):
        load_dataset_config(path)
    (dirs / "latin1.toml").write_bytes('[general]\n# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: not valid UTF-8"):
        load_dataset_config(dirs / "latin1.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found"):
        load_dataset_config(dirs / "nope.toml")


def test_relative_image_dir_resolves_against_cwd(dirs, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("cfg")
    path = _write(elsewhere, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    assert load_dataset_config(path).datasets[0].subsets[0].image_dir == dirs / "a"
    path = _write(elsewhere, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "missing"\n')
    with pytest.raises(ConfigError, match=rf"image_dir: folder 'missing' not found .*current directory {dirs}"):
        load_dataset_config(path)


def test_bucket_cross_checks(dirs):
    path = _write(dirs, '[[datasets]]\nresolution = 128\nenable_bucket = true\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(ConfigError, match=r"datasets\[0\]: min_bucket_reso 256 is larger than the resolution 128x128"):
        load_dataset_config(path)
    path = _write(dirs, '[[datasets]]\nresolution = 128\nenable_bucket = true\nmin_bucket_reso = 64\n'
                        'max_bucket_reso = 32\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with pytest.raises(ConfigError, match=r"min_bucket_reso 64 is larger than max_bucket_reso 32"):
        load_dataset_config(path)


def test_unsupported_keys_are_accepted_with_one_warning(dirs, caplog):
    path = _write(dirs, '[[datasets]]\nnetwork_multiplier = 0.5\n'
                        '[[datasets.subsets]]\nimage_dir = "a"\ncustom_attributes = 5\n')
    with caplog.at_level(logging.WARNING):
        cfg = load_dataset_config(path)
    assert [u.split(" ")[0] for u in cfg.unsupported] == ["datasets[0].network_multiplier",
                                                          "datasets[0].subsets[0].custom_attributes"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "custom_attributes" in warnings[0].getMessage()


def test_defaults_from_cli_namespace():
    args = argparse.Namespace(resolution=(768, 512), train_batch_size=4, caption_extension="txt", flip_aug=True,
                              keep_tokens=0, enable_bucket=False, unrelated="x")
    d = DatasetDefaults.from_args(args)
    assert d.resolution == (768, 512) and d.batch_size == 4 and d.caption_extension == ".txt" and d.flip_aug
    assert d.min_bucket_reso == 256  # absent -> default
    with pytest.raises(ConfigError, match=r"--resolution \[500, 500\]"):
        DatasetDefaults.from_args(argparse.Namespace(resolution=(500, 500)))


def test_kohya_folder_layout(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    (train / "10_zkw heart").mkdir(parents=True)
    (train / "3_cat_dog").mkdir()
    (train / ".ipynb_checkpoints").mkdir()
    (reg / "1_heart").mkdir(parents=True)
    cfg = config_from_train_data_dir(train, reg, DatasetDefaults(batch_size=2, shuffle_caption=True))
    assert cfg.source == "--train_data_dir"
    (bp,) = cfg.datasets
    assert bp.batch_size == 2
    got = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg, s.shuffle_caption) for s in bp.subsets]
    assert got == [("10_zkw heart", 10, "zkw heart", False, True), ("3_cat_dog", 3, "cat_dog", False, True),
                   ("1_heart", 1, "heart", True, True)]


def test_kohya_folder_layout_errors(tmp_path):
    train = tmp_path / "train"
    (train / "10_ok").mkdir(parents=True)
    (train / "cats").mkdir()
    with pytest.raises(DatasetError, match=r"--train_data_dir .*folder 'cats' does not match <repeats>_<concept>"):
        config_from_train_data_dir(train)
    (train / "cats").rmdir()
    (train / "0_x").mkdir()
    with pytest.raises(DatasetError, match=r"'0_x' has 0 repeats"):
        config_from_train_data_dir(train)
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "img.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"images must be inside subfolders named <repeats>_<concept>"):
        config_from_train_data_dir(loose)
    (train / "0_x").rmdir()
    with pytest.raises(DatasetError, match=r"--reg_data_dir .*nothere: folder not found"):
        config_from_train_data_dir(train, tmp_path / "nothere")


def test_bundled_bucket_example_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/train/zkw").mkdir(parents=True)
    (tmp_path / "data/reg/girl").mkdir(parents=True)
    cfg = load_dataset_config(REPO / "configs/examples/dataset_bucket.toml")
    (bp,) = cfg.datasets
    assert bp.enable_bucket and bp.resolution == (512, 512) and bp.batch_size == 2 and not cfg.unsupported
    train, reg = bp.subsets
    assert (train.num_repeats, train.keep_tokens, train.shuffle_caption, train.is_reg) == (10, 1, True, False)
    assert (reg.is_reg, reg.shuffle_caption, reg.class_tokens) == (True, False, "girl")


def test_caption_keys_of_sd_scripts_load_and_validate(dirs):
    path = _write(dirs, '[general]\ncaption_separator = ";"\ntoken_warmup_step = 0.25\n[[datasets]]\n'
                        'enable_wildcard = true\n[[datasets.subsets]]\nimage_dir = "a"\ntoken_warmup_min = 3\n'
                        'keep_tokens_separator = "|||"\ncaption_dropout_every_n_epochs = 2\n')
    sub = load_dataset_config(path, DatasetDefaults(caption_tag_dropout_rate=0.1)).datasets[0].subsets[0]
    assert (sub.caption_separator, sub.token_warmup_step, sub.enable_wildcard, sub.token_warmup_min) == (";", 0.25, True, 3)
    assert (sub.keep_tokens_separator, sub.caption_dropout_every_n_epochs, sub.caption_tag_dropout_rate) == ("|||", 2, 0.1)
    for line, valid in (('caption_separator = ""', "non-empty"), ("token_warmup_step = -1", "a number >= 0"),
                        ('enable_wildcard = "yes"', "true or false"), ("token_warmup_min = 1.5", "an integer >= 0")):
        bad = _write(dirs, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n{line}\n', name="bad.toml")
        with pytest.raises(ConfigError, match=rf"datasets\[0\]\.subsets\[0\]\.{line.split()[0]}: bad value .*{valid}"):
            load_dataset_config(bad)
