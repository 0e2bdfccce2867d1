"""What our optimizers' LoRA-aware techniques do with each network type (docs/optimizer-guides.md, "Network
types"): which tensors CustomAdamW pairs for ALLoRA / its LoRA+ ratio, which Automagic row-scales, how SAC
splits units, and that a step of each moves every trainable tensor."""

from __future__ import annotations

import pytest
import torch

from library.optimizers.registry import build_optimizer
from library.optimizers.sac import sac_units
from networks import dylora, lora, lora_fa, lycoris_kohya, oft
from tests.networks.test_lora import tiny_text_encoder, tiny_unet, unet_inputs

NETWORKS = {
    "lora": lambda te, u: lora.create_network(1.0, 4, 1, None, te, u),
    "lora_fa": lambda te, u: lora_fa.create_network(1.0, 4, 1, None, te, u),
    "dylora": lambda te, u: dylora.create_network(1.0, 4, 1, None, te, u, unit=2),
    "oft": lambda te, u: oft.create_network(1.0, 4, 0.01, None, None, u),
    "lycoris-locon-dora": lambda te, u: lycoris_kohya.create_network(1.0, 4, 1, None, te, u, algo="locon",
                                                                    dora_wd=True),
    "lycoris-loha": lambda te, u: lycoris_kohya.create_network(1.0, 4, 1, None, te, u, algo="loha"),
    "lycoris-lokr": lambda te, u: lycoris_kohya.create_network(1.0, 4, 1, None, te, u, algo="lokr"),
}
# number of (down, up) pairs CustomAdamW finds: one per module for LoRA-shaped tensors, one per rank chunk for
# DyLoRA, none where there is no lora_down/lora_up pair (LoRA-FA trains lora_up alone; LoHa, LoKr, OFT)
PAIRS_PER_MODULE = {"lora": 1, "lora_fa": 0, "dylora": 2, "oft": 0, "lycoris-locon-dora": 1, "lycoris-loha": 0,
                    "lycoris-lokr": 0}


def _groups(kind: str):
    te, unet = tiny_text_encoder(), tiny_unet()
    network = NETWORKS[kind](te, unet)
    network.apply_to(te, unet, kind != "oft", True)
    return network, unet, network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)


def _build(name: str, groups):
    return build_optimizer(name, groups, lr=1e-3, cli_kwargs={}, optimizer_args={}, toml_table=None,
                           environ={})[0]


def _step(network, unet, optimizer) -> dict:
    before = {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad}
    sample, t, enc = unet_inputs()
    network.train()
    for _ in range(2):  # two steps: a zero-initialised factor gets its first gradient at step 2
        unet(sample, t, enc).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: not torch.equal(p.detach(), before[n]) for n, p in network.named_parameters() if n in before}


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_custom_adamw_pairs_what_it_can_and_steps_everything(kind):
    network, unet, groups = _groups(kind)
    optimizer = _build("CustomAdamW", groups)
    moved = _step(network, unet, optimizer)
    info = optimizer.get_optimization_info()
    modules = len(network.unet_loras) + len(network.text_encoder_loras)
    assert info["lora_pairs"] == PAIRS_PER_MODULE[kind] * modules
    by_module: dict[str, bool] = {}
    for name, changed in moved.items():
        if name.startswith(("lora_unet", "oft_unet")):
            module = name.split(".")[0]
            by_module[module] = by_module.get(module, False) or changed
    # every U-Net module trains; a DyLoRA chunk only once it was drawn twice (CustomAdamW's first step of a
    # tensor sets its second moment and moves nothing)
    assert by_module and (any if kind == "dylora" else all)(by_module.values())


@pytest.mark.parametrize("kind", ["lora", "lora_fa", "dylora", "oft", "lycoris-loha"])
def test_automagic_allora_marks_only_lora_factor_names(kind):
    network, unet, groups = _groups(kind)
    optimizer = _build("Automagic_Sinkgd", groups)
    marked = {name: optimizer._uses_allora(g, i, p) for g in optimizer.param_groups
              for i, (name, p) in enumerate(zip(g["names"], g["params"], strict=True))}
    factor = ("lora_down", "lora_up", "lora_A", "lora_B")
    assert marked and all(v == any(f in n for f in factor) for n, v in marked.items())
    assert any(marked.values()) == (kind in ("lora", "lora_fa", "dylora"))
    _step(network, unet, optimizer)


def test_sac_units_split_heads_of_output_factors_only():
    # lora_up / LoHa's hada_w*_a of a q/k/v projection have the projection's output rows: one unit per head
    assert sac_units("lora_unet_x_attn1_to_q.lora_up.weight", torch.Size([64, 4]), 64, 8) == 8
    assert sac_units("lora_unet_x_attn1_to_q.lora_down.weight", torch.Size([4, 64]), 64, 8) == 1
    assert sac_units("lora_unet_x_attn1_to_q.oft_blocks", torch.Size([4, 16, 16]), 64, 8) == 1
    assert sac_units("lora_unet_x_ff_net_2.lora_up.weight", torch.Size([64, 4]), 64, 8) == 1
    assert sac_units("lora_unet_x_attn1_to_q.hada_w1_a", torch.Size([64, 4]), 64, 8) == 8
