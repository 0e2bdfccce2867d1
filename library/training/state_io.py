"""The --save_state folder in a format that cannot run code: tensors in safetensors, everything else in JSON.

A pickle is a program: unpickling a state folder someone shared would run whatever it holds. So loraforge writes

    state.safetensors   every tensor (network weights, optimizer moments, RNG states), named by its path
    state.json          the rest (optimizer/scheduler settings, step, epoch, the run's settings), written last:
                        its presence is the completeness marker, and it records state.safetensors' size

and reads older folders (accelerate's `*.bin` / `*.pkl`, as sd-scripts and earlier loraforge wrote them) only
through torch's `weights_only=True` unpickler, which builds tensors and plain containers and nothing else.
"""

from __future__ import annotations

import codecs
import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from library.errors import ConfigError
from library.models.common import unpickling_refusal

FORMAT = "loraforge-state"
VERSION = 1
TENSORS = "state.safetensors"
MANIFEST = "state.json"

_TENSOR, _TUPLE, _DICT, _NDARRAY, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__ndarray__", "__float__"
_OBJECT = "__object__"
# optimizer state objects rebuilt from their plain attributes; only these classes, named here, are ever created
_PLAIN_OBJECTS = {"galore_torch.galore_projector.GaLoreProjector", "apollo_torch.random_projector.GradientProjector"}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ----------------------------------------------------------------------------------------------- tree codec
def encode(tree: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON-able copy of `tree`; its tensors go into `tensors` under their path. Non-finite floats and
    dicts with non-string keys (optimizer state is keyed by parameter index) keep their exact type."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(tree, np.ndarray):
        tensors[path] = torch.from_numpy(tree.astype(np.int64) if tree.dtype == np.uint32 else tree).contiguous()
        return {_NDARRAY: path, "dtype": str(tree.dtype)}
    if isinstance(tree, np.generic):
        tree = tree.item()
    if isinstance(tree, bool) or tree is None or isinstance(tree, (int, str)):
        return tree
    if isinstance(tree, float):
        return tree if np.isfinite(tree) else {_FLOAT: repr(tree)}
    if isinstance(tree, tuple):
        return {_TUPLE: [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]
    if isinstance(tree, dict):
        if all(isinstance(k, str) for k in tree) and not any(k.startswith("__") for k in tree):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in tree.items()}
        return {_DICT: [[encode(k, tensors, f"{path}.k{i}"), encode(v, tensors, f"{path}.{i}")]
                        for i, (k, v) in enumerate(tree.items())]}
    if isinstance(tree, torch.dtype):
        return str(tree)
    if _qualified(type(tree)) in _PLAIN_OBJECTS:
        return {_OBJECT: _qualified(type(tree)), "attrs": encode(vars(tree), tensors, path)}
    raise ConfigError(f"--save_state: cannot store a {type(tree).__name__} at {path} (only tensors, numbers, "
                      "strings and containers are saved)")


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if _TENSOR in tree:
        return tensors[tree[_TENSOR]]
    if _NDARRAY in tree:
        return tensors[tree[_NDARRAY]].numpy().astype(tree["dtype"])
    if _FLOAT in tree:
        return float(tree[_FLOAT])
    if _TUPLE in tree:
        return tuple(decode(v, tensors) for v in tree[_TUPLE])
    if _DICT in tree:
        return {decode(k, tensors): decode(v, tensors) for k, v in tree[_DICT]}
    if _OBJECT in tree:
        return _plain_object(tree[_OBJECT], decode(tree["attrs"], tensors))
    return {k: decode(v, tensors) for k, v in tree.items()}


def _plain_object(name: str, attrs: dict) -> Any:
    if name not in _PLAIN_OBJECTS:
        raise ConfigError(f"--resume: the state names the class {name}, which is not one loraforge rebuilds")
    import importlib

    module, _, cls_name = name.rpartition(".")
    obj = object.__new__(getattr(importlib.import_module(module), cls_name))
    vars(obj).update(attrs)
    return obj


# ----------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ----------------------------------------------------------------------------------------------- write / read
def write_state(folder: Path, parts: dict[str, Any], run: dict[str, Any], *, step: int) -> None:
    """Write `parts` (name -> state tree) into `folder`; `run` records the settings the state depends on."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {name: encode(part, tensors, name) for name, part in parts.items()}
    save_file(tensors, str(folder / TENSORS))
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "run": run, "parts": tree,
                "files": {TENSORS: (folder / TENSORS).stat().st_size}}
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:  # last: a folder with it is complete
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: Path) -> dict | None:
    """The state.json of a complete loraforge state folder, or None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def read_state(folder: Path, manifest: dict) -> dict[str, Any]:
    where = f"--resume {folder}"
    for name, size in manifest.get("files", {}).items():
        actual = (folder / name).stat().st_size if (folder / name).is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes"
            raise ConfigError(f"{where}: {name} is {found}, the save wrote {size} bytes (truncated or changed); "
                              "resume from an earlier state")
    try:
        tensors = load_file(str(folder / TENSORS))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{where}: {TENSORS} is unreadable ({exc}); resume from an earlier state") from None
    return {name: decode(tree, tensors) for name, tree in manifest["parts"].items()}


# ----------------------------------------------------------------------------------------------- older folders
_LEGACY_PARTS = {"network": "custom_checkpoint_0.pkl", "lr_scheduler": "custom_checkpoint_1.pkl",
                 "progress": "custom_checkpoint_2.pkl", "optimizer": "optimizer.bin"}
_SD_SCRIPTS_PARTS = {"network": "model.safetensors", "lr_scheduler": "scheduler.bin", "optimizer": "optimizer.bin"}


def is_legacy_state(folder: Path) -> bool:
    return (folder / "optimizer.bin").is_file() and any(folder.glob("random_states_*.pkl"))


def load_pickle_safely(path: Path) -> Any:
    """torch's restricted unpickler: tensors, numbers, strings, containers (and NumPy arrays, for RNG states);
    anything else — a class, a function call — is refused, never run."""
    core = getattr(np, "_core", None) or np.core
    safe = [core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType, codecs.encode]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"--resume {path}: refused, the file holds code or objects that are not plain data "
                          f"({unpickling_refusal(exc)}); only tensors and plain values are loaded from a state "
                          "folder") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(f"--resume {path}: unreadable ({str(exc).splitlines()[0][:160]}); truncated or not "
                          "a state file") from None


