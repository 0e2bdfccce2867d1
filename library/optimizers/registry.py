"""Every optimizer name loraforge knows, and how to build it.

This is the only place that knows optimizer names. A name maps to an ``OptimizerSpec``; lookup ignores case
and ``_``/``-``/``.`` so kohya (``AdamW8bit``), Hugging Face (``adamw_bnb_8bit``) and OpenToMe (``AdamWSGG``)
spellings all work, and ``module.path.ClassName`` loads any importable ``torch.optim.Optimizer`` subclass.
Implementations are imported lazily, by module path, at build time: a missing package or an in-house module
that is not there yet only makes its own names unavailable (``OptimizerUnavailable`` naming what is needed)
and never breaks the listing or the other names.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import logging
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from library.errors import OptimizerError, OptimizerUnavailable
from library.optimizers.args import accepted_kwargs, resolve_settings

logger = logging.getLogger(__name__)

# import name -> pip name, for "pip install ..." hints.
PIP_NAMES = {
    "bitsandbytes": "bitsandbytes",
    "pytorch_optimizer": "pytorch-optimizer",
    "torchao": "torchao",
    "schedulefree": "schedulefree",
    "prodigyopt": "prodigyopt",
    "dadaptation": "dadaptation",
    "came_pytorch": "came-pytorch",
    "galore_torch": "galore-torch",
    "apollo_torch": "apollo-torch",
    "lomo_optim": "lomo-optim",
    "grokadamw": "grokadamw",
    "transformers": "transformers",
    "torch_xla": "torch_xla (and an XLA/TPU device)",
    "torch_npu": "torch_npu (and an Ascend NPU)",
    "apex": "apex (NVIDIA, built from source with --cuda_ext)",
    "torchdistx": "torchdistx",
}

FAMILY_TYPES = {
    "SGG": "SGG (scaling with gradient grouping)",
    "SAC": "SAC (scaling with architectural constraints)",
}


@dataclass(frozen=True)
class ClassBuilder:
    """Builds ``module:Class`` lazily.

    ``fixed`` holds kwargs the name implies (``fused=True``, ``optim_bits=8``) and the user cannot change;
    ``group_kwargs`` are extra settings (name -> default) that ``regroup`` moves into the param groups (GaLore's
    rank etc.); ``adjust`` may rewrite the final kwargs (Adafactor's ``lr=None`` under ``relative_step``).
    """

    path: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    group_kwargs: Mapping[str, Any] = field(default_factory=dict)
    regroup: Callable[[list[dict], dict[str, Any]], list[dict]] | None = None
    adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    wrap: Callable[[type], type] | None = None
    prefer_fused: bool = False  # torch's fused CUDA kernel when every parameter is on CUDA and the user chose nothing

    @property
    def module(self) -> str:
        return self.path.partition(":")[0]

    def load(self, name: str) -> type:
        module_name, _, attr = self.path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise OptimizerUnavailable(f"{name}: cannot import {module_name}: {exc}") from exc
        target = getattr(module, attr, None)
        if target is None:
            raise OptimizerUnavailable(f"{name}: module {module_name} has no {attr}")
        return self.wrap(target) if self.wrap is not None else target

    def accepted_kwargs(self, name: str) -> dict[str, Any]:
        accepted = accepted_kwargs(self.load(name), self.group_kwargs)
        for key in self.fixed:
            accepted.pop(key, None)
        return accepted

    def __call__(
        self, params: Any, lr: float | None = None, *, name: str = "", **kwargs: Any
    ) -> torch.optim.Optimizer:
        target = self.load(name or self.path)
        kwargs = {"lr": lr, **kwargs}
        if self.adjust is not None:
            kwargs = self.adjust(kwargs)
        groups = param_groups_of(params)
        if self.regroup is not None:
            group_kwargs = {k: kwargs.pop(k, v) for k, v in self.group_kwargs.items()}
            groups = self.regroup(groups, group_kwargs)
        if kwargs.get("lr", 0) is None and "lr" not in accepted_kwargs(target):
            kwargs.pop("lr")
        if self.prefer_fused and "fused" not in kwargs and "foreach" not in kwargs and _all_cuda(groups):
            kwargs["fused"] = True  # one kernel for all LoRA tensors instead of a launch-bound foreach loop
        return target(groups, **kwargs, **self.fixed)


def _all_cuda(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: its names, how to build it, what it needs, and its documented defaults."""

    name: str
    aliases: tuple[str, ...]
    build: ClassBuilder
    requires: tuple[str, ...] = ()
    needs_cuda: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    family: str = "standard"
    description: str = ""
    state_bytes: str = ""  # optimizer state per trainable fp32 parameter, for the docs
    refused: str = ""  # why loraforge's `loss.backward(); optimizer.step()` loop cannot drive it


def param_groups_of(params: Any) -> list[dict]:
    """Param groups as a list of dict copies; a plain iterable of tensors becomes one group."""
    items = list(params)
    if items and isinstance(items[0], Mapping):
        return [dict(g) for g in items]
    return [{"params": items}]


def _split_2d(groups: list[dict], group_kwargs: dict[str, Any]) -> list[dict]:
    """GaLore/APOLLO project only matrices: 2-D tensors get the projection settings, the rest plain Adam."""
    out = []
    for group in groups:
        names = group.get("names")
        for want_2d in (True, False):
            idx = [i for i, p in enumerate(group["params"]) if (p.dim() == 2) == want_2d]
            if not idx:
                continue
            part = {**group, "params": [group["params"][i] for i in idx]}
            if names is not None:
                part["names"] = [names[i] for i in idx]
            if want_2d:
                part.update(group_kwargs)
            out.append(part)
    return out


def _adafactor_lr(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Adafactor's relative step computes its own lr and refuses a manual one."""
    if kwargs.get("relative_step"):
        kwargs["lr"] = None
    return kwargs


@functools.cache
def _state_in_optimizer(cls: type) -> type:
    """GrokAdamW keeps its state in ``group["state"]`` keyed by tensor, so state_dict() cannot restore it;
    this subclass points that dict at ``self.state`` during the step and removes it afterwards."""

    class StateInOptimizer(cls):
        def step(self, closure: Any = None) -> Any:
            for group in self.param_groups:
                group["state"] = self.state
            try:
                return super().step(closure)
            finally:
                for group in self.param_groups:
                    group.pop("state", None)

    StateInOptimizer.__name__ = StateInOptimizer.__qualname__ = cls.__name__
    return StateInOptimizer


def _cls(path: str, **kw: Any) -> ClassBuilder:
    return ClassBuilder(path, **kw)


_GALORE = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
_APOLLO = {
    "rank": 128,
    "proj": "random",
    "scale_type": "channel",
    "scale": 1.0,
    "update_proj_gap": 200,
    "proj_type": "std",
}
_ADAFACTOR = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
_SGG_ENV = {
    "n_clusters": "SGG_N_CLUSTERS",
    "recluster_interval": "SGG_RECLUSTER_INTERVAL",
    "scale_bound": "SGG_SCALE_BOUND",
    "beta3": "SGG_BETA3",
    "ema_decay_clusters": "SGG_EMA_DECAY_CLUSTERS",
    "ema_decay_scale": "SGG_EMA_DECAY_SCALE",
    "ema_decay_scale_factors": "SGG_EMA_DECAY_SCALE_FACTORS",
    "t_total": "SGG_T_TOTAL",
    "optimize_1d": "SGG_OPTIMIZE_1D",
    "lr_1d": "SGG_LR_1D",
}
_SAC_ENV = {
    "scale_update_freq": "SAC_SCALE_UPDATE_FREQ",
    "scale_bound": "SAC_SCALE_BOUND",
    "dim": "SAC_DIM",
    "n_heads": "SAC_N_HEADS",
}
_BNB = ("bitsandbytes",)
_PO = ("pytorch_optimizer",)


def _refusal(name: str, how: str, instead: str) -> str:
    return (
        f"{name} {how}, which bypasses the trainer's loss.backward(); optimizer.step() loop (gradient "
        f"accumulation, clipping, mixed-precision scaling, saved optimizer state); use {instead} instead"
    )


_LOMO_HOW = "fuses the update into backward (it needs the model and fused_backward(loss, lr))"
_LAYERWISE_HOW = "steps each parameter inside its own backward hook (one optimizer per parameter)"

_SPECS: tuple[OptimizerSpec, ...] = (
    # --- torch.optim -------------------------------------------------------------------------------------
    OptimizerSpec(
        "AdamW",
        ("adamw_torch",),
        _cls("torch.optim:AdamW", prefer_fused=True),
        description="AdamW with decoupled weight decay (torch.optim; fused kernel on CUDA, foreach elsewhere)",
        state_bytes="8",
    ),
    OptimizerSpec(
        "adamw_torch_fused",
        ("AdamWFused",),
        _cls("torch.optim:AdamW", fixed={"fused": True}),
        description="AdamW as one fused kernel per step (torch.optim, fused=True)",
        state_bytes="8",
    ),
    OptimizerSpec(
        "sgd",
        (),
        _cls("torch.optim:SGD"),
        description="SGD, optional momentum (torch.optim)",
        state_bytes="0 (4 with momentum)",
    ),
    OptimizerSpec(
        "SGDNesterov",
        (),
        _cls("torch.optim:SGD", fixed={"nesterov": True}),
        defaults={"momentum": 0.9},
        description="SGD with Nesterov momentum 0.9 (torch.optim)",
        state_bytes="4",
    ),
    OptimizerSpec(
        "adagrad", (), _cls("torch.optim:Adagrad"), description="Adagrad (torch.optim)", state_bytes="4"
    ),
    OptimizerSpec(
        "rmsprop", (), _cls("torch.optim:RMSprop"), description="RMSprop (torch.optim)", state_bytes="4"
    ),
    # --- bitsandbytes ------------------------------------------------------------------------------------
    OptimizerSpec(
        "AdamW8bit",
        ("adamw_bnb_8bit", "adamw_8bit"),
        _cls("bitsandbytes.optim:AdamW8bit"),
        _BNB,
        description="AdamW with block-wise 8-bit states (bitsandbytes)",
        state_bytes="2",
    ),
    OptimizerSpec(
        "PagedAdamW8bit",
        ("paged_adamw_8bit",),
        _cls("bitsandbytes.optim:PagedAdamW8bit"),
        _BNB,
        description="8-bit AdamW, states in paged unified memory (plain 8-bit on CPU)",
        state_bytes="2",
    ),
    OptimizerSpec(
        "PagedAdamW32bit",
        ("paged_adamw_32bit", "PagedAdamW"),
        _cls("bitsandbytes.optim:PagedAdamW32bit"),
        _BNB,
        description="AdamW, states in paged unified memory (plain on CPU)",
        state_bytes="8",
    ),
    OptimizerSpec(
        "Lion8bit",
        ("lion_8bit",),
        _cls("bitsandbytes.optim:Lion8bit"),
        _BNB,
        description="Lion with 8-bit momentum (bitsandbytes)",
        state_bytes="1",
    ),
    OptimizerSpec(
        "PagedLion8bit",
        ("paged_lion_8bit",),
        _cls("bitsandbytes.optim:PagedLion8bit"),
        _BNB,
        description="8-bit Lion, paged states (plain 8-bit on CPU)",
        state_bytes="1",
    ),
    OptimizerSpec(
        "lion_32bit",
        ("Lion32bit",),
        _cls("bitsandbytes.optim:Lion32bit"),
        _BNB,
        description="Lion, fp32 momentum (bitsandbytes)",
        state_bytes="4",
    ),
    OptimizerSpec(
        "paged_lion_32bit",
        ("PagedLion32bit",),
        _cls("bitsandbytes.optim:PagedLion32bit"),
        _BNB,
        description="Lion, fp32 momentum in paged memory (plain on CPU)",
        state_bytes="4",
    ),
    OptimizerSpec(
        "SGDNesterov8bit",
        (),
        _cls("bitsandbytes.optim:SGD8bit", fixed={"nesterov": True}),
        _BNB,
        defaults={"momentum": 0.9},
        description="SGD, Nesterov momentum 0.9 in 8 bits (bitsandbytes)",
        state_bytes="1",
    ),
    OptimizerSpec(
        "ademamix",
        ("AdEMAMix",),
        _cls("bitsandbytes.optim:AdEMAMix", fixed={"optim_bits": 32}),
        _BNB,
        description="AdEMAMix: Adam with a second, slow momentum EMA (bitsandbytes, fp32)",
        state_bytes="12",
    ),
    OptimizerSpec(
        "ademamix_8bit",
        ("AdEMAMix8bit",),
        _cls("bitsandbytes.optim:AdEMAMix8bit"),
        _BNB,
        description="AdEMAMix with 8-bit states (bitsandbytes)",
        state_bytes="3",
    ),
    OptimizerSpec(
        "paged_ademamix_32bit",
        ("PagedAdEMAMix32bit",),
        _cls("bitsandbytes.optim:PagedAdEMAMix", fixed={"optim_bits": 32}),
        _BNB,
        description="AdEMAMix, fp32 states in paged memory (plain on CPU)",
        state_bytes="12",
    ),
    OptimizerSpec(
        "paged_ademamix_8bit",
        ("PagedAdEMAMix8bit",),
        _cls("bitsandbytes.optim:PagedAdEMAMix8bit"),
        _BNB,
        description="AdEMAMix, 8-bit paged states (plain 8-bit on CPU)",
        state_bytes="3",
    ),
    OptimizerSpec(
        "rmsprop_bnb",
        (),
        _cls("bitsandbytes.optim:RMSprop"),
        _BNB,
        description="RMSprop (bitsandbytes; optim_bits=8 or 32)",
        state_bytes="4",
    ),
    OptimizerSpec(
        "rmsprop_bnb_8bit",
        (),
        _cls("bitsandbytes.optim:RMSprop8bit"),
        _BNB,
        description="RMSprop with 8-bit state (bitsandbytes)",
        state_bytes="1",
    ),
    OptimizerSpec(
        "rmsprop_bnb_32bit",
        (),
        _cls("bitsandbytes.optim:RMSprop32bit"),
        _BNB,
        description="RMSprop, fp32 state (bitsandbytes)",
        state_bytes="4",
    ),
    # --- torchao low-bit ---------------------------------------------------------------------------------
    OptimizerSpec(
        "adamw_torch_8bit",
        (),
        _cls("torchao.optim:AdamW8bit"),
        ("torchao",),
        description="AdamW with 8-bit block-quantised states (torchao, torch.compile'd)",
        state_bytes="2",
    ),
    OptimizerSpec(
        "adamw_torch_4bit",
        (),
        _cls("torchao.optim:AdamW4bit"),
        ("torchao",),
        description="AdamW with 4-bit block-quantised states (torchao, torch.compile'd)",
        state_bytes="1",
    ),
    # --- device-specific ---------------------------------------------------------------------------------
    OptimizerSpec(
        "adamw_torch_xla",
        (),
        _cls("torch_xla.amp.syncfree:AdamW"),
        ("torch_xla",),
        description="AdamW for XLA/TPU devices (torch_xla)",
        state_bytes="8",
    ),
    OptimizerSpec(
        "adamw_torch_npu_fused",
        (),
        _cls("torch_npu.optim:NpuFusedAdamW"),
        ("torch_npu",),
        description="fused AdamW for Ascend NPUs (torch_npu)",
        state_bytes="8",
    ),
    OptimizerSpec(
        "adamw_apex_fused",
        (),
        _cls("apex.optimizers:FusedAdam", fixed={"adam_w_mode": True}),
        ("apex",),
        needs_cuda=True,
        description="NVIDIA Apex fused AdamW",
        state_bytes="8",
    ),
    OptimizerSpec(
        "adamw_anyprecision",
        (),
        _cls("torchdistx.optimizers:AnyPrecisionAdamW"),
        ("torchdistx",),
        description="AdamW with selectable state dtypes and Kahan summation (torchdistx)",
        state_bytes="8 (less with bf16 states)",
    ),
    # --- low-rank gradient projection --------------------------------------------------------------------
    OptimizerSpec(
        "galore_adamw",
        ("GaLoreAdamW",),
        _cls("galore_torch:GaLoreAdamW", group_kwargs=_GALORE, regroup=_split_2d),
        ("galore_torch",),
        description="GaLore: AdamW on a low-rank projection of 2-D gradients (galore-torch)",
        state_bytes="8 (rank/min-dim of it on 2-D tensors)",
    ),
    OptimizerSpec(
        "galore_adamw_8bit",
        ("GaLoreAdamW8bit",),
        _cls("galore_torch:GaLoreAdamW8bit", group_kwargs=_GALORE, regroup=_split_2d),
        ("galore_torch", "bitsandbytes"),
        needs_cuda=True,
        description="GaLore with 8-bit AdamW states (galore-torch)",
        state_bytes="2 (less on 2-D tensors)",
    ),
    OptimizerSpec(
        "galore_adafactor",
        ("GaLoreAdafactor",),
        _cls("galore_torch:GaLoreAdafactor", group_kwargs=_GALORE, regroup=_split_2d, adjust=_adafactor_lr),
        ("galore_torch",),
        defaults=_ADAFACTOR,
        description="GaLore with Adafactor (galore-torch)",
        state_bytes="~0 (factored)",
    ),
    OptimizerSpec(
        "galore_adamw_layerwise",
        (),
        _cls("galore_torch:GaLoreAdamW"),
        ("galore_torch",),
        refused=_refusal("galore_adamw_layerwise", _LAYERWISE_HOW, "galore_adamw"),
        description="GaLore AdamW stepped per layer in backward hooks",
    ),
    OptimizerSpec(
        "galore_adamw_8bit_layerwise",
        (),
        _cls("galore_torch:GaLoreAdamW8bit"),
        ("galore_torch",),
        refused=_refusal("galore_adamw_8bit_layerwise", _LAYERWISE_HOW, "galore_adamw_8bit"),
        description="8-bit GaLore AdamW stepped per layer in backward hooks",
    ),
    OptimizerSpec(
        "galore_adafactor_layerwise",
        (),
        _cls("galore_torch:GaLoreAdafactor"),
        ("galore_torch",),
        refused=_refusal("galore_adafactor_layerwise", _LAYERWISE_HOW, "galore_adafactor"),
        description="GaLore Adafactor stepped per layer in backward hooks",
    ),
    OptimizerSpec(
        "apollo_adamw",
        ("APOLLOAdamW",),
        _cls("apollo_torch:APOLLOAdamW", group_kwargs=_APOLLO, regroup=_split_2d),
        ("apollo_torch",),
        description="APOLLO: AdamW scaled by channel-wise low-rank random-projection moments",
        state_bytes="8 (rank/min-dim of it on 2-D tensors)",
    ),
    OptimizerSpec(
        "apollo_adamw_layerwise",
        (),
        _cls("apollo_torch:APOLLOAdamW"),
        ("apollo_torch",),
        refused=_refusal("apollo_adamw_layerwise", _LAYERWISE_HOW, "apollo_adamw"),
        description="APOLLO stepped per layer in backward hooks",
    ),
    OptimizerSpec(
        "lomo",
        ("Lomo",),
        _cls("lomo_optim:Lomo"),
        ("lomo_optim",),
        refused=_refusal("lomo", _LOMO_HOW, "adafactor or AdamW8bit"),
        description="LOMO: SGD fused into backward, no optimizer state",
    ),
    OptimizerSpec(
        "adalomo",
        ("AdaLomo",),
        _cls("lomo_optim:AdaLomo"),
        ("lomo_optim",),
        refused=_refusal("adalomo", _LOMO_HOW, "adafactor or AdamW8bit"),
        description="AdaLomo: factored adaptive LOMO fused into backward",
    ),
    # --- other packages ----------------------------------------------------------------------------------
    OptimizerSpec(
        "grokadamw",
        ("GrokAdamW",),
        _cls("grokadamw:GrokAdamW", wrap=_state_in_optimizer),
        ("grokadamw",),
        description="GrokAdamW: AdamW amplifying slow gradient components (grokadamw; "
        "its state lives on the CPU)",
        state_bytes="12",
    ),
    OptimizerSpec(
        "stable_adamw",
        ("StableAdamW",),
        _cls("pytorch_optimizer:StableAdamW"),
        _PO,
        description="StableAdamW: AdamW with AdaFactor-style update clipping (pytorch-optimizer)",
        state_bytes="8 (+2 Kahan)",
    ),
    OptimizerSpec(
        "schedule_free_adamw",
        ("AdamWScheduleFree",),
        _cls("schedulefree:AdamWScheduleFree"),
        ("schedulefree",),
        description="Schedule-free AdamW; needs no LR schedule (schedulefree)",
        state_bytes="8",
    ),
    OptimizerSpec(
        "schedule_free_radam",
        ("RAdamScheduleFree",),
        _cls("schedulefree:RAdamScheduleFree"),
        ("schedulefree",),
        description="Schedule-free RAdam; no warm-up or schedule (schedulefree)",
        state_bytes="8",
    ),
    OptimizerSpec(
        "schedule_free_sgd",
        ("SGDScheduleFree",),
        _cls("schedulefree:SGDScheduleFree"),
        ("schedulefree",),
        description="Schedule-free SGD (schedulefree)",
        state_bytes="4",
    ),
    OptimizerSpec(
        "adafactor",
        (),
        _cls("transformers.optimization:Adafactor", adjust=_adafactor_lr),
        ("transformers",),
        defaults=_ADAFACTOR,
        description="Adafactor, factored second moment; fixed lr unless relative_step=True",
        state_bytes="~0 (factored; 4 with beta1)",
    ),
    OptimizerSpec(
        "CAME",
        (),
        _cls("came_pytorch:CAME"),
        ("came_pytorch",),
        defaults={"lr": 1e-4},
        description="CAME: confidence-guided Adafactor (came-pytorch)",
        state_bytes="4 (+factored)",
    ),
    OptimizerSpec(
        "DAdaptAdamPreprint",
        ("DAdaptation",),  # sd-scripts' "DAdaptation" is this one, the paper's preprint Adam
        _cls("dadaptation.experimental:DAdaptAdamPreprint"),
        ("dadaptation",),
        defaults={"lr": 1.0},
        description="D-Adaptation Adam as in the preprint (sd-scripts' DAdaptation); keep lr=1",
        state_bytes="12",
    ),
    OptimizerSpec(
        "DAdaptAdam",
        (),
        _cls("dadaptation:DAdaptAdam"),
        ("dadaptation",),
        defaults={"lr": 1.0},
        description="D-Adaptation Adam: learns the step size; keep lr=1",
        state_bytes="12",
    ),
    OptimizerSpec(
        "DAdaptAdaGrad",
        (),
        _cls("dadaptation:DAdaptAdaGrad"),
        ("dadaptation",),
        defaults={"lr": 1.0},
        description="D-Adaptation AdaGrad; keep lr=1",
        state_bytes="12",
    ),
    OptimizerSpec(
        "DAdaptAdan",
        (),
        _cls("dadaptation:DAdaptAdan"),
        ("dadaptation",),
        defaults={"lr": 1.0},
        description="D-Adaptation Adan; keep lr=1",
        state_bytes="16",
    ),
    OptimizerSpec(
        "DAdaptAdanIP",
        (),
        _cls("dadaptation.experimental:DAdaptAdanIP"),
        ("dadaptation",),
        defaults={"lr": 1.0},
        description="D-Adaptation Adan, inner-product variant (experimental); keep lr=1",
        state_bytes="16",
    ),
    OptimizerSpec(
        "DAdaptLion",
        (),
        _cls("dadaptation:DAdaptLion"),
        ("dadaptation",),
        defaults={"lr": 1.0},
        description="D-Adaptation Lion; keep lr=1",
        state_bytes="8",
    ),
    OptimizerSpec(
        "DAdaptSGD",
        (),
        _cls("dadaptation:DAdaptSGD"),
        ("dadaptation",),
        defaults={"lr": 1.0},
        description="D-Adaptation SGD; keep lr=1",
        state_bytes="8",
    ),
    OptimizerSpec(
        "Prodigy",
        (),
        _cls("prodigyopt:Prodigy"),
        ("prodigyopt",),
        defaults={"lr": 1.0},
        description="Prodigy: D-Adaptation successor, learns the step size; keep lr=1",
        state_bytes="16",
    ),
    # --- OpenToMe standard members (doc defaults; explicit values win) -----------------------------------
    OptimizerSpec(
        "Lion",
        (),
        _cls("pytorch_optimizer:Lion"),
        _PO,
        defaults={"lr": 2e-6, "betas": (0.9, 0.98)},
        description="Lion: sign of interpolated momentum (pytorch-optimizer)",
        state_bytes="4",
    ),
    OptimizerSpec(
        "SophiaG",
        ("Sophia",),
        _cls("library.optimizers.sophia:SophiaG"),
        defaults={"lr": 2e-6},
        description="Sophia-G: momentum clipped by a Gauss-Newton-Bartlett Hessian diagonal",
        state_bytes="8",
    ),
    OptimizerSpec(
        "Lamb",
        (),
        _cls("pytorch_optimizer:Lamb"),
        _PO,
        defaults={"betas": (0.9, 0.99)},
        description="LAMB: Adam with per-tensor trust ratio (pytorch-optimizer)",
        state_bytes="8",
    ),
    OptimizerSpec(
        "Adan",
        (),
        _cls("pytorch_optimizer:Adan"),
        _PO,
        defaults={"betas": (0.9, 0.92, 0.99)},
        description="Adan: Nesterov-style adaptive momentum, three betas (pytorch-optimizer)",
        state_bytes="16",
    ),
    OptimizerSpec(
        "Adam_mini",
        ("AdamMini",),
        _cls("library.optimizers.adam_mini:Adam_mini"),
        env={"dim": "ADAM_MINI_DIM", "n_heads": "ADAM_MINI_N_HEADS"},
        description="Adam-mini: one second-moment scalar per block/head",
        state_bytes="~4",
    ),
    # --- in-house ----------------------------------------------------------------------------------------
    OptimizerSpec(
        "CustomAdamW",
        ("HinaAdamW", "custom_hina_adamw"),
        _cls("library.optimizers.hina_adamw:HinaAdamWOptimizer"),
        family="Hina",
        description="Hina's AdamW: ADOPT, Grams, Cautious, TAM, AGR, OrthoGrad, SPD, ALLoRA, dynamic WD",
        state_bytes="8, 12 with SPD (m, v, θ₀)",
    ),
    OptimizerSpec(
        "CustomAdamW8bit",
        ("HinaAdamW8bit",),
        _cls("library.optimizers.hina_adamw:HinaAdamWOptimizer", fixed={"optim_bits": 8}),
        family="Hina",
        description="CustomAdamW with block-wise 8-bit states",
        state_bytes="~2, ~4 with SPD (8-bit m, v; bf16 θ₀)",
    ),
    OptimizerSpec(
        "Automagic_Sinkgd",
        (),
        _cls("library.optimizers.automagic:Automagic_Sinkgd"),
        family="Automagic",
        description="Automagic: per-element lr mask, ADOPT momentum, Grams, SinkGD, ALLoRA",
        state_bytes="~13 (lr mask, momentum, sign)",
    ),
    OptimizerSpec(
        "Automagic_CameAMP",
        (),
        _cls("library.optimizers.automagic:Automagic_CameAMP"),
        family="Automagic",
        description="Automagic on CAME with 8-bit states",
        state_bytes="~13.5 (lr mask, first moment, factored moments, sign)",
    ),
    *(
        OptimizerSpec(
            n,
            (),
            _cls(f"library.optimizers.sgg:{n}"),
            env=_SGG_ENV,
            family="SGG",
            description=d,
            state_bytes=b,
        )
        for n, d, b in (
            ("AdamWSGG", "AdamW scaled by gradient grouping (clustered step sizes)", "~8"),
            ("AdamWSGG_v2", "AdamWSGG with EMA-smoothed cluster scales", "~8"),
            ("AdafactorSGG", "Adafactor scaled by gradient grouping", "~4"),
            ("LambSGG_v2", "LAMB scaled by gradient grouping", "~8"),
            ("ShampooSGG_v2", "Shampoo scaled by gradient grouping", "matrix preconditioners"),
        )
    ),
    OptimizerSpec(
        "AdamWSAC",
        (),
        _cls("library.optimizers.sac:AdamWSAC"),
        defaults={"betas": (0.9, 0.99)},
        env=_SAC_ENV,
        family="SAC",
        description="AdamW scaled per block by architectural constraints",
        state_bytes="~8",
    ),
    OptimizerSpec(
        "Adam_miniSAC",
        (),
        _cls("library.optimizers.sac:Adam_miniSAC"),
        defaults={"betas": (0.9, 0.99), "eps": 1e-8},
        env=_SAC_ENV,
        family="SAC",
        description="Adam-mini scaled per head by architectural constraints",
        state_bytes="~4",
    ),
)


def _key(name: str) -> str:
    return re.sub(r"[_\-.]", "", name).lower()


def _index(specs: Iterable[OptimizerSpec]) -> dict[str, OptimizerSpec]:
    index: dict[str, OptimizerSpec] = {}
    for spec in specs:
        for n in (spec.name, *spec.aliases):
            other = index.setdefault(_key(n), spec)
            if other is not spec:
                raise RuntimeError(f"optimizer name {n!r} of {spec.name} collides with {other.name}")
    return index


_INDEX = _index(_SPECS)


def list_optimizers() -> list[OptimizerSpec]:
    """Every registered optimizer, in table order."""
    return list(_SPECS)


def resolve(name: str) -> OptimizerSpec:
    """Spec for ``name`` (case, ``_``, ``-``, ``.`` ignored) or for a ``module.path.ClassName``."""
    spec = _INDEX.get(_key(name))
    if spec is not None:
        return spec
    module, _, attr = name.rpartition(".")
    if module and attr.isidentifier() and all(part.isidentifier() for part in module.split(".")):
        return OptimizerSpec(
            name,
            (),
            _cls(f"{module}:{attr}"),
            requires=(module.split(".")[0],),
            family="custom",
            description=f"{attr} from {module}",
        )
    close = difflib.get_close_matches(_key(name), list(_INDEX), n=3, cutoff=0.6)
    names = dict.fromkeys(_INDEX[c].name for c in close)  # an alias and its name point at one optimizer
    hint = f"; did you mean {', '.join(names)}?" if names else ""
    raise OptimizerError(
        f"--optimizer_type: unknown optimizer {name!r}{hint} (see `--optimizer_type list`, or give module.path.Class)"
    )


def optimizer_family(spec: OptimizerSpec) -> str:
    """The "Type" shown in "Selected optimizer: X (Type: ...)"."""
    return FAMILY_TYPES.get(spec.family, spec.family)


def unavailable_reason(spec: OptimizerSpec) -> str | None:
    """Why ``spec`` cannot be built on this machine, or None. Cheap: imports nothing."""
    if spec.refused:
        return spec.refused
    for module in spec.requires:
        if importlib.util.find_spec(module) is None:
            pip = PIP_NAMES.get(module, module)
            return f"{spec.name} needs the package {module}: pip install {pip}"
    if spec.needs_cuda and not torch.cuda.is_available():
        return f"{spec.name} needs a CUDA GPU"
    module = spec.build.module
    if module.startswith("library.") and importlib.util.find_spec(module) is None:
        return f"{spec.name} needs the module {module}, which is not in this install"
    return None


def package_of(spec: OptimizerSpec) -> str:
    """Who implements it: a pip package, torch, or loraforge."""
    top = spec.build.module.split(".")[0]
    if top == "library":
        return "loraforge"
    return PIP_NAMES.get(top, top).split(" ")[0]


def build_optimizer(
    name: str,
    param_groups: Any,
    *,
    lr: float | None = None,
    cli_kwargs: Mapping[str, Any] | None = None,
    optimizer_args: Sequence[str] | Mapping[str, Any] | None = None,
    toml_table: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    from_config_file: Collection[str] = (),
) -> tuple[torch.optim.Optimizer, dict[str, str]]:
    """Build the optimizer ``name`` over ``param_groups``; returns it and {kwarg: source} of every value set.

    ``lr`` is the explicit ``--learning_rate`` (None: not given, so the registry/class default applies to
    groups without their own ``lr``). ``environ`` defaults to an empty mapping (pass ``os.environ``).
    """
    spec = resolve(name)
    reason = unavailable_reason(spec)
    if reason:
        raise OptimizerUnavailable(reason)
    _log_loaded_once()
    if spec.family == "custom":
        target = spec.build.load(spec.name)
        if not (isinstance(target, type) and issubclass(target, torch.optim.Optimizer)):
            raise OptimizerError(f"--optimizer_type: {name} is not a torch.optim.Optimizer subclass")
    accepted = spec.build.accepted_kwargs(spec.name)
    kwargs, sources = resolve_settings(
        spec.name,
        accepted,
        spec_defaults=spec.defaults,
        env_vars=spec.env,
        lr=lr,
        cli_kwargs=cli_kwargs,
        optimizer_args=optimizer_args,
        toml_table=toml_table,
        environ=environ,
        from_config_file=from_config_file,
    )
    try:
        optimizer = spec.build(param_groups, name=spec.name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise OptimizerError(f"{spec.name}: invalid settings {kwargs}: {exc}") from exc
    except OptimizerError as exc:
        # the optimizer names only its kwarg; say which environment variable set it
        from_env = [k for k, src in sources.items() if src.startswith("env ") and f"{k}=" in str(exc)]
        if from_env:
            raise OptimizerError(f"{exc} (set by environment variable {sources[from_env[0]][4:]})") from None
        raise
    logger.info("Selected optimizer: %s (Type: %s)", spec.name, optimizer_family(spec))
    for key, source in sources.items():
        logger.info("  %s = %r (%s)", key, kwargs[key], source)
    return optimizer, sources


_loaded_logged = False


def _log_loaded_once() -> None:
    global _loaded_logged
    if _loaded_logged or not logger.isEnabledFor(logging.INFO):  # a silenced probe build does not use it up
        return
    _loaded_logged = True
    for family in ("SGG", "SAC"):  # the OpenToMe guide documents these two lines
        names = [s.name for s in _SPECS if s.family == family and unavailable_reason(s) is None]
        logger.info("%s optimizers loaded: %s", family, names)
    available = sum(unavailable_reason(s) is None for s in _SPECS if s.family not in ("SGG", "SAC"))
    logger.info("%d other optimizers available (--optimizer_type list names them)", available)


def short_status(spec: OptimizerSpec) -> str:
    """Availability in a few words, for the listing."""
    reason = unavailable_reason(spec)
    if reason is None:
        return "available"
    if spec.refused:
        return "refused (own loop)"
    if "CUDA" in reason:
        return "needs CUDA"
    if "not in this install" in reason:
        return "module missing"
    return "needs " + reason.rpartition("pip install ")[2].split(" ")[0]


def format_optimizer_table(width: int | None = None) -> str:
    """Terminal listing for ``--optimizer_type list``: name, aliases, package, status, description.

    Descriptions are cut to the terminal's width only on a terminal: piped into `less` or a file, they are whole."""
    if width is None and not sys.stdout.isatty():
        width = 10**6
    width = width or shutil.get_terminal_size((120, 24)).columns
    rows = [(s.name, ", ".join(s.aliases), package_of(s), short_status(s), s.description) for s in _SPECS]
    head = ("name", "aliases", "package", "status", "description")
    cols = [max(len(r[i]) for r in (*rows, head)) for i in range(4)]
    lines = []
    for row in (head, *rows):
        left = "  ".join(cell.ljust(cols[i]) for i, cell in enumerate(row[:4]))
        room = max(width - len(left) - 2, 20)
        lines.append(f"{left}  {textwrap.shorten(row[4], room, placeholder='...')}".rstrip())
    footer = (
        "Names ignore case and _ - . ; any module.path.ClassName of a torch optimizer works. Settings: "
        "--optimizer_args k=v, [optimizer] in --config_file, env vars (SGG_*, SAC_*, ADAM_MINI_*). "
        "docs/optimizers.md has defaults and memory per parameter."
    )
    return "\n".join([*lines, "", textwrap.fill(footer, width)])
