"""Sample prompt files as sd-scripts reads them (.txt, .toml, .json), checked whole before training starts.

`.txt`: one prompt per line, `#` starts a comment line; options follow the prompt, each after " --" and matched
case-insensitively as sd-scripts does: `--n` negative prompt, `--w`/`--h` size, `--d` seed, `--s` steps,
`--l` CFG scale, `--g` guidance scale, `--ss` sampler, and the options of other model families sd-scripts also
parses (`--cn`, `--ctr`, `--rcfg`, `--fs`). `.toml`: a `[prompt]` table whose keys are defaults for each
`[[prompt.subset]]`. `.json`: a list of prompt lines or of tables. Table keys are sd-scripts' names: prompt,
negative_prompt, width, height, seed, sample_steps, scale, guidance_scale, sample_sampler, ...

sd-scripts skips an option it cannot read and crashes at the first sample on others; here every problem is one
line naming file:line (or file:prompt N) before the model loads.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger("loraforge")

# sd-scripts' --sample_sampler names and the diffusers scheduler each one means (its get_my_scheduler)
SAMPLERS: dict[str, str] = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler", "k_lms": "LMSDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}
MAX_SIDE = 8192  # larger samples cannot fit any accelerator's memory
# sd-scripts' defaults (sample_images_common)
DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_SCALE = 512, 30, 7.5


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: int | None = None
    sampler: str | None = None  # None: --sample_sampler
    where: str = field(default="", compare=False)  # file:line, for errors found once the sampler is known


# option -> (table key, kind); the order matters only for "ss" before "s" (sd-scripts needs "s " + digits)
_LINE_OPTIONS: dict[str, tuple[str, type]] = {
    "w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("sample_steps", int),
    "l": ("scale", float), "g": ("guidance_scale", float), "n": ("negative_prompt", str),
    "ss": ("sample_sampler", str), "cn": ("controlnet_image", str), "ctr": ("cfg_trunc_ratio", float),
    "rcfg": ("renorm_cfg", float), "fs": ("flow_shift", float),
}
_TABLE_KEYS = {key for key, _ in _LINE_OPTIONS.values()} | {"prompt", "enum"}
# read by sd-scripts for other model families (FLUX, Lumina, ControlNet): an SD sample has no use for them
_OTHER_FAMILIES = {"guidance_scale", "cfg_trunc_ratio", "renorm_cfg", "flow_shift"}
_OPTION = re.compile(r"^(\w+)(?:\s+(.*))?$", re.DOTALL)


def line_to_table(line: str, where: str) -> dict[str, Any]:
    """A prompt line as sd-scripts splits it (on " --"), with each option's value checked."""
    prompt, *options = line.split(" --")
    table: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        m = _OPTION.match(option.strip())
        name = m.group(1).lower() if m else option.strip().split(" ")[0]
        if name not in _LINE_OPTIONS:
            raise ConfigError(f"{where}: unknown option --{name}; valid: "
                              f"{', '.join('--' + o for o in _LINE_OPTIONS)}")
        key, kind = _LINE_OPTIONS[name]
        value = (m.group(2) or "").strip()
        if not value:
            raise ConfigError(f"{where}: --{name} needs a value")
        table[key] = _convert(value, kind, f"{where}: --{name}")
    return table


def _convert(value: Any, kind: type, where: str) -> Any:
    try:
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        out = kind(value)
    except (TypeError, ValueError):
        article = "an integer" if kind is int else "a number" if kind is float else "text"
        raise ConfigError(f"{where} {value!r}: expected {article}") from None
    if kind is float and not (out == out and abs(out) != float("inf")):
        raise ConfigError(f"{where} {value!r}: expected a finite number")
    return out