def read_legacy_state(folder: Path, rank: int) -> dict[str, Any]:
    """An accelerate state folder (earlier loraforge, or sd-scripts'), through the restricted unpickler."""
    sd_scripts = (folder / "model.safetensors").is_file() and not (folder / "custom_checkpoint_0.pkl").is_file()
    parts: dict[str, Any] = {}
    for name, file in (_SD_SCRIPTS_PARTS if sd_scripts else _LEGACY_PARTS).items():
        path = folder / file
        if not path.is_file():
            raise ConfigError(f"--resume {folder}: {file} is missing; not a complete state folder")
        if file.endswith(".safetensors"):
            try:
                parts[name] = load_file(str(path))
            except (SafetensorError, OSError) as exc:
                raise ConfigError(f"--resume {path}: unreadable ({exc})") from None
        else:
            parts[name] = load_pickle_safely(path)
    if sd_scripts:
        train_state = folder / "train_state.json"
        try:
            steps = json.loads(train_state.read_text(encoding="utf-8"))
            parts["progress"] = {"global_step": int(steps["current_step"]), "epoch": int(steps.get("current_epoch", 0)),
                                 "batches_done_in_epoch": 0}
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"--resume {folder}: train_state.json is missing or unreadable") from None
    rng = folder / f"random_states_{rank}.pkl"
    if rng.is_file():
        raw = load_pickle_safely(rng)
        parts["rng"] = {"torch": raw["torch_manual_seed"], "python": raw["random_state"],
                        "numpy": raw["numpy_random_seed"]}
        if "torch_cuda_manual_seed" in raw:
            parts["rng"]["cuda"] = raw["torch_cuda_manual_seed"]
    return parts
