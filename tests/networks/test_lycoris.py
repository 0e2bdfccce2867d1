"""--network_module lycoris.kohya: every LyCORIS algo trains on our models, saves LyCORIS' keys, and LyCORIS'
own code rebuilt from our file gives the weights our hooked network ran with."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from lycoris import kohya
from lycoris.functional import locon, loha, lokr
from lycoris.modules import IA3Module, get_module, make_module
from torch import nn

from library.errors import ConfigError, ModelError
from library.training.validate import import_network_module
from networks import lycoris_kohya
from tests.networks.test_lora import tiny_sdxl_unet, tiny_text_encoder, tiny_unet, unet_inputs

ALGOS = {
    "locon": dict(algo="locon", conv_dim=2, conv_alpha=1),
    "lora-dora": dict(algo="lora", dora_wd=True),
    "loha-tucker": dict(algo="loha", use_tucker=True, conv_dim=2),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-full-matrix-scalar": dict(algo="lokr", full_matrix=True, use_scalar=True),
    "ia3": dict(algo="ia3"),
    "dylora": dict(algo="dylora", block_size=2),
    "full": dict(algo="full", preset="attn-mlp"),
    "diag-oft": dict(algo="diag-oft", block_size=8, constraint=0.1),
    "boft": dict(algo="boft", block_size=8, preset="unet-transformer-only"),
    "glora": dict(algo="glora"),
    "locon-train-norm": dict(algo="locon", train_norm=True, preset="attn-mlp"),
}


def _layers_by_name(unet: nn.Module, te: nn.Module) -> dict[str, nn.Module]:
    out = {f"lora_unet_{n}".replace(".", "_"): m for n, m in unet.named_modules() if n}
    out.update({f"lora_te_text_model_{n}".replace(".", "_"): m for n, m in te.named_modules() if n})
    return out


def _batch():
    sample, t, enc = unet_inputs()
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    return sample, t, enc, ids


def _outputs(unet, te, batch):
    sample, t, enc, ids = batch
    return unet(sample, t, enc).sample, te(ids).last_hidden_state


def _train(network, unet, te, batch, steps: int = 2, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(network.prepare_optimizer_params(lr, lr, lr), lr=lr)
    network.train()
    for _ in range(steps):
        out_u, out_t = _outputs(unet, te, batch)
        (out_u.square().mean() + out_t.square().mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    network.eval()


@torch.no_grad()
def _applied_linear_weight(layer: nn.Linear) -> torch.Tensor:
    """The weight a (hooked) Linear runs with: its output on the identity minus its output on zero (the bias)."""
    eye = torch.eye(layer.in_features)
    return (layer(eye) - layer(torch.zeros_like(eye))).T


@torch.no_grad()
def _lycoris_merged_weight(algo: str, saved: dict, name: str, base: nn.Linear) -> torch.Tensor:
    """The layer's weight after merging our file, by LyCORIS' functional API where its modules' own merge is
    known to be off in 4.1.3 (LoHa/LoKr apply alpha/rank twice in get_diff_weight, IA3 cannot be rebuilt by
    make_module, DyLoRA merges a random rank), by LyCORIS' modules rebuilt from the file otherwise."""
    def get(key):
        return saved.get(f"{name}.{key}")

    weight = base.weight.float()
    if algo == "loha":
        gamma = float(get("alpha")) / get("hada_w1_b").shape[0]
        return weight + loha.diff_weight(get("hada_w1_b"), get("hada_w1_a"), get("hada_w2_b"), get("hada_w2_a"),
                                         get("hada_t1"), get("hada_t2"), gamma=gamma)
    if algo == "lokr":
        parts = [get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                  "lokr_t2")]
        alpha = float(get("alpha")) if get("alpha") is not None else None
        return weight + lokr.diff_weight(*parts, gamma=alpha).reshape(weight.shape)
    if algo == "dylora":
        gamma = float(get("alpha")) / get("lora_down.weight").shape[0]
        return weight + locon.diff_weight(get("lora_down.weight"), get("lora_up.weight"), None, gamma=gamma)
    if algo == "ia3":
        return IA3Module.make_module_from_state_dict(name, base, get("weight")).get_merged_weight(1.0)[0].float()
    lyco_type, params = get_module(saved, name)
    return make_module(lyco_type, params, name, base).get_merged_weight(multiplier=1.0)[0].float()


