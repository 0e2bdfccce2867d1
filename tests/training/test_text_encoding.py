"""Long captions (--max_token_length 150/225) and emphasis (--weighted_captions) against sd-scripts' definition.

The references below are written from sd-scripts' tokenize/encode strategies: a caption tokenized to n*75 + 2
positions is cut into n chunks `BOS + 75 positions + the final position`; where the tokenizer pads with something
other than EOS (SD2, SDXL's second), a chunk ending on a word ends with EOS and an empty chunk starts `BOS EOS`.
Each chunk is encoded on its own; the output keeps the first chunk's BOS, every chunk's 75 middle positions and the
last chunk's final position. SDXL's pooled embedding is the projected final state at the first chunk's first EOS.
Emphasis multiplies each position's output by its weight, nothing else (sd-scripts' train_network).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.models.clip_tokenizer import load_clip_tokenizer
from library.models.common import sd_tokenizers
from library.training import conditioning
from library.training.prompt_tokens import input_ids, parse_prompt_attention, weighted_input_ids

BOS, EOS = 49406, 49407
WORDS = ["red", "blue", "cat", "dog", "tree", "house", "sky", "car"]
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(200))  # 200 one-token words


@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def tok_pad0():
    return load_clip_tokenizer(pad_token="!")


def _clip(cls, hidden: int, seed: int, projection: int = 32):
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                            num_attention_heads=4, hidden_act="quick_gelu", projection_dim=projection)
    torch.manual_seed(seed)
    return cls(config).double().eval()


@pytest.fixture(scope="module")
def te():
    return _clip(CLIPTextModel, 32, 0)


@pytest.fixture(scope="module")
def te2():
    return _clip(CLIPTextModelWithProjection, 64, 1, projection=48)


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids[1:-1]


def _row(*parts, fill: int) -> list[int]:
    row = [x for p in parts for x in (p if isinstance(p, list) else [p])]
    return row + [fill] * (77 - len(row))


def _joined(per_chunk: list[torch.Tensor]) -> torch.Tensor:
    """sd-scripts' re-assembly: first chunk's BOS, 75 middle positions of each chunk, last chunk's final position."""
    return torch.cat([per_chunk[0][:1]] + [c[1:76] for c in per_chunk] + [per_chunk[-1][76:]])


# ------------------------------------------------------------------------------------------ input ids
def test_200_token_caption_chunks_at_150_and_225(tok, tok_pad0):
    t = _tokens(tok, LONG)
    assert len(t) == 200
    v1_225 = [_row(BOS, t[:75], EOS, fill=EOS), _row(BOS, t[75:150], EOS, fill=EOS), _row(BOS, t[150:], EOS, fill=EOS)]
    pad0_225 = v1_225[:2] + [_row(BOS, t[150:], EOS, fill=0)]
    assert input_ids(tok, LONG, 225).tolist() == v1_225
    assert input_ids(tok_pad0, LONG, 225).tolist() == pad0_225
    assert input_ids(tok, LONG, 150).tolist() == v1_225[:2]  # truncated to 150 tokens, the end token kept
    assert input_ids(tok_pad0, LONG, 150).tolist() == v1_225[:2]
    assert input_ids(tok, LONG).tolist() == [_row(BOS, t[:75], EOS, fill=EOS)]


def test_short_caption_chunks_get_sd_scripts_end_token_fixups(tok, tok_pad0):
    t = _tokens(tok, "red cat")
    assert input_ids(tok_pad0, "red cat", 225).tolist() == [_row(BOS, t, EOS, fill=0), _row(BOS, EOS, fill=0),
                                                            _row(BOS, EOS, fill=0)]
    assert input_ids(tok, "red cat", 150).tolist() == [_row(BOS, t, EOS, fill=EOS), _row(BOS, fill=EOS)]
    t75 = _tokens(tok, " ".join(WORDS[i % 8] for i in range(75)))
    ids = input_ids(tok_pad0, " ".join(WORDS[i % 8] for i in range(75)), 150).tolist()
    assert ids == [_row(BOS, t75, EOS, fill=0), _row(BOS, EOS, fill=0)]  # the word-ending chunk is closed with EOS


def test_sd2_tokenizer_pads_with_zero_as_sd_scripts():
    assert [t.pad_token_id for t in sd_tokenizers("sd2")] == [0]
    assert [t.pad_token_id for t in sd_tokenizers("sd1")] == [EOS]
    assert [t.pad_token_id for t in sd_tokenizers("sdxl")] == [EOS, 0]


def test_prompt_attention_parses_like_sd_scripts():
    # the example of sd-scripts' (and A1111's) docstring, with its float values
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_prompt_attention("[a] b: c") == [("a", 1 / 1.1), (" b: c", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]


# ------------------------------------------------------------------------------------------ SD encoder
@pytest.mark.parametrize("length, clip_skip, pad0", [(150, None, False), (225, 2, False), (225, None, True)])
@torch.no_grad()
def test_sd_encoder_output_is_the_chunks_joined(te, tok, tok_pad0, length, clip_skip, pad0):
    tokenizer = tok_pad0 if pad0 else tok
    captions = [LONG, "red cat"]
    got = conditioning.encode_sd(tokenizer, te, captions, clip_skip, "cpu", max_token_length=length)
    assert got.shape == (2, length + 2, 32)
    for row, caption in zip(got, captions, strict=True):
        chunks = input_ids(tokenizer, caption, length)
        outs = []
        for chunk in chunks:
            out = te(chunk.unsqueeze(0), output_hidden_states=True)
            state = out.last_hidden_state if not clip_skip else \
                getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-2])
            outs.append(state[0])
        torch.testing.assert_close(row, _joined(outs), rtol=0, atol=1e-12)


