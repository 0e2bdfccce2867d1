"""Checks of optimizer settings shared by every in-house optimizer: one message shape, naming the optimizer, the
setting, the bad value and what would be valid (raised as OptimizerError before any model loads)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from library.errors import OptimizerError


def require(optimizer: str, name: str, value: Any, ok: bool, valid: str) -> None:
    """Raise ``<optimizer> <name>=<value> is invalid; valid: <valid>`` unless ``ok``."""
    if not ok:
        raise OptimizerError(f"{optimizer} {name}={value!r} is invalid; valid: {valid}")


def validate_names(cls: str, params: Iterable[Any]) -> None:
    """Reject param groups whose ``names`` list does not line up with ``params``."""
    for group in params:
        if isinstance(group, dict) and "names" in group:
            if len(group["names"]) != len(list(group["params"])):
                raise OptimizerError(
                    f"{cls} param group 'names' has {len(group['names'])} entries for {len(group['params'])} params; "
                    "valid: one name per parameter"
                )


def validate_common(cls: str, lr: float, betas: Sequence[float], eps: float, weight_decay: float) -> None:
    """Checks shared by every Adam-style optimizer here; messages name the class, key and bad value."""
    if not (isinstance(lr, (int, float)) and lr >= 0.0):
        raise OptimizerError(f"{cls} lr={lr!r} is invalid; valid: a number >= 0")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise OptimizerError(f"{cls} betas={tuple(betas)!r} is invalid; valid: two numbers in [0, 1)")
    if not (isinstance(eps, (int, float)) and eps >= 0.0):
        raise OptimizerError(f"{cls} eps={eps!r} is invalid; valid: a number >= 0")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0.0):
        raise OptimizerError(f"{cls} weight_decay={weight_decay!r} is invalid; valid: a number >= 0")


def validate_positive_int(cls: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptimizerError(f"{cls} {key}={value!r} is invalid; valid: an integer >= 1")


def validate_heads(cls: str, dim: int, n_heads: int) -> None:
    """The model width and head count that split q/k(/v) projections into heads of ``dim // n_heads`` rows: heads
    of whole rows need ``n_heads`` to divide ``dim``."""
    validate_positive_int(cls, "dim", dim)
    validate_positive_int(cls, "n_heads", n_heads)
    if dim % n_heads:
        raise OptimizerError(f"{cls} n_heads={n_heads} is invalid for dim={dim}; valid: a divisor of dim")