@pytest.mark.parametrize("args", list(ALGOS.values()), ids=list(ALGOS))
def test_algo_trains_saves_lycoris_keys_and_lycoris_rebuilds_the_applied_weights(tmp_path, args):
    unet, te = tiny_unet(), tiny_text_encoder()
    base_unet, base_te = copy.deepcopy(unet), copy.deepcopy(te)
    batch = _batch()
    before = _outputs(unet, te, batch)
    network = lycoris_kohya.create_network(1.0, 4, 2.0, None, te, unet, **args)
    network.apply_to(te, unet, True, True)
    _train(network, unet, te, batch)
    with torch.no_grad():
        after = _outputs(unet, te, batch)
    assert (after[0] - before[0]).abs().max() > 1e-4  # training changed the output

    path = tmp_path / "lyco.safetensors"
    network.save_weights(path, None, {"ss_network_module": "lycoris.kohya"})
    saved = safetensors.torch.load_file(path)
    assert saved.keys() == network.state_dict().keys()
    if "unet" not in args.get("preset", ""):  # kohya TE names
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in saved)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in saved)

    base_layers = _layers_by_name(base_unet, base_te)
    compared = 0
    for module in network.loras:
        layer = module.org_module[0]
        if not isinstance(layer, nn.Linear):
            continue
        base = copy.deepcopy(base_layers[module.lora_name])
        expected = _lycoris_merged_weight(args["algo"], saved, module.lora_name, base)
        if args["algo"] == "dylora":
            # LyCORIS' DyLoRA runs a random rank block in every forward, scaled alpha/blocks; its file is a plain
            # full-rank LoCon (alpha/rank) and LyCORIS' loader reads it as one
            lyco_type, params = get_module(saved, module.lora_name)
            assert lyco_type.__name__ == "LoConModule"
            with torch.no_grad():
                applied = make_module(lyco_type, params, module.lora_name, copy.deepcopy(base)).get_merged_weight()[0]
        else:
            applied = _applied_linear_weight(layer)
        torch.testing.assert_close(applied, expected, atol=2e-5, rtol=1e-4)
        compared += 1
    assert compared > 10

    # --network_weights continues bit-exactly, through create_network and create_network_from_weights
    expected_sd = network.state_dict()
    network.restore()
    for from_weights in (False, True):
        te2, unet2 = copy.deepcopy(base_te), copy.deepcopy(base_unet)
        if from_weights and args["algo"] == "ia3":
            with pytest.raises(ConfigError, match="cannot rebuild an IA3 network from a file"):
                lycoris_kohya.create_network_from_weights(1.0, path, None, te2, unet2)
            continue
        if from_weights and args["algo"] == "dylora":  # LyCORIS writes a conv DyLoRA's lora_up unloadably
            with pytest.raises(ModelError, match="LyCORIS cannot rebuild a network from this file"):
                lycoris_kohya.create_network_from_weights(1.0, path, None, te2, unet2)
            continue
        if not from_weights and args["algo"] == "dylora":
            dy = lycoris_kohya.create_network(1.0, 4, 2.0, None, te2, unet2, **args)
            dy.apply_to(te2, unet2, True, True)
            with pytest.raises(ConfigError, match="add --dim_from_weights to continue it"):
                dy.load_weights(path)
            dy.restore()
            continue
        again = (lycoris_kohya.create_network_from_weights(1.0, path, None, te2, unet2)[0] if from_weights
                 else lycoris_kohya.create_network(1.0, 4, 2.0, None, te2, unet2, **args))
        again.apply_to(te2, unet2, True, True)
        again.load_weights(path)
        got = again.state_dict()
        assert got.keys() == expected_sd.keys()
        if from_weights and args["algo"] == "full":  # LyCORIS holds W0 + diff and saves (W0 + diff) - W0
            assert max((got[k] - expected_sd[k]).abs().max().item() for k in expected_sd) < 1e-6
        else:
            assert all(torch.equal(got[k], expected_sd[k]) for k in expected_sd), from_weights
        again.restore()


