"""Text conditioning for SD1.x/2.x (one CLIP encoder) and SDXL (two encoders, pooled embedding, size/crop ids)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None  # SDXL: {"text_embeds": pooled, "time_ids": ...}

    def to(self, device, dtype=None) -> Conditioning:
        extra = None
        if self.added_cond_kwargs is not None:
            extra = {k: v.to(device, dtype) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states.to(device, dtype), extra)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_sd(tokenizer, text_encoder, captions: list[str], clip_skip: int | None, device) -> torch.Tensor:
    ids = tokenize(tokenizer, captions).to(device)
    if not clip_skip or clip_skip <= 1:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    # transformers 5 flattened CLIPTextModel (no .text_model); CLIPTextModelWithProjection still has it
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def sdxl_time_ids(sizes: list[tuple[int, int]], device) -> torch.Tensor:
    """(original h, w, crop top, left, target h, w) per sample; we train on centre crops of resized images."""
    rows = [[h, w, 0, 0, h, w] for (w, h) in sizes]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def encode_sdxl(tokenizers, text_encoders, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = []
    pooled = None
    for tok, enc in zip(tokenizers, text_encoders, strict=True):
        out = enc(tokenize(tok, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(hidden, dim=-1), pooled


def encode_prompts(model, captions: list[str], sizes: list[tuple[int, int]], clip_skip: int | None, device) -> Conditioning:
    if model.model_type == "sdxl":
        hidden, pooled = encode_sdxl(model.tokenizers, model.text_encoders, captions, device)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": sdxl_time_ids(sizes, device)})
    return Conditioning(encode_sd(model.tokenizers[0], model.text_encoders[0], captions, clip_skip, device))
