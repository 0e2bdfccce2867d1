"""Block-wise LoRA as sd-scripts' networks.lora defines it: per-block lr weights, ranks and alphas.

The U-Net is cut into numbered blocks (sd-scripts' numbering, so users' lists mean the same here):
- SD1/SD2 (25 blocks): 0 unused, 1-12 down (`down_blocks_i_{resnets,attentions}_j` -> 1+3i+j, downsamplers
  1+3i+2), 12 also mid (`mid_block`), 13-24 up (13+3i+j). The 12 "down"/"up" entries are the full model's.
- SDXL (23 blocks), on SAI names: 0 time/label embedding, 1-9 `input_blocks_n` (1+n), 10-12 `middle_block_n`,
  13-21 `output_blocks_n`, 22 `out`.

`down_lr_weight` / `up_lr_weight` are a list (missing entries 1.0, extra ones dropped) or a preset
`cosine|sine|linear|reverse_linear|zeros[+base]`; `mid_lr_weight` a list. Weights <= `block_lr_zero_threshold`
become 0; a block whose weight is 0 gets no LoRA modules at all.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from library.errors import ConfigError
from networks.sdxl_keys import unet_key_to_sai

logger = logging.getLogger(__name__)

SD_DOWN_UP_BLOCKS, SD_MID_BLOCKS = 12, 1
SDXL_DOWN_UP_BLOCKS, SDXL_MID_BLOCKS = 9, 3
BLOCK_ARGS = (
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
)
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def num_blocks(sdxl: bool) -> int:
    return 1 + 2 * SDXL_DOWN_UP_BLOCKS + SDXL_MID_BLOCKS + 1 if sdxl else 2 * SD_DOWN_UP_BLOCKS + SD_MID_BLOCKS


def block_index(lora_name: str, sdxl: bool) -> int:
    """sd-scripts' block number of a U-Net module (our diffusers-path name); -1 when it belongs to none."""
    if sdxl:
        name = unet_key_to_sai(lora_name).removeprefix("lora_unet_")
        first = name.split("_")
        if name.startswith(("time_embed_", "label_emb_")):
            return 0
        if name.startswith("input_blocks_"):
            return 1 + int(first[2])
        if name.startswith("middle_block_"):
            return 10 + int(first[2])
        if name.startswith("output_blocks_"):
            return 13 + int(first[2])
        return 22 if name.startswith("out_") else -1
    m = _UPDOWN.search(lora_name)
    if m:
        i, kind, j = int(m[2]), m[3], int(m[4])
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if m[1] == "down" else SD_DOWN_UP_BLOCKS + 1 + idx
    return SD_DOWN_UP_BLOCKS if "mid_block_" in lora_name else -1


def _numbers(key: str, value: Any, kind: type) -> list:
    """A `--network_args` list: "1,2,3" or literal-evaluated (1, 2, 3); empty entries are 0 (as sd-scripts)."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, Sequence) else [value]
    try:
        return [kind(float(v)) if not (isinstance(v, str) and not v.strip()) else kind(0) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"--network_args {key}={value!r}: expected comma-separated numbers") from None


def _preset(key: str, value: str, length: int) -> list[float]:
    name, _, base = value.partition("+")
    try:
        base_lr = float(base) if base else 0.0
    except ValueError:
        raise ConfigError(f"--network_args {key}={value!r}: the part after '+' must be a number") from None
    steps = [i / (length - 1) for i in range(length)]
    curves = {
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * length,
    }
    if name not in curves:
        raise ConfigError(
            f"--network_args {key}={value!r}: expected numbers or one of {', '.join(curves)} (optionally +base)"
        )
    return [v + base_lr for v in curves[name]]


def _fit(key: str, weights: list[float], length: int) -> list[float]:
    if len(weights) != length:
        logger.warning("%s has %d entries, %d expected: %s", key, len(weights), length,
                       "extra ones ignored" if len(weights) > length else "missing ones are 1.0")
    return (weights + [1.0] * length)[:length]


def block_lr_weights(kwargs: Mapping[str, Any], sdxl: bool) -> list[float] | None:
    """Per-block lr multipliers (length `num_blocks`), or None when no *_lr_weight is given."""
    if all(kwargs.get(k) is None for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")):
        return None
    side, mid = (SDXL_DOWN_UP_BLOCKS, SDXL_MID_BLOCKS) if sdxl else (SD_DOWN_UP_BLOCKS, SD_MID_BLOCKS)
    threshold = _numbers("block_lr_zero_threshold", kwargs.get("block_lr_zero_threshold") or 0.0, float)[0]
    parts = []
    for key, length in (("down_lr_weight", side), ("mid_lr_weight", mid), ("up_lr_weight", side)):
        value = kwargs.get(key)
        if value is None:
            parts.append([1.0] * length)
            continue
        is_preset = isinstance(value, str) and key != "mid_lr_weight" and "," not in value
        weights = _preset(key, value, length) if is_preset else _numbers(key, value, float)
        parts.append([w if w > threshold else 0.0 for w in _fit(key, weights, length)])
    weights = parts[0] + parts[1] + parts[2]
    return [1.0, *weights, 1.0] if sdxl else weights


def block_dims_and_alphas(
    kwargs: Mapping[str, Any],
    sdxl: bool,
    network_dim: int,
    network_alpha: float,
    conv_dim: int | None,
    conv_alpha: float | None,
    lr_weights: list[float] | None,
) -> tuple[list[int], list[float], list[int] | None, list[float] | None]:
    """(block_dims, block_alphas, conv_block_dims, conv_block_alphas), with 0 dims where the lr weight is 0."""
    n = num_blocks(sdxl)

    def listed(key: str, kind: type, default: Any) -> list:
        value = kwargs.get(key)
        if value is None:
            return [default] * n
        values = _numbers(key, value, kind)
        if len(values) != n:
            raise ConfigError(
                f"--network_args {key}: {len(values)} values, {n} expected (one per {'SDXL ' if sdxl else ''}"
                "U-Net block)"
            )
        return values

    dims, alphas = listed("block_dims", int, network_dim), listed("block_alphas", float, network_alpha)
    conv_dims = conv_alphas = None
    if kwargs.get("conv_block_dims") is not None:
        conv_dims = listed("conv_block_dims", int, 0)
        conv_alphas = listed("conv_block_alphas", float, 1.0 if conv_alpha is None else conv_alpha)
    elif conv_dim is not None:
        conv_dims, conv_alphas = [conv_dim] * n, [1.0 if conv_alpha is None else conv_alpha] * n
    if lr_weights is not None:
        for i, w in enumerate(lr_weights):
            if w == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return dims, alphas, conv_dims, conv_alphas


def check_syntax(block_args: Mapping[str, Any]) -> None:
    """Parse every block-wise value once, before any model exists (lengths are checked when it does)."""
    for key, value in block_args.items():
        if key in ("down_lr_weight", "up_lr_weight") and isinstance(value, str) and "," not in value:
            _preset(key, value, SD_DOWN_UP_BLOCKS)
        else:
            _numbers(key, value, int if key.endswith("_dims") else float)