def test_lycoris_alone_builds_time_embedding_twice_ours_once():
    """LyCORIS 4.1.3's preset lists class TimestepEmbedding and the name time_embedding.linear_1; diffusers'
    time_embedding is a TimestepEmbedding, so LyCORIS alone stops; the wrapper builds each layer once."""
    unet, te = tiny_unet(), tiny_text_encoder()
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_time_embedding_linear_1"):
        kohya.create_network(1.0, 4, 1.0, None, te, unet, algo="locon")
    network = lycoris_kohya.create_network(1.0, 4, 1.0, None, te, unet, algo="locon")
    names = [m.lora_name for m in network.loras]
    assert len(names) == len(set(names))
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2", "lora_unet_conv_in",
            "lora_unet_conv_out"} <= set(names)
    assert import_network_module("lycoris.kohya") is lycoris_kohya


def test_bad_network_args_fail_in_one_line():
    with pytest.raises(ConfigError, match="--network_args algo=lohaa: valid algos are"):
        lycoris_kohya.check_network_args({"algo": "lohaa"}, None)
    with pytest.raises(ConfigError, match="--network_args algo=tlora: LyCORIS' tlora forward fails"):
        lycoris_kohya.check_network_args({"algo": "tlora"}, None)
    with pytest.raises(ConfigError, match="--network_args use_tuker: unknown for lycoris.kohya"):
        lycoris_kohya.check_network_args({"use_tuker": True}, None)
    with pytest.raises(ConfigError, match="preset=nope: neither a built-in preset"):
        lycoris_kohya.check_network_args({"preset": "nope"}, None)
    assert lycoris_kohya.check_network_args({}, 0.1)["dropout"] == 0.1  # --network_dropout reaches LyCORIS


@pytest.mark.parametrize("args", [ALGOS["loha-tucker"], ALGOS["lokr"], ALGOS["diag-oft"]], ids=["loha", "lokr", "oft"])
def test_resume_from_file_is_bit_exact_sdxl_sai_names(tmp_path, args):
    te1, te2 = tiny_text_encoder(0), tiny_text_encoder(1, with_projection=True)
    unet = tiny_sdxl_unet()
    network = lycoris_kohya.create_network(1.0, 4, 2.0, None, [te1, te2], unet, **args)
    network.apply_to([te1, te2], unet, True, True)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "sdxl.safetensors"
    network.save_weights(path, None, {})
    unet_keys = [k for k in safetensors.torch.load_file(path) if k.startswith("lora_unet_")]
    assert unet_keys and all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block",
                                           "lora_unet_output_blocks", "lora_unet_time_embed", "lora_unet_out_",
                                           "lora_unet_label_emb")) for k in unet_keys)
    expected = network.state_dict()
    network.restore()

    for from_weights in (False, True):
        u, t1, t2 = tiny_sdxl_unet(), tiny_text_encoder(0), tiny_text_encoder(1, with_projection=True)
        if from_weights:
            again, _ = lycoris_kohya.create_network_from_weights(1.0, path, None, [t1, t2], u)
        else:
            again = lycoris_kohya.create_network(1.0, 4, 2.0, None, [t1, t2], u, **args)
        again.apply_to([t1, t2], u, True, True)
        again.load_weights(path)
        got = again.state_dict()
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), k
        again.restore()


def test_file_for_another_model_is_refused_with_counts(tmp_path):
    te, unet = tiny_text_encoder(), tiny_unet()
    network = lycoris_kohya.create_network(1.0, 4, 1.0, None, te, unet, algo="loha")
    network.apply_to(te, unet, True, True)
    sd = network.state_dict()
    sd["lora_unet_not_a_layer.hada_w1_a"] = torch.zeros(1)
    safetensors.torch.save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(ModelError, match=r"extra.safetensors: only \d+ of its \d+ modules match"):
        network.load_weights(tmp_path / "extra.safetensors")
