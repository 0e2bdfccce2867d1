"""sd-scripts' network modules under their names: block-wise LoRA, LoRA-FA, DyLoRA, OFT (formulas in float64),
and every type continues bit-exactly from its own file."""

from __future__ import annotations

import math
import random

import pytest
import safetensors.torch
import torch
from torch import nn

from library.errors import ConfigError
from networks import blocks, dylora, lora, lora_fa, oft
from tests.networks.test_lora import tiny_sdxl_unet, tiny_text_encoder, tiny_unet, unet_inputs


# --- block-wise ----------------------------------------------------------------------------------------------------
def test_block_index_is_sd_scripts_numbering():
    assert blocks.block_index("lora_unet_down_blocks_0_attentions_1_proj_in", False) == 2
    assert blocks.block_index("lora_unet_down_blocks_1_downsamplers_0_conv", False) == 6
    assert blocks.block_index("lora_unet_mid_block_attentions_0_proj_in", False) == 12
    assert blocks.block_index("lora_unet_up_blocks_3_attentions_2_proj_out", False) == 24
    assert blocks.block_index("lora_unet_down_blocks_1_attentions_0_proj_in", True) == 5  # input_blocks_4
    assert blocks.block_index("lora_unet_mid_block_attentions_0_proj_in", True) == 11  # middle_block_1
    assert blocks.block_index("lora_unet_up_blocks_0_upsamplers_0_conv", True) == 15  # output_blocks_2_2


def test_lr_weight_presets_and_threshold_follow_sd_scripts():
    w = blocks.block_lr_weights({"down_lr_weight": "cosine", "up_lr_weight": "0.5,0.1",
                                 "block_lr_zero_threshold": 0.2}, sdxl=False)
    down = [math.sin(math.pi * (i / 11) / 2) for i in reversed(range(12))]
    assert w[:12] == pytest.approx([x if x > 0.2 else 0 for x in down])
    assert w[12] == 1.0 and w[13:] == [0.5, 0.0] + [1.0] * 10
    sdxl = blocks.block_lr_weights({"mid_lr_weight": "0,1,2"}, sdxl=True)
    assert len(sdxl) == 23 and sdxl[0] == sdxl[22] == 1.0 and sdxl[10:13] == [0.0, 1.0, 2.0]
    with pytest.raises(ConfigError, match="down_lr_weight='cosinus'"):
        blocks.check_syntax({"down_lr_weight": "cosinus"})


def test_block_lrs_reach_param_groups_and_zero_blocks_get_no_modules():
    te, unet = tiny_text_encoder(), tiny_unet(attention_in_both=True)
    # as sd-scripts, entry i of the 25 weights (12 down, 1 mid, 12 up) is block i's; block 0 has no layers
    down = ",".join(["0.5", "0", "1", "0.5", "2"])
    network = lora.create_network(1.0, 4, 1, None, te, unet, down_lr_weight=down, mid_lr_weight="3",
                                  conv_dim=2)
    network.apply_to(te, unet)
    assert not [m for m in network.unet_loras if blocks.block_index(m.lora_name, False) == 1]  # weight 0
    groups = network.prepare_optimizer_params(None, 1e-3, 1e-4)
    by_desc = {g["description"]: g for g in groups}
    assert by_desc["unet_block3"]["lr"] == pytest.approx(0.5e-3)  # down_blocks_0 downsampler
    assert by_desc["unet_block4"]["lr"] == pytest.approx(2e-3)
    assert by_desc["unet_block12"]["lr"] == pytest.approx(3e-3)
    assert by_desc["unet_block13"]["lr"] == pytest.approx(1e-3) and by_desc["textencoder"]["lr"] == 1e-4
    for g in groups:
        if g["description"].startswith("unet_block"):
            idx = int(g["description"][len("unet_block"):])
            assert all(blocks.block_index(n.split(".")[0], False) == idx for n in g["names"])


