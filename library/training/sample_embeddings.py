"""Text embeddings of sample prompts, as sd-scripts' sampling pipelines make them.

SD1/SD2 (sd-scripts' long-prompt-weighting pipeline): prompts up to 225 tokens whatever `--max_token_length` is,
`(word:1.3)` emphasis, every 77-position chunk kept whole (BOS and end included), and the weighted embedding scaled
back to its unweighted mean. The prompt and its negative share one chunk count. SDXL samples are encoded like its
training captions (`--max_token_length`, emphasis without renormalisation) with the negative prompt, or "", encoded
rather than zeroed.
"""

from __future__ import annotations

import torch

from library.training import conditioning
from library.training.prompt_tokens import parse_prompt_attention

MAX_CHUNKS = 3


def _weighted_tokens(tokenizer, text: str, limit: int) -> tuple[list[int], list[float]]:
    tokens: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(text):
        ids = tokenizer(piece, verbose=False).input_ids[1:-1]
        tokens += ids
        weights += [weight] * len(ids)
        if len(tokens) > limit:
            break
    return tokens[:limit], weights[:limit]


def _chunk_weights(weights: list[float], n_chunks: int, body: int) -> list[float]:
    """Per position of the n whole chunks: 1 at each chunk's BOS and end, the tokens' weights between."""
    if not weights:
        return [1.0] * n_chunks * (body + 2)
    out: list[float] = []
    for c in range(n_chunks):
        out += [1.0, *weights[c * body:(c + 1) * body], 1.0]
    return out + [1.0] * (n_chunks * (body + 2) - len(out))


def _encode_whole_chunks(text_encoder, ids: torch.Tensor, n_chunks: int, body: int, eos: int, pad: int,
                         clip_skip: int | None) -> torch.Tensor:
    def encode(chunk: torch.Tensor) -> torch.Tensor:
        if clip_skip is None or clip_skip == 1:
            return text_encoder(chunk)[0]
        out = text_encoder(chunk, output_hidden_states=True)
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out.hidden_states[-clip_skip])

    if n_chunks == 1:
        return encode(ids)
    parts = []
    for c in range(n_chunks):
        chunk = ids[:, c * body:(c + 1) * body + 2].clone()
        chunk[:, 0] = ids[0, 0]
        if pad == eos:
            chunk[:, -1] = ids[0, -1]
        else:
            for row in chunk:
                if row[-1] != eos and row[-1] != pad:
                    row[-1] = eos
                if row[1] == pad:
                    row[1] = eos
        parts.append(encode(chunk))
    return torch.cat(parts, dim=1)


def sd_prompt_embeddings(tokenizer, text_encoder, prompts: list[str], clip_skip: int | None,
                         device) -> torch.Tensor:
    """[len(prompts), n*77, dim] for SD1/SD2 sampling; n = the chunks the longest prompt needs, at most 3."""
    body = tokenizer.model_max_length - 2
    parsed = [_weighted_tokens(tokenizer, p, body * MAX_CHUNKS) for p in prompts]
    longest = max(len(tokens) for tokens, _ in parsed)
    n_chunks = max(1, min(MAX_CHUNKS, (longest - 1) // body + 1))
    length = body * n_chunks + 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.tensor([[bos, *t] + [eos] * (length - 1 - len(t)) for t, _ in parsed], device=device)
    hidden = _encode_whole_chunks(text_encoder, ids, n_chunks, body, eos, tokenizer.pad_token_id, clip_skip)
    weights = torch.tensor([_chunk_weights(w, n_chunks, body) for _, w in parsed], dtype=hidden.dtype,
                           device=hidden.device)
    before = hidden.float().mean(dim=[-2, -1]).to(hidden.dtype)
    hidden = hidden * weights.unsqueeze(-1)
    after = hidden.float().mean(dim=[-2, -1]).to(hidden.dtype)
    return hidden * (before / after)[:, None, None]


def pipeline_embeddings(model, prompt: str, negative: str, *, guidance: bool, clip_skip: int | None,
                        max_token_length: int | None, device) -> dict[str, torch.Tensor]:
    """The `prompt_embeds` keyword arguments of a diffusers SD / SDXL pipeline for one sample prompt; the negative
    prompt only with classifier-free guidance (scale > 1), as sd-scripts encodes it."""
    texts = [prompt, negative] if guidance else [prompt]
    if model.model_type == "sdxl":
        cond = conditioning.encode_prompts(model, texts, None, device, max_token_length=max_token_length, weighted=True)
        hidden, pooled = cond.encoder_hidden_states, cond.added_cond_kwargs["text_embeds"]
        out = {"prompt_embeds": hidden[:1], "pooled_prompt_embeds": pooled[:1]}
        if guidance:
            out.update(negative_prompt_embeds=hidden[1:], negative_pooled_prompt_embeds=pooled[1:])
        return out
    hidden = sd_prompt_embeddings(model.tokenizers[0], model.text_encoders[0], texts, clip_skip, device)
    return {"prompt_embeds": hidden[:1], **({"negative_prompt_embeds": hidden[1:]} if guidance else {})}
