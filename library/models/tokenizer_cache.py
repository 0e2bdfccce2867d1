"""`--tokenizer_cache_dir`: tokenizers read from, or saved to, a folder, under sd-scripts' folder names.

sd-scripts names each tokenizer's folder after its Hugging Face id with `/` -> `_`; a cache folder written by
sd-scripts therefore serves loraforge and the other way round. A folder that holds the tokenizer is used as is
(a customised tokenizer included); a missing one is written from the tokenizer the model loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import CLIPTokenizer

from library.errors import ModelError
from library.models.clip_tokenizer import SDXL_TOKENIZER_2_PAD
from library.models.common import first_line

logger = logging.getLogger("loraforge")

CACHE_NAMES = {
    "sd1": ("openai_clip-vit-large-patch14",),
    "sd2": ("stabilityai_stable-diffusion-2",),
    "sdxl": ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"),
}


def use_tokenizer_cache(model_type: str, tokenizers: list[CLIPTokenizer], folder: str | Path) -> list[CLIPTokenizer]:
    """The tokenizers to train with: each from its cache folder when present, else the given one saved there."""
    out = []
    for i, (name, tokenizer) in enumerate(zip(CACHE_NAMES[model_type], tokenizers, strict=True)):
        local = Path(folder) / name
        if local.exists():
            # SDXL's second tokenizer pads with "!" (id 0) as OpenCLIP does, whatever the cached files say
            pad = {"pad_token": SDXL_TOKENIZER_2_PAD} if model_type == "sdxl" and i == 1 else {}
            try:
                tokenizer = CLIPTokenizer.from_pretrained(local, local_files_only=True, **pad)
            except Exception as exc:  # OSError, bad JSON: the folder is not a tokenizer
                raise ModelError(f"--tokenizer_cache_dir {local}: not a CLIP tokenizer folder ({first_line(exc)}); "
                                 "remove it to have it written again") from exc
            logger.info("tokenizer from cache: %s", local)
        else:
            try:
                tokenizer.save_pretrained(local)
            except OSError as exc:
                raise ModelError(f"--tokenizer_cache_dir {local}: cannot write ({exc.strerror or exc})") from exc
            logger.info("tokenizer saved to cache: %s", local)
        out.append(tokenizer)
    return out
