"""The bundled CLIP BPE tokenizer (derived from open_clip's MIT-licensed vocabulary; see tokenizer/clip/LICENSE).

Every SD text encoder (CLIP ViT-L, OpenCLIP ViT-H and ViT-bigG) uses this same 49,408-token vocabulary, so one
copy serves SD1, SD2 and both SDXL tokenizers. The OpenCLIP encoders (SD2's, SDXL's second) pad with `!` (id 0),
as sd-scripts' SD2 and SDXL tokenizers do; CLIP ViT-L (SD1, SDXL's first) pads with the end token.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer" / "clip"
OPEN_CLIP_PAD = "!"
SDXL_TOKENIZER_2_PAD = OPEN_CLIP_PAD


def load_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Load the bundled tokenizer; `pad_token="!"` gives SDXL's second tokenizer (OpenCLIP pads with 0)."""
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad_token, local_files_only=True)
