"""SDXL (and SD2 v-prediction) training end to end on tiny models written to disk in both layouts.

The models are `tests.models.tiny` builders saved as a diffusers folder and as one LDM single file; the single
file is read against the tiny configs instead of the bundled full-size ones (the only thing redirected). Training
runs through the real entry points: `sdxl_train_network.py` as a subprocess, `train_network.py`'s `main` in-process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.data.synthetic import generate_shapes_dataset
from library.models import single_file
from library.models.loader import detect_model_type, load_sd_model
from library.training import conditioning, losses
from library.training.entry import main
from networks import lora
from tests.models.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[2]
SEED = 11


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> dict:
    """Tiny SDXL as a diffusers folder and as an LDM single file (+ its config folder); a small dataset."""
    root = tmp_path_factory.mktemp("sdxl")
    tiny = make_tiny("sdxl", seed=SEED)
    folder = tiny.save_pipeline(root / "folder")
    ldm = root / "tiny_sdxl.safetensors"
    save_file(tiny.ldm_state_dict(), str(ldm))
    configs = tiny.save_configs(root / "configs")
    data = root / "data"
    generate_shapes_dataset(data / "2_shapes", 4, size=96, seed=3)
    for name in ("0000.png", "0001.png"):  # 96x64 (W, H): a centre crop into the 64x64 bucket, left = 16
        path = data / "2_shapes" / name
        Image.open(path).crop((0, 16, 96, 80)).save(path)
    return {"tiny": tiny, "folder": folder, "ldm": ldm, "configs": configs, "data": data, "root": root}


@pytest.fixture
def tiny_configs(sdxl, monkeypatch):
    """Single files are read against the tiny configs (the bundled ones describe the full-size models)."""
    monkeypatch.setattr(single_file, "bundled_config_dir", lambda model_type, v_parameterization: sdxl["configs"])
    return sdxl["configs"]


def argv(model: Path, data: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
            "--caption_extension", ".txt", "--output_dir", str(out), "--output_name", "lora", "--network_dim", "4",
            "--network_alpha", "4", "--optimizer_type", "AdamW", "--learning_rate", "3e-3",
            "--max_train_steps", str(steps), "--seed", "5", "--log_every_n_steps", "1", *extra]


def prefixes(path: Path) -> set[str]:
    return {k.split("_")[0] + "_" + k.split("_")[1] for k in load_file(str(path))}


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------------------ micro-conditioning
def test_time_ids_are_original_size_crop_and_target_in_sdxl_order():
    ids = conditioning.sdxl_time_ids([(96, 64), (1024, 768)], [(0, 16), (8, 0)], [(64, 64), (896, 640)], "cpu")
    # (W, H) in, (h, w) out: original (h, w), crop (top, left), target (h, w) as diffusers' SDXL pipeline builds them
    expected = torch.tensor([[64, 96, 0, 16, 64, 64], [768, 1024, 8, 0, 640, 896]], dtype=torch.float32)
    assert torch.equal(ids, expected)


def test_trainer_batches_carry_each_images_own_time_ids_cached_or_not(sdxl, tmp_path):
    from library.cli import parse_args
    from library.data.dataset import collate
    from library.training.trainer import LoRATrainer

    def conditioning_of(*extra: str):
        trainer = LoRATrainer(parse_args(argv(sdxl["folder"], sdxl["data"], tmp_path / extra[0][2:], *extra,
                                              "--sdxl")))
        trainer.setup()
        batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
        with torch.no_grad():
            return batch, trainer._conditioning(batch)

    batch, fresh = conditioning_of("--network_train_unet_only")
    _, cached = conditioning_of("--cache_text_encoder_outputs", "--network_train_unet_only")
    rows = {tuple(r) for r in fresh.added_cond_kwargs["time_ids"].tolist()}
    # crop (top, left) as sd-scripts passes it: the 96x64 image fitted inside 64x64 is 64x42.7 at top (64-42.7)//2
    assert rows == {(64.0, 96.0, 10.0, 0.0, 64.0, 64.0), (96.0, 96.0, 0.0, 0.0, 64.0, 64.0)}
    assert sorted(batch["original_size"]) == [(96, 64), (96, 64), (96, 64), (96, 64), (96, 96), (96, 96), (96, 96),
                                              (96, 96)]  # 2 repeats
    for key in ("time_ids", "text_embeds"):
        torch.testing.assert_close(cached.added_cond_kwargs[key], fresh.added_cond_kwargs[key])
    torch.testing.assert_close(cached.encoder_hidden_states, fresh.encoder_hidden_states)
    assert fresh.encoder_hidden_states.shape[-1] == 32 + 64  # both encoders' penultimate layers, concatenated
    assert fresh.added_cond_kwargs["text_embeds"].shape[-1] == 48  # te2's projection


# ------------------------------------------------------------------------------------------ training runs
@torch.no_grad()
def test_sdxl_train_network_script_trains_both_encoders_and_diffusers_loads_the_file(sdxl, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "sdxl_train_network.py"),
                           *argv(sdxl["folder"], sdxl["data"], out, "--network_args", "conv_dim=2", "conv_alpha=1")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out / "lora.safetensors"
    assert prefixes(path) == {"lora_unet", "lora_te1", "lora_te2"}
    meta = metadata(path)
    assert meta["modelspec.architecture"].startswith("stable-diffusion-xl") and meta["ss_steps"] == "4"

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl["folder"], local_files_only=True)
    gen = torch.Generator().manual_seed(0)
    sample, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 600])
    enc = torch.randn(2, 77, 96, generator=gen)
    cond = {"text_embeds": torch.randn(2, 48, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outputs(p) -> tuple[torch.Tensor, ...]:
        return (p.unet(sample, t, enc, added_cond_kwargs=cond).sample, p.text_encoder(ids).last_hidden_state,
                p.text_encoder_2(ids).text_embeds)

    base = outputs(pipe)
    pipe.load_lora_weights(str(path))
    theirs = outputs(pipe)

    # our own network from the same file, on a fresh copy of the same components
    model = load_sd_model(sdxl["folder"], sdxl=True)
    network, _ = lora.create_network_from_weights(1.0, str(path), model.vae, model.text_encoders, model.unet)
    network.apply_to(model.text_encoders, model.unet)
    network.load_weights(str(path))
    ours = (model.unet(sample, t, enc, added_cond_kwargs=cond).sample, model.text_encoders[0](ids).last_hidden_state,
            model.text_encoders[1](ids).text_embeds)
    for before, after, mine in zip(base, theirs, ours, strict=True):
        assert (after - before).abs().max() > 1e-4  # every part of the model was trained and is changed
        torch.testing.assert_close(after, mine, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def fixed_noise_loss(model, network, multiplier: float, data: Path) -> float:
    """Epsilon MSE on the training images at fixed noise and timesteps, with the LoRA at `multiplier`."""
    from library.data.buckets import crop_top_left, fit_predefined
    from library.data.transforms import fit_to_bucket

    network.set_multiplier(multiplier)
    images = [Image.open(p).convert("RGB") for p in sorted(data.rglob("*.png"))]
    crops = [(fit_to_bucket(np.asarray(img), fit_predefined(img.size, [(64, 64)])),  # as the dataset feeds them
              crop_top_left((64, 64), img.size, False)) for img in images]
    pixels = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                          for c, _ in crops])
    latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
    captions = [(data / "2_shapes" / f"{i:04d}.txt").read_text().strip() for i in range(len(images))]
    cond = conditioning.encode_prompts(model, captions, None, "cpu")
    time_ids = conditioning.sdxl_time_ids([img.size for img in images], [top_left for _, top_left in crops],
                                          [(64, 64)] * len(images), "cpu")
    scheduler = losses.make_noise_scheduler(model.scheduler_config, v_parameterization=False, zero_terminal_snr=False)
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for t in (100, 300, 500, 700, 900):
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.full((len(images),), t)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = model.unet(noisy, timesteps, cond.encoder_hidden_states,
                          added_cond_kwargs={**cond.added_cond_kwargs, "time_ids": time_ids}).sample
        total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / 5


def test_train_network_detects_sdxl_in_a_single_file_and_trains_the_unet_from_cached_outputs(sdxl, tiny_configs,
                                                                                              tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="loraforge")
    out = tmp_path / "out"
    assert detect_model_type(sdxl["ldm"]) == "sdxl"
    rc = main(argv(sdxl["ldm"], sdxl["data"], out, "--network_train_unet_only", "--cache_text_encoder_outputs",
                   "--cache_latents", "--gradient_checkpointing", "--network_args", "conv_dim=4", "conv_alpha=4",
                   steps=16))
    assert rc == 0
    assert "is an SDXL model: training it as SDXL" in caplog.text
    path = out / "lora.safetensors"
    assert prefixes(path) == {"lora_unet"}
    assert metadata(path)["modelspec.architecture"].startswith("stable-diffusion-xl")

    model = load_sd_model(sdxl["ldm"], sdxl=True)
    network, _ = lora.create_network_from_weights(1.0, str(path), model.vae, model.text_encoders, model.unet)
    network.apply_to(model.text_encoders, model.unet, apply_text_encoder=False)
    network.load_weights(str(path))
    base = fixed_noise_loss(model, network, 0.0, sdxl["data"])
    trained = fixed_noise_loss(model, network, 1.0, sdxl["data"])
    assert trained < base * 0.9, (base, trained)


def test_cached_text_encoder_outputs_need_unet_only_training(sdxl, tmp_path, capsys):
    rc = main(argv(sdxl["folder"], sdxl["data"], tmp_path / "out", "--cache_text_encoder_outputs", "--sdxl"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "--cache_text_encoder_outputs needs --network_train_unet_only" in err
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_broken_sdxl_files_are_named_with_what_was_expected(sdxl, tiny_configs, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sdxl["ldm"].read_bytes()[:5000])
    assert main(argv(truncated, sdxl["data"], tmp_path / "a")) == 2
    assert f"{truncated}: not a readable safetensors file" in capsys.readouterr().err

    state = load_file(str(sdxl["ldm"]))
    del state["conditioner.embedders.1.model.ln_final.weight"]
    missing = tmp_path / "missing.safetensors"
    save_file(state, str(missing))
    assert main(argv(missing, sdxl["data"], tmp_path / "b", "--sdxl")) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "text_encoder_2" in err and "final_layer_norm.weight" in err


# ------------------------------------------------------------------------------------------ SD2 v-prediction
def test_sd2_v_prediction_with_zero_terminal_snr_trains(sdxl, tmp_path, monkeypatch):
    tiny = make_tiny("sd2", seed=SEED)
    ldm = tmp_path / "sd2.safetensors"
    save_file(tiny.ldm_state_dict(), str(ldm))
    configs = tiny.save_configs(tmp_path / "configs")
    monkeypatch.setattr(single_file, "bundled_config_dir", lambda model_type, v_parameterization: configs)
    out = tmp_path / "out"
    flags = ("--v2", "--v_parameterization", "--scale_v_pred_loss_like_noise_pred", "--zero_terminal_snr",
             "--min_snr_gamma", "5")
    assert main(argv(ldm, sdxl["data"], out, *flags[1:], steps=3)) == 2  # without --v2: an error, not SD1
    from library.cli import parse_args
    from library.training.trainer import LoRATrainer

    trainer = LoRATrainer(parse_args(argv(ldm, sdxl["data"], out, *flags, steps=3)))
    trainer.setup()
    scheduler = trainer.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.alphas_cumprod[-1] == 0
    trainer.train()
    meta = metadata(out / "lora.safetensors")
    assert meta["ss_v2"] == "True" and meta["modelspec.architecture"].startswith("stable-diffusion-v2-768-v")
    assert prefixes(out / "lora.safetensors") == {"lora_unet", "lora_te"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="--cuda_graphs records CUDA graphs")
def test_sdxl_with_cuda_graphs_trains_the_lora_that_eager_trains(sdxl, tmp_path):
    """The recorded step carries SDXL's added conditioning (pooled embedding, per-image time ids) as inputs."""
    trained = {}
    for label, flags in (("eager", []), ("graphs", ["--cuda_graphs"])):
        out = tmp_path / label
        assert main(argv(sdxl["folder"], sdxl["data"], out, "--network_train_unet_only", "--cache_text_encoder_outputs",
                         "--cache_latents", "--gradient_checkpointing", "--mixed_precision", "bf16", *flags,
                         steps=6)) == 0
        trained[label] = load_file(str(out / "lora.safetensors"))
    ups = sorted(k for k in trained["eager"] if "lora_up" in k)
    eager, graphs = (torch.cat([trained[run][k].float().flatten() for k in ups]) for run in ("eager", "graphs"))
    assert graphs.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(eager, graphs, dim=0) > 0.999


