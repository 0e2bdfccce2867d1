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


def encode_sdxl(tokenizers, text_encoders, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = []
    pooled = None
    for tok, enc in zip(tokenizers, text_encoders, strict=True):
        out = enc(tokenize(tok, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(hidden, dim=-1), pooled


def encode_prompts(model, captions: list[str], clip_skip: int | None, device) -> Conditioning:
    """Text conditioning only; SDXL's time ids depend on each image and are added per batch (`sdxl_time_ids`)."""
    if model.model_type == "sdxl":
        hidden, pooled = encode_sdxl(model.tokenizers, model.text_encoders, captions, device)
        return Conditioning(hidden, {"text_embeds": pooled})
    return Conditioning(encode_sd(model.tokenizers[0], model.text_encoders[0], captions, clip_skip, device))
