"""sd-scripts dataset TOML -> validated `DatasetConfig` dataclasses.

Schema (as sd-scripts): `[general]`, `[[datasets]]`, `[[datasets.subsets]]`. A subset key may be set at any of
the three levels and a dataset key at `[general]` or `[[datasets]]`; the most specific wins, then the CLI value
(`DatasetDefaults`). Relative `image_dir` paths resolve against the current working directory, as in sd-scripts,
so run the command from the folder the paths are relative to (the bundled examples: the repository root).

Every mistake is a `ConfigError` naming the file, the key with its table path (`datasets[0].subsets[1].num_repeat`),
the bad value and what is valid, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from library.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)


@dataclass
class SubsetConfig:
    """One image folder. `caption_extension=None` means: `.caption`, else `.txt`, per image."""

    image_dir: Path
    num_repeats: int = 1
    caption_extension: str | None = None
    class_tokens: str | None = None
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    is_reg: bool = False
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ","
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    random_crop: bool = False
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    resize_interpolation: str | None = None  # None: area to shrink, Lanczos to enlarge (sd-scripts)
    cache_info: bool = False
    metadata_file: Path | None = None  # sd-scripts' fine-tuning metadata JSON: images and captions listed there
    alpha_mask: bool = False  # the alpha channel is the loss mask
    conditioning_data_dir: Path | None = None  # loss-mask images named as the images (with --masked_loss)
    name: str = ""  # where it came from, for messages: "datasets[0].subsets[1]" or "--train_data_dir 10_cat"


@dataclass
class DatasetBlueprint:
    """Subsets trained at one resolution / batch size / bucket setting."""

    resolution: tuple[int, int]  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    subsets: list[SubsetConfig] = field(default_factory=list)
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None  # None: --seed


@dataclass
class DatasetConfig:
    datasets: list[DatasetBlueprint]
    source: str  # the TOML path or "--train_data_dir"
    unsupported: list[str] = field(default_factory=list)  # accepted-but-ignored keys, with their table path


@dataclass
class DatasetDefaults:
    """The CLI values; TOML `[general]`, dataset and subset keys override them (subset > dataset > general)."""

    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str | None = None
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ","
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    resize_interpolation: str | None = None
    cache_info: bool = False
    num_repeats: int = 1  # --dataset_repeats, as sd-scripts maps it
    validation_split: float = 0.0
    validation_seed: int | None = None
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None  # --conditioning_data_dir, for --train_data_dir folders

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DatasetDefaults:
        """Pick the dataset flags from parsed CLI options (`--train_batch_size` -> batch_size); absent ones keep defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            flag = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}.get(f.name, f.name)
            value = getattr(args, flag, None)
            if value is not None:
                values[f.name] = value
        if "resolution" in values:
            values["resolution"] = _check_resolution(values["resolution"], "--resolution", "command line")
        if values.get("caption_extension") is not None:
            values["caption_extension"] = _normalise_extension(values["caption_extension"])
        return cls(**values)


# ---------------------------------------------------------------------------------------------------- schema
# key -> (checker, what is valid). A checker returns the converted value or raises _Invalid.


class _Invalid(ValueError):
    pass


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid
    return v


