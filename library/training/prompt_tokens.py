"""Caption -> CLIP input ids in 77-token chunks, with optional per-token emphasis weights, as sd-scripts makes them.

CLIP reads 77 positions (BOS, 75 tokens, EOS). With `--max_token_length 150|225` sd-scripts tokenizes to 152/227
positions and cuts them into 2/3 chunks, each `BOS + 75 tokens + last position`, encoded separately; the encoder
outputs are joined back (`join_chunks`). For tokenizers that pad with something other than EOS (SD2, SDXL's second)
a chunk that ends on a word gets EOS as its last position, and an empty chunk `BOS PAD ...` becomes `BOS EOS PAD ...`.

Emphasis (`--weighted_captions`) follows the A1111 syntax sd-scripts parses: `(x)` x1.1, `[x]` /1.1, `(x:1.3)`,
nesting multiplies, `\\(` etc. are literal brackets.
"""

from __future__ import annotations

import re

import torch

ROUND, SQUARE = 1.1, 1 / 1.1

_ATTENTION_TOKEN = re.compile(
    r"\\[()\[\]\\]"             # escaped bracket or backslash: literal
    r"|\\"                      # lone backslash
    r"|[(\[]"                   # opening bracket
    r"|:([+-]?[.\d]+)\)"        # ":1.3)": closes a round bracket with that weight
    r"|[)\]]"                   # closing bracket
    r"|[^\\()\[\]:]+"           # plain text
    r"|:"                       # a colon that is not a weight
)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] runs of a caption; neighbouring runs of equal weight are merged."""
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:
            runs.append([token, 1.0])
    for start in open_round:  # unclosed brackets still count
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)
    if not runs:
        runs = [["", 1.0]]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def total_length(tokenizer, max_token_length: int | None) -> int:
    """Positions of the whole tokenized caption: 77, or 152 / 227 with --max_token_length 150 / 225."""
    return tokenizer.model_max_length if max_token_length is None else max_token_length + 2


def input_ids(tokenizer, caption: str, max_token_length: int | None = None) -> torch.Tensor:
    """LongTensor[n_chunks, 77] for one caption."""
    length = total_length(tokenizer, max_token_length)
    ids = tokenizer(caption, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids[0]
    return _chunks(tokenizer, ids) if length > tokenizer.model_max_length else ids.unsqueeze(0)


def weighted_input_ids(tokenizer, caption: str, max_token_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(LongTensor[n_chunks, 77], FloatTensor[n_chunks, 77]): ids of the emphasis-stripped caption and each
    position's weight (1 for BOS/EOS/padding). Each bracketed run is tokenized on its own, as sd-scripts does."""
    length = total_length(tokenizer, max_token_length)
    tokens: list[int] = []
    weights: list[float] = []
    for text, weight in parse_prompt_attention(caption):
        piece = tokenizer(text, verbose=False).input_ids[1:-1]  # long runs are cut below, not by CLIP
        tokens += piece
        weights += [weight] * len(piece)
        if len(tokens) > length - 2:
            break
    tokens, weights = tokens[:length - 2], weights[:length - 2]
    pad = length - 2 - len(tokens)
    ids = torch.tensor([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
    w = torch.tensor([1.0, *weights] + [1.0] * (pad + 1))
    if length <= tokenizer.model_max_length:
        return ids.unsqueeze(0), w.unsqueeze(0)
    chunked_w = torch.ones(len(_starts(tokenizer, length)), tokenizer.model_max_length)
    for c, start in enumerate(_starts(tokenizer, length)):
        chunked_w[c, 1:-1] = w[start:start + tokenizer.model_max_length - 2]
    return _chunks(tokenizer, ids), chunked_w


def _starts(tokenizer, length: int) -> range:
    body = tokenizer.model_max_length - 2
    return range(1, length - tokenizer.model_max_length + 2, body)


def _chunks(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    body = tokenizer.model_max_length - 2
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in _starts(tokenizer, len(ids)):
        chunk = torch.cat([ids[:1], ids[start:start + body], ids[-1:]])
        if pad != eos:
            if chunk[-2] != eos and chunk[-2] != pad:  # ends on a word: close it
                chunk[-1] = eos
            if chunk[1] == pad:  # nothing left for this chunk: BOS EOS PAD ...
                chunk[1] = eos
        chunks.append(chunk)
    return torch.stack(chunks)


def join_chunks(per_chunk: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """[B*n, 77, ...] encoder outputs (or weights) -> [B, n*75 + 2, ...]: the first chunk's BOS, every chunk's 75
    middle positions, the last chunk's last position. One chunk stays [B, 77, ...]."""
    length = per_chunk.shape[1]
    flat = per_chunk.reshape(per_chunk.shape[0] // n_chunks, n_chunks * length, *per_chunk.shape[2:])
    if n_chunks == 1:
        return flat
    parts = [flat[:, :1]] + [flat[:, s:s + length - 2] for s in range(1, n_chunks * length, length)] + [flat[:, -1:]]
    return torch.cat(parts, dim=1)
