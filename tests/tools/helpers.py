"""Test helpers for the LoRA tools: tiny single-file models, LoRA files with known weights, model outputs."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from library.models import load_sd_model
from networks.lora import LoRANetwork, create_network
from networks.sdxl_keys import unet_key_to_sai
from tests.models.tiny import make_tiny, unet_inputs
from tests.networks.test_lora import randomize_lora

FLAGS = {"sd1": {}, "sd2": {"v2": True}, "sdxl": {"sdxl": True}}


def single_file(tmp_path: Path, kind: str, monkeypatch, seed: int = 7) -> Path:
    """A tiny original-layout checkpoint; single-file loads (ours and the tools') read its configs."""
    tiny = make_tiny(kind, seed=seed)
    configs = tiny.save_configs(tmp_path / f"{kind}-configs")
    monkeypatch.setattr("library.models.single_file.bundled_config_dir", lambda *_: configs)
    path = tmp_path / f"{kind}-base.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tiny.ldm_state_dict().items()}, path)
    return path


def load(path, kind: str):
    return load_sd_model(str(path), **FLAGS[kind])


def lora_file(
    model,
    path: Path,
    *,
    dim: int = 4,
    alpha: float = 2.0,
    conv_dim: int | None = 2,
    seed: int = 1,
    sai_names: bool = False,
) -> LoRANetwork:
    """A LoRA with random non-zero factors on every target layer, saved as sd-scripts would name it."""
    kwargs = {"conv_dim": conv_dim, "conv_alpha": 1.0} if conv_dim else {}
    with torch.random.fork_rng(devices=[]):
        network = create_network(1.0, dim, alpha, None, model.text_encoders, model.unet, **kwargs)
    randomize_lora(network, seed=seed, std=0.2)
    base = "sdxl_base_v1-0" if model.model_type == "sdxl" else "sd_v1"
    metadata = {
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": base,
        "ss_v2": str(model.model_type == "sd2"),
    }
    state = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    if sai_names:
        state = {unet_key_to_sai(k): v for k, v in state.items()}
    safetensors.torch.save_file(state, path, metadata)
    return network


@torch.no_grad()
def outputs(model) -> dict[str, torch.Tensor]:
    """U-Net prediction and every text encoder's last hidden state on fixed inputs."""
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    out = {"unet": model.unet(**unet_inputs(model)).sample}
    for i, te in enumerate(model.text_encoders):
        out[f"te{i}"] = te(ids).last_hidden_state
    return out


@torch.no_grad()
def outputs_with_lora(model, network_file: Path, multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """The base model with the LoRA hooked in by networks.lora (the reference a merge must equal)."""
    from networks.lora import create_network_from_weights

    network, weights = create_network_from_weights(
        multiplier, network_file, None, model.text_encoders, model.unet
    )
    network.load_state_dict(weights)
    network.set_multiplier(multiplier)
    network.apply_to(model.text_encoders, model.unet)
    try:
        return outputs(model)
    finally:
        network.remove_from()


def merge_argv(base, loras: list, ratios: list[str], out, *extra: str) -> list[str]:
    """merge_lora.py's command line merging `loras` (one ratio each) into the model `base`, saved to `out`."""
    return [
        "--sd_model",
        str(base),
        "--models",
        *map(str, loras),
        "--ratios",
        *ratios,
        "--save_to",
        str(out),
        *extra,
    ]