def test_block_dims_and_alphas_shape_the_tensors():
    te, unet = tiny_text_encoder(), tiny_unet(attention_in_both=True)
    dims = [0] + [2] * 11 + [3] + [5] * 12
    conv = [0] * 13 + [1] * 12
    network = lora.create_network(1.0, 4, 1, None, te, unet, block_dims=",".join(map(str, dims)),
                                  block_alphas=",".join(["1"] * 25), conv_block_dims=",".join(map(str, conv)))
    for m in network.unet_loras:
        idx = blocks.block_index(m.lora_name, False)
        is_3x3 = isinstance(m.org_module, nn.Conv2d) and m.org_module.kernel_size != (1, 1)
        assert m.lora_down.weight.shape[0] == (conv if is_3x3 else dims)[idx], m.lora_name
    assert any(isinstance(m.org_module, nn.Conv2d) and m.org_module.kernel_size == (3, 3) for m in network.unet_loras)
    assert not [m for m in network.unet_loras if "down_blocks" in m.lora_name and "resnets" in m.lora_name
                and isinstance(m.org_module, nn.Conv2d) and m.org_module.kernel_size == (3, 3)]  # conv dims 0
    assert {m.lora_dim for m in network.text_encoder_loras} == {4}  # blocks are U-Net only
    with pytest.raises(ConfigError, match="block_dims: 3 values, 23 expected"):
        lora.create_network(1.0, 4, 1, None, te, tiny_sdxl_unet(), block_dims="1,2,3")


# --- LoRA-FA ---------------------------------------------------------------------------------------------------------
def test_lora_fa_trains_only_lora_up():
    te, unet = tiny_text_encoder(), tiny_unet()
    network = lora_fa.create_network(1.0, 4, 1, None, te, unet)
    network.apply_to(te, unet)
    groups = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    names = [n for g in groups for n in g["names"]]
    assert names and all(".lora_up." in n for n in names)
    down = network.unet_loras[0].lora_down.weight
    assert not down.requires_grad and down.std().item() == pytest.approx(
        math.sqrt(2 / (down.shape[1] + 4)), rel=0.2)
    assert set(network.get_trainable_params()) == {p for g in groups for p in g["params"]}


# --- DyLoRA ----------------------------------------------------------------------------------------------------------
def test_dylora_forward_is_sd_scripts_formula_and_only_the_drawn_chunk_learns():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    module = dylora.DyLoRAModule("lora_x", layer, 1.0, lora_dim=4, alpha=2.0, unit=2).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    module.apply_to()
    x = torch.randn(3, 6, dtype=torch.float64)
    random.seed(7)
    b = random.randint(0, 3)
    b -= b % 2
    down = torch.cat(list(module.lora_A)).detach()
    up = torch.cat(list(module.lora_B), dim=1).detach()
    expected = x @ layer.weight.T + layer.bias + (x @ down.T @ up.T) * 0.5 * math.sqrt(4 / (b + 2))
    random.seed(7)
    module.train()
    out = layer(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    grads = [p.grad is not None for p in module.lora_A]
    assert grads == [i == b // 2 for i in range(2)]
    module.eval()  # full rank at alpha/dim
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias + (x @ down.T @ up.T) * 0.5)
    sd = module.state_dict()
    assert set(sd) == {"lora_down.weight", "lora_up.weight", "alpha"} and sd["lora_down.weight"].shape == (4, 6)


# --- OFT -------------------------------------------------------------------------------------------------------------
def test_oft_forward_is_sd_scripts_cayley_rotation():
    torch.manual_seed(0)
    layer = nn.Linear(6, 8).double()
    module = oft.OFTModule("oft_unet_x", layer, 0.7, lora_dim=2, alpha=0.01)
    with torch.no_grad():
        module.oft_blocks.normal_(std=0.3)
    module.apply_to()
    blocks_ = module.oft_blocks.detach().double()
    q = blocks_ - blocks_.transpose(1, 2)
    norm = q.norm()
    q = q * (min(norm, 0.01 * 8) + 1e-8) / (norm + 1e-8)
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    r = 0.7 * ((eye + q) @ torch.linalg.inv(eye - q) - eye) + eye
    w = torch.einsum("knm,knp->kmp", r, layer.weight.detach().reshape(2, 4, 6)).reshape(8, 6)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), (x @ w.T + layer.bias).to(layer(x).dtype), atol=1e-6, rtol=1e-6)


