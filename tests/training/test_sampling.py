"""Sample images as sd-scripts makes them: its 16 sampler names, its prompt-file formats and options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from library.training.sample_prompts import SAMPLERS, SamplePrompt, load_prompts
from library.training.sampling import generate, make_scheduler
from tests.training.conftest import train_argv

# sd-scripts' get_my_scheduler, name by name (train_util.py)
SD_SCRIPTS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}


def test_the_sampler_option_takes_exactly_sd_scripts_sixteen_names():
    from library.cli import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "sample_sampler")
    assert sorted(action.choices) == sorted(SD_SCRIPTS) and len(action.choices) == 16 and action.default == "ddim"


@pytest.mark.parametrize("name", sorted(SD_SCRIPTS))
@pytest.mark.parametrize("v_pred", [False, True])
def test_each_sampler_is_sd_scripts_scheduler_with_its_schedule(name, v_pred):
    s = make_scheduler(name, v_pred)
    assert type(s).__name__ == SD_SCRIPTS[name]
    c = s.config
    assert (c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule) == (1000, 0.00085, 0.012, "scaled_linear")
    assert c.prediction_type == ("v_prediction" if v_pred else "epsilon")
    if name.startswith("dpmsolver"):
        assert c.algorithm_type == name
    if "clip_sample" in c:
        assert c.clip_sample is True  # sd-scripts switches clipping on wherever the scheduler has it


def test_a_txt_prompt_file_reads_every_option_in_any_case_with_sd_scripts_defaults_and_rounding(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\n"
                    "a cat --N ugly, blurry --W 515 --h 13 --D 7 --S 5000 --L 4.5 --SS K_Euler_A\n"
                    " # indented: a prompt, as sd-scripts reads it\n"
                    "a dog --s 0 --g 3.5\n\n", encoding="utf-8")
    cat, hashed, dog = load_prompts(path)
    assert cat == SamplePrompt("a cat", negative="ugly, blurry", width=512, height=64, steps=1000, scale=4.5, seed=7,
                               sampler="k_euler_a")
    assert hashed.prompt == "# indented: a prompt, as sd-scripts reads it"
    assert dog == SamplePrompt("a dog", width=512, height=512, steps=1, scale=7.5)  # sd-scripts' defaults


def test_toml_and_json_prompt_files_as_sd_scripts_reads_them(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text("[prompt]\nwidth = 256\nsample_steps = 12\nscale = 5.0\n\n"
                    "[[prompt.subset]]\nprompt = 'a cat'\nseed = 3\n\n"
                    "[[prompt.subset]]\nprompt = 'a dog'\nwidth = 320\nsample_sampler = 'heun'\n"
                    "negative_prompt = 'blurry'\n", encoding="utf-8")
    assert load_prompts(toml) == [SamplePrompt("a cat", width=256, steps=12, scale=5.0, seed=3),
                                  SamplePrompt("a dog", "blurry", width=320, steps=12, scale=5.0, sampler="heun")]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["a cat --w 128 --s 4", {"prompt": "a dog", "height": 192, "guidance_scale": 3.5}]),
                  encoding="utf-8")
    assert load_prompts(js) == [SamplePrompt("a cat", width=128, steps=4), SamplePrompt("a dog", height=192)]


@pytest.fixture(scope="module")
def tiny_model():
    from library.models.loader import load_sd_model

    return load_sd_model("builtin:tiny-sd")


def test_every_sampler_draws_an_image_and_samplers_differ(tiny_model):
    prompts = [SamplePrompt("a red circle", width=64, height=64, steps=4, scale=5.0, seed=1)]
    images = {name: np.asarray(generate(tiny_model, prompts, name, torch.device("cpu"), 0)[0], dtype=np.int16)
              for name in SAMPLERS}
    assert all(im.shape == (64, 64, 3) for im in images.values())
    assert np.array_equal(images["euler"], images["k_euler"])  # two names, one scheduler
    assert np.abs(images["ddim"] - images["euler_a"]).mean() > 1  # another sampler, another picture
    per_prompt = [SamplePrompt("a red circle", width=64, height=64, steps=4, scale=5.0, seed=1, sampler="euler_a")]
    own = np.asarray(generate(tiny_model, per_prompt, "ddim", torch.device("cpu"), 0)[0], dtype=np.int16)
    assert np.array_equal(own, images["euler_a"])  # a prompt's --ss wins over --sample_sampler


def test_samples_during_training_use_the_prompt_file_and_sampler(tiny_dataset, tmp_path):
    from library.training.entry import main

    prompts = tmp_path / "p.toml"
    prompts.write_text("[prompt]\nwidth = 64\nheight = 64\nsample_steps = 2\n[[prompt.subset]]\nprompt = 'a cat'\n",
                       encoding="utf-8")
    out = tmp_path / "out"
    # --sample_every_n_epochs replaces --sample_every_n_steps (as sd-scripts); the one step ends no epoch
    assert main(train_argv(tiny_dataset, out, "--sample_prompts", str(prompts), "--sample_sampler", "k_dpm_2_a",
                           "--sample_at_first", "--sample_every_n_steps", "1", "--sample_every_n_epochs", "1",
                           steps=1)) == 0
    assert sorted(p.name for p in (out / "sample").glob("t_0*.png")) == ["t_000000_00_a_cat.png"]
