"""Diffusers-format folders (save_pretrained) load back offline with their family and weights intact."""

import json
import shutil

import pytest
import torch

from library.errors import ModelError
from library.models import load_sd_model
from tests.models.tiny import assert_same_weights, make_tiny, unet_inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    tinies = {kind: make_tiny(kind) for kind in ("sd1", "sdxl")}
    folders = {kind: tiny.save_pipeline(root / kind) for kind, tiny in tinies.items()}
    return tinies, folders


def test_sd1_folder_round_trip(saved):
    tinies, folders = saved
    tiny, model = tinies["sd1"], load_sd_model(folders["sd1"])
    assert model.model_type == "sd1" and model.source == str(folders["sd1"])
    assert not model.v_parameterization and model.scheduler_config["prediction_type"] == "epsilon"
    assert_same_weights(tiny.text_encoders[0], model.text_encoders[0])
    assert_same_weights(tiny.vae, model.vae)
    assert_same_weights(tiny.unet, model.unet)
    assert model.tokenizers[0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sdxl_folder_round_trip_with_two_text_encoders(saved):
    tinies, folders = saved
    tiny, model = tinies["sdxl"], load_sd_model(folders["sdxl"], sdxl=True)
    assert model.model_type == "sdxl"
    assert [type(te).__name__ for te in model.text_encoders] == [
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
    ]
    for expected, actual in zip(tiny.text_encoders, model.text_encoders, strict=True):
        assert_same_weights(expected, actual)
    assert_same_weights(tiny.unet, model.unet)
    assert [t.pad_token_id for t in model.tokenizers] == [49407, 0]
    with torch.no_grad():
        assert torch.equal(tiny.unet(**unet_inputs(tiny)).sample, model.unet(**unet_inputs(model)).sample)


def test_v_prediction_scheduler_sets_v_parameterization(tmp_path):
    folder = make_tiny("sd1", prediction_type="v_prediction").save_pipeline(tmp_path / "v")
    model = load_sd_model(folder)
    assert model.v_parameterization and model.scheduler_config["prediction_type"] == "v_prediction"


def test_folder_without_model_index_is_refused(saved, tmp_path):
    _, folders = saved
    broken = shutil.copytree(folders["sd1"], tmp_path / "broken")
    (broken / "model_index.json").unlink()
    with pytest.raises(ModelError, match="model_index.json"):
        load_sd_model(broken)


def test_flags_must_match_the_folder_family(saved):
    _, folders = saved
    with pytest.raises(ModelError, match=r"is an SDXL model .* use sdxl_train_network.py \(or --sdxl\)"):
        load_sd_model(folders["sdxl"])
    with pytest.raises(ModelError, match=r"is an SD1 model .* select SD2"):
        load_sd_model(folders["sd1"], v2=True)


def test_sd2_is_told_from_sd1_by_cross_attention_width(saved, tmp_path):
    _, folders = saved
    folder = shutil.copytree(folders["sd1"], tmp_path / "sd2ish")
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["cross_attention_dim"] = 1024
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"is an SD2 model \(UNet cross_attention_dim 1024\)"):
        load_sd_model(folder)


def test_corrupt_component_weights_name_the_component(saved, tmp_path):
    _, folders = saved
    folder = shutil.copytree(folders["sd1"], tmp_path / "corrupt")
    (weights,) = (folder / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="unet"):
        load_sd_model(folder)
