"""Network files: reading, writing, and the key namings they come in.

Inside, every network names its modules after our models' module paths (kohya style, `lora_unet_<diffusers
path>`). Files travel in other namings, and this module translates at the edge:

- SDXL U-Net keys are written with the SAI names sd-scripts uses (`lora_unet_input_blocks_4_1_proj_in`, see
  `networks.sdxl_keys`) and read in either naming.
- diffusers / PEFT LoRA files (`unet.<path>.lora_A.weight`, `text_encoder.<path>.lora_B.weight`, the older
  `unet.<path>.lora.down.weight`) are read as kohya LoRA keys with alpha = rank (their scale is 1).

A file whose modules do not all belong to the network is an error naming how many matched (`check_modules`):
loading half a LoRA and training on is the silent failure users cannot see.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from library.errors import ModelError
from library.models.common import unpickling_refusal
from networks.sdxl_keys import unet_key_to_diffusers, unet_key_to_sai


def read_lora_file(file: str | os.PathLike) -> dict[str, Tensor]:
    """State dict of a `.safetensors` or torch-pickled network file (tensors only, no code execution)."""
    path = Path(file)
    if not path.is_file():
        raise ModelError(f"LoRA file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects other than tensors: refused, never run
        raise ModelError(f"refused LoRA file {path}: it holds code or objects that are not tensors "
                         f"({unpickling_refusal(e)}); use a .safetensors LoRA") from None
    except Exception as e:  # corrupt or foreign file: one line naming the file
        raise ModelError(f"cannot read LoRA file {path}: {type(e).__name__}: {e}".splitlines()[0]) from e


def safetensors_hashes(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts precomputes them for A1111's additional-networks index.

    The model hash is the sha256 of the tensor data (everything after the header); the legacy hash is the
    first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB. Only `ss_*` metadata enters the bytes
    hashed, so user metadata does not change the hash.
    """
    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(state_dict), ss_meta)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def write_network_file(
    state_dict: Mapping[str, Tensor],
    file: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
) -> None:
    """Write atomically; `.safetensors` gets the metadata and the sshs_* hashes, anything else `torch.save`."""
    tensors = {
        k: v.detach().to(device="cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        .contiguous()
        for k, v in state_dict.items()
    }
    path = Path(file)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(tensors, meta)
        safetensors.torch.save_file(tensors, str(tmp), meta)
    else:
        torch.save(tensors, tmp)
    with open(tmp, "rb+") as f:  # the bytes reach the disk before the name points at them
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_network(
    network: nn.Module,
    file: str | os.PathLike,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
) -> None:
    """Every network kind's save_weights: its state in the file naming (`to_file_keys`), written atomically.

    The network carries `sdxl` (set from its U-Net when built)."""
    write_network_file(to_file_keys(network.state_dict(), network.sdxl), file, dtype, metadata)


def untrained_prefixes(network: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the parts a network has no adapters on: a file's modules there are not checked on load."""
    parts = (("lora_unet", network.unet_loras), ("lora_te", network.text_encoder_loras))
    return tuple(prefix for prefix, adapters in parts if not adapters)


def is_sdxl_unet(unet: nn.Module | None) -> bool:
    """SDXL's U-Net is the one conditioned on pooled text and size ids (`addition_embed_type="text_time"`)."""
    config = getattr(unet, "config", None)
    return config is not None and getattr(config, "addition_embed_type", None) == "text_time"


def to_file_keys(state_dict: Mapping[str, Tensor], sdxl: bool) -> dict[str, Tensor]:
    """Our keys -> the keys written: SDXL U-Net modules get sd-scripts' SAI names."""
    if not sdxl:
        return dict(state_dict)
    return {unet_key_to_sai(k): v for k, v in state_dict.items()}


_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<part>unet|text_encoder|text_encoder_2)\.(?P<path>.+?)"
    r"\.(?:lora_(?P<ab>A|B)(?:\.default)?\.weight|lora\.(?P<du>down|up)\.weight|(?P<alpha>alpha))$"
)
_PEFT_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def _from_diffusers_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers / PEFT LoRA keys -> kohya keys, alpha = rank where the file has none (their scale is 1)."""
    two_encoders = any(k.startswith(("text_encoder_2.", "base_model.model.text_encoder_2.")) for k in state_dict)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ModelError(f"LoRA key {key}: neither kohya (lora_unet_*, lora_te*_) nor diffusers/PEFT form")
        prefix = _PEFT_PREFIX[m["part"]]
        if prefix == "lora_te" and two_encoders:
            prefix = "lora_te1"
        name = f"{prefix}_{m['path'].replace('.', '_')}"
        if m["alpha"]:
            out[f"{name}.alpha"] = value
        else:
            out[f"{name}.{'lora_down' if (m['ab'] or m['du']) in ('A', 'down') else 'lora_up'}.weight"] = value
    for key in [k for k in out if k.endswith(".lora_down.weight")]:
        out.setdefault(key.replace(".lora_down.weight", ".alpha"), torch.tensor(float(out[key].shape[0])))
    return out


def to_network_keys(state_dict: Mapping[str, Tensor], sdxl: bool) -> dict[str, Tensor]:
    """A file's keys -> our keys: diffusers/PEFT files converted, SAI-named SDXL U-Net keys renamed back."""
    sd = dict(state_dict)
    if sd and not any(k.startswith(("lora_", "oft_")) for k in sd):
        sd = _from_diffusers_keys(sd)
    if sdxl and any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block",
                                  "oft_unet_input_blocks", "oft_unet_output_blocks", "oft_unet_middle_block",
                                  "lora_unet_time_embed", "lora_unet_label_emb", "lora_unet_out_"))
                    for k in sd):
        try:
            sd = {unet_key_to_diffusers(k): v for k, v in sd.items()}
        except KeyError as e:
            raise ModelError(f"{e.args[0]} (the file mixes SAI and diffusers U-Net names)") from None
    return sd


def module_names(keys: Iterable[str]) -> set[str]:
    return {k.split(".", 1)[0] for k in keys}


def check_modules(
    file_modules: set[str], network_modules: set[str], source: str, ignored_prefixes: tuple[str, ...] = ()
) -> None:
    """Every module of the file must exist in the network (those under `ignored_prefixes`, parts not trained,
    excepted); otherwise one line: how many matched, and examples of both sides."""
    example = next(iter(sorted(network_modules)), "none")
    if file_modules and not file_modules & network_modules:
        raise ModelError(
            f"{source}: none of its {len(file_modules)} modules (e.g. {sorted(file_modules)[0]}) match this network "
            f"(e.g. {example}); is it for this model type and network module?"
        )
    considered = {m for m in file_modules if not m.startswith(ignored_prefixes)} if ignored_prefixes else file_modules
    unmatched = sorted(considered - network_modules)
    if not unmatched:
        return
    matched = len(considered) - len(unmatched)
    raise ModelError(
        f"{source}: only {matched} of its {len(considered)} modules match this network "
        f"(e.g. {unmatched[0]} does not; the network has e.g. {example}); is it for this model type and "
        "network module?"
    )