def test_sdxl_trains_with_masks_and_the_objective_options(sdxl, tmp_path):
    """SDXL with conditioning_data_dir masks (cropped as the 96x64 images are), Huber loss, noise and timestep
    options, debiased weights and max-norm, from cached latents: a LoRA other than the plain run's."""
    masks = tmp_path / "masks" / "2_shapes"
    masks.mkdir(parents=True)
    for path in sorted((sdxl["data"] / "2_shapes").glob("*.png")):
        size = Image.open(path).size
        half = Image.new("RGB", size, (0, 0, 0))
        half.paste((255, 255, 255), (0, 0, size[0] // 2, size[1]))
        half.save(masks / path.name)
    common = ("--network_train_unet_only", "--cache_text_encoder_outputs", "--cache_latents", "--sdxl")
    options = ("--masked_loss", "--conditioning_data_dir", str(tmp_path / "masks"), "--loss_type", "huber",
               "--noise_offset", "0.05", "--adaptive_noise_scale", "0.01", "--ip_noise_gamma", "0.1",
               "--min_timestep", "50", "--max_timestep", "950", "--debiased_estimation_loss",
               "--scale_weight_norms", "1")
    for name, flags in (("plain", ()), ("options", options)):
        assert main(argv(sdxl["folder"], sdxl["data"], tmp_path / name, *common, *flags, steps=3)) == 0
    plain, trained = (load_file(str(tmp_path / name / "lora.safetensors")) for name in ("plain", "options"))
    assert max((plain[k] - trained[k]).abs().max().item() for k in plain) > 1e-6
    meta = metadata(tmp_path / "options" / "lora.safetensors")
    assert meta["ss_loss_type"] == "huber" and meta["modelspec.timestep_range"] == "50,950"
