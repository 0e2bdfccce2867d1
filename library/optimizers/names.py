"""What a parameter's name says about it: its param group's names, its LoRA factor side, its attention heads.

Param groups carry ``names`` parallel to ``params`` (torch's own key is ``param_names``); optimizers that treat
LoRA factors or attention projections differently read them here, so every optimizer recognises the same names.
"""

from __future__ import annotations

import re
from typing import Any

# A LoRA factor: `lora_down`/`lora_A` (rank rows) or `lora_up`/`lora_B` (output rows) as one dotted part of the
# name; `prefix` and `suffix` are the rest, which pair a down factor with its up factor.
LORA_FACTOR = re.compile(r"^(?P<prefix>|.*\.)(?P<role>lora_down|lora_up|lora_A|lora_B)(?P<suffix>\..*|)$")
LORA_DOWN_ROLES = ("lora_down", "lora_A")
# Query/key projections (Adam-mini's head blocks), and with value (SAC's head units): the layer name as one
# `.`/`_`-delimited part, in diffusers', sd-scripts' and LLM spellings.
QUERY_KEY = re.compile(r"(?:^|[._])(?:to_q|to_k|q_proj|k_proj|query|key|wq|wk)(?:[._]|$)")
QUERY_KEY_VALUE = re.compile(
    r"(?:^|[._])(?:to_q|to_k|to_v|q_proj|k_proj|v_proj|query|key|value|wq|wk|wv)(?:[._]|$)"
)


def group_names(group: dict[str, Any]) -> list[str | None]:
    """The group's parameter names (``names`` or torch's ``param_names``), or Nones when it has none."""
    names = group.get("names", group.get("param_names"))
    if names is None:
        return [None] * len(group["params"])
    return list(names)


def lora_role(name: str | None) -> str | None:
    """"down" for a LoRA down/A factor, "up" for an up/B factor, None for any other name."""
    match = None if name is None else LORA_FACTOR.match(name)
    if match is None:
        return None
    return "down" if match["role"] in LORA_DOWN_ROLES else "up"


def head_count(rows: int, dim: int, n_heads: int) -> int | None:
    """Attention heads in a tensor of ``rows`` output rows (``dim // n_heads`` rows each), None if the rows do not
    split into whole heads."""
    head_dim = dim // n_heads
    if head_dim > 0 and rows % head_dim == 0:
        return rows // head_dim
    return None


def is_head_structured(name: str | None, pattern: re.Pattern[str] = QUERY_KEY) -> bool:
    """True for attention projections whose rows are heads (a LoRA down factor has rank rows, never heads)."""
    return name is not None and pattern.search(name) is not None and lora_role(name) != "down"
