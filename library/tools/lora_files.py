"""Read kohya-format LoRA files into per-module factors and write them back atomically with `ss_*` metadata.

Keys are `<module>.lora_down.weight`, `<module>.lora_up.weight`, `<module>.alpha` (kohya LoRA, LoCon and
LyCORIS' `locon` all use them). LyCORIS LoHa (`hada_*`) and LoKr (`lokr_*`) modules are read for merging
into a model (`read_any_lora`); other LyCORIS types, and LoHa/LoKr where only LoRA factors make sense, are
refused by name rather than their modules dropped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from library.errors import ConfigError, ModelError
from library.tools.lora_math import loha_delta, lokr_delta, lora_delta
from library.training.atomic import atomic_file
from library.training.metadata import MODELSPEC_VERSION, architecture
from networks.files import read_lora_file, safetensors_hashes

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_LYCORIS_MARKERS = {
    "hada_w1_a": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "b_norm": "(IA)^3/norm",
    "diff": "full-diff",
}
_LYCORIS_MERGEABLE = ("hada_", "lokr_")
_LYCORIS_KEYS = {  # per type: each tuple lists alternative key sets, one of which must be present
    "LoHa": ((("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),)),
    "LoKr": (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")),
}
_LOKR_SECOND = (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))
PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LycorisWeights:
    """One LyCORIS LoHa / LoKr module: its tensors by key suffix (`hada_w1_a`, `lokr_w1`, ...) and alpha."""

    kind: str  # "LoHa" | "LoKr"
    tensors: dict[str, Tensor]
    alpha: float | None

    def to(self, device: torch.device, dtype: torch.dtype) -> LycorisWeights:
        return LycorisWeights(
            self.kind, {k: v.to(device, dtype) for k, v in self.tensors.items()}, self.alpha
        )

    def delta(self, weight_shape: tuple[int, ...]) -> Tensor:
        t = self.tensors
        if self.kind == "LoHa":
            rank = t["hada_w1_b"].shape[0]
            scale = self.alpha / rank if self.alpha else 1.0
            return loha_delta(
                t["hada_w1_a"],
                t["hada_w1_b"],
                t["hada_w2_a"],
                t["hada_w2_b"],
                scale,
                weight_shape,
                t.get("hada_t1"),
                t.get("hada_t2"),
            )
        factors, rank = [], None
        for i in ("1", "2"):
            if f"lokr_w{i}" in t:
                factors.append(t[f"lokr_w{i}"])
                continue
            rank = t[f"lokr_w{i}_b"].shape[0]
            if f"lokr_t{i}" in t:
                factors.append(
                    torch.einsum("ijkl,ip,jr->prkl", t[f"lokr_t{i}"], t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"])
                )
            else:
                factors.append(t[f"lokr_w{i}_a"] @ t[f"lokr_w{i}_b"])
        scale = self.alpha / rank if (self.alpha and rank) else 1.0  # full factors: alpha does not apply
        return lokr_delta(factors[0], factors[1], scale, weight_shape)


@dataclass
class LoraWeights:
    """One module's factors; `alpha` None means "no alpha key" (kohya then scales by 1)."""

    down: Tensor
    up: Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha / self.rank) if self.alpha else 1.0

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraWeights:
        return LoraWeights(self.down.to(device, dtype), self.up.to(device, dtype), self.alpha)

    def delta(self, weight_shape: tuple[int, ...]) -> Tensor:
        return lora_delta(self.down, self.up, self.scale, weight_shape)


