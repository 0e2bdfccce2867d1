"""Which images a subset holds, as sd-scripts lists them: an image folder (with its optional `cache_info` file), or
a fine-tuning metadata JSON (`--in_json` / `metadata_file`); and the validation split of that list."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from library.config.dataset_config import SubsetConfig
from library.data.images import IMAGE_EXTENSIONS
from library.errors import DatasetError

INFO_CACHE_FILE = "metadata_cache.json"  # sd-scripts' name: {path: {"caption": str, "resolution": [w, h]}}


@dataclass
class SubsetEntry:
    path: Path
    caption: str | None = None  # None: read the caption file next to the image
    size: tuple[int, int] | None = None  # None: measure the image


def list_entries(sub: SubsetConfig) -> list[SubsetEntry]:
    """The subset's images in sd-scripts' order (sorted paths; a metadata file's keys in its order)."""
    if sub.metadata_file is not None:
        return metadata_entries(sub.metadata_file, sub.image_dir, sub.caption_separator)
    folder = Path(sub.image_dir)
    if not folder.is_dir():
        raise DatasetError(f"{sub.name or 'subset'}: image folder {folder} not found")
    if sub.cache_info:
        cached = read_info_cache(folder)
        if cached is not None:
            return cached
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return [SubsetEntry(p) for p in files]


def metadata_entries(metadata_file: Path, image_dir: Path | None, separator: str = ",") -> list[SubsetEntry]:
    """sd-scripts' fine-tuning metadata: {image key: {"caption": str, "tags": str, "image_size": [w, h]}}. A key is
    a path, absolute or relative to image_dir; a key without extension (older files) finds its image by trying
    the image extensions. The caption is the caption, then the tags after `separator` (caption_separator)."""
    try:
        data = json.loads(Path(metadata_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"metadata file {metadata_file}: cannot read it as UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DatasetError(f"metadata file {metadata_file}: expected a JSON object of image key -> "
                           '{"caption": ..., "tags": ...}')
    entries = []
    for key, meta in data.items():
        path = Path(key)
        if not path.is_absolute():
            if image_dir is None:
                raise DatasetError(f"metadata file {metadata_file}: image {key!r} is a relative path; give the image "
                                   "folder (--train_data_dir or the subset's image_dir)")
            path = Path(image_dir) / key
        if not path.is_file():
            path = next((path.with_name(path.name + ext) for ext in IMAGE_EXTENSIONS
                         if path.with_name(path.name + ext).is_file()), path)
        caption = meta.get("caption") or ""
        tags = meta.get("tags")
        if tags:
            caption = caption + separator + tags if caption else tags
        size = meta.get("image_size")
        entries.append(SubsetEntry(path, caption, tuple(size) if size else None))
    return entries


def read_info_cache(folder: Path) -> list[SubsetEntry] | None:
    """`cache_info`: sizes and captions from the folder's cache file, when it exists (sd-scripts trusts it)."""
    cache = folder / INFO_CACHE_FILE
    if not cache.is_file():
        return None
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return [SubsetEntry(Path(p), m["caption"], tuple(m["resolution"])) for p, m in data.items()]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: measure again and rewrite it


def write_info_cache(folder: Path, rows: list[tuple[Path, str, tuple[int, int]]]) -> None:
    data = {str(p): {"caption": c, "resolution": list(size)} for p, c, size in rows}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".metadata_cache.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
    os.replace(tmp, folder / INFO_CACHE_FILE)


def split_for_validation(entries: list, split: float, seed: int, role: str) -> list:
    """sd-scripts' split: shuffle with `random.seed(seed)`, training keeps the first ceil(n * (1 - split)),
    validation the last round(n * split) (the two can share one image when both round up, as in sd-scripts)."""
    shuffled = list(entries)
    random.Random(seed).shuffle(shuffled)
    if role == "train":
        return shuffled[:math.ceil(len(shuffled) * (1 - split))]
    return shuffled[len(shuffled) - round(len(shuffled) * split):]
