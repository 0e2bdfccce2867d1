"""sd-scripts' image, bucket, augmentation, latent-cache and validation-loss options.

The dataset TOML has the augmentation keys too (`color_aug`, `random_crop`, `face_crop_aug_range`,
`resize_interpolation`, `validation_split`, `validation_seed`); these flags are their defaults, as in sd-scripts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from library.data.buckets import INTERPOLATIONS
from library.errors import ConfigError


def _face_range(value: str) -> tuple[float, float]:
    """'2.0,4.0' -> (2.0, 4.0): the face's larger side spans 1/4 .. 1/2 of the image's short side."""
    try:
        lo, hi = (float(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. 2.0,4.0), got {value!r}") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {value!r}")
    return lo, hi


REFUSALS = {
    "dataset_class": "a class written against sd-scripts' internal dataset API cannot run here; describe the data "
                     "with --dataset_config TOML, --train_data_dir folders or --in_json",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("images, augmentation and validation loss")
    g.add_argument("--dataset_class", type=str, default=None,
                   help="sd-scripts' package.module.Class dataset: refused (see docs/cli.md)")
    g.add_argument("--color_aug", action="store_true",
                   help="weak colour augmentation: a third of the samples get a small hue shift or gamma")
    g.add_argument("--random_crop", action="store_true",
                   help="crop each sample at a random position of its resized image instead of the centre")
    g.add_argument("--face_crop_aug_range", type=_face_range, default=None, metavar="MIN,MAX",
                   help="without buckets: crop around the face given in the file name (name_cx_cy_w_h.png), "
                        "scaled so the image's short side is MIN..MAX face sizes, e.g. 2.0,4.0")
    g.add_argument("--resize_interpolation", choices=INTERPOLATIONS, default=None,
                   help="resize filter; default: area to shrink, Lanczos to enlarge")
    g.add_argument("--fast_image_decode", action="store_true",
                   help="(loraforge) decode large JPEGs only as large as their bucket needs: about 2x faster "
                        "uncached steps on photos, pixels slightly different from sd-scripts' full decode")
    g.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE call when caching latents")
    g.add_argument("--skip_cache_check", action="store_true",
                   help="reuse an existing latent cache file without checking its bucket, size and model")
    g.add_argument("--cache_info", action="store_true",
                   help="keep image sizes and captions in metadata_cache.json per image folder; later runs "
                        "read them from there instead of the images")
    g.add_argument("--debug_dataset", action="store_true",
                   help="print what each sample of the first epoch would be (bucket, crop, caption) and exit")
    g.add_argument("--dataset_repeats", type=int, default=1,
                   help="repeats of a fine-tuning (--in_json) dataset; the default num_repeats of TOML subsets")
    g.add_argument("--in_json", type=str, default=None,
                   help="sd-scripts fine-tuning metadata JSON (image -> caption, tags) as the dataset; relative "
                        "image paths resolve against --train_data_dir")
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="share of each subset's training images held out to compute a validation loss")
    g.add_argument("--validation_seed", type=int, default=None,
                   help="seed of the validation split and of the validation noise (default: --seed)")
    g.add_argument("--validate_every_n_steps", type=int, default=None,
                   help="validation loss every N steps (by default only at each epoch's end)")
    g.add_argument("--validate_every_n_epochs", type=int, default=None,
                   help="validation loss every N epochs (default: every epoch)")
    g.add_argument("--max_validation_steps", type=int, default=None,
                   help="at most N validation batches per validation (default: all)")


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for these options, before anything is loaded."""
    for flag in ("vae_batch_size", "dataset_repeats", "validate_every_n_steps", "validate_every_n_epochs",
                 "max_validation_steps"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} {value}: must be >= 1")
    if not 0.0 <= args.validation_split < 1.0:
        raise ConfigError(f"--validation_split {args.validation_split}: must be in [0, 1) (a share of the images)")
    if args.in_json:
        if args.dataset_config:
            raise ConfigError("--in_json and --dataset_config exclude each other: give the metadata file as "
                              "metadata_file in the TOML's subset")
        if not Path(args.in_json).is_file():
            raise ConfigError(f"--in_json {args.in_json}: file not found")
        if args.reg_data_dir:
            raise ConfigError("--reg_data_dir cannot be used with --in_json (fine-tuning datasets have no "
                              "regularisation images)")