def _int_at_least(lo: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise _Invalid
        return v

    return check


def _rate(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
        raise _Invalid
    return float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Invalid
    return v


def _separator(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _Invalid
    return v


def _non_negative(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise _Invalid
    return float(v) if isinstance(v, float) else v


def _extension(v: Any) -> str:
    if not isinstance(v, str) or not v.strip(".") or "/" in v or "\\" in v:
        raise _Invalid
    return _normalise_extension(v)


def _normalise_extension(ext: str) -> str:
    """sd-scripts appends the extension verbatim; a missing dot ("txt") is always a mistake, so add it."""
    return ext if ext.startswith(".") else "." + ext


def _face_range(v: Any) -> tuple[float, float]:
    if not isinstance(v, list) or len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, int | float) for x in v):
        raise _Invalid
    if not 0 < v[0] <= v[1]:
        raise _Invalid
    return float(v[0]), float(v[1])


def _interpolation(v: Any) -> str:
    from library.data.buckets import INTERPOLATIONS

    if v not in INTERPOLATIONS:
        raise _Invalid
    return v


def _split(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
        raise _Invalid
    return float(v)


def _seed(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Invalid
    return v


def _resolution(v: Any) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    if not isinstance(v, list) or len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise _Invalid
    if min(v) < 64 or max(v) > MAX_RESOLUTION or v[0] % 8 or v[1] % 8:
        raise _Invalid
    return (v[0], v[1])


def _repeats(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_REPEATS:
        raise _Invalid
    return v


def _reso(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8:
        raise _Invalid
    return v


MAX_RESOLUTION = 16384  # a side beyond this cannot fit any accelerator's memory: refuse it instead of hanging
MAX_REPEATS = 100_000  # repeats beyond this only make a list of billions of samples
_RESOLUTION_VALID = (f"a multiple of 8 from 64 to {MAX_RESOLUTION} or a [width, height] pair of them, "
                     "e.g. 512 or [768, 512]")

# Keys that live on a subset (settable at every level).
_SUBSET_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "num_repeats": (_repeats, f"an integer from 1 to {MAX_REPEATS}"),
    "caption_extension": (_extension, 'a file extension such as ".txt" or ".caption"'),
    "class_tokens": (_str, "a string (the caption for images without a caption file)"),
    "keep_tokens": (_int_at_least(0), "an integer >= 0"),
    "shuffle_caption": (_bool, "true or false"),
    "caption_dropout_rate": (_rate, "a number in [0, 1]"),
    "caption_dropout_every_n_epochs": (_int_at_least(0), "an integer >= 0 (0 = off)"),
    "caption_tag_dropout_rate": (_rate, "a number in [0, 1]"),
    "keep_tokens_separator": (_str, 'a string such as "|||"'),
    "secondary_separator": (_str, 'a string such as ";;;"'),
    "caption_prefix": (_str, "a string"),
    "caption_suffix": (_str, "a string"),
    "caption_separator": (_separator, 'a non-empty string such as ","'),
    "enable_wildcard": (_bool, "true or false"),
    "token_warmup_min": (_int_at_least(0), "an integer >= 0"),
    "token_warmup_step": (_non_negative, "a number >= 0 (below 1: that fraction of max_train_steps)"),
    "flip_aug": (_bool, "true or false"),
    "random_crop": (_bool, "true or false"),
    "color_aug": (_bool, "true or false"),
    "face_crop_aug_range": (_face_range, "a [min, max] pair of numbers with 0 < min <= max, e.g. [2.0, 4.0]"),
    "resize_interpolation": (_interpolation, "one of lanczos, nearest, bilinear, linear, bicubic, cubic, area, box"),
    "cache_info": (_bool, "true or false"),
    "alpha_mask": (_bool, "true or false (the alpha channel is the loss mask)"),
}
# Keys only valid inside [[datasets.subsets]].
_SUBSET_ONLY_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "image_dir": (_str, "a folder path (relative paths resolve against the current directory)"),
    "is_reg": (_bool, "true or false"),
    "metadata_file": (_str, "a fine-tuning metadata JSON file (relative paths resolve against the current directory)"),
    "conditioning_data_dir": (_str, "a folder of mask images named as the subset's images (with --masked_loss)"),
}
# Keys that live on a dataset (settable in [general] and [[datasets]]).
_DATASET_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "resolution": (_resolution, _RESOLUTION_VALID),
    "batch_size": (_int_at_least(1), "an integer >= 1"),
    "enable_bucket": (_bool, "true or false"),
    "min_bucket_reso": (_reso, "a positive multiple of 8"),
    "max_bucket_reso": (_reso, "a positive multiple of 8"),
    "bucket_reso_steps": (_reso, "a positive multiple of 8 (64 is usual)"),
    "bucket_no_upscale": (_bool, "true or false"),
    "validation_split": (_split, "a number in [0, 1): the share of each subset's images held out for validation"),
    "validation_seed": (_seed, "an integer (the split's shuffle seed; default --seed)"),
}
# sd-scripts keys we accept so its configs load, but do not implement: each one logs a warning.
_UNSUPPORTED_SUBSET_KEYS = {
    "custom_attributes": "custom attributes are not used",
}
_UNSUPPORTED_DATASET_KEYS = {
    "network_multiplier": "per-dataset network multipliers are not implemented",
}

_GENERAL_VALID = {**_DATASET_KEYS, **_SUBSET_KEYS}
_DATASET_VALID = {**_DATASET_KEYS, **_SUBSET_KEYS}
_SUBSET_VALID = {**_SUBSET_KEYS, **_SUBSET_ONLY_KEYS}


# ---------------------------------------------------------------------------------------------------- loading


def load_dataset_config(path: str | Path, defaults: DatasetDefaults | None = None) -> DatasetConfig:
    """Read and validate a dataset TOML; raises ConfigError with file, key path, value and what is valid."""
    path = Path(path)
    defaults = defaults or DatasetDefaults()
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"dataset config {path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"dataset config {path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"dataset config {path}: not valid UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_error(path, exc)) from None
    except RecursionError:
        raise ConfigError(f"dataset config {path}: nested too deeply to read (tables or arrays inside each other "
                          "thousands of levels deep)") from None
    return _build(data, path, defaults)


def _toml_error(path: Path, exc: tomllib.TOMLDecodeError) -> str:
    msg = str(exc)
    m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
    if m:
        reason = msg[: m.start()].strip()
        return f"dataset config {path}:{m.group(1)}: invalid TOML at line {m.group(1)}, column {m.group(2)}: {reason}"
    return f"dataset config {path}: invalid TOML: {msg}"


class _Ctx:
    """Error formatting and the list of ignored keys for one file."""

    def __init__(self, path: Path):
        self.path = path
        self.unsupported: list[str] = []

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"dataset config {self.path}: {where}: {message}")

    def check_keys(self, table: dict, where: str, valid: dict, level: str) -> dict[str, Any]:
        """Validate one table's keys and values; returns the converted known values."""
        out: dict[str, Any] = {}
        for key, value in table.items():
            here = f"{where}.{key}" if where else key
            if key in valid:
                checker, desc = valid[key]
                try:
                    out[key] = checker(value)
                except _Invalid:
                    raise self.fail(here, f"bad value {value!r}: expected {desc}") from None
            elif key in _UNSUPPORTED_SUBSET_KEYS or (key in _UNSUPPORTED_DATASET_KEYS and level != "subset"):
                reason = _UNSUPPORTED_SUBSET_KEYS.get(key) or _UNSUPPORTED_DATASET_KEYS[key]
                self.unsupported.append(f"{here} ({reason})")
            else:
                raise self.fail(here, self._unknown(key, value, valid, level))
        return out

    @staticmethod
    def _unknown(key: str, value: Any, valid: dict, level: str) -> str:
        tables = {"general": "[general]", "dataset": "[[datasets]]", "subset": "[[datasets.subsets]]"}
        if key in _SUBSET_ONLY_KEYS:
            return f"{key} = {value!r} is only valid in [[datasets.subsets]], not in {tables[level]}"
        if key in _DATASET_KEYS:
            return f"{key} = {value!r} is a dataset key: set it in [general] or [[datasets]], not in {tables[level]}"
        if key in ("datasets", "subsets", "general"):
            return f"unexpected table {key!r} in {tables[level]}"
        close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(sorted(valid))}"
        return f"unknown key {key!r} (value {value!r}); {hint}"


def _build(data: dict, path: Path, defaults: DatasetDefaults) -> DatasetConfig:
    ctx = _Ctx(path)
    for key in data:
        if key not in ("general", "datasets"):
            close = difflib.get_close_matches(key, ["general", "datasets"], n=1)
            hint = f"did you mean {close[0]!r}?" if close else "the top level holds only [general] and [[datasets]]"
            raise ctx.fail(key, f"unknown top-level key or table {key!r}; {hint}")
    general_table = data.get("general", {})
    if not isinstance(general_table, dict):
        raise ctx.fail("general", "must be a table: write [general]")
    general = ctx.check_keys(general_table, "general", _GENERAL_VALID, "general")
    datasets_raw = data.get("datasets")
    if not isinstance(datasets_raw, list) or not datasets_raw or not all(isinstance(d, dict) for d in datasets_raw):
        raise ctx.fail("datasets", "expected at least one [[datasets]] table with [[datasets.subsets]] inside")

    datasets = []
    for i, ds_table in enumerate(datasets_raw):
        where = f"datasets[{i}]"
        subsets_raw = ds_table.get("subsets")
        ds_values = ctx.check_keys({k: v for k, v in ds_table.items() if k != "subsets"}, where, _DATASET_VALID,
                                   "dataset")
        if not isinstance(subsets_raw, list) or not subsets_raw or not all(isinstance(s, dict) for s in subsets_raw):
            raise ctx.fail(f"{where}.subsets", "expected at least one [[datasets.subsets]] table with image_dir")
        subsets = []
        for j, sub_table in enumerate(subsets_raw):
            sub_where = f"{where}.subsets[{j}]"
            sub_values = ctx.check_keys(sub_table, sub_where, _SUBSET_VALID, "subset")
            if "image_dir" not in sub_values and "metadata_file" not in sub_values:
                raise ctx.fail(f"{sub_where}.image_dir", "missing: every subset needs image_dir = \"path/to/images\" "
                               "(or metadata_file = \"meta.json\" for a fine-tuning subset)")
            merged = _merge(_subset_field_names(), sub_values, ds_values, general, defaults)
            resolved = None
            if "image_dir" in sub_values:
                resolved = _existing(sub_values["image_dir"], Path.is_dir, ctx, f"{sub_where}.image_dir", "folder")
            if "metadata_file" in sub_values:
                merged["metadata_file"] = _existing(sub_values["metadata_file"], Path.is_file, ctx,
                                                    f"{sub_where}.metadata_file", "file")
                if merged.pop("is_reg", False):
                    raise ctx.fail(f"{sub_where}.is_reg", "a fine-tuning (metadata_file) subset cannot be is_reg")
            if "conditioning_data_dir" in sub_values:
                merged["conditioning_data_dir"] = _existing(sub_values["conditioning_data_dir"], Path.is_dir, ctx,
                                                            f"{sub_where}.conditioning_data_dir", "folder")
            subsets.append(SubsetConfig(image_dir=resolved, name=sub_where, **merged))
        merged_ds = _merge(_DATASET_KEYS.keys(), ds_values, general, defaults)
        blueprint = DatasetBlueprint(subsets=subsets, **merged_ds)
        try:
            check_blueprint(blueprint)
        except DatasetError as exc:
            raise ctx.fail(where, str(exc)) from None
        datasets.append(blueprint)

    if ctx.unsupported:
        logger.warning("dataset config %s: accepted but not implemented (ignored): %s", path, "; ".join(ctx.unsupported))
    return DatasetConfig(datasets=datasets, source=str(path), unsupported=ctx.unsupported)


def _existing(value: str, exists, ctx: _Ctx, where: str, kind: str) -> Path:
    path = Path(value).expanduser()
    resolved = path if path.is_absolute() else Path.cwd() / path
    if resolved.exists() and not exists(resolved):
        other = "a file" if resolved.is_file() else "not a file"
        raise ctx.fail(where, f"{str(path)!r} is {other}; expected a {kind}")
    if not exists(resolved):
        raise ctx.fail(where, f"{kind} {str(path)!r} not found (relative paths resolve against the current "
                       f"directory {Path.cwd()})")
    return resolved


def check_mask_sources(config: DatasetConfig, masked_loss: bool) -> None:
    """--masked_loss needs a mask (alpha_mask or conditioning_data_dir); mask folders need --masked_loss."""
    subsets = [s for d in config.datasets for s in d.subsets]
    with_dir = [s for s in subsets if s.conditioning_data_dir is not None]
    if with_dir and not masked_loss:
        raise ConfigError(f"{config.source}: {with_dir[0].name} has conditioning_data_dir (loss masks): add "
                          "--masked_loss to train with them")
    if masked_loss and not with_dir and not any(s.alpha_mask for s in subsets):
        raise ConfigError(f"--masked_loss: no mask in {config.source}; add --alpha_mask (alpha channel) or "
                          "conditioning_data_dir (mask images) to the subsets")


def _subset_field_names() -> list[str]:
    return [*_SUBSET_KEYS, "is_reg"]


def _merge(names, *levels) -> dict[str, Any]:
    """First level that sets a key wins; the last level is the DatasetDefaults (attributes, not a dict)."""
    out = {}
    *tables, defaults = levels
    for name in names:
        for table in tables:
            if name in table:
                out[name] = table[name]
                break
        else:
            if hasattr(defaults, name):
                out[name] = getattr(defaults, name)
    return out


def check_blueprint(bp: DatasetBlueprint) -> None:
    """Cross-key checks sd-scripts also makes; raises DatasetError (the TOML loader turns it into ConfigError)."""
    w, h = bp.resolution
    if bp.batch_size < 1:
        raise DatasetError(f"batch_size {bp.batch_size}: must be >= 1")
    if not bp.enable_bucket:
        return
    from library.data.buckets import adjust_bucket_limits

    if bp.min_bucket_reso > bp.max_bucket_reso:
        raise DatasetError(f"min_bucket_reso {bp.min_bucket_reso} is larger than max_bucket_reso {bp.max_bucket_reso}")
    lo, hi = adjust_bucket_limits(bp.min_bucket_reso, bp.max_bucket_reso, bp.bucket_reso_steps)
    if not bp.bucket_no_upscale and min(w, h) < lo:
        raise DatasetError(f"min_bucket_reso {bp.min_bucket_reso} is larger than the resolution {w}x{h}: "
                           f"set min_bucket_reso <= {min(w, h)}")
    if not bp.bucket_no_upscale and max(w, h) > hi:
        raise DatasetError(f"max_bucket_reso {bp.max_bucket_reso} is smaller than the resolution {w}x{h}: "
                           f"set max_bucket_reso >= {max(w, h)}")
    if (lo, hi) != (bp.min_bucket_reso, bp.max_bucket_reso):
        logger.warning("min_bucket_reso %d / max_bucket_reso %d are not multiples of bucket_reso_steps %d: using "
                       "%d / %d, as sd-scripts does", bp.min_bucket_reso, bp.max_bucket_reso, bp.bucket_reso_steps,
                       lo, hi)


def _check_resolution(value: Any, where: str, source: str) -> tuple[int, int]:
    if isinstance(value, tuple):
        value = list(value)
    try:
        return _resolution(value)
    except _Invalid:
        raise ConfigError(f"{where} {value!r} ({source}): expected {_RESOLUTION_VALID}") from None


# ---------------------------------------------------------------------------------------------------- folders

_FOLDER = re.compile(r"^(\d+)_(.*)$")


def config_from_train_data_dir(train_data_dir: str | Path, reg_data_dir: str | Path | None = None,
                               defaults: DatasetDefaults | None = None) -> DatasetConfig:
    """kohya folder layout: `<train_data_dir>/<N>_<concept>/` holds images repeated N times, captioned `<concept>`
    when an image has no caption file. Hidden folders are ignored; any other folder name is an error."""
    defaults = defaults or DatasetDefaults()
    subsets = _folder_subsets(Path(train_data_dir), "--train_data_dir", defaults, is_reg=False)
    if reg_data_dir:
        subsets += _folder_subsets(Path(reg_data_dir), "--reg_data_dir", defaults, is_reg=True)
    values = {name: getattr(defaults, name) for name in _DATASET_KEYS}
    blueprint = DatasetBlueprint(subsets=subsets, **values)
    check_blueprint(blueprint)
    return DatasetConfig(datasets=[blueprint], source="--train_data_dir")


def _mask_folder(root: str | None, subfolder: str) -> Path | None:
    """--conditioning_data_dir: masks in <root>/<N_concept>/ when that folder exists, else in <root> itself
    (training folders only: regularisation images count everywhere)."""
    if root is None:
        return None
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise DatasetError(f"--conditioning_data_dir {root}: folder not found")
    return base / subfolder if (base / subfolder).is_dir() else base


def _folder_subsets(root: Path, flag: str, defaults: DatasetDefaults, is_reg: bool) -> list[SubsetConfig]:
    from library.data.images import IMAGE_EXTENSIONS

    if not root.is_dir():
        raise DatasetError(f"{flag} {root}: folder not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    bad = [p.name for p in folders if not _FOLDER.match(p.name)]
    if bad:
        raise DatasetError(f"{flag} {root}: folder {bad[0]!r} does not match <repeats>_<concept> (e.g. "
                           f"'10_zkw heart': 10 repeats, caption 'zkw heart'); rename it or use --dataset_config")
    zero = [p.name for p in folders if int(_FOLDER.match(p.name).group(1)) < 1]
    if zero:
        raise DatasetError(f"{flag} {root}: folder {zero[0]!r} has 0 repeats; the number before '_' must be >= 1")
    many = [p.name for p in folders if int(_FOLDER.match(p.name).group(1)) > MAX_REPEATS]
    if many:
        raise DatasetError(f"{flag} {root}: folder {many[0]!r} asks for more than {MAX_REPEATS} repeats; "
                           f"the number before '_' must be from 1 to {MAX_REPEATS}")
    if not folders:
        loose = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file())
        hint = ("images must be inside subfolders named <repeats>_<concept>, e.g. 10_zkw" if loose
                else "expected subfolders named <repeats>_<concept>, e.g. 10_zkw")
        raise DatasetError(f"{flag} {root}: no image folders; {hint}")
    subsets = []
    for folder in folders:
        m = _FOLDER.match(folder.name)
        concept = m.group(2).strip()
        values = _merge(_subset_field_names(), defaults)
        values["conditioning_data_dir"] = None if is_reg else _mask_folder(defaults.conditioning_data_dir, folder.name)
        values["num_repeats"] = int(m.group(1))
        values["is_reg"] = is_reg
        values["class_tokens"] = concept or None
        subsets.append(SubsetConfig(image_dir=folder.resolve(), name=f"{flag} {folder.name}", **values))
    return subsets


def config_from_in_json(in_json: str | Path, train_data_dir: str | Path | None = None,
                        defaults: DatasetDefaults | None = None) -> DatasetConfig:
    """sd-scripts' fine-tuning dataset: one subset listed by a metadata JSON (`--in_json`), images relative to
    `--train_data_dir`, repeated `--dataset_repeats` times."""
    defaults = defaults or DatasetDefaults()
    values = _merge(_subset_field_names(), defaults)
    values["is_reg"] = False
    image_dir = Path(train_data_dir).resolve() if train_data_dir else None
    subset = SubsetConfig(image_dir=image_dir, metadata_file=Path(in_json).resolve(), name=f"--in_json {in_json}",
                          **values)
    blueprint = DatasetBlueprint(subsets=[subset], **{name: getattr(defaults, name) for name in _DATASET_KEYS})
    check_blueprint(blueprint)
    return DatasetConfig(datasets=[blueprint], source=f"--in_json {in_json}")
