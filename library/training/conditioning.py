"""Text conditioning for SD1.x/2.x (one CLIP encoder) and SDXL (two encoders, pooled embedding, size/crop ids)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.training import prompt_tokens


@dataclass
class Conditioning:
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None  # SDXL: {"text_embeds": pooled, "time_ids": ...}

    def to(self, device, dtype=None) -> Conditioning:
        extra = None
        if self.added_cond_kwargs is not None:
            extra = {k: v.to(device, dtype) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states.to(device, dtype), extra)


def token_batch(tokenizer, captions: list[str], max_token_length: int | None = None,
                weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids [B, n_chunks, 77], weights [B, n_chunks, 77] or None) of a batch of captions."""
    if weighted:
        pairs = [prompt_tokens.weighted_input_ids(tokenizer, c, max_token_length) for c in captions]
        return torch.stack([ids for ids, _ in pairs]), torch.stack([w for _, w in pairs])
    return torch.stack([prompt_tokens.input_ids(tokenizer, c, max_token_length) for c in captions]), None


def _emphasise(hidden: torch.Tensor, weights: torch.Tensor | None, n_chunks: int) -> torch.Tensor:
    """sd-scripts' --weighted_captions: each caption position's output times its weight (no renormalisation)."""
    if weights is None:
        return hidden
    per_position = prompt_tokens.join_chunks(weights.reshape(-1, weights.shape[-1]), n_chunks)
    return hidden * per_position.to(hidden.device).unsqueeze(-1)


def encode_sd(tokenizer, text_encoder, captions: list[str], clip_skip: int | None, device,
              max_token_length: int | None = None, weighted: bool = False) -> torch.Tensor:
    ids, weights = token_batch(tokenizer, captions, max_token_length, weighted)
    n_chunks = ids.shape[1]
    flat = ids.reshape(-1, ids.shape[-1]).to(device)
    if not clip_skip or clip_skip <= 1:
        hidden = text_encoder(flat)[0]
    else:
        out = text_encoder(flat, output_hidden_states=True)
        # transformers 5 flattened CLIPTextModel (no .text_model); CLIPTextModelWithProjection still has it
        hidden = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out.hidden_states[-clip_skip])
    return _emphasise(prompt_tokens.join_chunks(hidden, n_chunks), weights, n_chunks)


def eos_pooled(text_encoder, last_hidden: torch.Tensor, ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """SDXL's pooled text embedding as sd-scripts takes it: the projected final state at each row's first EOS
    (CLIP's own pooling picks the largest token id, which is not EOS for added tokens)."""
    eos = (ids == eos_token_id).int().argmax(dim=1).to(last_hidden.device)
    pooled = last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), eos]
    projection = text_encoder.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden.dtype)


def sdxl_time_ids(original_sizes: list[tuple[int, int]], crops_top_left: list[tuple[int, int]],
                  target_sizes: list[tuple[int, int]], device) -> torch.Tensor:
    """SDXL's size/crop micro-conditioning, one row per sample: (original h, w, crop top, left, target h, w).

    Sizes come as the dataset gives them, (W, H): the image file's size and the bucket; the crop as (top, left) in
    resized pixels. SDXL was trained on these, so telling it the real original size keeps small or cropped
    images from teaching it low-resolution or cut-off looks (the SDXL paper, section 2.2).
    """
    rows = [[oh, ow, top, left, th, tw]
            for (ow, oh), (top, left), (tw, th) in zip(original_sizes, crops_top_left, target_sizes, strict=True)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def encode_sdxl(tokenizers, text_encoders, captions: list[str], device, max_token_length: int | None = None,
                weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' penultimate states, chunk-joined and concatenated; the pooled embedding comes from the second
    encoder's first chunk, before any emphasis weights."""
    hidden = []
    pooled = None
    for tok, enc in zip(tokenizers, text_encoders, strict=True):
        ids, weights = token_batch(tok, captions, max_token_length, weighted)
        n_chunks = ids.shape[1]
        flat = ids.reshape(-1, ids.shape[-1]).to(device)
        out = enc(flat, output_hidden_states=True)
        if getattr(enc, "text_projection", None) is not None:
            pooled = eos_pooled(enc, out.last_hidden_state, flat, tok.eos_token_id)[::n_chunks]
        hidden.append(_emphasise(prompt_tokens.join_chunks(out.hidden_states[-2], n_chunks), weights, n_chunks))
    return torch.cat(hidden, dim=-1), pooled


def encode_prompts(model, captions: list[str], clip_skip: int | None, device, *, max_token_length: int | None = None,
                   weighted: bool = False) -> Conditioning:
    """Text conditioning only; SDXL's time ids depend on each image and are added per batch (`sdxl_time_ids`).
    `max_token_length` 150/225: long captions in 75-token chunks; `weighted`: `(word:1.3)` emphasis."""
    if model.model_type == "sdxl":
        hidden, pooled = encode_sdxl(model.tokenizers, model.text_encoders, captions, device, max_token_length, weighted)
        return Conditioning(hidden, {"text_embeds": pooled})
    return Conditioning(encode_sd(model.tokenizers[0], model.text_encoders[0], captions, clip_skip, device,
                                  max_token_length, weighted))
