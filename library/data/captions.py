"""Caption files and per-step caption processing, as sd-scripts' `process_caption` does it.

Order (sd-scripts'): prefix/suffix are joined on first (so the prefix counts toward `keep_tokens` and the suffix is
shuffled and can be dropped), then whole-caption dropout, wildcards (or the first line), tag split / token warm-up /
shuffle / tag dropout, and last the secondary separator. Randomness comes from an explicit generator derived from
(seed, epoch, index), never from the global RNG, so a run is reproducible and a resumed run sees the same captions
as an uninterrupted one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.errors import DatasetError

AUTO_EXTENSIONS = (".caption", ".txt")

# Independent random streams per sample, so turning one augmentation on does not change another's draws.
STREAM_CAPTION, STREAM_FLIP, STREAM_CROP = 0, 1, 2

_WILDCARD = re.compile(r"\{([^}]+)\}")


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


def read_caption(path: Path, enable_wildcard: bool = False) -> str:
    """The caption of a UTF-8 caption file (a BOM is fine), as sd-scripts reads it: the first line, stripped; with
    wildcards, every non-empty line (one is drawn per step). DatasetError naming the file otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"caption file {path} cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"caption file {path} is not valid UTF-8 (byte {data[exc.start]:#04x} at offset "
                           f"{exc.start}); re-save it as UTF-8") from None
    lines = text.splitlines()
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip() if lines else ""


@dataclass(frozen=True)
class CaptionOptions:
    """The caption-related settings of one subset (sd-scripts' names and defaults)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0

    @property
    def random(self) -> bool:
        """Whether the caption can change from one step to the next (then text-encoder outputs cannot be cached)."""
        return (self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_dropout_every_n_epochs > 0
                or self.caption_tag_dropout_rate > 0 or self.token_warmup_step > 0 or self.enable_wildcard)


@dataclass(frozen=True)
class CaptionStep:
    """Where training is when a sample is drawn: sd-scripts' 1-based epoch and the optimizer steps done so far."""

    epoch: int = 1
    step: int = 0
    max_train_steps: int = 0


def process_caption(caption: str, opts: CaptionOptions, rng: np.random.Generator, at: CaptionStep) -> str:
    """The caption one sample trains on at `at`."""
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    n = opts.caption_dropout_every_n_epochs
    if dropped or (n > 0 and at.epoch % n == 0):
        return ""
    caption = choose_wildcards(caption, rng) if opts.enable_wildcard else caption.split("\n")[0]
    warmup = warmup_steps(opts.token_warmup_step, at.max_train_steps)
    if opts.shuffle_caption or opts.token_warmup_step > 0 or opts.caption_tag_dropout_rate > 0:
        fixed, flex, tail = split_tags(caption, opts)
        if warmup and at.step < warmup:
            flex = flex[:math.floor(at.step * ((len(flex) - opts.token_warmup_min) / warmup)) + opts.token_warmup_min]
        if opts.shuffle_caption:
            flex = [flex[i] for i in rng.permutation(len(flex))]
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + tail)
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def warmup_steps(token_warmup_step: float, max_train_steps: int) -> float:
    """sd-scripts: below 1 the warm-up length is that fraction of the training steps."""
    return math.floor(token_warmup_step * max_train_steps) if token_warmup_step < 1 else token_warmup_step


def choose_wildcards(caption: str, rng: np.random.Generator) -> str:
    """One line of a multi-line caption, then `{a|b|c}` -> one of a, b, c (`{{` and `}}` are literal braces)."""
    if "\n" in caption:
        lines = caption.split("\n")
        caption = lines[int(rng.integers(len(lines)))]
    open_mark, close_mark = "⦅", "⦆"  # placeholders for escaped braces that the caption itself does not contain
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "⦅", close_mark + "⦆"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: (options := m.group(1).split("|"))[int(rng.integers(len(options)))], caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def split_tags(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed head, shufflable middle, fixed tail), as sd-scripts splits them. `keep_tokens_separator`
    ("a, b ||| c, d ||| e") marks the fixed parts and empty tags are dropped; otherwise the first `keep_tokens`
    tags are fixed and empty tags stay (sd-scripts keeps them, so "a,,b" shuffles an empty tag too)."""
    sep, kts = opts.caption_separator, opts.keep_tokens_separator

    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(sep) if t.strip()]

    if kts and kts in caption:
        fixed, flex = caption.split(kts, 1)
        tail: list[str] = []
        if kts in flex:
            flex, tail_part = flex.split(kts, 1)
            tail = tags(tail_part)
        return tags(fixed), tags(flex), tail
    all_tags = [t.strip() for t in caption.strip().split(sep)]
    if opts.keep_tokens > 0:
        return all_tags[:opts.keep_tokens], all_tags[opts.keep_tokens:], []
    return [], all_tags, []


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """Tag counts as sd-scripts writes them to `ss_tag_frequency`: split at ",", stripped, lower-cased."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
