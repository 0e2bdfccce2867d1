"""CustomAdamW (Hina's AdamW): AdamW with nine switchable techniques and an optional 8-bit state.

Definitions: the papers cited per technique (summarised in docs/optimizers.md); flag names and defaults from Hina's
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
- The step count is per tensor (``state["step"]``): a Python int in eager mode, a 0-d device tensor in
  capturable mode (below); state_dict() saves ints either way.
- ``optim_bits=8`` keeps m and v of tensors with at least ``min_8bit_size`` elements as block-wise uint8 codes
  (:mod:`library.optimizers.quant8`); each step dequantises, updates in fp32 and requantises all quantised
  tensors of a bucket with one call each (bit-identical to per-tensor quantisation, see
  :class:`~library.optimizers.quant8.FlatQuantState`).
- Performance: a LoRA step touches hundreds of small tensors, so on a GPU it is bound by host work (Python,
  dispatch, launches) and host syncs, not arithmetic. Per param group a cached plan holds the tensors with
  gradients, their states and the buckets; it is reused while the same tensors have gradients (checked with a few
  C-level passes), so a step runs no per-tensor Python: the plan owns the step counters (one Python int when all
  tensors step together) and writes every ``state["step"]`` in one C-level pass, so state_dict and direct reads
  stay current. Per bucket of (device, dtype, 8-bit or not) the tensors are laid end to end in flat buffers
  (:mod:`library.optimizers.flat`), split into runs of at most ``step_chunk_size`` elements (the bound on a
  step's temporaries; more runs mean more kernels). Gradients and weights are gathered into fresh flat
  buffers of the working dtype (one ``_chunk_cat`` each) and the weights written back with one split and one foreach copy; m, v, θ₀ and TAM's s̄ are flat
  buffers whose per-parameter views are what ``self.state[p]`` holds, so state_dict keeps its per-parameter
  format and a loaded state is gathered again. Every elementwise op is one kernel over the bucket, fused where a
  form exists (both ADOPT lerp weights from one op, the step applied by one ``addcmul_`` without a δ buffer,
  a uniform bias correction or SPD strength folded into a scalar); per-tensor sums/maxima are one
  ``segment_reduce`` (``unsafe=True``: its default length check reads values back to the host), several sums of
  products share one (TAM's cosine, SPD's inner product and norm); per-tensor factors are one ``index_select``
  with an int32 element→tensor index built at the start of the step; ALLoRA's row norms are one norm per run of
  shape buckets with equal row length (all LoRA ups share cols = rank), its row factors multiply the update in
  place, one broadcast per run.
  Step-dependent values (ADOPT clip, bias corrections, ρ(t)) are Python scalars when all tensors of a bucket are
  at the same step, else one small host-built tensor copied once (eager mode; capturable mode computes them on
  the device). So a bucket's step dispatches a fixed number
  of ops (about 70 kernels with the defaults) whatever its tensor count, and never reads a value back from the
  device; the number of buckets grows only with the elements over ``step_chunk_size``.
- Memory: between steps the optimizer keeps its state and nothing else (fp32: m, v, θ₀ = 12 bytes per
  parameter; 8-bit: codes, absmax and a bf16 θ₀ = 4.03), plus a few values per tensor. The flat copies of
  gradients and weights and the element index live only inside a step (a caller's CUDA graph keeps them in
  its private pool). Inside a step the temporaries are about 5 fp32 values per
  element (7 with 8-bit state: both decoded moments), each dropped or reused as soon as it is spent, and they
  are per bucket: a bucket holds whole tensors of at most ``step_chunk_size`` elements (runs fixed when the
  tensors are laid out), so the peak is the state plus one run's temporaries, not the parameter set's.
- Capturable mode, ``cuda_graphs=True`` (the default), follows torch.optim's ``capturable=True``: the
  optimizer keeps what changes between steps on the device and the caller records the step. The step counts are
  float32 device tensors advanced by the step itself (one 0-d counter per group while its tensors step together,
  else per-tensor counters per bucket; ``state["step"]`` is the counter or a 0-d view), each group's lr a
  persistent 0-d float64 device tensor in ``group["lr"]`` (a scheduler ``fill_``s it), and the
  clip, bias corrections and ρ(t) are computed from them on the device in float64 by the formulas the eager
  path evaluates in Python. After its first call (which lays out the plan and the state), step() is a fixed
  sequence of kernels with no host sync, so the trainer records it with forward and backward under
  ``--cuda_graphs`` (library/training/graphed_step.py). Only lr and the step counts may change between replays:
  other settings are kernel constants of a recording. ``cuda_graphs=False`` keeps Python numbers (fewer tiny
  kernels when nothing records the step). On the CPU the two modes give the same bits except where SPD's
  strength is a device scalar (it then scales the per-tensor coefficient instead of the deviation: float
  rounding).
"""

