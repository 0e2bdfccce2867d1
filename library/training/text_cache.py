"""--cache_text_encoder_outputs_to_disk: each image's text-encoder outputs in `<image>_te_outputs.npz`, as
sd-scripts names them, so a later run with the same captions and encoders skips the text encoders entirely.

A file is reused only when it holds this caption and the same `cache_tag` (base model, --clip_skip, merged
--base_weights); otherwise it is encoded again and replaced atomically.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from library.training.conditioning import Conditioning


def te_outputs_path(image: Path) -> Path:
    return image.with_name(image.stem + "_te_outputs.npz")


def _read(npz: Path, caption: str, tag: str) -> Conditioning | None:
    if not npz.is_file():
        return None
    try:
        with np.load(npz, allow_pickle=False) as data:
            if str(data["caption"]) != caption or str(data["cache_tag"]) != tag:
                return None
            extra = {k[len("added_"):]: torch.from_numpy(data[k]) for k in data.files if k.startswith("added_")}
            return Conditioning(torch.from_numpy(data["hidden"]), extra or None)
    except (OSError, ValueError, KeyError):  # truncated or foreign file: encode again
        return None


def _write(npz: Path, caption: str, tag: str, cond: Conditioning) -> None:
    arrays = {"caption": np.array(caption), "cache_tag": np.array(tag),
              "hidden": cond.encoder_hidden_states.float().cpu().numpy()}
    for k, v in (cond.added_cond_kwargs or {}).items():
        arrays[f"added_{k}"] = v.float().cpu().numpy()
    fd, tmp = tempfile.mkstemp(dir=npz.parent, prefix=f".{npz.stem}.", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, npz)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def cached_outputs(items: Iterable[tuple[Path, str]], encode: Callable[[str], Conditioning],
                   tag: str) -> tuple[dict[str, Conditioning], int]:
    """{caption: outputs} for (image, caption) pairs, read from or written to the images' npz files; also how
    many captions were encoded (0 when every file could be reused)."""
    out: dict[str, Conditioning] = {}
    encoded = 0
    for image, caption in items:
        npz = te_outputs_path(image)
        cond = _read(npz, caption, tag)
        if cond is None:
            cond = out.get(caption)
            if cond is None:
                cond = encode(caption)
                encoded += 1
            _write(npz, caption, tag, cond)
        out.setdefault(caption, cond)
    return out, encoded
