"""Sample prompts are encoded as sd-scripts' sampling pipelines encode them.

SD1/SD2 reference, from sd-scripts' long-prompt-weighting pipeline: prompt and negative are tokenized per emphasis
run, padded with the end token to n*75 + 2 positions (n = chunks the longer needs, at most 3); chunk c is positions
75c .. 75c+76 with BOS first and the end token last, encoded whole (77 outputs each, concatenated); each position's
output is multiplied by its weight (1 at every chunk's BOS and end) and the result rescaled to the unweighted mean.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from library.models.clip_tokenizer import load_clip_tokenizer
from library.training import conditioning, sampling
from library.training.sample_embeddings import pipeline_embeddings, sd_prompt_embeddings

BOS, EOS = 49406, 49407
FILLER = " ".join(["red", "blue", "cat", "dog", "tree"] * 20)  # 100 one-token words
PROMPT = "(masterpiece:1.3), " + FILLER + " [blurry]"


@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def te():
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = CLIPTextModel(config).double().eval()
    with torch.no_grad():  # a random init's final LayerNorm has zero bias: its mean output would be ~0, the rescale noise
        getattr(model, "text_model", model).final_layer_norm.bias.normal_(0.3, 0.2)
    return model


def _tokens(tok, text):
    return tok(text).input_ids[1:-1]


@torch.no_grad()
def test_sd_sample_prompt_long_weighted_and_mean_restored(tok, te):
    runs = [("masterpiece", 1.3), (", " + FILLER + " ", 1.0), ("blurry", 1 / 1.1)]
    tokens, weights = [], []
    for text, w in runs:
        piece = _tokens(tok, text)
        tokens += piece
        weights += [w] * len(piece)
    assert len(tokens) == 103  # -> 2 chunks
    ids = [BOS, *tokens] + [EOS] * (151 - len(tokens))
    neg_ids = [BOS] + [EOS] * 151
    chunks = [[BOS, *row[1:76], EOS] for row in (ids, neg_ids)] + [[BOS, *row[76:151], EOS] for row in (ids, neg_ids)]
    assert chunks[0][:3] == [BOS, tokens[0], tokens[1]] and chunks[2][1] == tokens[75]
    chunks_t = torch.tensor(chunks)
    out = te(chunks_t).last_hidden_state
    plain = torch.cat([out[0:2], out[2:4]], dim=1)  # [prompt, negative] x 154 positions
    w = torch.ones(2, 154, dtype=torch.float64)
    w[0, 1:76] = torch.tensor(weights[:75])
    w[0, 78:78 + 28] = torch.tensor(weights[75:])
    weighted = plain * w.unsqueeze(-1)
    mean = lambda x: x.float().mean(dim=[1, 2]).double()  # noqa: E731 - sd-scripts takes the means in float32
    expected = weighted * (mean(plain) / mean(weighted))[:, None, None]

    got = sd_prompt_embeddings(tok, te, [PROMPT, ""], None, "cpu")
    assert got.shape == (2, 154, 32)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)  # float32 means: 1-ulp summation order
    torch.testing.assert_close(got.mean(dim=[1, 2]), plain.mean(dim=[1, 2]), rtol=1e-6, atol=0)  # mean kept
    short = sd_prompt_embeddings(tok, te, ["a cat", ""], None, "cpu")
    assert short.shape == (2, 77, 32)  # one chunk when both fit


@torch.no_grad()
def test_sample_images_from_long_weighted_prompts(tok):
    from library.models import load_sd_model

    model = load_sd_model("builtin:tiny-sd")
    sp = sampling.SamplePrompt(prompt=PROMPT, negative="(ugly:1.2)", width=64, height=64, steps=2, scale=5.0, seed=1)
    embeds = pipeline_embeddings(model, sp.prompt, sp.negative, guidance=True, clip_skip=2, max_token_length=None,
                                 device="cpu")
    assert embeds["prompt_embeds"].shape == embeds["negative_prompt_embeds"].shape == (1, 154, 32)
    assert set(pipeline_embeddings(model, "a", "", guidance=False, clip_skip=None, max_token_length=None,
                                   device="cpu")) == {"prompt_embeds"}
    images = sampling.generate(model, [sp, sampling.SamplePrompt("a cat", width=64, height=64, steps=2, scale=1.0)],
                               "euler_a", model.scheduler_config, "cpu", 0, clip_skip=2)
    assert [im.size for im in images] == [(64, 64), (64, 64)]


@torch.no_grad()
def test_sdxl_sample_prompts_use_the_training_encoding_with_the_negative_encoded():
    from tests.models.tiny import make_tiny

    tiny = make_tiny("sdxl")
    model = SimpleNamespace(model_type="sdxl", tokenizers=[load_clip_tokenizer(), load_clip_tokenizer(pad_token="!")],
                            text_encoders=tiny.text_encoders, vae=tiny.vae, unet=tiny.unet)
    embeds = pipeline_embeddings(model, PROMPT, "", guidance=True, clip_skip=None, max_token_length=150, device="cpu")
    expected = conditioning.encode_prompts(model, [PROMPT, ""], None, "cpu", max_token_length=150, weighted=True)
    torch.testing.assert_close(embeds["prompt_embeds"], expected.encoder_hidden_states[:1])
    torch.testing.assert_close(embeds["negative_prompt_embeds"], expected.encoder_hidden_states[1:])
    torch.testing.assert_close(embeds["negative_pooled_prompt_embeds"], expected.added_cond_kwargs["text_embeds"][1:])
    assert embeds["negative_prompt_embeds"].abs().sum() > 0  # "" is encoded, not zeroed
    scheduler_config = dict(tiny.scheduler.config)
    images = sampling.generate(model, [sampling.SamplePrompt(PROMPT, width=64, height=64, steps=2, scale=4.0)],
                               "ddim", scheduler_config, "cpu", 0, max_token_length=150)
    assert images[0].size == (64, 64)
