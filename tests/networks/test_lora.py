"""networks.lora: kohya names, shapes, forward math against a dense float64 reference, files, optimizer groups."""

from __future__ import annotations

import copy
import hashlib
import pickle

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.errors import ConfigError, ModelError
from networks.lora import LoRANetwork, create_network, create_network_from_weights
from networks.lora_modules import LoRAModule

TE_CONFIG = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def tiny_unet(attention_in_both: bool = False, seed: int = 0, **extra) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    first_down, last_up = (
        ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attention_in_both else ("DownBlock2D", "UpBlock2D")
    )
    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=(first_down, "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", last_up),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    config.update(extra)
    return UNet2DConditionModel(**config).eval()


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's layout (text_time conditioning, 2 resnets per down block, 3 per up block) at toy width: the SAI
    names sd-scripts gives SDXL modules assume that layout."""
    return tiny_unet(
        seed=seed,
        layers_per_block=2,
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    )


def tiny_text_encoder(seed: int = 0, with_projection: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if with_projection:
        return CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=32, **TE_CONFIG)).eval()
    return CLIPTextModel(CLIPTextConfig(**TE_CONFIG)).eval()


def randomize_lora(network: LoRANetwork, seed: int = 1, std: float = 0.1) -> None:
    """Non-zero lora_up so that a test of the adapter path can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def unet_inputs(batch: int = 2, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 500]),
        torch.randn(batch, 5, 32, generator=g),
    )


