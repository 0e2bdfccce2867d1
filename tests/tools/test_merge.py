"""merge_lora.py / sdxl_merge_lora.py: merged models equal the base with the LoRA applied; files load in
diffusers."""

from __future__ import annotations

import pytest
import safetensors
import torch

from networks import merge_lora, sdxl_merge_lora
from tests.models.tiny import make_tiny
from tests.tools.helpers import load, lora_file, merge_argv, outputs, outputs_with_lora, single_file


def assert_outputs_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])  # SD2: q/k/v are row blocks of OpenCLIP's fused in_proj
def test_merge_into_single_file_equals_base_with_lora(tmp_path, monkeypatch, kind):
    base_path = single_file(tmp_path, kind, monkeypatch)
    base = load(base_path, kind)
    lora_a, lora_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora_file(base, lora_a, seed=1)
    lora_file(base, lora_b, dim=2, alpha=1.0, conv_dim=None, seed=2)
    before = outputs(base)

    out = tmp_path / "merged.safetensors"
    assert (
        merge_lora.main(  # an SD2 file needs no --v2 here: the type is read from its keys
            merge_argv(base_path, [lora_a, lora_b], ["0.7", "-0.4"], out)
        )
        == 0
    )
    merged = outputs(load(out, kind))
    # the reference: the base with both LoRAs hooked in at their ratios, one after the other
    reference_model = load(base_path, kind)
    from networks.lora import create_network_from_weights

    networks = []
    for path, ratio in ((lora_a, 0.7), (lora_b, -0.4)):
        net, weights = create_network_from_weights(
            ratio, path, None, reference_model.text_encoders, reference_model.unet
        )
        net.load_state_dict(weights)
        net.apply_to(reference_model.text_encoders, reference_model.unet)
        networks.append(net)
    assert_outputs_close(merged, outputs(reference_model))
    assert not torch.allclose(merged["unet"], before["unet"], atol=1e-3)
    assert not torch.allclose(merged["te0"], before["te0"], atol=1e-3)

    with safetensors.safe_open(str(out), "pt") as f:  # same layout: every key of the source is still there
        keys, meta = set(f.keys()), f.metadata()
    with safetensors.safe_open(str(base_path), "pt") as f:
        assert keys == set(f.keys())
    assert meta["modelspec.merged_from"] == f"{kind}-base, a, b"


def test_sd1_merge_output_loads_in_diffusers_from_single_file(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    base_path = single_file(tmp_path, "sd1", monkeypatch)
    base = load(base_path, "sd1")
    lora = tmp_path / "l.safetensors"
    lora_file(base, lora)
    expected = outputs_with_lora(base, lora, 1.0)
    out = tmp_path / "merged.safetensors"
    assert merge_lora.main(merge_argv(base_path, [lora], ["1"], out, "--save_precision", "float")) == 0
    config = make_tiny("sd1").save_pipeline(
        tmp_path / "pipeline-config"
    )  # the configs and tokenizer it reads
    pipe = StableDiffusionPipeline.from_single_file(
        str(out), config=str(config), local_files_only=True, safety_checker=None
    )

    class Model:  # diffusers' modules in the shape `outputs` reads
        unet, text_encoders = pipe.unet, [pipe.text_encoder]

    assert_outputs_close(outputs(Model), expected)


def test_merge_into_builtin_writes_a_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    base = load("builtin:tiny-sd", "sd1")
    lora = tmp_path / "l.safetensors"
    lora_file(base, lora, conv_dim=None)
    expected = outputs_with_lora(base, lora, 0.5)
    out = tmp_path / "merged"
    assert (
        merge_lora.main(
            ["--sd_model", "builtin:tiny-sd", "--models", str(lora), "--ratios", "0.5", "--save_to", str(out)]
        )
        == 0
    )
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)

    class Model:
        unet, text_encoders = pipe.unet, [pipe.text_encoder]

    assert_outputs_close(outputs(Model), expected)
    assert_outputs_close(outputs(load(out, "sd1")), expected)


