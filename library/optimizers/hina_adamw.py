"""CustomAdamW (Hina's AdamW): AdamW with nine switchable techniques and an optional 8-bit state.

Definitions: the papers cited per technique (summarised in docs/optimizers.md); flag names and defaults from the seed
usage guide. Per parameter tensor, one step composes the techniques in this order (g = gradient, θ = weight):

 1. g ← grad (working copy, fp32 for half-precision weights)
 2. OrthoGrad   g ← g⊥ rescaled to ‖g‖ (skips ‖θ‖≈0, e.g. LoRA up at init)        ``use_orthogonal_grad``
 3. AGR         g ← g − (|g|/Σ|g|)⊙g                                                ``use_agr``
 4. momentum input x: ADOPT x = clip(g / max(√v_prev, ε), ±t^¼); AdamW x = g       ``use_adopt_stability``
 5. TAM         s̄ ← β_s·s̄ + (1−β_s)·cos(m_prev, x); x ← (1+s̄)/2·x                 ``use_tam``, ``tam_beta``
 6. m ← β₁m + (1−β₁)x;  v ← β₂v + (1−β₂)g²
 7. update u: ADOPT u = m; AdamW u = m̂/(√v̂ + ε) (bias-corrected)
 8. Grams       u ← sign(g)·|u|                                                     ``use_grams``
 9. Cautious    u ← u·[u·g>0] / max(mean([u·g>0]), 1e-3)                            ``use_cautious``
10. ALLoRA      u_i ← u_i / √(‖θ_i‖² + 1/η²) per row, LoRA tensors only              ``use_alora``, ``alora_eta``
11. θ̃ = θ − lr'·u with lr' = ``alora_ratio``·lr for lora_up/lora_B (LoRA+), lr otherwise
12. decay: SPD (``use_spd``) replaces plain decay: if ⟨g, θ−θ₀⟩ < 0, θ ← θ̃ − λ(t)·r·(θ̃−θ₀),
    r = max(0, ‖θ̃−θ₀‖−‖θ−θ₀‖)/‖θ̃−θ₀‖; otherwise decoupled decay θ ← θ·(1 − lr'·wd(t)) before the step.
    Dynamic weight decay (``dynamic_weight_decay``) scales both: wd(t) = wd·ρ(t), λ(t) = ``spd_lambda``·ρ(t),
    ρ(t) = 1 for t ≤ T, else max(``wd_min_ratio``, ``wd_decay_factor``^((t−T)/T)) — it reaches the floor.

Design decisions:
- ADOPT normalises with the v of the previous step, so it needs no separate v_prev buffer: x is computed from v
  before v is updated. ADOPT's "v₀ = g₀², no update" initial step is taken per tensor on the first step whose
  gradient is non-zero (v still all zero). A zero-initialised lora_up makes lora_down's first gradient exactly
  zero; the original then divided a real gradient by ε at step 2. Here lora_down simply starts one step later.
- Cautious after Grams is a no-op on every coordinate (Grams already aligns the signs with g; the mask would
  only rescale by the fraction of non-zero gradients), so Cautious is applied only when Grams is off.
- TAM compares the momentum with the quantity it accumulates (x), which is g itself without ADOPT.
- SPD covers every tensor of a group with ``use_spd``; θ₀ is the weight at the tensor's first step. SPD's
  inner product uses g after OrthoGrad/AGR (the gradient this optimizer acts on).
- LoRA roles come from the group's ``names`` (or torch's ``param_names``): ``lora_down``/``lora_A`` and
  ``lora_up``/``lora_B`` are paired by the rest of the name in one dict pass over all groups; only paired
  tensors get ALLoRA and the LoRA+ ratio. Without names those features are off (logged once).
- The step count is per tensor (``state["step"]``, a Python int, so schedules need no host sync).
- ``optim_bits=8`` keeps m and v of tensors with at least ``min_8bit_size`` elements as block-wise uint8 codes
  (:mod:`library.optimizers.quant8`); each step dequantises, updates in fp32 and requantises, all quantised
  tensors of a (device, dtype) at once (bit-identical to per-tensor quantisation, see ``_QuantisedBatch``).
- Every step is a fixed number of launches whatever the tensor count: elementwise math in ``torch._foreach_*``,
  per-tensor dot products by polarisation over ``_foreach_norm``, ALLoRA row norms per shape bucket. θ₀ and TAM's s̄
  stay exact (θ₀ in the weight's dtype, s̄ is one scalar).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers import quant8
from library.optimizers.state import ExactStateLoad
from library.optimizers.transforms import (
    agr_,
    allora_scale_,
    cautious_,
    dots,
    grams_,
    orthograd_,
    tam_damping_,
)

logger = logging.getLogger(__name__)

_LORA_NAME = re.compile(r"^(?P<prefix>|.*\.)(?P<role>lora_down|lora_up|lora_A|lora_B)(?P<suffix>\..*|)$")
_DOWN_ROLES = ("lora_down", "lora_A")
_FLAGS = (
    "use_spd",
    "use_cautious",
    "use_orthogonal_grad",
    "use_adopt_stability",
    "use_grams",
    "use_agr",
    "use_tam",
    "use_alora",
    "dynamic_weight_decay",
)


def weight_decay_ratio(step: int, transition_steps: int, decay_factor: float, min_ratio: float) -> float:
    """ρ(t) of dynamic weight decay: 1 up to T, then decay_factor^((t−T)/T) floored at min_ratio."""
    if step <= transition_steps:
        return 1.0
    return max(min_ratio, decay_factor ** ((step - transition_steps) / transition_steps))


def find_lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Pair LoRA down/up (A/B) names by the rest of the name: {key: (down_name, up_name)}, one pass."""
    downs: dict[str, str] = {}
    ups: dict[str, str] = {}
    for name in names:
        match = _LORA_NAME.match(name)
        if match is None:
            continue
        key = f"{match['prefix']}*{match['suffix']}"
        (downs if match["role"] in _DOWN_ROLES else ups)[key] = name
    return {key: (downs[key], ups[key]) for key in downs.keys() & ups.keys()}


