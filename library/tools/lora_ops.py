"""sd-scripts' LoRA-to-LoRA operations, with its numbers, on `{module name: LoraWeights}` dicts.

- `merge_weighted`: merge_lora.py without `--sd_model` (factors summed, or concatenated with `concat`);
- `summed_updates` + `low_rank`: svd_merge_lora.py (dense updates summed, then cut to a new rank by SVD);
- `resize`: resize_lora.py (each update cut to a lower rank by SVD, fixed or by a dynamic rule);
- `extract`: extract_lora_from_models.py (the SVD of a weight difference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from library.errors import ModelError
from library.tools.lora_files import LoraWeights
from library.tools.lora_math import (
    as_matrix,
    choose_rank,
    clamp_to_quantile,
    factors_from_svd,
    product_svd,
    retained,
)

Progress = Callable[[Iterable], Iterable]


def _identity(items: Iterable) -> Iterable:
    return items


def weight_shape(w: LoraWeights) -> tuple[int, ...]:
    """The shape of the layer a module adapts: `[out, in]` or `[out, in, kh, kw]`."""
    return (w.up.shape[0], *w.down.shape[1:])


def merge_weighted(
    loras: list[tuple[str, dict[str, LoraWeights]]], ratios: list[float], concat: bool = False
) -> dict[str, LoraWeights]:
    """merge_lora.py's LoRA merge: each factor scaled by `sqrt(alpha / base_alpha) * ratio` (`up` by its
    absolute value, so a negative ratio flips the update once) and summed, or with `concat` stacked along the
    rank.

    base_alpha is the first file's alpha of the module. A plain sum of factors is not the sum of the updates;
    that is what sd-scripts computes, and `svd_merge` is the exact alternative.
    """
    merged: dict[str, LoraWeights] = {}
    for (source, modules), ratio in zip(loras, ratios, strict=True):
        for name, w in modules.items():
            alpha = w.alpha if w.alpha is not None else float(w.rank)
            base = merged.get(name)
            base_alpha = base.alpha if base is not None else alpha
            scale = math.sqrt(alpha / base_alpha) * ratio if base_alpha else ratio
            down, up = w.down * scale, w.up * abs(scale)
            if base is None:
                merged[name] = LoraWeights(down, up, alpha)
            elif concat:
                merged[name] = LoraWeights(
                    torch.cat([base.down, down]), torch.cat([base.up, up], dim=1), base_alpha
                )
            elif base.down.shape != down.shape or base.up.shape != up.shape:
                raise ModelError(
                    f"{source}: {name} has rank {w.rank} but an earlier LoRA has rank {base.rank} "
                    f"(shapes {tuple(down.shape)} vs {tuple(base.down.shape)}); "
                    "merge LoRAs of different ranks "
                    "with --concat or svd_merge_lora.py"
                )
            else:
                merged[name] = LoraWeights(base.down + down, base.up + up, base_alpha)
    return merged


def shuffle_ranks(modules: dict[str, LoraWeights], generator: torch.Generator | None = None) -> None:
    """Permute each module's rank axis (merge_lora.py --shuffle): the update is unchanged."""
    for w in modules.values():
        perm = torch.randperm(w.rank, generator=generator)
        w.down, w.up = w.down[perm], w.up[:, perm]


@dataclass
class StackedUpdate:
    """A sum of LoRA updates kept as stacked factors: `up @ down` (`[out, R] @ [R, in * kh * kw]`, R the sum of
    the ranks) in the layer's weight `shape`; its SVD then costs O((out + in) R^2), not a dense SVD."""

    up: Tensor
    down: Tensor
    shape: tuple[int, ...]

    def dense(self) -> Tensor:
        return (self.up @ self.down).reshape(self.shape)


def summed_updates(
    loras: list[tuple[str, dict[str, LoraWeights]]],
    ratios: list[float],
    device: torch.device,
    progress: Progress = _identity,
) -> dict[str, StackedUpdate]:
    """Per module, the sum over files of `ratio * alpha / rank * up @ down`, as stacked factors on `device`."""
    total: dict[str, StackedUpdate] = {}
    for (source, modules), ratio in zip(loras, ratios, strict=True):
        for name, w in progress(list(modules.items())):
            up = w.up.to(device).flatten(1) * (w.scale * ratio)
            down = w.down.to(device).flatten(1)
            shape = weight_shape(w)
            if name not in total:
                total[name] = StackedUpdate(up, down, shape)
                continue
            if total[name].shape != shape:
                raise ModelError(
                    f"{source}: {name} adapts a layer of shape {shape}, an earlier LoRA one of "
                    f"{total[name].shape}; are they for the same base model?"
                )
            before = total[name]
            total[name] = StackedUpdate(torch.cat([before.up, up], 1), torch.cat([before.down, down]), shape)
    return total