def test_sdxl_merge_reads_sai_names_and_equals_base_with_lora(tmp_path, monkeypatch):
    base_path = single_file(tmp_path, "sdxl", monkeypatch)
    base = load(base_path, "sdxl")
    lora = tmp_path / "sai.safetensors"
    lora_file(base, lora, sai_names=True)
    with safetensors.safe_open(str(lora), "pt") as f:
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
    diffusers_named = tmp_path / "diffusers-named.safetensors"
    lora_file(base, diffusers_named)  # same seed: the same weights under our names
    expected = outputs_with_lora(base, diffusers_named, 0.8)
    out = tmp_path / "merged.safetensors"
    assert (
        sdxl_merge_lora.main(
            ["--sd_model", str(base_path), "--models", str(lora), "--ratios", "0.8", "--save_to", str(out)]
        )
        == 0
    )
    assert_outputs_close(outputs(load(out, "sdxl")), expected)


@pytest.mark.parametrize("concat", [False, True])
def test_lora_merge_follows_sd_scripts_and_loads_in_diffusers(tmp_path, concat):
    from library.tools.lora_files import read_lora
    from tests.networks.test_lora_diffusers import sd_pipeline

    base = load("builtin:tiny-sd", "sd1")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora_file(base, a, alpha=2.0, conv_dim=None, seed=1)
    lora_file(base, b, alpha=4.0, conv_dim=None, seed=2)
    out = tmp_path / "ab.safetensors"
    args = ["--models", str(a), str(b), "--ratios", "0.5", "-1.5", "--save_to", str(out)]
    assert merge_lora.main(args + (["--concat"] if concat else [])) == 0

    (ma, _), (mb, _) = read_lora(a), read_lora(b)
    merged, meta = read_lora(out)
    name = next(iter(ma))
    s_a, s_b = 0.5, (4.0 / 2.0) ** 0.5 * -1.5  # sqrt(alpha / first alpha) * ratio; up scaled by |s|
    down = [ma[name].down * s_a, mb[name].down * s_b]
    up = [ma[name].up * abs(s_a), mb[name].up * abs(s_b)]
    if concat:
        torch.testing.assert_close(merged[name].down, torch.cat(down))
        torch.testing.assert_close(merged[name].up, torch.cat(up, dim=1))
    else:
        torch.testing.assert_close(merged[name].down, down[0] + down[1])
        torch.testing.assert_close(merged[name].up, up[0] + up[1])
    assert merged[name].alpha == 2.0
    assert meta["ss_network_dim"] == ("8" if concat else "4") and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.merged_from"] == "a, b"

    pipe = sd_pipeline(base.unet, base.text_encoders[0])
    pipe.load_lora_weights(str(out))  # diffusers reads the merged file


