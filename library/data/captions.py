"""Caption files and per-step caption processing (shuffle, keep_tokens, dropout), as sd-scripts does it.

Randomness comes from an explicit generator derived from (seed, epoch, index), never from the global RNG, so a
run is reproducible and a resumed run sees the same captions as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.errors import DatasetError

AUTO_EXTENSIONS = (".caption", ".txt")

# Independent random streams per sample, so turning one augmentation on does not change another's draws.
STREAM_CAPTION, STREAM_FLIP, STREAM_CROP = 0, 1, 2


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """Generator for one sample of one epoch; SeedSequence mixes the integers, so neighbours are uncorrelated."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch, index, stream])


def find_caption_file(image: Path, extension: str | None) -> Path | None:
    """`<stem><extension>` next to the image; with no extension given: `.caption`, else `.txt`."""
    for ext in (extension,) if extension else AUTO_EXTENSIONS:
        candidate = image.parent / (image.stem + ext)
        if candidate.is_file():
            return candidate
    return None


def read_caption(path: Path) -> str:
    """First non-empty line of a UTF-8 caption file (a BOM is fine); DatasetError naming the file otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"caption file {path} cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"caption file {path} is not valid UTF-8 (byte {data[exc.start]:#04x} at offset "
                           f"{exc.start}); re-save it as UTF-8") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


@dataclass(frozen=True)
class CaptionOptions:
    """The caption-related settings of one subset."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str | None = None
    caption_suffix: str | None = None


def add_prefix_suffix(caption: str, opts: CaptionOptions) -> str:
    """sd-scripts joins prefix/suffix with a space: `caption_prefix = "zkw,"` gives "zkw, <caption>"."""
    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}" if caption else opts.caption_prefix
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}" if caption else opts.caption_suffix
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, ", ")
    return caption


def process_caption(caption: str, opts: CaptionOptions, rng: np.random.Generator, epoch: int) -> str:
    """The caption one sample trains on this epoch: whole-caption dropout, tag shuffle and tag dropout."""
    if opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0:
        return ""
    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return ""
    sep = opts.keep_tokens_separator
    if opts.shuffle_caption or opts.caption_tag_dropout_rate > 0 or (sep and sep in caption):
        head, flex, tail = _split_tags(caption, opts)
        if opts.shuffle_caption and len(flex) > 1:
            flex = [flex[i] for i in rng.permutation(len(flex))]
        if opts.caption_tag_dropout_rate > 0:
            keep = rng.random(len(flex)) >= opts.caption_tag_dropout_rate
            flex = [t for t, k in zip(flex, keep, strict=True) if k]
        caption = ", ".join(head + flex + tail)
    return add_prefix_suffix(caption, opts)


def static_caption(caption: str, opts: CaptionOptions) -> str:
    """The caption without the random parts (for cached text-encoder outputs and sample prompts)."""
    sep = opts.keep_tokens_separator
    if sep and sep in caption:
        caption = ", ".join(sum(_split_tags(caption, opts), []))
    return add_prefix_suffix(caption, opts)


def _split_tags(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, shufflable middle, fixed tail). `keep_tokens_separator` ("a, b ||| c, d ||| e") marks the
    fixed parts explicitly; otherwise the first `keep_tokens` tags are fixed. The secondary separator keeps
    tags together through the shuffle: it is replaced only afterwards."""

    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    sep = opts.keep_tokens_separator
    if sep and sep in caption:
        parts = caption.split(sep, 2)
        head, flex = tags(parts[0]), tags(parts[1])
        tail = tags(parts[2]) if len(parts) > 2 else []
        return head, flex, tail
    all_tags = tags(caption)
    return all_tags[: opts.keep_tokens], all_tags[opts.keep_tokens:], []


def tag_frequency(captions: Iterable[str], secondary_separator: str = "") -> dict[str, int]:
    """Tag counts as sd-scripts writes them to `ss_tag_frequency` (parentheses stripped)."""
    counts: dict[str, int] = {}
    for caption in captions:
        if secondary_separator:
            caption = caption.replace(secondary_separator, ",")
        for tag in caption.split(","):
            tag = tag.strip().replace("(", "").replace(")", "")
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