def _svd(update: Tensor | StackedUpdate) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    """(U, S, Vh, weight shape) of a dense update or of stacked factors, in float32 at least (no half SVD)."""
    if isinstance(update, StackedUpdate):
        up, down = update.up, update.down
        if up.dtype in (torch.float16, torch.bfloat16):
            up, down = up.float(), down.float()
        return (*product_svd(up, down), update.shape)
    matrix = as_matrix(update)
    if matrix.dtype in (torch.float16, torch.bfloat16):
        matrix = matrix.float()
    return (*torch.linalg.svd(matrix, full_matrices=False), tuple(update.shape))


def low_rank(
    updates: dict[str, Tensor | StackedUpdate],
    new_rank: int,
    new_conv_rank: int,
    clamp_quantile: float,
    progress: Progress = _identity,
) -> dict[str, LoraWeights]:
    """Each update as a LoRA of `new_rank` (`new_conv_rank` for kxk convs, at most the layer's out/in channels),
    alpha = rank (scale 1), factors clipped at `clamp_quantile` as svd_merge_lora.py / extract_lora_from_models.py
    do. An update of lower rank than asked gets zero directions, so the file has the rank sd-scripts writes."""
    out = {}
    for name, update in progress(list(updates.items())):
        U, S, Vh, shape = _svd(update)
        is_kxk = len(shape) == 4 and shape[2:] != (1, 1)
        rank = min(new_conv_rank if is_kxk else new_rank, shape[0], shape[1])
        if rank > len(S):  # sd-scripts' full SVD has (near-)zero values here
            missing = rank - len(S)
            U = torch.cat([U, U.new_zeros(U.shape[0], missing)], 1)
            S = torch.cat([S, S.new_zeros(missing)])
            Vh = torch.cat([Vh, Vh.new_zeros(missing, Vh.shape[1])])
        up, down = factors_from_svd(U, S, Vh, rank, shape)
        up, down = clamp_to_quantile(up, down, clamp_quantile)
        out[name] = LoraWeights(down.cpu(), up.cpu(), float(rank))
    return out


@dataclass
class ResizeReport:
    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float


def resize(
    modules: dict[str, LoraWeights],
    new_rank: int,
    new_conv_rank: int,
    dynamic_method: str | None,
    dynamic_param: float | None,
    device: torch.device,
    progress: Progress = _identity,
) -> tuple[dict[str, LoraWeights], list[ResizeReport]]:
    """resize_lora.py: `up @ down` cut by SVD to the rank `choose_rank` gives; the new alpha keeps the old
    scale (`alpha / old_rank * new_rank`): the update becomes `scale * (rank-r truncation of up @ down)`."""
    out, reports = {}, []
    for name, w in progress(list(modules.items())):
        shape = weight_shape(w)
        up2d, down2d = w.up.to(device).flatten(1), w.down.to(device).flatten(1)
        U, S, Vh = product_svd(up2d, down2d)
        is_kxk = len(shape) == 4 and shape[2:] != (1, 1)
        max_rank = new_conv_rank if is_kxk else new_rank
        rank = choose_rank(S, max_rank, dynamic_method, dynamic_param, min(up2d.shape[0], down2d.shape[1]))
        up, down = factors_from_svd(U, S, Vh, rank, shape)
        alpha = w.scale * rank
        out[name] = LoraWeights(down.cpu(), up.cpu(), alpha)
        reports.append(ResizeReport(name, w.rank, rank, alpha, **retained(S, rank)))
    return out, reports


def extract(
    differences: dict[str, Tensor],
    dim: int,
    conv_dim: int | None,
    clamp_quantile: float,
    progress: Progress = _identity,
) -> dict[str, LoraWeights]:
    """extract_lora_from_models.py: each weight difference as a rank-`dim` LoRA (kxk convs at `conv_dim`)."""
    return low_rank(differences, dim, conv_dim if conv_dim is not None else dim, clamp_quantile, progress)