def run_error(main, args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def test_merge_errors_are_one_line(tmp_path, monkeypatch, capsys):
    sd1 = load("builtin:tiny-sd", "sd1")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora_file(sd1, a, dim=4, conv_dim=None)
    lora_file(sd1, b, dim=2, conv_dim=None)
    msg = run_error(
        merge_lora.main,
        ["--models", str(a), str(b), "--ratios", "1", "1", "--save_to", str(tmp_path / "o.safetensors")],
        capsys,
    )
    assert "rank 2" in msg and "rank 4" in msg and "--concat" in msg
    msg = run_error(
        merge_lora.main, ["--models", str(a), "--ratios", "1", "1", "--save_to", "o.safetensors"], capsys
    )
    assert "--ratios" in msg

    sdxl_path = single_file(tmp_path, "sdxl", monkeypatch)
    sdxl_lora = tmp_path / "xl.safetensors"
    lora_file(load(sdxl_path, "sdxl"), sdxl_lora, conv_dim=None)
    msg = run_error(
        merge_lora.main,
        [
            "--sd_model",
            "builtin:tiny-sd",
            "--models",
            str(sdxl_lora),
            "--ratios",
            "1",
            "--save_to",
            str(tmp_path / "m"),
        ],
        capsys,
    )
    assert "another model type" in msg and str(sdxl_lora) in msg
    msg = run_error(
        sdxl_merge_lora.main,
        [
            "--sd_model",
            "builtin:tiny-sd",
            "--models",
            str(a),
            "--ratios",
            "1",
            "--save_to",
            str(tmp_path / "m"),
        ],
        capsys,
    )
    assert "is an SD1 model, not SDXL" in msg and "networks/merge_lora.py" in msg
    assert not (tmp_path / "m").exists()


def test_merge_loha_and_lokr_into_a_model_follows_their_definitions(tmp_path):
    """LyCORIS LoHa: (w1a w1b) * (w2a w2b) * alpha / rank; LoKr: kron(w1, w2a w2b) * alpha / rank."""
    import safetensors.torch

    from library.tools.checkpoint import lora_layers

    base = load("builtin:tiny-sd", "sd1")
    layers = lora_layers(base)
    linear = next(n for n in layers if n.endswith("attn1_to_q"))
    conv = next(n for n in layers if n.endswith("resnets_0_conv1"))
    te = next(n for n in layers if n.startswith("lora_te_") and n.endswith("mlp_fc1"))
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    loha, expected = {}, {}
    for name in (linear, conv, te):
        shape = tuple(layers[name].module.weight.shape)
        out, inp = shape[0], int(torch.Size(shape[1:]).numel())
        t = {
            "hada_w1_a": randn(out, 2),
            "hada_w1_b": randn(2, inp),
            "hada_w2_a": randn(out, 2),
            "hada_w2_b": randn(2, inp),
        }
        loha.update({f"{name}.{k}": v for k, v in t.items()})
        loha[f"{name}.alpha"] = torch.tensor(1.0)
        product = (t["hada_w1_a"].double() @ t["hada_w1_b"].double()) * (
            t["hada_w2_a"].double() @ t["hada_w2_b"].double()
        )
        expected[name] = 0.7 * product.reshape(shape) * (1.0 / 2)
    out, inp = layers[linear].module.weight.shape
    w1, w2a, w2b = randn(2, 4), randn(out // 2, 3), randn(3, inp // 4)
    lokr = {
        f"{linear}.lokr_w1": w1,
        f"{linear}.lokr_w2_a": w2a,
        f"{linear}.lokr_w2_b": w2b,
        f"{linear}.alpha": torch.tensor(6.0),
    }
    w2 = w2a.double() @ w2b.double()
    kron = torch.einsum("ab,cd->acbd", w1.double(), w2).reshape(out, inp)  # block (a, b) is w1[a, b] * w2
    expected[linear] = expected[linear] + 1.0 * kron * (6.0 / 3)
    safetensors.torch.save_file(loha, tmp_path / "loha.safetensors")
    safetensors.torch.save_file(lokr, tmp_path / "lokr.safetensors")

    merged_dir = tmp_path / "merged"
    assert (
        merge_lora.main(
            [
                "--sd_model",
                "builtin:tiny-sd",
                "--models",
                str(tmp_path / "loha.safetensors"),
                str(tmp_path / "lokr.safetensors"),
                "--ratios",
                "0.7",
                "1.0",
                "--save_to",
                str(merged_dir),
            ]
        )
        == 0
    )
    merged_layers = lora_layers(load(merged_dir, "sd1"))
    for name, delta in expected.items():
        got = merged_layers[name].module.weight.double() - layers[name].module.weight.double()
        torch.testing.assert_close(got, delta, atol=1e-5, rtol=1e-4, msg=name)
    untouched = next(n for n in layers if n.endswith("attn2_to_k"))
    assert torch.equal(merged_layers[untouched].module.weight, layers[untouched].module.weight)