def precision(name: str | None, flag: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in PRECISIONS:
        raise ConfigError(f"{flag} {name!r}: valid values are {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's metadata; other formats carry none."""
    if Path(path).suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError: bad header; the tensor read names the problem too
        raise ModelError(
            f"cannot read LoRA file {path}: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from exc


def read_lora(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, LoraWeights], dict]:
    """(module name -> factors, metadata) of a kohya-format LoRA file, floats cast to `dtype`."""
    state = read_lora_file(path)
    return split_modules(state, str(path), dtype), read_metadata(path)


def read_any_lora(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> dict[str, LoraWeights | LycorisWeights]:
    """Modules of a kohya LoRA/LoCon or a LyCORIS LoHa/LoKr file (what merging into a model accepts)."""
    state = read_lora_file(path)
    lycoris: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        if rest.startswith(_LYCORIS_MERGEABLE):
            lycoris.setdefault(name, {})[rest] = value.to(dtype)
    rest_state = {k: v for k, v in state.items() if k.partition(".")[0] not in lycoris}
    modules: dict[str, LoraWeights | LycorisWeights] = {}
    if rest_state or not lycoris:
        modules.update(split_modules(rest_state, str(path), dtype))
    for name, tensors in lycoris.items():
        kind = "LoHa" if any(k.startswith("hada_") for k in tensors) else "LoKr"
        for alternatives in (_LYCORIS_KEYS[kind], *((_LOKR_SECOND,) if kind == "LoKr" else ())):
            if not any(all(k in tensors for k in keys) for keys in alternatives):
                wanted = " or ".join("+".join(keys) for keys in alternatives)
                raise ModelError(f"{path}: {kind} module {name} lacks {wanted}")
        alpha = state.get(f"{name}.alpha")
        modules[name] = LycorisWeights(kind, tensors, float(alpha) if alpha is not None else None)
    return modules


def split_modules(
    state: dict[str, Tensor], source: str, dtype: torch.dtype = torch.float32
) -> dict[str, LoraWeights]:
    modules: dict[str, LoraWeights] = {}
    for key in state:
        name, _, rest = key.partition(".")
        kind = _LYCORIS_MARKERS.get(rest.split(".")[0])
        if kind is not None:
            raise ModelError(
                f"{source}: key {key} is a {kind} weight; this tool handles LoRA/LoCon factors "
                "(lora_down/lora_up) only"
            )
        if rest != "lora_down.weight":
            continue
        up_key = f"{name}.lora_up.weight"
        if up_key not in state:
            raise ModelError(f"{source}: {key} has no matching {up_key}")
        down, up = state[key].to(dtype), state[up_key].to(dtype)
        if up.shape[1] != down.shape[0]:
            raise ModelError(
                f"{source}: {name} has mismatched ranks: lora_down {tuple(down.shape)} vs "
                f"lora_up {tuple(up.shape)}"
            )
        alpha = state.get(f"{name}.alpha")
        modules[name] = LoraWeights(down, up, float(alpha) if alpha is not None else None)
    if not modules:
        raise ModelError(f"{source}: no '<module>.lora_down.weight' keys; not a kohya-format LoRA")
    return modules


def join_modules(modules: dict[str, LoraWeights]) -> dict[str, Tensor]:
    """The kohya state dict of per-module factors (alpha written as a 0-d tensor)."""
    state = {}
    for name, w in modules.items():
        state[f"{name}.lora_down.weight"] = w.down.contiguous()
        state[f"{name}.lora_up.weight"] = w.up.contiguous()
        state[f"{name}.alpha"] = torch.tensor(w.alpha if w.alpha is not None else float(w.rank))
    return state


def check_save_path(save_to: str | None, flag: str = "--save_to") -> Path:
    if not save_to:
        raise ConfigError(f"{flag} is required: the file to write ({', '.join(LORA_SUFFIXES)})")
    path = Path(save_to)
    if path.suffix not in LORA_SUFFIXES:
        raise ConfigError(f"{flag} {save_to}: unsupported extension; use {', '.join(LORA_SUFFIXES)}")
    return path


def save_lora(
    path: Path, state: dict[str, Tensor], metadata: dict[str, str], dtype: torch.dtype | None
) -> None:
    """Atomic write; floats cast to `dtype` first (the sshs_* hashes are of the bytes written)."""
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in state.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        if path.suffix == ".safetensors":
            meta = {str(k): str(v) for k, v in metadata.items()}
            meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(state, meta)
            safetensors.torch.save_file(state, str(tmp), meta)
        else:
            torch.save(state, tmp)


def minimum_network_metadata(
    v2: str | None, base_model: str | None, dims: str, alphas: str, network_args: dict | None = None
) -> dict[str, str]:
    """The `ss_*` keys sd-scripts writes into a LoRA it did not train (merged, resized, extracted)."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": dims, "ss_network_alpha": alphas}
    if v2 is not None:
        metadata["ss_v2"] = v2
    if base_model is not None:
        metadata["ss_base_model_version"] = base_model
    if network_args is not None:
        metadata["ss_network_args"] = json.dumps(network_args)
    return metadata


def model_type_of(metadata: dict[str, str]) -> tuple[str, bool]:
    """(model type, v-prediction) a LoRA's metadata declares; SD1 when it says nothing."""
    base = metadata.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return "sdxl", False
    if metadata.get("ss_v2") == "True" or base.startswith("sd_v2"):
        return "sd2", metadata.get("modelspec.prediction_type", "v") == "v"
    return "sd1", False


def modelspec(
    model_type: str, v_parameterization: bool, *, lora: bool, title: str, merged_from: str | None = None
) -> dict[str, str]:
    """sd-scripts' `modelspec.*` keys (the SAI model spec) for a tool's output."""
    arch = architecture(model_type, v_parameterization)
    size = 1024 if model_type == "sdxl" else 768 if (model_type == "sd2" and v_parameterization) else 512
    md = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{arch}/lora" if lora else arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if model_type == "sdxl"
        else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if merged_from:
        md["modelspec.merged_from"] = merged_from
    return md


def merged_from(paths: list[str]) -> str:
    """Titles of the merged files (their modelspec.title, else the file stem), as sd-scripts lists them."""
    titles = []
    for p in paths:
        title = read_metadata(p).get("modelspec.title") if Path(p).is_file() else None
        titles.append(title or Path(p).stem)
    return ", ".join(titles)
