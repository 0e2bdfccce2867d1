"""sd-scripts' caption and text-encoder options.

The caption options are the command-line defaults of the dataset TOML keys of the same name (subset > dataset >
[general] > command line); `--max_token_length` and `--weighted_captions` act on the text encoders.
"""

from __future__ import annotations

import argparse

MAX_TOKEN_LENGTHS = (150, 225)


def _number(name: str, kind: type, low: float, high: float | None = None):
    """An argparse type named `name` (the help's metavar): `kind` within [low, high], errors naming the range."""
    valid = f"a number in [{low}, {high}]" if high is not None else \
        f"{'an integer' if kind is int else 'a number'} >= {low}"

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {valid}, got {value!r}") from None
        if number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"expected {valid}, got {value!r}")
        return number

    parse.__name__ = name
    return parse


_rate, _count, _steps = _number("rate", float, 0, 1), _number("count", int, 0), _number("steps", float, 0)


def _separator(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("expected a non-empty string such as ','")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("captions and text encoders")
    g.add_argument("--caption_extention", type=str, default=None,
                   help="sd-scripts' old spelling of --caption_extension, read as it (the correct spelling wins)")
    g.add_argument("--caption_separator", type=_separator, default=",", help="separator between caption tags")
    g.add_argument("--keep_tokens_separator", type=str, default="",
                   help="tags before this separator stay in place (and after a second one: at the end) when "
                        "shuffling, dropping or warming up tags; replaces --keep_tokens where a caption has it")
    g.add_argument("--secondary_separator", type=str, default=None,
                   help="joins tags that shuffle and drop as one; replaced by --caption_separator afterwards")
    g.add_argument("--enable_wildcard", action="store_true",
                   help="'{image|picture|rendition}' picks one option per step, and a multi-line caption file one "
                        "line per step")
    g.add_argument("--caption_prefix", type=str, default=None,
                   help="text put before every caption (counts toward --keep_tokens)")
    g.add_argument("--caption_suffix", type=str, default=None,
                   help="text put after every caption (shuffled and dropped with the tags)")
    g.add_argument("--caption_dropout_every_n_epochs", type=_count, default=0,
                   help="train with empty captions in epochs N, 2N, ... (0: never)")
    g.add_argument("--caption_tag_dropout_rate", type=_rate, default=0.0,
                   help="probability of dropping each tag that is not kept in place")
    g.add_argument("--token_warmup_min", type=_count, default=1,
                   help="tags (after the kept ones) trained at step 0 with --token_warmup_step")
    g.add_argument("--token_warmup_step", type=_steps, default=0.0,
                   help="the number of tags grows from --token_warmup_min to all by this step (below 1: that "
                        "fraction of --max_train_steps); 0: off")
    g.add_argument("--max_token_length", type=int, default=None, choices=MAX_TOKEN_LENGTHS,
                   help="captions up to 150 or 225 tokens: encoded in 75-token chunks and concatenated, as "
                        "sd-scripts does (default: 75)")
    g.add_argument("--weighted_captions", action="store_true",
                   help="'(word:1.3)', '(word)' and '[word]' in captions scale the text encoders' output for those "
                        "tokens; keep commas out of the brackets when shuffling or dropping tags")


CAPTION_KEYS = ("caption_separator", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
                "caption_prefix", "caption_suffix", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                "token_warmup_min", "token_warmup_step")


def caption_defaults(args: argparse.Namespace) -> dict:
    """The caption options given (or defaulted) on the command line, as dataset defaults; unset ones stay out."""
    return {key: getattr(args, key) for key in CAPTION_KEYS if getattr(args, key, None) is not None}