from __future__ import annotations

import logging
import math
import operator
from collections import deque
from collections.abc import Iterable
from itertools import compress, repeat
from operator import attrgetter, itemgetter
from typing import Any

import torch
from torch import Tensor

from library.errors import OptimizerError
from library.optimizers import quant8
from library.optimizers import transforms as T
from library.optimizers.flat import FlatLayout, FlatState, chunk_positions, partition
from library.optimizers.names import LORA_DOWN_ROLES, LORA_FACTOR
from library.optimizers.state import (
    Capturable,
    ExactStateLoad,
    closure_loss,
    dense_grad,
    step_numbers,
    work_dtype,
)
from library.optimizers.transforms import weight_decay_ratio, weight_decay_ratio_tensor
from library.optimizers.validate import require

logger = logging.getLogger(__name__)

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


def find_lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Pair LoRA down/up (A/B) names by the rest of the name: {key: (down_name, up_name)}, one pass."""
    downs: dict[str, str] = {}
    ups: dict[str, str] = {}
    for name in names:
        match = LORA_FACTOR.match(name)
        if match is None:
            continue
        key = f"{match['prefix']}*{match['suffix']}"
        (downs if match["role"] in LORA_DOWN_ROLES else ups)[key] = name
    return {key: (downs[key], ups[key]) for key in downs.keys() & ups.keys()}


def _anchor_dtype(p: Tensor, quantised: bool) -> torch.dtype:
    """SPD's θ₀ dtype: the weights', except bf16 next to 8-bit moments of fp32 weights, so the 8-bit state
    (1 + 1 + 2 bytes) stays near half of AdamW's 8. bf16 rounds θ₀ by at most 2⁻⁹ of its value."""
    return torch.bfloat16 if quantised and p.dtype == torch.float32 else p.dtype


def _anchor_bytes(p: Tensor, group: dict[str, Any], quantised: bool) -> int:
    if not group["use_spd"]:
        return 0
    return p.numel() * torch.empty((), dtype=_anchor_dtype(p, quantised)).element_size()


