"""Bytes per parameter an optimizer holds between steps and at its peak inside one, counted exactly on the CPU.

The parameter set is LoRA-shaped (rank 16 down/up pairs on SDXL-sized attention and feed-forward layers, one 1x1
conv pair, one layer whose size is no multiple of the 8-bit block; ~24k parameters per tensor, SDXL's LoRA set has
~30k), so what an optimizer keeps per element dominates and per-tensor constants weigh what they weigh there. docs/optimizers.md states the targets; bench/optimizer_step.py
measures the same on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from bench.optimizer_step import state_bytes
from bench.storage_ledger import StorageLedger, optimizer_bytes
from library.optimizers.registry import build_optimizer

# (out, in) of the adapted layers; (out, in, 1, 1) is a 1x1 conv
LAYERS = [(640, 640), (1280, 1280), (640, 2048), (1280, 2048), (5120, 1280), (1280, 5120), (640, 640, 1, 1),
          (77, 321)]
RANK = 16


def lora_params() -> tuple[list[torch.nn.Parameter], list[str]]:
    gen = torch.Generator().manual_seed(0)
    params, names = [], []
    for i, (out, inp, *kernel) in enumerate(LAYERS):
        down = torch.randn((RANK, inp, *kernel), generator=gen) / inp**0.5
        params += [torch.nn.Parameter(down), torch.nn.Parameter(torch.zeros((out, RANK, *kernel)))]
        names += [f"lora_unet_m{i}.lora_down.weight", f"lora_unet_m{i}.lora_up.weight"]
    return params, names


# per-tensor values (TAM's s̄, segment lengths and offsets, LoRA roles): bytes per tensor, not per element
PER_TENSOR_BYTES = 64


def per_element_limit(bytes_per_param: float) -> float:
    """A bytes-per-parameter target plus the per-tensor allowance, spread over this set's parameters."""
    params, _ = lora_params()
    return bytes_per_param + PER_TENSOR_BYTES * len(params) / sum(p.numel() for p in params)


def measure(name: str, *settings: str) -> tuple[float, float, float]:
    """(kept, peak, state) bytes per parameter of registry optimizer ``name``."""
    params, names = lora_params()
    built = []

    def make():
        built.append(build_optimizer(name, [{"params": params, "names": names}], lr=1e-4,
                                     optimizer_args=list(settings))[0])
        return built[-1]

    kept, peak = optimizer_bytes(make, params)
    return kept, peak, state_bytes(built[-1]) / sum(p.numel() for p in params)


def test_ledger_counts_new_storages_once_and_forgets_freed_ones():
    base = torch.zeros(1000)
    with StorageLedger() as ledger:
        a = torch.empty(250)  # 1000 bytes
        view = a[10:20]
        base.add_(1.0)  # in place on a storage made outside: nothing new
        b = a * 2  # 1000 more
        assert ledger.live == 2000 and view.untyped_storage().nbytes() == 1000
        del b
        assert ledger.settle() == 1000 and ledger.peak == 2000


def test_torch_adamw_keeps_its_two_moments():
    kept, _, state = measure("AdamW")
    assert kept == pytest.approx(8.0, abs=0.01) and state == pytest.approx(kept, abs=0.01)


@pytest.mark.parametrize(
    "name,settings,kept_max",
    [
        ("CustomAdamW", (), 12.0),  # m, v and SPD's θ₀ in fp32
        ("CustomAdamW", ("use_spd=False", "use_tam=False"), 8.0),  # m, v
        ("CustomAdamW8bit", (), 4.4),  # m, v as uint8 codes + one fp32 absmax per 256, θ₀ in bf16
    ],
)
def test_custom_adamw_keeps_only_its_state(name, settings, kept_max):
    kept, _, state = measure(name, *settings)
    assert kept <= per_element_limit(kept_max)
    assert kept == pytest.approx(state, abs=0.01)  # nothing besides the state survives a step


# a sixth of this set per step run: about what the default run (4M elements) is on SDXL's 42.6M-parameter set
CHUNKED = "step_chunk_size=65536"


@pytest.mark.parametrize(
    "name,settings,peak_max",
    [
        ("CustomAdamW", (CHUNKED,), 20.0),  # measured 16.3
        ("CustomAdamW", ("use_spd=False", "use_tam=False", CHUNKED), 12.5),  # measured 12.3
        ("CustomAdamW8bit", (CHUNKED,), 12.0),  # measured 9.95
    ],
)
def test_custom_adamw_peak_in_a_step_stays_near_its_state(name, settings, peak_max):
    kept, peak, _ = measure(name, *settings)
    assert kept <= peak <= per_element_limit(peak_max)


@pytest.mark.parametrize(
    "name,temporaries_max",
    [
        ("CustomAdamW", 20.2),  # measured 20.1: g, θ, the element index and two working buffers, fp32
        ("CustomAdamW8bit", 28.1),  # measured 28.1: the same plus both decoded moments
    ],
)
def test_custom_adamw_temporaries_per_element_of_a_run(name, temporaries_max):
    """One run over the whole set (the default size exceeds it): what a step adds per element of a run."""
    kept, peak, _ = measure(name)
    assert peak - kept <= temporaries_max


@pytest.mark.parametrize("name", [
    "Automagic_Sinkgd", "Automagic_CameAMP", "AdamWSGG", "AdamWSGG_v2", "AdafactorSGG", "LambSGG_v2",
    "ShampooSGG_v2", "AdamWSAC", "Adam_miniSAC", "Adam_mini", "SophiaG",
])  # fmt: skip
def test_in_house_optimizers_keep_nothing_per_parameter_besides_their_state(name):
    kept, _, state = measure(name)
    assert kept == pytest.approx(state, abs=0.01)