def _work_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class _QuantisedBatch:
    """All 8-bit states of one (device, working dtype) bucket decoded/encoded with one bitsandbytes call each.

    Every tensor gets a slot of ``num_blocks(n)·BLOCKSIZE`` elements in one flat buffer, so quantisation blocks
    never straddle two tensors; the slot's tail is the map's exact zero, which changes neither a block's absmax
    nor any code. Codes and absmax are therefore bit-identical to quantising each tensor on its own, and the
    per-parameter state (``<name>_codes`` / ``<name>_absmax``) keeps its format.
    """

    def __init__(self, shapes: list[torch.Size], device: torch.device, dtype: torch.dtype) -> None:
        self.shapes, self.device, self.dtype = shapes, device, dtype
        sizes = [math.prod(s) for s in shapes]
        blocks = [quant8.num_blocks(n) for n in sizes]
        self.total_blocks = sum(blocks)
        block_starts = [0]
        for b in blocks[:-1]:
            block_starts.append(block_starts[-1] + b)
        self.slots = [(b * quant8.BLOCKSIZE, n) for b, n in zip(block_starts, sizes, strict=True)]
        self.absmax_slots = list(zip(block_starts, blocks, strict=True))

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [flat[o : o + n].view(s) for (o, n), s in zip(self.slots, self.shapes, strict=True)]

    def load(self, states: list[dict[str, Any]], name: str, signed: bool) -> tuple[Tensor, list[Tensor]]:
        """(flat working buffer, one view per tensor shaped like it)."""
        codes = torch.full(
            (self.total_blocks * quant8.BLOCKSIZE,), _zero_code(signed), dtype=torch.uint8, device=self.device
        )
        torch._foreach_copy_(self._views(codes), [s[f"{name}_codes"] for s in states])
        absmax = torch.cat([s[f"{name}_absmax"] for s in states])
        flat = quant8.dequantize(codes, absmax, signed=signed, dtype=self.dtype)
        return flat, self._views(flat)

    def store_(self, states: list[dict[str, Any]], name: str, flat: Tensor, signed: bool) -> None:
        codes = torch.empty(flat.shape, dtype=torch.uint8, device=self.device)
        absmax = torch.empty(self.total_blocks, dtype=torch.float32, device=self.device)
        quant8.quantize_into_(flat, codes, absmax, signed=signed)
        torch._foreach_copy_([s[f"{name}_codes"] for s in states], self._views(codes))
        torch._foreach_copy_([s[f"{name}_absmax"] for s in states], [absmax[o : o + n] for o, n in self.absmax_slots])