class Transformer2DModel(nn.Module):
    """Stand-in with the class name kohya targets: one Linear and one 1x1 conv, small enough to compile."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(6, 8, 1)
        self.to_q = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        return self.to_q(h.flatten(2).transpose(1, 2))


class ToyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Transformer2DModel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


# --- names and shapes ----------------------------------------------------------------------------------------


def test_keys_use_kohya_names_with_down_up_alpha_per_module():
    unet, te = tiny_unet(), tiny_text_encoder()
    network = create_network(1.0, 4, 1, None, te, unet)
    keys = set(network.state_dict())
    for name in (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_mid_block_attentions_0_proj_in",
        "lora_unet_up_blocks_0_attentions_1_proj_out",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
        "lora_te_text_model_encoder_layers_1_mlp_fc1",
    ):
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    names = {k.split(".")[0] for k in keys}
    assert all(f"{n}.alpha" in keys and f"{n}.lora_up.weight" in keys for n in names)
    assert len(keys) == 3 * len(names)
    # no conv_dim: the ResNet convs are not adapted; 4 transformers x 12 layers, 2 CLIP layers x 6
    assert not any("resnets" in n or "samplers" in n for n in names)
    assert len(network.unet_loras) == 48 and len(network.text_encoder_loras) == 12


def test_parameter_count_follows_dim_and_alpha_sets_scale():
    te = tiny_text_encoder()
    for dim in (4, 8):
        network = create_network(1.0, dim, 2.0, None, te, None)
        # per CLIP layer: q,k,v,out 32->32 and fc1 32->37, fc2 37->32; params = dim * (in + out)
        assert sum(p.numel() for p in network.parameters()) == 2 * dim * (4 * 64 + 2 * 69)
        assert all(lora.scale == 2.0 / dim for lora in network.text_encoder_loras)
        assert all(float(lora.alpha) == 2.0 for lora in network.text_encoder_loras)
    default = create_network(1.0, None, None, None, te, None)
    assert default.text_encoder_loras[0].lora_dim == 4 and default.text_encoder_loras[0].scale == 0.25


def test_up_starts_at_zero_and_down_is_kaiming_uniform():
    network = create_network(1.0, 4, 1, None, tiny_text_encoder(), None)
    lora = network.text_encoder_loras[0]
    assert torch.count_nonzero(lora.lora_up.weight) == 0
    bound = 1.0 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert lora.lora_down.weight.abs().max() <= bound and lora.lora_down.weight.std() > bound / 4


def test_conv_dim_adds_resnet_and_sampler_convs_with_kohya_shapes():
    unet = tiny_unet()
    network = create_network(1.0, 4, 1, None, None, unet, conv_dim=3, conv_alpha=1.5)
    by_name = {lora.lora_name: lora for lora in network.unet_loras}
    conv1 = by_name["lora_unet_down_blocks_1_resnets_0_conv1"]
    assert conv1.lora_down.weight.shape == (3, 32, 3, 3) and conv1.lora_up.weight.shape == (64, 3, 1, 1)
    assert conv1.scale == 0.5
    down = by_name["lora_unet_down_blocks_0_downsamplers_0_conv"]
    assert down.lora_down.stride == (2, 2) and down.lora_down.weight.shape == (3, 32, 3, 3)
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in by_name
    # inside the ResNet blocks the Linear and the 1x1 shortcut get network_dim / network_alpha (as kohya)
    assert by_name["lora_unet_down_blocks_1_resnets_0_time_emb_proj"].lora_down.weight.shape == (4, 128)
    shortcut = by_name["lora_unet_down_blocks_1_resnets_0_conv_shortcut"]
    assert shortcut.lora_down.weight.shape == (4, 32, 1, 1) and shortcut.scale == 0.25
    proj_in = by_name["lora_unet_down_blocks_1_attentions_0_proj_in"]
    assert proj_in.lora_down.weight.shape == (4, 64, 1, 1) and proj_in.lora_up.weight.shape == (64, 4, 1, 1)
    assert len(network.unet_loras) == 79


def test_two_text_encoders_get_te1_te2_prefixes_and_own_lr():
    te1, te2 = tiny_text_encoder(0), tiny_text_encoder(1, with_projection=True)
    network = create_network(1.0, 4, 1, None, [te1, te2], None)
    names = {lora.lora_name for lora in network.text_encoder_loras}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert not any(n.startswith("lora_te_") for n in names) and len(names) == 24
    assert not any("text_projection" in n for n in names)
    groups = network.prepare_optimizer_params([1e-4, 2e-4], None, 1e-3)
    assert [(g["description"], g["lr"]) for g in groups] == [("textencoder1", 1e-4), ("textencoder2", 2e-4)]
    assert all(n.startswith("lora_te2_") for n in groups[1]["names"])
    for one_lr in (1e-4, [1e-4]):  # one lr for both encoders: one group, named as sd-scripts names it
        single = network.prepare_optimizer_params(one_lr, None, 1e-3)
        assert [(g["description"], g["lr"], len(g["params"])) for g in single] == [("textencoder", 1e-4, 48)]


# --- forward math --------------------------------------------------------------------------------------------


def _dense_reference(layer: nn.Module, lora: LoRAModule, x: torch.Tensor) -> torch.Tensor:
    """float64: the layer with W + multiplier * alpha/dim * up @ down."""
    up = lora.lora_up.weight.double().flatten(1)
    down = lora.lora_down.weight.double()
    delta = (up @ down.flatten(1)).view(up.shape[0], *down.shape[1:]) * (
        lora.multiplier * float(lora.alpha) / lora.lora_dim
    )
    weight, bias = layer.weight.double() + delta, layer.bias.double()
    if isinstance(layer, nn.Conv2d):
        return nn.functional.conv2d(x.double(), weight, bias, layer.stride, layer.padding)
    return nn.functional.linear(x.double(), weight, bias)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(12, 10), (3, 5, 12)),
        (nn.Linear(12, 10), (7, 12)),
        (nn.Conv2d(6, 5, 3, stride=2, padding=1), (2, 6, 9, 9)),
        (nn.Conv2d(6, 5, 1), (2, 6, 4, 4)),
    ],
)
def test_forward_equals_dense_weight_update(layer, shape):
    torch.manual_seed(0)
    lora = LoRAModule("lora_unet_x", layer, multiplier=0.7, lora_dim=3, alpha=2.0)
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(shape)
    base = layer(x)
    lora.apply_to()
    out = layer(x)
    torch.testing.assert_close(out.double(), _dense_reference(layer, lora, x), atol=1e-5, rtol=1e-5)
    assert (out - base).abs().max() > 1e-2
    lora.remove()
    torch.testing.assert_close(layer(x), base, atol=0, rtol=0)


def test_zero_up_leaves_model_output_unchanged():
    unet, te = tiny_unet(), tiny_text_encoder()
    sample, t, enc = unet_inputs()
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        ref_u, ref_t = unet(sample, t, enc).sample, te(ids).last_hidden_state
        network = create_network(1.0, 4, 1, None, te, unet, conv_dim=4)
        network.apply_to(te, unet)
        torch.testing.assert_close(unet(sample, t, enc).sample, ref_u, atol=0, rtol=0)
        torch.testing.assert_close(te(ids).last_hidden_state, ref_t, atol=0, rtol=0)


def test_multiplier_scales_the_delta_linearly():
    unet = tiny_unet()
    sample, t, enc = unet_inputs()
    network = create_network(1.0, 4, 4, None, None, unet)
    randomize_lora(network, std=0.02)
    network.apply_to(None, unet)
    with torch.no_grad():
        full = unet(sample, t, enc).sample
        network.set_multiplier(0.0)
        base = unet(sample, t, enc).sample
        network.set_multiplier(0.5)
        half = unet(sample, t, enc).sample
    assert (full - base).abs().max() > 1e-3
    # the U-Net is non-linear, so compare one layer for exact linearity and the model only loosely
    layer_lora = next(lora for lora in network.unet_loras if not lora.is_conv)
    x = torch.randn(2, 5, layer_lora.org_module.in_features)
    network.set_multiplier(0.0)
    b = layer_lora.org_module(x)
    network.set_multiplier(0.5)
    h = layer_lora.org_module(x)
    network.set_multiplier(1.0)
    f = layer_lora.org_module(x)
    torch.testing.assert_close(h - b, (f - b) / 2, atol=1e-6, rtol=1e-5)
    assert (half - base).abs().max() < (full - base).abs().max()


def test_apply_flags_drop_untrained_parts_and_remove_restores_the_model():
    unet, te = tiny_unet(), tiny_text_encoder()
    network = create_network(1.0, 4, 1, None, te, unet)
    randomize_lora(network)
    ids = torch.randint(0, 1000, (1, 7))
    ref = te(ids).last_hidden_state
    network.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    assert network.text_encoder_loras == [] and all(k.startswith("lora_unet_") for k in network.state_dict())
    torch.testing.assert_close(te(ids).last_hidden_state, ref, atol=0, rtol=0)
    sample, t, enc = unet_inputs()
    hooked = unet(sample, t, enc).sample
    network.remove_from()
    assert "forward" not in network.unet_loras[0].org_module.__dict__
    plain = unet(sample, t, enc).sample
    assert (hooked - plain).abs().max() > 1e-3


def test_merge_equals_hooked_forward_and_unmerge_restores_weights():
    unet = tiny_unet()
    network = create_network(0.8, 4, 2, None, None, unet, conv_dim=2)
    randomize_lora(network, std=0.05)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    network.apply_to(None, unet)
    sample, t, enc = unet_inputs()
    with torch.no_grad():
        hooked = unet(sample, t, enc).sample
        network.merge_to()
        assert all("forward" not in lora.org_module.__dict__ for lora in network.unet_loras)
        merged = unet(sample, t, enc).sample
        network.unmerge()
        again = unet(sample, t, enc).sample
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, hooked, atol=1e-5, rtol=1e-5)
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


# --- dropout ---------------------------------------------------------------------------------------------------


def test_no_dropout_objects_when_dropout_is_zero():
    network = create_network(
        1.0, 4, 1, None, tiny_text_encoder(), None, neuron_dropout=0.0, rank_dropout="0", module_dropout=None
    )
    assert not any(isinstance(m, nn.Dropout) for m in network.modules())
    assert not any(lora.has_dropout for lora in network.text_encoder_loras)


def test_dropout_acts_only_in_train_mode():
    te = tiny_text_encoder()
    plain = create_network(1.0, 4, 1, None, te, None)
    randomize_lora(plain)
    sd = plain.state_dict()
    ids = torch.randint(0, 1000, (2, 7))
    plain.apply_to(te, None)
    with torch.no_grad():
        expected = te(ids).last_hidden_state
    plain.remove_from()
    network = create_network(
        1.0, 4, 1, None, te, None, neuron_dropout=0.5, rank_dropout=0.3, module_dropout=0.2
    )
    network.load_state_dict(sd)
    network.apply_to(te, None)
    with torch.no_grad():
        network.eval()
        torch.testing.assert_close(te(ids).last_hidden_state, expected, atol=0, rtol=0)
        network.train()
        torch.manual_seed(0)
        a = te(ids).last_hidden_state
        b = te(ids).last_hidden_state
    assert (a - expected).abs().max() > 1e-4 and (a - b).abs().max() > 1e-4


def test_rank_dropout_is_unbiased():
    layer = nn.Linear(4, 3)
    lora = LoRAModule("lora_unet_x", layer, lora_dim=2, alpha=2, rank_dropout=0.5)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(1, 4).expand(40000, 4)
    with torch.no_grad():
        lora.eval()
        expected = layer(x[:1])
        lora.train()
        torch.manual_seed(0)
        mean = layer(x).mean(0, keepdim=True)
    torch.testing.assert_close(mean, expected, atol=0.03 * expected.abs().max().item(), rtol=0)


# --- training integration ----------------------------------------------------------------------------------------


def test_prepare_optimizer_params_names_and_loraplus_groups():
    unet, te = tiny_unet(), tiny_text_encoder()
    network = create_network(1.0, 4, 1, None, te, unet, loraplus_unet_lr_ratio="16")
    groups = network.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert [(g["description"], g["lr"]) for g in groups] == [
        ("textencoder", 5e-5),
        ("unet", 1e-4),
        ("unet plus", 1.6e-3),
    ]
    named = dict(network.lora_params_named())
    for g in groups:
        assert len(g["names"]) == len(g["params"])
        assert all(named[n] is p for n, p in zip(g["names"], g["params"], strict=True))
    assert all(n.endswith(".lora_up.weight") for n in groups[2]["names"])
    assert all(n.endswith(".lora_down.weight") for n in groups[1]["names"])
    assert (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
        in groups[2]["names"]
    )
    covered = [p for g in groups for p in g["params"]]
    assert len(covered) == len(list(network.get_trainable_params())) == len(named)

    both = create_network(1.0, 4, 1, None, te, unet, loraplus_lr_ratio=4).prepare_optimizer_params(
        None, None, 1e-4
    )
    assert [(g["description"], g["lr"]) for g in both] == [
        ("textencoder", 1e-4),
        ("textencoder plus", 4e-4),
        ("unet", 1e-4),
        ("unet plus", 4e-4),
    ]
    frozen_te = network.prepare_optimizer_params(0, 1e-4, 1e-3)
    assert [g["description"] for g in frozen_te] == ["unet", "unet plus"]


def test_gradients_reach_only_lora_and_match_with_gradient_checkpointing():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        unet = tiny_unet().requires_grad_(False)
        network = create_network(1.0, 4, 1, None, None, unet, conv_dim=2)
        randomize_lora(network)
        network.apply_to(None, unet)
        network.prepare_grad_etc(None, unet)
        if checkpointing:
            unet.enable_gradient_checkpointing()
            network.enable_gradient_checkpointing()
        unet.train()
        sample, t, enc = unet_inputs()
        unet(sample, t, enc).sample.square().mean().backward()
        assert all(p.grad is None for p in unet.parameters())
        return {n: p.grad.clone() for n, p in network.lora_params_named()}

    plain, checkpointed = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in plain.values())
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5)


def test_autocast_bf16_and_half_base_weights():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    lora = LoRAModule("lora_unet_x", layer, lora_dim=4, alpha=4)
    nn.init.normal_(lora.lora_up.weight, std=0.1)
    lora.apply_to()
    x = torch.randn(2, 3, 16)
    ref = _dense_reference(layer, lora, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=2e-2)
    out.float().sum().backward()
    assert lora.lora_up.weight.grad.dtype == torch.float32 and lora.lora_up.weight.grad.abs().sum() > 0

    layer.to(torch.bfloat16)  # base weights in bf16, adapter in fp32, no autocast
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and lora.lora_down.weight.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=2e-2)


def test_torch_compile_fullgraph_matches_eager():
    model = ToyUNet()
    network = create_network(1.0, 4, 2, None, None, model)
    assert {lora.lora_name for lora in network.unet_loras} == {
        "lora_unet_block_proj_in",
        "lora_unet_block_to_q",
    }
    randomize_lora(network)
    network.apply_to(None, model)
    x = torch.randn(2, 6, 3, 3)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in network.parameters()]
    network.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(network.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_network_pickles_and_state_dict_holds_only_lora_tensors():
    unet = tiny_unet()
    network = create_network(1.0, 4, 1, None, None, unet)
    network.apply_to(None, unet)
    assert all(
        k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in network.state_dict()
    )
    clone = pickle.loads(pickle.dumps(network))
    assert clone.state_dict().keys() == network.state_dict().keys()
    copy.deepcopy(network)


@torch.no_grad()
def test_max_norm_regularization_caps_the_dense_update_norm():
    network = create_network(1.0, 4, 2, None, tiny_text_encoder(), None)
    randomize_lora(network, std=0.5)

    def dense_norms() -> torch.Tensor:
        return torch.stack([lora.delta_weight().double().norm() for lora in network.text_encoder_loras])

    before = dense_norms()
    middle = before.sort().values[len(before) // 2 - 1:len(before) // 2 + 1]
    cap = float(middle.mean())  # between two modules' norms: no module sits on the cap, where float32 could tip it
    scaled, mean, biggest = network.apply_max_norm_regularization(cap, "cpu")
    after = dense_norms()
    assert int(scaled) == int((before > cap).sum()) > 0
    torch.testing.assert_close(after, torch.clamp(before, max=cap), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(biggest.double(), after.max(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean.double(), after.mean(), atol=1e-6, rtol=1e-5)


# --- files -------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bitwise_with_metadata_and_hashes(tmp_path):
    unet, te = tiny_unet(), tiny_text_encoder()
    network = create_network(1.0, 4, 2, None, te, unet, conv_dim=2, conv_alpha=1)
    randomize_lora(network)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, {"ss_network_dim": 4, "ss_network_alpha": "2.0", "modelspec.title": "x"})
    other = create_network(1.0, 4, 2, None, tiny_text_encoder(), tiny_unet(), conv_dim=2, conv_alpha=1)
    info = other.load_weights(path)
    assert info.missing_keys == [] and info.unexpected_keys == []
    for k, v in network.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "x"
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header :]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
    assert not list(tmp_path.glob("*.tmp"))


def test_save_dtype_and_pickle_format(tmp_path):
    network = create_network(1.0, 4, 2, None, tiny_text_encoder(), None)
    randomize_lora(network)
    network.save_weights(tmp_path / "half.safetensors", torch.float16, None)
    sd = safetensors.torch.load_file(tmp_path / "half.safetensors")
    assert all(v.dtype == torch.float16 for v in sd.values())
    network.save_weights(tmp_path / "lora.pt", None, None)
    other = create_network(1.0, 4, 2, None, tiny_text_encoder(), None)
    other.load_weights(tmp_path / "lora.pt", strict=True)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in network.state_dict().items())


def test_create_network_from_weights_infers_dims_alphas_and_conv(tmp_path):
    unet, te = tiny_unet(), tiny_text_encoder()
    network = create_network(1.0, 8, 4, None, te, unet, conv_dim=2, conv_alpha=1)
    randomize_lora(network, std=0.02)
    sd = network.state_dict()
    # a per-module dim that differs from the rest, as in resized LoRAs
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"
    sd[f"{name}.lora_down.weight"] = sd[f"{name}.lora_down.weight"][:3].clone()
    sd[f"{name}.lora_up.weight"] = sd[f"{name}.lora_up.weight"][:, :3].clone()
    sd[f"{name}.alpha"] = torch.tensor(3.0)
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file(sd, path)

    loaded, weights = create_network_from_weights(1.0, path, None, tiny_text_encoder(), tiny_unet())
    by_name = {lora.lora_name: lora for lora in loaded.text_encoder_loras + loaded.unet_loras}
    assert by_name.keys() == {k.split(".")[0] for k in sd}
    assert by_name[name].lora_dim == 3 and by_name[name].scale == 1.0
    conv = by_name["lora_unet_up_blocks_1_resnets_0_conv2"]
    assert conv.lora_dim == 2 and conv.scale == 0.5 and conv.lora_down.weight.shape == (2, 32, 3, 3)
    assert by_name["lora_te_text_model_encoder_layers_0_mlp_fc2"].lora_dim == 8
    assert by_name["lora_te_text_model_encoder_layers_0_mlp_fc2"].scale == 0.5
    loaded.load_weights(path, strict=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    assert weights.keys() == sd.keys()


def test_loaded_alpha_sets_the_scale(tmp_path):
    te = tiny_text_encoder()
    network = create_network(1.0, 4, 4, None, te, None)
    sd = network.state_dict()
    sd = {k: (torch.tensor(1.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    safetensors.torch.save_file(sd, tmp_path / "a.safetensors")
    network.load_weights(tmp_path / "a.safetensors")
    assert all(lora.scale == 0.25 for lora in network.text_encoder_loras)


def test_load_errors_name_the_file_and_keys(tmp_path):
    te = tiny_text_encoder()
    network = create_network(1.0, 4, 1, None, te, None)
    sd = network.state_dict()

    partial = {k: v for k, v in sd.items() if "layers_0" in k}
    safetensors.torch.save_file(partial, tmp_path / "partial.safetensors")
    info = network.load_weights(tmp_path / "partial.safetensors")
    assert len(info.missing_keys) == len(sd) // 2 and info.unexpected_keys == []
    with pytest.raises(ModelError, match="missing lora_te_text_model_encoder_layers_1"):
        network.load_weights(tmp_path / "partial.safetensors", strict=True)

    wrong_dim = create_network(1.0, 8, 1, None, te, None).state_dict()
    safetensors.torch.save_file(wrong_dim, tmp_path / "dim8.safetensors")
    with pytest.raises(ModelError, match=r"dim8.safetensors: lora_te_.*shape \(8, 32\).*\(4, 32\)"):
        network.load_weights(tmp_path / "dim8.safetensors")

    foreign = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32)}
    safetensors.torch.save_file(foreign, tmp_path / "foreign.safetensors")
    with pytest.raises(ModelError, match="foreign.safetensors: none of its 1 modules"):
        network.load_weights(tmp_path / "foreign.safetensors")
    with pytest.raises(ModelError, match="foreign.safetensors: none of its 1 modules"):
        create_network_from_weights(1.0, tmp_path / "foreign.safetensors", None, te, None)
    with pytest.raises(ModelError, match="not found: .*missing.safetensors"):
        network.load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot read LoRA file .*junk.safetensors"):
        network.load_weights(tmp_path / "junk.safetensors")


# --- network_args --------------------------------------------------------------------------------------------------


def test_network_args_accept_strings_and_reject_bad_values():
    te = tiny_text_encoder()
    network = create_network("1.0", "8", "4", None, te, None, rank_dropout="0.1", loraplus_lr_ratio="16")
    lora = network.text_encoder_loras[0]
    assert lora.lora_dim == 8 and lora.scale == 0.5 and lora.rank_dropout == 0.1
    assert network.loraplus_lr_ratio == 16.0
    with pytest.raises(ConfigError, match=r"conv_dim='3\.5': expected an integer"):
        create_network(1.0, 4, 1, None, te, None, conv_dim="3.5")
    with pytest.raises(ConfigError, match=r"rank_dropout=1\.0: out of range"):
        create_network(1.0, 4, 1, None, te, None, rank_dropout=1.0)
    with pytest.raises(ConfigError, match="block_dim: unknown for networks.lora; valid keys: conv_dim"):
        create_network(1.0, 4, 1, None, te, None, block_dim="2,2,2")
    with pytest.raises(ConfigError, match="block_dims: 3 values, 25 expected"):
        create_network(1.0, 4, 1, None, te, None, block_dims="2,2,2")
    with pytest.raises(ConfigError, match="network_dim"):
        create_network(1.0, 0, 1, None, te, None)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio=0"):
        create_network(1.0, 4, 1, None, te, None, loraplus_lr_ratio=0)
