"""Original-layout (LDM) single files load offline: family from keys, weights exact, bad files named."""

import pytest
import torch
from safetensors.torch import save_file

from library.errors import ModelError
from library.models import load_sd_model
from library.models.single_file import bundled_config_dir, detect_checkpoint_type
from tests.models.tiny import assert_same_weights, make_tiny, unet_inputs

FLAGS = {"sd1": {}, "sd2": {"v2": True}, "sdxl": {"sdxl": True}}


class NotATensor:
    """A pickled custom object, as in checkpoints that weights_only=True must refuse."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    out = {}
    for kind in ("sd1", "sd2", "sdxl"):
        tiny = make_tiny(kind)
        state = tiny.ldm_state_dict()
        path = root / f"{kind}.safetensors"
        save_file(state, path)
        out[kind] = (tiny, state, path, tiny.save_configs(root / f"{kind}-configs"))
    return out


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_single_file_round_trip_reproduces_weights_and_outputs(files, kind):
    tiny, _, path, configs = files[kind]
    model = load_sd_model(path, config_dir=configs, **FLAGS[kind])
    assert model.model_type == kind and model.source == str(path)
    assert len(model.text_encoders) == len(model.tokenizers) == len(tiny.text_encoders)
    for expected, actual in zip(tiny.text_encoders, model.text_encoders, strict=True):
        assert type(expected) is type(actual)
        assert_same_weights(expected, actual)
    assert_same_weights(tiny.vae, model.vae)
    assert_same_weights(tiny.unet, model.unet)
    ids = model.tokenizers[0](["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(tiny.unet(**unet_inputs(tiny)).sample, model.unet(**unet_inputs(model)).sample)
        for expected, actual in zip(tiny.text_encoders, model.text_encoders, strict=True):
            assert torch.equal(expected(ids.input_ids)[0], actual(ids.input_ids)[0])
        pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        assert torch.equal(
            tiny.vae.encode(pixels).latent_dist.mean, model.vae.encode(pixels).latent_dist.mean
        )


def test_ckpt_with_nested_state_dict_loads_like_safetensors(files, tmp_path):
    tiny, state, _, configs = files["sd1"]
    path = tmp_path / "model.ckpt"
    extra = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    torch.save({"state_dict": {**state, **extra}, "global_step": 1000}, path)  # as the original SD 1.x files
    model = load_sd_model(path, config_dir=configs)
    assert_same_weights(tiny.unet, model.unet)
    assert_same_weights(tiny.text_encoders[0], model.text_encoders[0])


def test_ckpt_is_read_with_weights_only(files, tmp_path):
    _, state, _, configs = files["sd1"]
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": state, "callback": NotATensor()}, path)
    with pytest.raises(ModelError, match=r"pickled\.ckpt: cannot read .*weights_only=True"):
        load_sd_model(path, config_dir=configs)


def test_dtype_and_v_parameterization_flag(files):
    _, _, path, configs = files["sd2"]
    model = load_sd_model(path, v2=True, v_parameterization=True, dtype=torch.float16, config_dir=configs)
    assert model.v_parameterization and model.scheduler_config["prediction_type"] == "v_prediction"
    assert {p.dtype for p in model.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in model.text_encoders[0].parameters()} == {torch.float16}


def test_type_is_detected_from_keys(files):
    for kind in ("sd1", "sd2", "sdxl"):
        _, state, path, _ = files[kind]
        assert detect_checkpoint_type(set(state), path)[0] == kind


@pytest.mark.parametrize(
    ("kind", "flags", "message"),
    [
        ("sd2", {}, r"is an SD2 model \(OpenCLIP .*\) but the flags \(no --v2/--sdxl\) select SD1; use --v2"),
        ("sd1", {"sdxl": True},
         r"is an SD1 model .* select SDXL; train it with train_network.py and neither --v2 nor --sdxl"),
        ("sdxl", {"v2": True}, r"is an SDXL model .* use sdxl_train_network.py \(or --sdxl\)"),
    ],
)
def test_contradicting_flags_are_errors(files, kind, flags, message):
    _, _, path, configs = files[kind]
    with pytest.raises(ModelError, match=message):
        load_sd_model(path, config_dir=configs, **flags)


def test_sd2_choice_of_bundled_config_follows_v_parameterization():
    assert bundled_config_dir("sd2", True).name == "sd21"
    assert bundled_config_dir("sd2", False).name == "sd21-base"
    assert bundled_config_dir("sd1", True).name == "sd15"
    assert bundled_config_dir("sdxl", False).name == "sdxl-base"


def test_without_config_dir_the_bundled_full_size_configs_are_used(files):
    _, _, path, _ = files["sd2"]
    with pytest.raises(ModelError, match=r"text_encoder .* do not fit .*configs/sd21/text_encoder"):
        load_sd_model(path, v2=True, v_parameterization=True)


def test_truncated_safetensors_is_named(files, tmp_path):
    _, _, path, configs = files["sd1"]
    cut = tmp_path / "cut.safetensors"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"cut\.safetensors: not a readable safetensors file .*truncated"):
        load_sd_model(cut, config_dir=configs)


def test_text_file_renamed_safetensors_is_named(tmp_path):
    fake = tmp_path / "notes.safetensors"
    fake.write_text("these are my prompt notes\n")
    with pytest.raises(ModelError, match=r"notes\.safetensors: not a readable safetensors file"):
        load_sd_model(fake)


def test_truncated_ckpt_is_named(files, tmp_path):
    _, state, _, configs = files["sd1"]
    full = tmp_path / "full.ckpt"
    torch.save(state, full)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"cut\.ckpt: cannot read as a PyTorch checkpoint"):
        load_sd_model(cut, config_dir=configs)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(ModelError, match=r"nowhere/model\.safetensors' not found"):
        load_sd_model(missing)


def test_lora_file_is_recognised(tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, lora)
    with pytest.raises(ModelError, match="is a LoRA file"):
        load_sd_model(lora)


def test_file_missing_a_text_encoder_weight_is_refused(files, tmp_path):
    _, state, _, configs = files["sd1"]
    partial = {k: v for k, v in state.items() if not k.endswith("final_layer_norm.weight")}
    path = tmp_path / "partial.safetensors"
    save_file(partial, path)
    with pytest.raises(
        ModelError, match=r"text_encoder .* weights do not fit .*\(missing final_layer_norm\.weight\)"
    ):
        load_sd_model(path, config_dir=configs)


def test_file_missing_a_unet_weight_is_refused(files, tmp_path):
    _, state, _, configs = files["sd1"]
    partial = {k: v for k, v in state.items() if k != "model.diffusion_model.out.2.weight"}
    path = tmp_path / "partial.safetensors"
    save_file(partial, path)
    with pytest.raises(
        ModelError, match=r"partial\.safetensors: unet weights do not fit .*\(missing conv_out\.weight\)"
    ):
        load_sd_model(path, config_dir=configs)


def test_weights_of_another_architecture_than_the_config_are_refused(files):
    _, _, path, _ = files["sd1"]
    _, _, _, sd2_configs = files["sd2"]
    with pytest.raises(ModelError, match=r"sd1\.safetensors: unet weights do not fit"):
        load_sd_model(path, config_dir=sd2_configs)