WEIGHTED = "a (red:1.5) cat, [dog] " + " ".join(WORDS[i % 8] for i in range(90)) + " ((tree)) " + " ".join(
    WORDS[i % 8] for i in range(60))
SEGMENTS = [("a ", 1.0), ("red", 1.5), (" cat, ", 1.0), ("dog", 1 / 1.1),
            (" " + " ".join(WORDS[i % 8] for i in range(90)) + " ", 1.0), ("tree", 1.1 * 1.1),
            (" " + " ".join(WORDS[i % 8] for i in range(60)), 1.0)]


def _weighted_reference(tokenizer, length: int):
    """(chunks, per-position weights [n, 77]) written out: each run tokenized alone, truncated to `length` tokens."""
    tokens, weights = [], []
    for text, weight in SEGMENTS:
        piece = _tokens(tokenizer, text)
        tokens += piece
        weights += [weight] * len(piece)
    tokens, weights = tokens[:length], weights[:length]
    n = max(1, length // 75)
    ids = [BOS, *tokens, EOS] + [tokenizer.pad_token_id] * (length - len(tokens))
    w = [1.0, *weights] + [1.0] * (length + 1 - len(weights))
    chunks = [[BOS, *ids[1 + 75 * c:76 + 75 * c], ids[-1]] for c in range(n)]
    for chunk in chunks:
        if tokenizer.pad_token_id != EOS and chunk[-2] not in (EOS, tokenizer.pad_token_id):
            chunk[-1] = EOS
    return torch.tensor(chunks), torch.tensor([[1.0, *w[1 + 75 * c:76 + 75 * c], 1.0] for c in range(n)])


@pytest.mark.parametrize("length", [None, 150])
@torch.no_grad()
def test_weighted_caption_scales_each_positions_output(te, tok, length):
    chunks, weights = _weighted_reference(tok, length or 75)
    ids, w = weighted_input_ids(tok, WEIGHTED, length)
    assert ids.tolist() == chunks.tolist()
    torch.testing.assert_close(w, weights.float(), rtol=0, atol=0)
    assert sorted({round(x, 6) for x in w.flatten().tolist()}) == ([0.909091, 1.0, 1.21, 1.5] if length else
                                                                   [0.909091, 1.0, 1.5])  # "tree" is token 97
    got = conditioning.encode_sd(tok, te, [WEIGHTED], None, "cpu", max_token_length=length, weighted=True)[0]
    plain = [te(c.unsqueeze(0)).last_hidden_state[0] for c in chunks]
    expected = _joined(plain) * _joined([x.double() for x in weights]).unsqueeze(-1) if length else \
        plain[0] * weights[0].double().unsqueeze(-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # no mean-restoring rescale


# ------------------------------------------------------------------------------------------ SDXL encoders
@pytest.mark.parametrize("length", [None, 150, 225])
@torch.no_grad()
def test_sdxl_hidden_states_and_pooled_from_first_chunks_eos(te, te2, tok, tok_pad0, length):
    model = SimpleNamespace(model_type="sdxl", tokenizers=[tok, tok_pad0], text_encoders=[te, te2])
    captions = [LONG, "red cat"]
    cond = conditioning.encode_prompts(model, captions, None, "cpu", max_token_length=length)
    n_pos = (length or 75) + 2
    assert cond.encoder_hidden_states.shape == (2, n_pos, 32 + 64)
    for b, caption in enumerate(captions):
        parts = []
        for tokenizer, encoder in ((tok, te), (tok_pad0, te2)):
            chunks = input_ids(tokenizer, caption, length)
            parts.append(_joined([encoder(c.unsqueeze(0), output_hidden_states=True).hidden_states[-2][0]
                                  for c in chunks]))
        torch.testing.assert_close(cond.encoder_hidden_states[b], torch.cat(parts, -1), rtol=0, atol=1e-12)
        first = input_ids(tok_pad0, caption, length)[0]
        eos_at = 76 if caption == LONG else 3  # a long caption's first chunk is closed with EOS at the end
        assert first[eos_at] == EOS and (first[:eos_at] != EOS).all()
        final = te2(first.unsqueeze(0)).last_hidden_state[0, eos_at]
        torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"][b], te2.text_projection(final),
                                   rtol=0, atol=1e-12)


@torch.no_grad()
def test_sdxl_weighted_captions_scale_both_encoders_but_not_pooled(te, te2, tok, tok_pad0):
    model = SimpleNamespace(model_type="sdxl", tokenizers=[tok, tok_pad0], text_encoders=[te, te2])
    weighted = conditioning.encode_prompts(model, [WEIGHTED], None, "cpu", max_token_length=150, weighted=True)
    plain_text = "".join(text for text, _ in SEGMENTS)
    _, weights = _weighted_reference(tok, 150)
    scale = _joined([w.double() for w in weights]).unsqueeze(-1)
    parts = []
    for tokenizer, encoder in ((tok, te), (tok_pad0, te2)):
        chunks, _ = _weighted_reference(tokenizer, 150)
        parts.append(_joined([encoder(c.unsqueeze(0), output_hidden_states=True).hidden_states[-2][0]
                              for c in chunks]) * scale)
    torch.testing.assert_close(weighted.encoder_hidden_states[0], torch.cat(parts, -1), rtol=0, atol=1e-12)
    plain = conditioning.encode_prompts(model, [plain_text], None, "cpu", max_token_length=150)
    torch.testing.assert_close(weighted.added_cond_kwargs["text_embeds"], plain.added_cond_kwargs["text_embeds"])