def test_oft_targets_keys_and_sdxl_names(tmp_path):
    unet = tiny_unet()
    attn = oft.create_network(1.0, 4, None, None, None, unet)
    assert {m.lora_name.rsplit("_", 1)[-1] for m in attn.unet_loras} >= {"q", "k", "v", "0"}
    assert all("_attn" in m.lora_name for m in attn.unet_loras)
    full = oft.create_network(1.0, 4, None, None, None, unet, enable_all_linear="True", enable_conv="True")
    assert len(full.unet_loras) > len(attn.unet_loras)
    with pytest.raises(ConfigError, match="enable_conv='maybe'"):
        oft.create_network(1.0, 4, None, None, None, unet, enable_conv="maybe")
    sdxl = tiny_sdxl_unet()
    network = oft.create_network(1.0, 4, None, None, None, sdxl)
    network.apply_to(None, sdxl)
    network.save_weights(tmp_path / "oft.safetensors", None, {})
    keys = safetensors.torch.load_file(tmp_path / "oft.safetensors").keys()
    assert keys and all(k.startswith("oft_unet_input_blocks") or k.startswith("oft_unet_middle_block")
                        or k.startswith("oft_unet_output_blocks") for k in keys)
    assert {k.rsplit(".", 1)[1] for k in keys} == {"oft_blocks", "alpha"}


# --- --cuda_graphs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "refused"),
    [("networks.lora", None), ("networks.lora_fa", None), ("networks.dylora", "draws its rank on the host"),
     ("networks.oft", "not been verified"), ("lycoris.kohya", "decide dropout and rank on the host")],
)
def test_cuda_graphs_work_or_are_refused_in_one_line(module, refused):
    import argparse

    from library.training.validate import validate_network_args

    args = argparse.Namespace(network_module=module, network_args=None, network_dropout=None, cuda_graphs=True,
                              gradient_checkpointing=False)
    if refused is None:
        validate_network_args(args)
    else:
        with pytest.raises(ConfigError, match=f"--cuda_graphs cannot record --network_module {module}: .*{refused}"):
            validate_network_args(args)


# --- resume, every type ----------------------------------------------------------------------------------------------
MODULES = {
    "lora": (lora, {"conv_dim": 2}),
    "lora-blockwise": (lora, {"block_dims": ",".join(["2"] * 12 + ["3"] * 13)}),
    "lora_fa": (lora_fa, {}),
    "dylora": (dylora, {"unit": 2}),
    "oft": (oft, {"enable_conv": True}),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_network_weights_continue_bit_exactly(tmp_path, name):
    module, args = MODULES[name]
    te, unet = tiny_text_encoder(), tiny_unet(attention_in_both=True)
    with_te = module is not oft
    network = module.create_network(1.0, 4, 1.0 if module is not oft else 0.01, None, te, unet, **args)
    network.apply_to(te, unet)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    network.eval()
    sample, t, enc = unet_inputs()
    with torch.no_grad():
        expected = unet(sample, t, enc).sample
    path = tmp_path / f"{name}.safetensors"
    network.save_weights(path, None, {})
    state = network.state_dict()
    network.remove_from()

    for from_weights in (False, True):
        te2, unet2 = tiny_text_encoder(), tiny_unet(attention_in_both=True)
        if from_weights:
            again, _ = module.create_network_from_weights(1.0, path, None, te2, unet2,
                                                          **({"unit": 2} if module is dylora else {}))
        else:
            again = module.create_network(1.0, 4, 1.0 if module is not oft else 0.01, None, te2, unet2, **args)
        again.apply_to(te2, unet2, with_te, True)
        again.load_weights(path)
        again.eval()
        got = again.state_dict()
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)
        with torch.no_grad():
            assert torch.equal(unet2(sample, t, enc).sample, expected)
        again.remove_from()
