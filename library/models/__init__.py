"""Base models: name/path -> SDModel (tokenizers, text encoders, VAE, UNet, DDPM config), fully offline."""

from library.models.builtin import BUILTIN_NAMES
from library.models.clip_tokenizer import load_clip_tokenizer
from library.models.common import SDModel
from library.models.loader import load_sd_model

__all__ = ["BUILTIN_NAMES", "SDModel", "load_clip_tokenizer", "load_sd_model"]