_ZERO_CODES: dict[bool, int] = {}


def _zero_code(signed: bool) -> int:
    """Index of 0.0 in the quantisation map, read once from the CPU copy (no device sync)."""
    if signed not in _ZERO_CODES:
        _ZERO_CODES[signed] = int(torch.argmin(quant8.quant_map(signed, torch.device("cpu")).abs()))
    return _ZERO_CODES[signed]


class HinaAdamWOptimizer(ExactStateLoad, torch.optim.Optimizer):
    """AdamW with ADOPT, Grams, Cautious, TAM, AGR, OrthoGrad, SPD, ALLoRA/LoRA+ and dynamic weight decay.

    Args:
        params: parameters or param groups; groups may carry ``names`` parallel to ``params`` for LoRA awareness.
        lr, betas, eps, weight_decay: AdamW's (ε is also ADOPT's normaliser floor).
        use_spd, spd_lambda: selective projection decay towards the first-step weights (replaces plain decay).
        use_cautious: mask update coordinates that disagree with the gradient (inactive when Grams is on).
        use_orthogonal_grad: project the gradient orthogonal to the weights.
        use_adopt_stability: ADOPT momentum (previous-step normaliser, t^¼ clip) instead of Adam's.
        use_grams: take the update's sign from the current gradient.
        use_agr: adaptive gradient regularisation.
        use_tam, tam_beta: torque-aware momentum and its cosine smoothing.
        use_alora, alora_ratio, alora_eta: ALLoRA row scaling (η = alora_eta) and LoRA+ lr ratio ηB/ηA.
        dynamic_weight_decay, wd_transition_steps, wd_decay_factor, wd_min_ratio: the ρ(t) schedule above.
        optim_bits: 32 or 8 (block-wise quantised m and v); min_8bit_size: smaller tensors keep fp32 state.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        use_spd: bool = True,
        spd_lambda: float = 0.1,
        use_cautious: bool = True,
        use_orthogonal_grad: bool = False,
        use_adopt_stability: bool = True,
        use_grams: bool = True,
        use_agr: bool = True,
        use_tam: bool = True,
        tam_beta: float = 0.999,
        use_alora: bool = True,
        alora_ratio: float = 21.0,
        alora_eta: float = 2.0,
        dynamic_weight_decay: bool = True,
        wd_transition_steps: int = 1000,
        wd_decay_factor: float = 0.7,
        wd_min_ratio: float = 0.1,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
    ) -> None:
        flags = dict(
            use_spd=use_spd,
            use_cautious=use_cautious,
            use_orthogonal_grad=use_orthogonal_grad,
            use_adopt_stability=use_adopt_stability,
            use_grams=use_grams,
            use_agr=use_agr,
            use_tam=use_tam,
            use_alora=use_alora,
            dynamic_weight_decay=dynamic_weight_decay,
        )
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise OptimizerError(f"CustomAdamW {name}={value!r} is invalid; valid: True or False")
        betas = tuple(betas)
        checks = [
            ("lr", lr, lr >= 0.0, ">= 0"),
            ("betas", betas, len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), "two values in [0, 1)"),
            ("eps", eps, eps > 0.0, "> 0"),
            ("weight_decay", weight_decay, weight_decay >= 0.0, ">= 0"),
            ("spd_lambda", spd_lambda, spd_lambda >= 0.0, ">= 0"),
            ("tam_beta", tam_beta, 0.0 <= tam_beta < 1.0, "in [0, 1)"),
            ("alora_ratio", alora_ratio, alora_ratio > 0.0, "> 0"),
            ("alora_eta", alora_eta, alora_eta > 0.0, "> 0"),
            (
                "wd_transition_steps",
                wd_transition_steps,
                int(wd_transition_steps) == wd_transition_steps and wd_transition_steps >= 1,
                "an integer >= 1",
            ),
            ("wd_decay_factor", wd_decay_factor, 0.0 < wd_decay_factor <= 1.0, "in (0, 1]"),
            ("wd_min_ratio", wd_min_ratio, 0.0 <= wd_min_ratio <= 1.0, "in [0, 1]"),
            ("optim_bits", optim_bits, optim_bits in (8, 32), "8 or 32"),
            (
                "min_8bit_size",
                min_8bit_size,
                int(min_8bit_size) == min_8bit_size and min_8bit_size >= 0,
                "an integer >= 0",
            ),
        ]
        for name, value, ok, valid in checks:
            if not ok:
                raise OptimizerError(f"CustomAdamW {name}={value!r} is invalid; valid: {valid}")
        if optim_bits == 8:
            quant8.quant_map(True, torch.device("cpu"))  # fail now, not mid-training, if bitsandbytes is missing
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            spd_lambda=spd_lambda,
            tam_beta=tam_beta,
            alora_ratio=alora_ratio,
            alora_eta=alora_eta,
            wd_transition_steps=int(wd_transition_steps),
            wd_decay_factor=wd_decay_factor,
            wd_min_ratio=wd_min_ratio,
            optim_bits=optim_bits,
            min_8bit_size=int(min_8bit_size),
            **flags,
        )
        self._lora_roles: dict[Tensor, str] | None = None
        self._lora_pair_count = 0
        self._unnamed_logged = False
        self._quant_plans: dict[tuple, _QuantisedBatch] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        names = param_group.get("names", param_group.get("param_names"))
        if names is not None and len(names) != len(list(param_group["params"])):
            raise OptimizerError(
                f"CustomAdamW param group 'names' has {len(names)} entries for "
                f"{len(list(param_group['params']))} params; valid: one name per parameter"
            )
        super().add_param_group(param_group)
        self._lora_roles = None

    # ----- LoRA awareness -------------------------------------------------------------------------------------

    def _roles(self) -> dict[Tensor, str]:
        """{param: "down" | "up"} for paired LoRA tensors, built once per set of param groups."""
        if self._lora_roles is not None:
            return self._lora_roles
        by_name: dict[str, Tensor] = {}
        unnamed = False
        for group in self.param_groups:
            names = group.get("names", group.get("param_names"))
            if names is None:
                unnamed = True
                continue
            by_name.update(zip(names, group["params"], strict=True))
        if unnamed and not self._unnamed_logged:
            logger.info(
                "CustomAdamW: parameters without 'names'; LoRA-specific features (ALLoRA, LoRA+ ratio) are off for them"
            )
            self._unnamed_logged = True
        pairs = find_lora_pairs(by_name)
        roles: dict[Tensor, str] = {}
        for down, up in pairs.values():
            roles[by_name[down]] = "down"
            roles[by_name[up]] = "up"
        self._lora_roles, self._lora_pair_count = roles, len(pairs)
        return roles

    # ----- state ----------------------------------------------------------------------------------------------

    def _init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        dtype = _work_dtype(p)
        if group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]:
            quant8.init_state(state, "exp_avg", p, signed=True)
            quant8.init_state(state, "exp_avg_sq", p, signed=False)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _ensure_feature_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Buffers exist only for the features that are on (also when a flag is switched on mid-run)."""
        if group["use_tam"] and "tam_s" not in state:
            state["tam_s"] = torch.zeros((), dtype=_work_dtype(p), device=p.device)
        if group["use_spd"] and "theta0" not in state:
            state["theta0"] = p.detach().clone(memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load exactly (uint8 codes, fp32 moments of half weights and θ₀ bit-for-bit); re-derive the LoRA roles."""
        super().load_state_dict(state_dict)
        self._lora_roles = None

    # ----- step -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        roles = self._roles()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params, roles)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor], roles: dict[Tensor, str]) -> None:
        beta1, beta2 = group["betas"]
        eps, lr = group["eps"], group["lr"]
        adopt = group["use_adopt_stability"]
        states = []
        for p in params:
            if p.grad.is_sparse:
                raise OptimizerError("CustomAdamW does not support sparse gradients; valid: dense gradients")
            state = self.state[p]
            if not state:
                self._init_state(p, state, group)
            self._ensure_feature_state(p, state, group)
            state["step"] += 1
            states.append(state)
        steps = [s["step"] for s in states]
        quantised = [quant8.has_state(s, "exp_avg") for s in states]
        ratios = [
            weight_decay_ratio(t, group["wd_transition_steps"], group["wd_decay_factor"], group["wd_min_ratio"])
            if group["dynamic_weight_decay"]
            else 1.0
            for t in steps
        ]
        alora = group["use_alora"]
        lrs = [lr * group["alora_ratio"] if alora and roles.get(p) == "up" else lr for p in params]

        # 1. working copies (the weights themselves when already in the working dtype)
        grads = [torch.empty_like(p, dtype=_work_dtype(p)) for p in params]
        torch._foreach_copy_(grads, [p.grad for p in params])
        weights = [p if p.dtype == _work_dtype(p) else torch.empty_like(p, dtype=_work_dtype(p)) for p in params]
        converted = [i for i, p in enumerate(params) if weights[i] is not p]
        if converted:
            torch._foreach_copy_([weights[i] for i in converted], [params[i] for i in converted])
        exp_avgs = [None if q else s["exp_avg"] for s, q in zip(states, quantised, strict=True)]
        exp_avg_sqs = [None if q else s["exp_avg_sq"] for s, q in zip(states, quantised, strict=True)]
        batches = []  # (plan, indices, states, flat m, flat v) per quantised (device, dtype) bucket
        for (device, dtype), indices in self._quantised_buckets(params, quantised).items():
            plan = self._quant_plan(tuple(params[i].shape for i in indices), device, dtype)
            bucket_states = [states[i] for i in indices]
            flat_m, views_m = plan.load(bucket_states, "exp_avg", signed=True)
            flat_v, views_v = plan.load(bucket_states, "exp_avg_sq", signed=False)
            for i, m, v in zip(indices, views_m, views_v, strict=True):
                exp_avgs[i], exp_avg_sqs[i] = m, v
            batches.append((plan, bucket_states, flat_m, flat_v))

        # 2-3. gradient transforms
        if group["use_orthogonal_grad"]:
            orthograd_(weights, grads)
        if group["use_agr"]:
            agr_(grads)

        # 4. momentum input
        if adopt:
            # A tensor whose v is still all zero has never seen a gradient: this step is its ADOPT init step.
            ready = (torch.stack(torch._foreach_max(exp_avg_sqs)) > 0).to(grads[0].dtype)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_clamp_min_(denom, eps)
            inputs = torch._foreach_div(grads, denom)
            clips = [t**0.25 for t in steps]
            torch._foreach_clamp_min_(inputs, [-c for c in clips])
            torch._foreach_clamp_max_(inputs, clips)
        else:
            inputs = grads

        # 5. TAM
        if group["use_tam"]:
            damping = tam_damping_(exp_avgs, inputs, [s["tam_s"] for s in states], group["tam_beta"])
            inputs = torch._foreach_mul(inputs, damping)

        # 6-7. moments and update
        if adopt:
            torch._foreach_lerp_(exp_avgs, inputs, list(ready * (1.0 - beta1)))
            grad_sq = torch._foreach_mul(grads, grads)
            torch._foreach_lerp_(exp_avg_sqs, grad_sq, list(1.0 - ready * beta2))
            updates = torch._foreach_mul(exp_avgs, 1.0)
        else:
            torch._foreach_lerp_(exp_avgs, inputs, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
            torch._foreach_add_(denom, eps)
            updates = torch._foreach_div(exp_avgs, denom)
            torch._foreach_div_(updates, [1.0 - beta1**t for t in steps])

        # 8-9. sign agreement with the gradient
        if group["use_grams"]:
            grams_(updates, grads)
        elif group["use_cautious"]:
            cautious_(updates, grads)

        # 10. ALLoRA row scaling on LoRA tensors
        if alora:
            lora = [i for i, p in enumerate(params) if p in roles]
            if lora:
                allora_scale_([updates[i] for i in lora], [weights[i] for i in lora], group["alora_eta"])

        # 11-12. step and decay
        if group["use_spd"]:
            deviation = torch._foreach_sub(weights, [s["theta0"] for s in states])  # in the weights' dtype
            pushes_away = dots(grads, deviation) < 0
            dev_before = torch.stack(torch._foreach_norm(deviation))
        elif group["weight_decay"] != 0.0:
            torch._foreach_mul_(
                weights, [1.0 - lr_i * group["weight_decay"] * r for lr_i, r in zip(lrs, ratios, strict=True)]
            )
        torch._foreach_mul_(updates, [-lr_i for lr_i in lrs])
        torch._foreach_add_(weights, updates)
        if group["use_spd"]:
            torch._foreach_add_(deviation, updates)  # now θ̃ − θ₀
            dev_after = torch.stack(torch._foreach_norm(deviation))
            growth = (dev_after - dev_before).clamp_min(0.0) / dev_after.clamp_min(1e-30)
            torch._foreach_mul_(deviation, list(growth * pushes_away.to(growth.dtype)))
            torch._foreach_mul_(deviation, [group["spd_lambda"] * r for r in ratios])
            torch._foreach_sub_(weights, deviation)

        # write back
        if converted:
            torch._foreach_copy_([params[i] for i in converted], [weights[i] for i in converted])
        for plan, bucket_states, flat_m, flat_v in batches:
            plan.store_(bucket_states, "exp_avg", flat_m, signed=True)
            plan.store_(bucket_states, "exp_avg_sq", flat_v, signed=False)

    @staticmethod
    def _quantised_buckets(params: list[Tensor], quantised: list[bool]) -> dict[tuple, list[int]]:
        buckets: dict[tuple, list[int]] = {}
        for i, (p, q) in enumerate(zip(params, quantised, strict=True)):
            if q:
                buckets.setdefault((p.device, _work_dtype(p)), []).append(i)
        return buckets

    def _quant_plan(self, shapes: tuple, device: torch.device, dtype: torch.dtype) -> _QuantisedBatch:
        """Slot layouts are cached by (shapes, device, dtype): the same parameters give the same plan each step."""
        key = (shapes, device, dtype)
        if key not in self._quant_plans:
            self._quant_plans[key] = _QuantisedBatch(list(shapes), device, dtype)
        return self._quant_plans[key]

    # ----- reporting ------------------------------------------------------------------------------------------

    def _current_ratio(self, group: dict[str, Any]) -> tuple[int, float]:
        step = max((self.state[p]["step"] for p in group["params"] if self.state.get(p)), default=0)
        if not group["dynamic_weight_decay"]:
            return step, 1.0
        return step, weight_decay_ratio(
            step, group["wd_transition_steps"], group["wd_decay_factor"], group["wd_min_ratio"]
        )

    def log_metrics(self) -> dict[str, float]:
        """Cheap per-logging-step values (no device reads): current weight decay and SPD strength of group 0."""
        group = self.param_groups[0]
        _, ratio = self._current_ratio(group)
        return {
            "weight_decay_current": group["weight_decay"] * ratio,
            "wd_ratio": ratio,
            "spd_lambda_current": group["spd_lambda"] * ratio if group["use_spd"] else 0.0,
        }

    def get_optimization_info(self) -> dict[str, Any]:
        """What is on, live counters, LoRA pairing and state memory (measured, plus 32/8-bit estimates)."""
        roles = self._roles()
        group = self.param_groups[0]
        step, ratio = self._current_ratio(group)
        techniques = {flag: bool(group[flag]) for flag in _FLAGS}
        techniques["cautious_active"] = group["use_cautious"] and not group["use_grams"]
        n_params = sum(p.numel() for g in self.param_groups for p in g["params"])
        state_bytes = sum(quant8.state_nbytes(s) for s in self.state.values())
        est32 = est8 = 0
        for g in self.param_groups:
            for p in g["params"]:
                extra = (p.numel() * p.element_size() if g["use_spd"] else 0) + (4 if g["use_tam"] else 0)
                moments32 = 2 * p.numel() * torch.empty((), dtype=_work_dtype(p)).element_size()
                est32 += moments32 + extra
                if p.numel() >= g["min_8bit_size"]:
                    est8 += 2 * (p.numel() + 4 * quant8.num_blocks(p.numel())) + extra
                else:
                    est8 += moments32 + extra
        return {
            "optimizer": "CustomAdamW",
            "techniques": techniques,
            "step": step,
            "lora_pairs": self._lora_pair_count,
            "lora_tensors": len(roles),
            "lr": group["lr"],
            "weight_decay_base": group["weight_decay"],
            "weight_decay_current": group["weight_decay"] * ratio,
            "wd_ratio": ratio,
            "spd_lambda_current": group["spd_lambda"] * ratio if group["use_spd"] else 0.0,
            "optim_bits": group["optim_bits"],
            "num_params": n_params,
            "state_bytes": state_bytes,
            "state_bytes_per_param": state_bytes / max(n_params, 1),
            "state_bytes_per_param_32bit": est32 / max(n_params, 1),
            "state_bytes_per_param_8bit": est8 / max(n_params, 1),
        }