class _Bucket:
    """Cached per-tensor constants and state buffers of one group's tensors sharing (device, dtype, 8-bit or not).

    Everything here depends only on which tensors the bucket holds and their LoRA roles, so it is built once and
    reused every step; hyper-parameters are read from the group at each step (they may change between steps).
    Only state and per-tensor values stay allocated between steps: the flat gradient and weight copies, the
    element index and every per-row value are rebuilt inside the step (kept memory is the optimizer state).
    """

    def __init__(
        self, params: list[Tensor], members: list[int], roles: dict[Tensor, str], quantised: bool
    ) -> None:
        first = params[0]
        self.params, self.members, self.quantised = params, members, quantised
        self.dtype = work_dtype(first)
        self.layout = layout = FlatLayout([p.shape for p in params], first.device)
        self.seg = T.Segments(layout)
        # 1-D views of the parameters (their own storage, no memory): the step's weights go back in one op
        self.param_rows = layout.rows(params)
        self.moments: FlatState | quant8.FlatQuantState = (
            quant8.FlatQuantState(layout) if quantised else FlatState(layout)
        )
        self.theta0 = FlatState(layout)
        self.theta0_dtype = _anchor_dtype(first, quantised)
        # TAM's s̄: one value per tensor; this layout keeps the order it is given, so pass states in layout order
        self.scalars = FlatState(FlatLayout([()] * layout.count, first.device))
        self.roles = layout.arrange([roles.get(p) for p in params])
        self.any_lora = any(r is not None for r in self.roles)
        self.all_lora = all(r is not None for r in self.roles)
        self.any_up = "up" in self.roles
        device = first.device
        self.tensor_lora = torch.tensor([r is not None for r in self.roles], device=device)
        self.tensor_rows = torch.tensor(
            [b.rows for b in layout.buckets for _ in range(b.count)], dtype=torch.int64, device=device
        )
        self.total_rows = sum(b.rows * b.count for b in layout.buckets)
        self._ratios: tuple[float, Tensor] | None = None
        self._adopt_coefs: tuple[tuple[float, float], Tensor, Tensor] | None = None
        self._seen: dict[tuple[int, str], tuple[Tensor, list[Tensor]]] = {}
        # capturable mode: the step counts on the device (layout order; state["step"] are views), and whether
        # they are all equal (known when the plan is built; they then advance together)
        self.counts: Tensor | None = None
        self.uniform = True

    def per_row(self, per_tensor: Tensor) -> Tensor:
        """Per-tensor values (layout order) repeated over each tensor's rows, in flat row order (a temporary)."""
        return torch.repeat_interleave(per_tensor, self.tensor_rows, output_size=self.total_rows)

    def gather_grads(self, grads: list[Tensor]) -> Tensor:
        """The gradients as one new flat buffer in the working dtype (layout order)."""
        return self.layout.gather(grads, self.dtype)

    def gather_weights(self) -> Tensor:
        """The weights as one new flat buffer in the working dtype (layout order)."""
        return self.layout.gather(self.params, self.dtype)

    def scatter_weights_(self, flat: Tensor) -> None:
        """Write the flat weights back into the parameters (one split and one foreach copy, cast to their dtype)."""
        self.layout.scatter_(self.param_rows, flat)

    def state_buffer(
        self, store: FlatState, states: list[dict[str, Any]], key: str, dtype: torch.dtype
    ) -> Tensor:
        """``store.buffer(...)``, skipped when the per-parameter tensors are still the ones it returned last time.

        The same identity test as FlatState's, done by ``map`` in C: one Python-level comparison per tensor and
        state key is a noticeable share of a step's host time with hundreds of tensors.
        """
        seen = self._seen.get((id(store), key))
        if (
            seen is not None
            and seen[0].dtype == dtype
            and all(map(operator.is_, map(itemgetter(key), states), seen[1]))
        ):
            return seen[0]
        flat = store.buffer(states, key, dtype)
        self._seen[(id(store), key)] = (flat, [s[key] for s in states])
        return flat

    def lr_ratios(self, ratio: float) -> Tensor:
        """Per-tensor lr multipliers in layout order: ``ratio`` on lora_up, 1 elsewhere (LoRA+)."""
        if self._ratios is None or self._ratios[0] != ratio:
            per_tensor = [ratio if r == "up" else 1.0 for r in self.roles]
            self._ratios = (ratio, torch.tensor(per_tensor, dtype=self.dtype, device=self.layout.device))
        return self._ratios[1]

    def adopt_coefs(self, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
        """ADOPT's lerp constants (:func:`~library.optimizers.transforms.adopt_lerp_coefs`), kept per (β₁, β₂)."""
        if self._adopt_coefs is None or self._adopt_coefs[0] != (beta1, beta2):
            coefs = T.adopt_lerp_coefs(beta1, beta2, self.dtype, self.layout.device)
            self._adopt_coefs = ((beta1, beta2), *coefs)
        return self._adopt_coefs[1], self._adopt_coefs[2]

    def per_tensor(self, values: list[float]) -> Tensor:
        """Host-computed per-tensor values (caller's order) as one device tensor in layout order, one copy."""
        host = torch.tensor(self.layout.arrange(values), dtype=self.dtype)
        if self.layout.device.type == "cuda":
            return host.pin_memory().to(self.layout.device, non_blocking=True)
        return host.to(self.layout.device)

    def count_steps(self, steps: list[int]) -> None:
        """Capturable mode: ``steps`` (caller's order) become this bucket's device counters, and each tensor's
        ``state["step"]`` a 0-d view of its counter, so state and replays see the same count."""
        self.counts = torch.tensor(self.layout.arrange(steps), dtype=torch.float32, device=self.layout.device)
        self.uniform = min(steps) == max(steps)
        for state, count in zip(self.arranged_states, self.counts.unbind(), strict=True):
            state["step"] = count

    def device_steps(self) -> Tensor:
        """The counters a capturable step reads: one 0-d tensor when the bucket's tensors step together."""
        return self.counts[0] if self.uniform else self.counts


_GRAD = attrgetter("grad")


class _Plan:
    """What one param group's step needs besides the gradients, cached while the same tensors have gradients.

    Rebuilding it walks every tensor in Python; reusing it costs a few C-level passes (identity of the params,
    which have a gradient), so a step's host work does not grow with per-tensor Python code. The plan owns the
    step counters while it lives: ``steps`` (a Python int when every tensor is at the same step, else a list)
    is incremented here and written to every ``state["step"]`` with one C-level pass, so state_dict() and
    direct reads always see the current count. In capturable mode they live on the device instead: one 0-d
    float32 counter that every ``state["step"]`` is when all tensors step together on one device (the common
    case: the step values are then computed once per plan), else each bucket's per-tensor counters (its
    ``state["step"]`` are 0-d views of them); either way one kernel per counter advances them.
    """

    def __init__(
        self,
        group_params: list[Tensor],
        has_grad: list[bool],
        features: tuple[bool, bool, int, bool],
        states: list[dict[str, Any]],
        buckets: list[_Bucket],
        capturable: bool,
    ) -> None:
        self.group_params = list(group_params)
        self.has_grad = has_grad
        self.partial = not all(has_grad)
        self.features = features
        self.states = states
        steps = step_numbers(states)
        self.steps: int | list[int] = steps[0] if min(steps) == max(steps) else steps
        self.capturable = capturable
        self.counter: Tensor | None = None  # capturable, every tensor at one step on one device
        single = len(buckets) == 1
        self.buckets = [
            (
                b,
                None if single else b.members,
                states if single else [states[i] for i in b.members],
            )
            for b in buckets
        ]
        for b, _, bucket_states in self.buckets:
            b.arranged_states = b.layout.arrange(bucket_states)
        devices = {b.layout.device for b in buckets}
        if capturable and isinstance(self.steps, int) and len(devices) == 1:
            self.counter = torch.tensor(float(self.steps), dtype=torch.float32, device=devices.pop())
            deque(map(operator.setitem, states, repeat("step"), repeat(self.counter)), maxlen=0)
        elif capturable:
            for b, members, _ in self.buckets:
                b.count_steps(steps if members is None else [steps[i] for i in members])
        else:  # counters read back from a capturable run's device become ints again
            deque(map(operator.setitem, states, repeat("step"), steps), maxlen=0)

    def matches(
        self, group_params: list[Tensor], has_grad: list[bool], features: tuple[bool, bool, int, bool]
    ) -> bool:
        return (
            features == self.features
            and has_grad == self.has_grad
            and len(group_params) == len(self.group_params)
            and all(map(operator.is_, group_params, self.group_params))
        )

    def advance(self) -> None:
        """One step for every tensor of the plan."""
        if self.counter is not None:
            self.counter.add_(1.0)
        elif self.capturable:
            for b, _, _ in self.buckets:
                b.counts.add_(1.0)
        elif isinstance(self.steps, int):
            self.steps += 1
            deque(map(operator.setitem, self.states, repeat("step"), repeat(self.steps)), maxlen=0)
        else:
            self.steps = [t + 1 for t in self.steps]
            deque(map(operator.setitem, self.states, repeat("step"), self.steps), maxlen=0)

    def bucket_steps(self, members: list[int] | None) -> int | list[int]:
        if isinstance(self.steps, int) or members is None:
            return self.steps
        return list(map(self.steps.__getitem__, members))


class HinaAdamWOptimizer(Capturable, ExactStateLoad, torch.optim.Optimizer):
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
        cuda_graphs: capturable mode (torch.optim's ``capturable``): step counts and lr live on the device, so
            the caller can record step() in a CUDA graph (the trainer does under ``--cuda_graphs``). On by
            default; False keeps them as Python numbers.
        step_chunk_size: a step runs over runs of whole tensors of at most this many elements (one bucket each),
            so its temporaries (~10 fp32 values per element, ~12 with 8-bit state) stay bounded whatever the
            parameter count; larger runs mean fewer kernels per step.
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
        cuda_graphs: bool = True,
        step_chunk_size: int = 2**22,
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
            require("CustomAdamW", name, value, isinstance(value, bool), "True or False")
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
            (
                "step_chunk_size",
                step_chunk_size,
                int(step_chunk_size) == step_chunk_size and step_chunk_size >= 1,
                "an integer >= 1",
            ),
        ]
        for name, value, ok, valid in checks:
            require("CustomAdamW", name, value, ok, valid)
        if optim_bits == 8:
            quant8.quant_map(
                True, torch.device("cpu")
            )  # fail now, not mid-training, if bitsandbytes is missing
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
            cuda_graphs=bool(cuda_graphs),
            step_chunk_size=int(step_chunk_size),
            **flags,
        )
        self._lora_roles: dict[Tensor, str] | None = None
        self._lora_pair_count = 0
        self._unnamed_logged = False
        self._plans: dict[int, _Plan] = {}
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
        self._plans = {}

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
        dtype = work_dtype(p)
        if group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]:
            quant8.init_state(state, "exp_avg", p, signed=True)
            quant8.init_state(state, "exp_avg_sq", p, signed=False)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _ensure_feature_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Buffers exist only for the features that are on (also when a flag is switched on mid-run)."""
        if group["use_tam"] and "tam_s" not in state:
            state["tam_s"] = torch.zeros((), dtype=work_dtype(p), device=p.device)
        if group["use_spd"] and "theta0" not in state:
            state["theta0"] = p.detach().to(_anchor_dtype(p, quant8.has_state(state, "exp_avg")), copy=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load exactly (uint8 codes, fp32 moments of half weights and θ₀ bit-for-bit); re-derive the LoRA roles.

        ``cuda_graphs`` stays this optimizer's: it chooses how the step runs, not what it computes, so a state saved
        in either mode continues in the mode of the run that loads it (torch would take the saved groups' value).
        """
        super().load_state_dict(state_dict)
        self._lora_roles = None
        self._plans = {}

    # ----- step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for index, group in enumerate(self.param_groups):
            group_params = group["params"]
            grads = list(map(_GRAD, group_params))
            has_grad = list(map(operator.is_not, grads, repeat(None)))
            capturable = group["cuda_graphs"]
            features = (group["use_tam"], group["use_spd"], group["step_chunk_size"], capturable)
            plan = self._plans.get(index)
            if plan is None or not plan.matches(group_params, has_grad, features):
                if not any(has_grad):
                    continue
                plan = self._plans[index] = self._plan(group, has_grad, features)
            if plan.partial:
                grads = list(compress(grads, has_grad))
            if capturable:
                self.device_lr(index, group, plan.buckets[0][0].layout.device)
            else:  # e.g. loaded from a capturable run: a Python number again
                self.host_lr(group)
            plan.advance()
            shared = None if plan.counter is None else self._device_values(group, None, plan.counter)
            for bucket, members, states in plan.buckets:
                bucket_grads = grads if members is None else list(map(grads.__getitem__, members))
                if shared is not None:
                    values = shared
                elif capturable:
                    values = self._device_values(group, bucket, bucket.device_steps())
                else:
                    values = self._step_values(group, bucket, plan.bucket_steps(members))
                self._step_bucket(group, bucket, states, bucket_grads, values)
        return loss

    def _plan(self, group: dict[str, Any], has_grad: list[bool], features: tuple[bool, bool, int, bool]) -> _Plan:
        """Initialise the state of new tensors and lay out the buckets (only when the tensor set changes)."""
        params = list(compress(group["params"], has_grad))
        for p in params:
            dense_grad(p, "CustomAdamW")
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                self._init_state(p, state, group)
            self._ensure_feature_state(p, state, group)  # also when a feature was switched on mid-run
        buckets = self._buckets(params, states, self._roles(), group["step_chunk_size"])
        return _Plan(group["params"], has_grad, features, states, buckets, capturable=group["cuda_graphs"])

    @staticmethod
    def _buckets(
        params: list[Tensor], states: list[dict[str, Any]], roles: dict[Tensor, str], chunk_size: int
    ) -> list[_Bucket]:
        """Buckets of tensors whose math shares flat buffers: per (device, dtype, 8-bit or not)
        (:func:`~library.optimizers.flat.partition`), split into runs of at most ``chunk_size`` elements
        (:func:`~library.optimizers.flat.chunk_positions`)."""
        dtypes = [p.dtype for p in params]
        quantised = [quant8.has_state(state, "exp_avg") for state in states]
        return [
            _Bucket([params[i] for i in chunk], chunk, roles, eight_bit)
            for (_, _, _, eight_bit), idx in partition(params, dtypes, quantised).items()
            for chunk in ([idx[j] for j in run] for run in chunk_positions([params[i].shape for i in idx], chunk_size))
        ]

    def _step_bucket(
        self,
        group: dict[str, Any],
        b: _Bucket,
        states: list[dict[str, Any]],
        grads: list[Tensor],
        values: dict[str, float | Tensor],
    ) -> None:
        """Gather the gradients, then steps 2-12 of the module docstring with this step's ``values``."""
        g = b.gather_grads(grads)
        with b.seg.indexed():
            self._update(group, b, states, g, values)

    @staticmethod
    def _step_values(group: dict[str, Any], b: _Bucket, steps: int | list[int]) -> dict[str, float | Tensor]:
        """This step's learning-rate and step-dependent scalars: Python floats when every tensor is at the same
        step, else per-tensor device tensors (layout order)."""
        if isinstance(steps, list) and min(steps) == max(steps):
            steps = steps[0]
        beta1, beta2 = group["betas"]
        lr = group["lr"]

        def per_tensor(fn) -> float | Tensor:
            return float(fn(steps)) if isinstance(steps, int) else b.per_tensor([fn(t) for t in steps])

        values: dict[str, float | Tensor] = {}
        step_lr = lr  # the update's scale; a uniform bias correction 1/(1−β₁ᵗ) is folded in here
        if group["use_adopt_stability"]:
            clip = per_tensor(lambda t: t**0.25)
            values["clip"], values["neg_clip"] = clip, -clip
        else:
            values["bias2"] = per_tensor(lambda t: math.sqrt(1.0 - beta2**t))
            correction = per_tensor(lambda t: 1.0 - beta1**t)
            if isinstance(correction, float):  # Grams, Cautious and ALLoRA commute with a positive scale
                step_lr = lr / correction
            else:
                values["correction"] = correction
        values["neg_step_lr"] = -step_lr
        ratio = (
            per_tensor(
                lambda t: weight_decay_ratio(
                    t, group["wd_transition_steps"], group["wd_decay_factor"], group["wd_min_ratio"]
                )
            )
            if group["dynamic_weight_decay"]
            else 1.0
        )
        if group["use_spd"]:
            values["neg_strength"] = -(ratio * group["spd_lambda"])
        elif group["weight_decay"] != 0.0:
            values["lr_decay"] = lr * group["weight_decay"] * ratio
        return values

    @staticmethod
    def _device_values(group: dict[str, Any], b: _Bucket | None, steps: Tensor) -> dict[str, float | Tensor]:
        """:meth:`_step_values` in capturable mode: the same formulas, computed on the device in the lr tensor's
        float64 from the step counters (0-d when the tensors step together, else bucket ``b``'s per-tensor
        counters), so no value that changes per step is a Python number and nothing is read back. Per-tensor
        results are rounded to the working dtype as the host-built ones are; a value that never changes stays a
        Python float."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        t = steps.to(lr.dtype)
        uniform = t.dim() == 0

        def per_tensor(x: Tensor) -> Tensor:
            return x if uniform else x.to(b.dtype)

        values: dict[str, float | Tensor] = {}
        step_lr = lr
        if group["use_adopt_stability"]:
            clip = per_tensor(t.pow(0.25))
            values["clip"], values["neg_clip"] = clip, -clip
        else:
            values["bias2"] = per_tensor(torch.pow(beta2, t).neg_().add_(1.0).sqrt_())
            correction = per_tensor(torch.pow(beta1, t).neg_().add_(1.0))
            if uniform:
                step_lr = lr / correction
            else:
                values["correction"] = correction
        values["neg_step_lr"] = -step_lr
        ratio: float | Tensor = 1.0
        if group["dynamic_weight_decay"]:
            ratio = per_tensor(
                weight_decay_ratio_tensor(
                    t, group["wd_transition_steps"], group["wd_decay_factor"], group["wd_min_ratio"]
                )
            )
        if group["use_spd"]:
            values["neg_strength"] = -(ratio * group["spd_lambda"])
        elif group["weight_decay"] != 0.0:
            values["lr_decay"] = lr * group["weight_decay"] * ratio
        return values

    def _update(
        self,
        group: dict[str, Any],
        b: _Bucket,
        states: list[dict[str, Any]],
        g: Tensor,
        v: dict[str, float | Tensor],
    ) -> None:
        """Steps 2-12 on the bucket's flat buffers (a fixed number of ops, no host sync), ``g`` the flat gradient
        (modified in place), inside ``b.seg.indexed()``.

        ``v`` holds :meth:`_step_values`, each a Python float, a 0-d device tensor (capturable mode) or a
        per-tensor vector.
        """
        S, dtype = b.seg, b.dtype
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        adopt = group["use_adopt_stability"]

        # 1. working copy of the weights
        theta = b.gather_weights()
        if b.quantised:
            m = b.moments.load(states, "exp_avg", signed=True, dtype=dtype)
            v2 = b.moments.load(states, "exp_avg_sq", signed=False, dtype=dtype)
        else:
            m = b.state_buffer(b.moments, states, "exp_avg", dtype)
            v2 = b.state_buffer(b.moments, states, "exp_avg_sq", dtype)

        # 2-3. gradient transforms
        if group["use_orthogonal_grad"]:
            T.orthograd_(S, theta, g)
        if group["use_agr"]:
            T.agr_(S, g)

        # 4. momentum input
        if adopt:
            x, ready = T.adopt_input(S, v2, g, eps, v["neg_clip"], v["clip"])
        else:
            x = g

        # 5. TAM
        if group["use_tam"]:
            smoothed = b.state_buffer(b.scalars, b.arranged_states, "tam_s", dtype)
            damping = S.expand(T.tam_damping_(S, m, x, smoothed, group["tam_beta"]))
            x = x * damping if x is g else x.mul_(damping)
            del damping  # every full-size temporary is dropped as soon as it is used: they set the peak

        # 6-7. moments and update
        if adopt:
            T.adopt_moments_(S, m, v2, x, g, ready, b.adopt_coefs(beta1, beta2))
            del x
            update = m
        else:
            m.lerp_(x, 1.0 - beta1)
            del x
            v2.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = v2.sqrt().div_(S.spread(v["bias2"])).add_(eps)
            update = torch.div(m, denom, out=denom)
            if "correction" in v:
                update.div_(S.expand(v["correction"]))
        if b.quantised:  # a decoded moment is requantised as soon as it is final (its buffer is scratch after)
            b.moments.store_("exp_avg_sq", v2, signed=False)
            del v2

        # 8-9. sign agreement with the gradient
        if group["use_grams"]:
            update = T.grams(update, g)
        elif group["use_cautious"]:
            update = T.cautious(S, update, g)

        # 10-11. ALLoRA's row factors on LoRA tensors, with lr' = alora_ratio·lr on lora_up folded in
        alora = group["use_alora"] and b.any_lora
        if alora:
            if update is m:  # m is state: scale a copy
                update = m.clone()
            T.allora_(
                b.layout,
                theta,
                update,
                group["alora_eta"],
                lora_rows=None if b.all_lora else b.per_row(b.tensor_lora),
                row_lr=b.per_row(b.lr_ratios(group["alora_ratio"])) if b.any_up else None,
            )
        m_stored = b.quantised and update is not m
        if m_stored:
            b.moments.store_("exp_avg", m, signed=True)
            del m

        # 12. SPD or decoupled decay, and the step −lr'·u
        if group["use_spd"]:
            theta0 = b.state_buffer(b.theta0, states, "theta0", b.theta0_dtype)
            T.spd_step_(S, theta, theta0, g, update, v["neg_step_lr"], v["neg_strength"])
        else:
            if "lr_decay" in v:
                lr_decay = v["lr_decay"]
                if alora and b.any_up:
                    lr_decay = b.lr_ratios(group["alora_ratio"]) * lr_decay
                T.decoupled_decay_(S, theta, lr_decay)
            T.descend_(theta, update, v["neg_step_lr"])

        # write back
        b.scatter_weights_(theta)
        if b.quantised and not m_stored:
            b.moments.store_("exp_avg", m, signed=True)

    # ----- reporting ------------------------------------------------------------------------------------------

    def _current_ratio(self, group: dict[str, Any]) -> tuple[int, float]:
        step = max(step_numbers([self.state[p] for p in group["params"] if self.state.get(p)]), default=0)
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

    def setup_warnings(self, network_args: Iterable[str]) -> list[str]:
        """ALLoRA's LoRA+ ratio and a network's loraplus_lr_ratio both scale lora_up's lr: say so once."""
        if any(g["use_alora"] for g in self.param_groups) and any(str(a).startswith("loraplus") for a in network_args):
            return [
                "CustomAdamW's use_alora already scales lora_up's lr by alora_ratio; with a network LoRA+ ratio too, "
                "lora_up gets both. Pass --no-use_alora or drop loraplus_lr_ratio"
            ]
        return []

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
                # per tensor: TAM's s̄ and, in capturable mode, the float32 step count on the device
                scalars = (4 if g["use_tam"] else 0) + (4 if g["cuda_graphs"] else 0)
                moments32 = 2 * p.numel() * torch.empty((), dtype=work_dtype(p)).element_size()
                est32 += moments32 + scalars + _anchor_bytes(p, g, quantised=False)
                if p.numel() >= g["min_8bit_size"]:
                    est8 += 2 * (p.numel() + 4 * quant8.num_blocks(p.numel())) + scalars
                    est8 += _anchor_bytes(p, g, quantised=True)
                else:
                    est8 += moments32 + scalars + _anchor_bytes(p, g, quantised=False)
        return {
            "optimizer": "CustomAdamW",
            "techniques": techniques,
            "step": step,
            "lora_pairs": self._lora_pair_count,
            "lora_tensors": len(roles),
            "lr": float(group["lr"]),
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