def table_to_prompt(table: dict[str, Any], where: str) -> SamplePrompt:
    """Check one prompt's table and apply sd-scripts' rounding (sizes down to a multiple of 8, at least 64;
    steps clamped to 1..1000)."""
    unknown = sorted(set(table) - _TABLE_KEYS - {"subset"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(_TABLE_KEYS))}")
    kinds = {key: kind for key, kind in _LINE_OPTIONS.values()}
    values = {k: _convert(v, kinds[k], f"{where}: {k}") if k in kinds else v for k, v in table.items()}
    prompt = values.get("prompt", "")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: empty prompt")
    if values.get("controlnet_image"):
        raise ConfigError(f"{where}: controlnet_image (--cn): ControlNet sampling is not supported by this trainer")
    sizes = {}
    for key in ("width", "height"):
        side = values.get(key, DEFAULT_SIZE)
        if not 1 <= side <= MAX_SIDE:
            raise ConfigError(f"{where}: {key} {side}: must be from 64 to {MAX_SIDE}")
        sizes[key] = max(64, side - side % 8)
    seed = values.get("seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise ConfigError(f"{where}: seed {seed}: must be from 0 to {2**63 - 1}")
    sampler = values.get("sample_sampler")
    if sampler is not None and sampler.lower() not in SAMPLERS:
        raise ConfigError(f"{where}: sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if values.get("scale", DEFAULT_SCALE) < 0:
        raise ConfigError(f"{where}: scale {values['scale']}: must be >= 0")
    return SamplePrompt(prompt=prompt.strip(), negative=str(values.get("negative_prompt") or ""),
                        steps=max(1, min(1000, values.get("sample_steps", DEFAULT_STEPS))),
                        scale=values.get("scale", DEFAULT_SCALE), seed=seed,
                        sampler=sampler.lower() if sampler else None, where=where, **sizes)


def _read(path: Path, flag: str) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{flag} {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read ({exc.strerror or exc})") from None


def _tables(path: Path, text: str, flag: str) -> list[tuple[str, Any]]:
    """(where, str line or table) for each prompt of the file."""
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{flag} {path}: invalid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{flag} {path}: nested too deeply to read") from None
        base = data.get("prompt")
        if not isinstance(base, dict) or not isinstance(base.get("subset"), list):
            raise ConfigError(f"{flag} {path}: expected a [prompt] table with [[prompt.subset]] entries, as sd-scripts")
        defaults = {k: v for k, v in base.items() if k != "subset"}
        return [(f"{flag} {path}: prompt.subset[{i}]", {**defaults, **sub} if isinstance(sub, dict) else sub)
                for i, sub in enumerate(base["subset"])]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{flag} {path}: invalid JSON: {exc}") from None
        if not isinstance(data, list):
            raise ConfigError(f"{flag} {path}: expected a JSON list of prompts (strings or objects)")
        return [(f"{flag} {path}: prompt {i + 1}", item) for i, item in enumerate(data)]
    return [(f"{flag} {path}:{i + 1}", line.strip()) for i, line in enumerate(text.splitlines())
            if line.strip() and not line.startswith("#")]  # sd-scripts: a comment's '#' is the line's first char


_MIN_STEPS = {"pndm": 4}  # PNDM's PLMS starts with a 4-step Runge-Kutta warm-up; fewer steps crash diffusers


def check_steps(prompts: list[SamplePrompt], default_sampler: str) -> None:
    for sp in prompts:
        sampler = sp.sampler or default_sampler
        if sp.steps < _MIN_STEPS.get(sampler, 1):
            raise ConfigError(f"{sp.where}: {sp.steps} steps with sampler {sampler}; it needs at least "
                              f"{_MIN_STEPS[sampler]}")


def load_prompts(path: str | Path, flag: str = "--sample_prompts") -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: file not found" + (" (it is a folder)" if path.is_dir() else ""))
    prompts = []
    ignored: set[str] = set()
    for where, item in _tables(path, _read(path, flag), flag):
        if isinstance(item, str):
            item = line_to_table(item, where)
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a prompt line or table, got {type(item).__name__}")
        ignored |= _OTHER_FAMILIES & set(item)
        prompts.append(table_to_prompt(item, where))
    if not prompts:
        raise ConfigError(f"{flag} {path}: no prompts (one per line; '#' starts a comment)")
    if ignored:
        logger.warning("%s %s: %s apply to other model families; an SD sample does not use them (as sd-scripts)",
                       flag, path, ", ".join(sorted(ignored)))
    return prompts
