"""sd-scripts' caption and text-encoder options through the real command line, TOML and trainer."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from library.cli import parse_args
from library.config.dataset_config import load_dataset_config
from library.training import conditioning
from library.training.entry import main
from library.training.setup import dataset_defaults
from library.training.trainer import LoRATrainer, sample_steps
from tests.training.conftest import train_argv

CAPTION_FLAGS = ["--caption_separator", ";", "--keep_tokens_separator", "|||", "--secondary_separator", ";;;",
                 "--enable_wildcard", "--caption_prefix", "zkw", "--caption_suffix", "best",
                 "--caption_dropout_every_n_epochs", "3", "--caption_tag_dropout_rate", "0.2",
                 "--token_warmup_min", "2", "--token_warmup_step", "0.5"]


def test_command_line_caption_options_are_dataset_defaults_the_toml_overrides(tiny_dataset, tmp_path):
    args = parse_args(train_argv(tiny_dataset, tmp_path / "out", *CAPTION_FLAGS))
    sub = load_dataset_config(tiny_dataset, dataset_defaults(args)).datasets[0].subsets[0]
    got = {k: getattr(sub, k) for k in ("caption_separator", "keep_tokens_separator", "secondary_separator",
                                        "enable_wildcard", "caption_prefix", "caption_suffix",
                                        "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                                        "token_warmup_min", "token_warmup_step")}
    assert got == {"caption_separator": ";", "keep_tokens_separator": "|||", "secondary_separator": ";;;",
                   "enable_wildcard": True, "caption_prefix": "zkw", "caption_suffix": "best",
                   "caption_dropout_every_n_epochs": 3, "caption_tag_dropout_rate": 0.2, "token_warmup_min": 2,
                   "token_warmup_step": 0.5}
    tiny_dataset.write_text(tiny_dataset.read_text(encoding="utf-8") + "caption_prefix = 'own'\n", encoding="utf-8")
    assert load_dataset_config(tiny_dataset, dataset_defaults(args)).datasets[0].subsets[0].caption_prefix == "own"


@pytest.mark.parametrize("flag, value", [("--caption_tag_dropout_rate", "1.5"), ("--max_token_length", "100"),
                                         ("--token_warmup_step", "-1"), ("--caption_separator", "")])
def test_bad_values_stop_with_exit_2(tiny_dataset, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        parse_args(train_argv(tiny_dataset, tmp_path / "out", flag, value))
    assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_cached_text_encoder_outputs_refuse_captions_that_change(tiny_dataset, tmp_path, capsys):
    tiny_dataset.write_text(tiny_dataset.read_text(encoding="utf-8") + "token_warmup_step = 4\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = main(train_argv(tiny_dataset, out, "--cache_text_encoder_outputs", "--network_train_unet_only"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --cache_text_encoder_outputs: the captions of datasets[0].subsets[0]")
    assert not out.exists() or not any(out.iterdir())


def test_sample_steps_count_optimizer_steps_like_sd_scripts():
    batches = [[4, 1], [0], [3, 2], [5]]
    assert sample_steps(batches, epoch=0, accumulate=1) == {4: 0, 1: 0, 0: 1, 3: 2, 2: 2, 5: 3}
    assert sample_steps(batches, epoch=2, accumulate=3) == {4: 4, 1: 4, 0: 4, 3: 4, 2: 4, 5: 5}  # 2 steps an epoch


@torch.no_grad()
def test_cached_long_weighted_captions_equal_fresh_encoding(tiny_dataset, tmp_path):
    (tmp_path / "images" / "img00.txt").write_text("(a red:1.4) circle, " + "on a green background, " * 40,
                                                   encoding="utf-8")
    trainer = LoRATrainer(parse_args(train_argv(tiny_dataset, tmp_path / "out", "--cache_text_encoder_outputs",
                                                "--network_train_unet_only", "--max_token_length", "225",
                                                "--weighted_captions")))
    trainer.setup()
    caption = next(c for c in trainer.cached_text if c.startswith("(a red:1.4)"))
    cached = trainer.cached_text[caption].encoder_hidden_states
    assert cached.shape == (1, 227, 32)
    fresh = conditioning.encode_prompts(trainer.model, [caption], None, trainer.device, max_token_length=225,
                                        weighted=True).encoder_hidden_states
    torch.testing.assert_close(cached, fresh)
    plain = conditioning.encode_prompts(trainer.model, [caption], None, trainer.device, max_token_length=225)
    assert not torch.allclose(cached, plain.encoder_hidden_states)  # the emphasis reached the cache


def test_training_with_long_weighted_warming_captions_records_metadata(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    rc = main(train_argv(tiny_dataset, out, "--max_token_length", "150", "--weighted_captions", "--shuffle_caption",
                         "--token_warmup_step", "2", "--caption_tag_dropout_rate", "0.1",
                         "--caption_dropout_every_n_epochs", "2", "--caption_prefix", "(zkw:1.2),", steps=3))
    assert rc == 0
    with safe_open(str(out / "t.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_max_token_length"] == "150" and meta["ss_caption_tag_dropout_rate"] == "0.1"
    assert meta["ss_caption_dropout_every_n_epochs"] == "2" and meta["ss_caption_dropout_rate"] == "0.0"
