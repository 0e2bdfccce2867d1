"""DatasetConfig -> a torch Dataset of (image, caption) samples and a bucket-aware batch sampler.

Everything that can be wrong with the data (missing folders, undecodable images, non-UTF-8 captions, empty
buckets) is found in the constructor, before any model is loaded. Image sizes are measured once there and kept,
so bucket assignment never decodes an image again.

Sample indices count repeats: an image with num_repeats=10 is 10 samples, each with its own caption shuffle and
flip per epoch (random streams keyed by (seed, epoch, sample index)), as sd-scripts' epochs work.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from library.config.dataset_config import DatasetBlueprint, DatasetConfig, SubsetConfig, check_blueprint
from library.data.buckets import (
    BucketFit,
    adjust_bucket_limits,
    crop_offsets,
    crop_top_left,
    fit_no_upscale,
    fit_predefined,
    make_bucket_resolutions,
)
from library.data.captions import (
    STREAM_CAPTION,
    STREAM_CROP,
    STREAM_FLIP,
    CaptionOptions,
    CaptionStep,
    find_caption_file,
    process_caption,
    read_caption,
    sample_rng,
    tag_frequency,
)
from library.data.images import IMAGE_EXTENSIONS, MIN_IMAGE_SIDE, load_image, probe_image
from library.data.masks import (
    check_mask_file,
    find_mask_file,
    load_mask_image,
    mask_tensor,
    split_alpha,
)
from library.data.sources import SubsetEntry, list_entries, split_for_validation, write_info_cache
from library.data.transforms import color_aug, face_crop, face_from_name, fit_to_bucket
from library.errors import DatasetError

logger = logging.getLogger(__name__)

_SHOW_BAD = 5  # bad files named in the error message; the rest are counted
STREAM_COLOR, STREAM_FACE = 10, 11  # random streams of colour and face-crop augmentation (see captions.STREAM_*)
SPLITS = ("train", "validation")


@dataclass
class _Subset:
    config: SubsetConfig
    dataset: int
    options: CaptionOptions
    images: list[int]
    extensions: dict[str, int]  # caption extension used -> image count ("none": class_tokens / empty)
    skipped: int = 0


@dataclass
class _Image:
    path: Path
    subset: int
    size: tuple[int, int]  # upright, full resolution
    caption: str  # as read (class_tokens when there is no caption file)
    fit: BucketFit
    face: tuple[int, int, int, int] | None = None  # from the file name, only with face_crop_aug_range
    mask_file: Path | None = None  # its loss mask in the subset's conditioning_data_dir

    @property
    def bucket(self) -> tuple[int, int]:
        return self.fit.bucket


@dataclass
class _Cached:
    latents: torch.Tensor | None  # None: on disk, load from `npz`
    flipped: torch.Tensor | None
    npz: Path | None
    mask: torch.Tensor | None = None  # uint8 [H, W] at the bucket, unflipped (in memory caching only)


def collate(items: list[dict]) -> dict:
    """Stack tensors of one batch (one bucket); captions and sizes stay Python lists."""
    batch: dict = {
        "caption": [it["caption"] for it in items],
        "is_reg": torch.tensor([it["is_reg"] for it in items], dtype=torch.bool),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "bucket": [it["bucket"] for it in items],
        "original_size": [it["original_size"] for it in items],
        "crop_top_left": [it["crop_top_left"] for it in items],
    }
    for key in ("pixel_values", "latents"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    if any("mask" in it for it in items):  # an image without a mask counts everywhere (sd-scripts: ones)
        w, h = items[0]["bucket"]
        batch["mask"] = torch.stack([it.get("mask", torch.ones(1, h, w)) for it in items])
    return batch


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (PIL or HxWx3 uint8) -> FloatTensor[3, H, W] in [-1, 1], the VAE's input range."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class CaptionedImageDataset(Dataset):
    """Item: {"pixel_values": [3,H,W] in [-1,1] (absent once latents are cached), "latents" (only once cached),
    "caption": str, "is_reg": bool, "bucket": (W, H), "index": int, "original_size": (W, H) of the file,
    "crop_top_left": (top, left) in resized pixels}."""

    collate = staticmethod(collate)

    def __init__(self, config: DatasetConfig, *, seed: int, skip_bad_images: bool = False, split: str = "train",
                 fast_decode: bool = False):
        """`split`: "train", or "validation" (each dataset's validation_split share of its non-regularisation
        images, once each, as sd-scripts holds them out). `fast_decode`: decode large JPEGs only as large as the
        resize needs (about 2x faster on photos; pixels then differ slightly from sd-scripts' full decode)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {SPLITS}")
        self.config = config
        self.seed = seed
        self.split = split
        self.fast_decode = fast_decode
        self.epoch = 0
        self._sample_steps: dict[int, int] = {}  # sample index -> optimizer step it trains at (token warm-up)
        self._max_train_steps = 0
        self._subsets: list[_Subset] = []
        self._images: list[_Image] = []
        self._samples: list[int] = []  # sample index -> image index (repeats expanded)
        self._groups: list[tuple[int, dict[tuple[int, int], list[int]]]] = []  # (batch_size, bucket -> samples)
        self._group_datasets: list[int] = []  # the dataset of each entry of _groups
        self._cache: dict[int, _Cached] = {}
        self.skipped: list[str] = []
        bad: list[str] = []
        self._datasets = [d for d, bp in enumerate(config.datasets) if split == "train" or bp.validation_split > 0]
        for d in self._datasets:
            self._scan_dataset(d, config.datasets[d], bad)
        if bad:
            if not skip_bad_images:
                shown = "; ".join(bad[:_SHOW_BAD])
                more = f" (and {len(bad) - _SHOW_BAD} more)" if len(bad) > _SHOW_BAD else ""
                raise DatasetError(f"{len(bad)} unusable file(s) in {config.source}: {shown}{more}; fix or remove "
                                   "them, or pass --skip_bad_images to train without them")
            logger.warning("skipping %d unusable file(s): %s", len(bad), "; ".join(bad))
            self.skipped = bad
        for d in self._datasets:
            self._build_samples(d, config.datasets[d])

    # ------------------------------------------------------------------------------------------ construction
    def _scan_dataset(self, d: int, bp: DatasetBlueprint, bad: list[str]) -> None:
        try:
            check_blueprint(bp)
        except DatasetError as exc:
            raise DatasetError(f"{self.config.source}: dataset {d}: {exc}") from None
        if not bp.subsets:
            raise DatasetError(f"{self.config.source}: dataset {d} has no subsets (image folders)")
        choose = _bucket_chooser(bp)
        min_side = min(MIN_IMAGE_SIDE, *bp.resolution)
        for sub in bp.subsets:
            if self.split == "validation" and sub.is_reg:
                continue  # sd-scripts validates on training images only
            entries = list_entries(sub)
            if not entries:
                where = sub.metadata_file or sub.image_dir
                raise DatasetError(f"{sub.name or 'subset'}: no images in {where} "
                                   f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
            if bp.validation_split > 0 and not sub.is_reg:
                split_seed = self.seed if bp.validation_seed is None else bp.validation_seed
                entries = split_for_validation(entries, bp.validation_split, split_seed, self.split)
            info = _Subset(sub, d, _caption_options(sub), [], {})
            self._subsets.append(info)
            face_crop_on = sub.face_crop_aug_range is not None and not bp.enable_bucket
            if sub.face_crop_aug_range is not None and bp.enable_bucket:
                logger.warning("%s: face_crop_aug_range applies only without enable_bucket (as in sd-scripts); "
                               "bucketed images are resized and cropped instead", sub.name or sub.image_dir)
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoding releases the GIL
                results = list(pool.map(functools.partial(_inspect, sub=sub, choose=choose, min_side=min_side),
                                        entries))
            rows = []
            for entry, result in zip(entries, results, strict=True):
                if isinstance(result, DatasetError):
                    bad.append(str(result))
                    info.skipped += 1
                    continue
                size, caption, caption_file, fit, mask_file = result
                path = entry.path
                ext = "metadata" if sub.metadata_file else caption_file.name[len(path.stem):] if caption_file else "none"
                info.extensions[ext] = info.extensions.get(ext, 0) + 1
                info.images.append(len(self._images))
                face = face_from_name(path.stem) if face_crop_on else None
                if face is not None and (size[0] < fit.bucket[0] or size[1] < fit.bucket[1]):
                    face = None  # smaller than the resolution: a face crop would need enlarging; resize instead
                self._images.append(_Image(path, len(self._subsets) - 1, size, caption, fit, face, mask_file))
                rows.append((path, caption, size))
            complete = not info.skipped and not (bp.validation_split > 0 and not sub.is_reg)  # the whole folder
            if sub.cache_info and sub.metadata_file is None and entries[0].size is None and complete:
                write_info_cache(Path(sub.image_dir), rows)

    def _build_samples(self, d: int, bp: DatasetBlueprint) -> None:
        subsets = [s for s in self._subsets if s.dataset == d]
        for s in subsets:
            if not s.images and self.split == "validation":
                continue  # too few images for a validation share: sd-scripts leaves the subset out
            if not s.images:
                raise DatasetError(f"{s.config.name or 'subset'}: no usable images in {s.config.image_dir} "
                                   f"({s.skipped} skipped as unusable)")
        uncaptioned = [self._images[i].path.name for s in subsets for i in s.images if not self._images[i].caption]
        if uncaptioned:
            logger.warning("%d image(s) have no caption file and no class_tokens, they train with an empty caption: %s",
                           len(uncaptioned), ", ".join(uncaptioned[:_SHOW_BAD]))
        repeats = {id(s): s.config.num_repeats if self.split == "train" else 1 for s in subsets}
        train = [(i, repeats[id(s)]) for s in subsets if not s.config.is_reg for i in s.images]
        reg = [(i, repeats[id(s)]) for s in subsets if s.config.is_reg for i in s.images]
        if not train and self.split == "validation":
            return
        if not train:
            folders = ", ".join(str(s.config.image_dir) for s in subsets)
            raise DatasetError(f"{self.config.source}: dataset {d} has only regularisation images ({folders}); "
                               "add a subset with is_reg = false")
        train_total = sum(r for _, r in train)
        reg_counts = balance_reg_repeats([r for _, r in reg], train_total)
        groups: dict[tuple[int, int], list[int]] = {}
        counts = [r for _, r in train] + reg_counts
        for (image, _), count in zip(train + reg, counts, strict=True):
            for _ in range(count):
                groups.setdefault(self._images[image].bucket, []).append(len(self._samples))
                self._samples.append(image)
        self._groups.append((bp.batch_size, dict(sorted(groups.items()))))
        self._group_datasets.append(d)

    # ------------------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._samples)

    def set_epoch(self, epoch: int) -> None:
        """Caption shuffle/dropout, flips and random crops of sample i depend on (seed, epoch, i)."""
        self.epoch = epoch

    def set_sample_steps(self, steps: dict[int, int], max_train_steps: int) -> None:
        """The optimizer step at which each sample of this epoch trains: token warm-up depends on it (set before
        the epoch's DataLoader starts, so worker processes get it too)."""
        self._sample_steps = dict(steps)
        self._max_train_steps = max_train_steps

    def uses_token_warmup(self) -> bool:
        return any(s.options.token_warmup_step > 0 for s in self._subsets)

    def random_caption_subsets(self) -> list[str]:
        """Subsets whose caption changes between steps (shuffle, dropout, warm-up, wildcards): their text-encoder
        outputs cannot be cached."""
        return [s.config.name or str(s.config.image_dir) for s in self._subsets if s.options.random]

    def __getitem__(self, index: int) -> dict:
        image_index = self._samples[index]
        img = self._images[image_index]
        sub = self._subsets[img.subset]
        flip = self._flipped(index)
        item = {"caption": self._caption(index), "is_reg": sub.config.is_reg, "bucket": img.bucket, "index": index,
                "original_size": img.size, "crop_top_left": crop_top_left(img.bucket, img.size, flip)}
        cached = self._cache.get(image_index)
        if cached is not None:
            item["latents"] = self._cached_latents(cached, flip)
            mask = _npz_mask(cached.npz) if cached.npz is not None and self._has_mask(img) else cached.mask
            if mask is not None:
                item["mask"] = mask_tensor(mask, flip)
            return item
        pixels, mask = self.pixels_and_mask(index)
        item["pixel_values"] = to_tensor(pixels)
        if mask is not None:
            item["mask"] = mask_tensor(torch.from_numpy(mask.copy()))
        return item

    def _caption(self, index: int) -> str:
        img = self._images[self._samples[index]]
        at = CaptionStep(self.epoch + 1, self._sample_steps.get(index, 0), self._max_train_steps)
        return process_caption(img.caption, self._subsets[img.subset].options,
                               sample_rng(self.seed, self.epoch, index, STREAM_CAPTION), at)

    def _flipped(self, index: int) -> bool:
        cfg = self._subsets[self._images[self._samples[index]].subset].config
        return cfg.flip_aug and bool(sample_rng(self.seed, self.epoch, index, STREAM_FLIP).random() < 0.5)

    def crop_window(self, index: int) -> tuple[BucketFit, tuple[int, int]]:
        """Sample `index`'s bucket fit and the (left, top) of the bucket in the resized image this epoch (random
        with random_crop, else centred): `fit_to_bucket(array, *crop_window(i))` cuts any per-pixel data (a mask)
        exactly as the image."""
        img = self._images[self._samples[index]]
        rng = sample_rng(self.seed, self.epoch, index, STREAM_CROP)
        random_crop = self._subsets[img.subset].config.random_crop
        return img.fit, crop_offsets(img.fit.resized, img.bucket, rng if random_crop else None)

    def pixels(self, index: int) -> np.ndarray:
        """Sample `index` as trained this epoch, HxWx3 uint8 (see `pixels_and_mask`)."""
        return self.pixels_and_mask(index)[0]

    def pixels_and_mask(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample `index` as trained this epoch, HxWx3 uint8: resized and cropped to its bucket (or cut around
        its face), colour-augmented and flipped, in sd-scripts' order; and its loss mask (HxW uint8, or None),
        cut and flipped exactly as the image (colour augmentation leaves it alone)."""
        img = self._images[self._samples[index]]
        cfg = self._subsets[img.subset].config
        pixels, mask = self._load_pixels_and_mask(self._samples[index])
        planes = [np.asarray(pixels), None if mask is None else np.asarray(mask)]
        for k, plane in enumerate(planes):
            if plane is None:
                continue
            if img.face is not None:  # the same random stream gives the mask the image's face crop
                rng = sample_rng(self.seed, self.epoch, index, STREAM_FACE)
                plane = face_crop(plane, img.face, img.bucket, cfg.face_crop_aug_range, cfg.random_crop, rng,
                                  cfg.resize_interpolation)
            else:
                plane = fit_to_bucket(plane, *self.crop_window(index), cfg.resize_interpolation)
            if k == 0 and cfg.color_aug:
                plane = color_aug(plane, sample_rng(self.seed, self.epoch, index, STREAM_COLOR))
            if self._flipped(index):
                plane = plane[:, ::-1]
            planes[k] = np.ascontiguousarray(plane)
        return planes[0], planes[1]

    def describe(self, index: int) -> dict:
        """What sample `index` trains on this epoch, without decoding it (for --debug_dataset)."""
        img = self._images[self._samples[index]]
        sub = self._subsets[img.subset]
        flip = self._flipped(index)
        crop = self.crop_window(index)[1]
        return {"index": index, "path": str(img.path), "is_reg": sub.config.is_reg,
                "caption": self._caption(index),
                "original_size": img.size, "resized_size": img.fit.resized, "bucket": img.bucket,
                "crop_left_top": None if img.face is not None else crop, "face_crop": img.face is not None,
                "flipped": flip, "crop_top_left": crop_top_left(img.bucket, img.size, flip)}

    def _load_pixels_and_mask(self, image_index: int) -> tuple[Image.Image, Image.Image | None]:
        """The decoded RGB image and its loss mask ("L", same size) when its subset has one."""
        img = self._images[image_index]
        cover = img.fit.resized if self.fast_decode and img.face is None else None
        if img.mask_file is not None:
            pixels = load_image(img.path, min_side=1, cover=cover)
            return pixels, load_mask_image(img.mask_file, pixels.size)
        if self._subsets[img.subset].config.alpha_mask:
            return split_alpha(load_image(img.path, min_side=1, cover=cover, keep_alpha=True))
        return load_image(img.path, min_side=1, cover=cover), None

    def caption_for_cache(self, index: int) -> str:
        """Sample `index`'s caption as training sees it when nothing in it is random (`random_caption_subsets` is
        empty): what cached text-encoder outputs are built from."""
        img = self._images[self._samples[index]]
        return process_caption(img.caption, self._subsets[img.subset].options, sample_rng(self.seed, 0, index, 0),
                               CaptionStep())

    def image_path(self, index: int) -> Path:
        """The image file of sample `index` (caches written next to it are named after it)."""
        return self._images[self._samples[index]].path

    def batch_sampler(self, *, seed: int, shuffle: bool = True) -> BucketBatchSampler:
        return BucketBatchSampler(self._groups, seed=seed, shuffle=shuffle)

    # ------------------------------------------------------------------------------------------ latents
    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], to_disk: bool, batch_size: int = 8,
                      cache_tag: str = "", skip_cache_check: bool = False) -> None:
        """Encode every image once (both flips for flip_aug subsets) so training never decodes images again.

        `encode` gets FloatTensor[B,3,H,W] in [-1,1] on the CPU and returns latents [B,C,H/f,W/f] (move to your
        device inside). `to_disk`: `<image stem>.npz` next to the image, reused on the next run when its recorded
        bucket, original size, flip variants and `cache_tag` (e.g. the VAE's name) still match, else recomputed;
        `skip_cache_check` reuses any existing file unopened (sd-scripts' --skip_cache_check).
        """
        if batch_size < 1:
            raise DatasetError(f"cache_latents batch_size {batch_size}: must be >= 1")
        for s in self._subsets:
            augment = [k for k in ("random_crop", "color_aug", "face_crop_aug_range") if getattr(s.config, k)]
            if augment:
                where = s.config.name or s.config.image_dir
                raise DatasetError(f"latent caching cannot be used with {augment[0]} (subset {where}): a cached "
                                   "latent has one fixed image; turn one of them off")
        todo: dict[tuple[int, int], list[int]] = {}
        reused = 0
        for i, img in enumerate(self._images):
            flip = self._subsets[img.subset].config.flip_aug
            npz = _npz_path(img.path) if to_disk else None
            valid = npz is not None and (npz.is_file() if skip_cache_check else
                                         _npz_valid(npz, img, flip, cache_tag, self._has_mask(img)))
            if valid:
                self._cache[i] = _Cached(None, None, npz)
                reused += 1
            else:
                todo.setdefault(img.bucket, []).append(i)
        for indices in todo.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                fitted = [self._fitted(i) for i in chunk]
                pixels = torch.stack([to_tensor(rgb) for rgb, _ in fitted])
                masks = [None if m is None else torch.from_numpy(m) for _, m in fitted]
                latents = _encode(encode, pixels)
                needs_flip = [self._subsets[self._images[i].subset].config.flip_aug for i in chunk]
                flipped = _encode(encode, pixels.flip(-1)) if any(needs_flip) else None
                for k, i in enumerate(chunk):
                    lat = latents[k].clone()
                    lat_f = flipped[k].clone() if flipped is not None and needs_flip[k] else None
                    if to_disk:
                        npz = _npz_path(self._images[i].path)
                        _write_npz(npz, self._images[i], lat, lat_f, cache_tag, masks[k])
                        self._cache[i] = _Cached(None, None, npz)
                    else:
                        self._cache[i] = _Cached(lat, lat_f, None, masks[k])
        logger.info("latents: %d image(s) encoded, %d reused from disk cache", sum(map(len, todo.values())), reused)

    def _fitted(self, image_index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The image (and its mask) resized and centre-cropped to the bucket, as a cached latent is made."""
        img = self._images[image_index]
        interpolation = self._subsets[img.subset].config.resize_interpolation
        pixels, mask = self._load_pixels_and_mask(image_index)
        fit = [None if a is None else fit_to_bucket(np.asarray(a), img.fit, None, interpolation)
               for a in (pixels, mask)]
        return fit[0], None if fit[1] is None else fit[1].copy()  # a writable array torch can own

    def _has_mask(self, img: _Image) -> bool:
        return img.mask_file is not None or self._subsets[img.subset].config.alpha_mask

    @staticmethod
    def _cached_latents(cached: _Cached, flip: bool) -> torch.Tensor:
        if cached.npz is None:
            return cached.flipped if flip else cached.latents
        with np.load(cached.npz, allow_pickle=False) as data:
            return torch.from_numpy(np.array(data["latents_flipped" if flip else "latents"]))

    # ------------------------------------------------------------------------------------------ summary
    def summary(self) -> dict:
        """Counts, buckets, per-subset settings and tag frequency; the ss_* LoRA metadata is written from it with
        sd-scripts' meanings (`*_x_repeats` count an image once per repeat, as its num_train_images does)."""
        sampler = self.batch_sampler(seed=self.seed)
        datasets = []
        for d, (batch_size, groups) in zip(self._group_datasets, self._groups, strict=True):
            bp = self.config.datasets[d]
            members = [s for s in self._subsets if s.dataset == d]
            subsets = [self._subset_summary(s) for s in members]
            datasets.append({
                "resolution": list(bp.resolution), "batch_size": batch_size, "enable_bucket": bp.enable_bucket,
                "min_bucket_reso": bp.min_bucket_reso, "max_bucket_reso": bp.max_bucket_reso,
                "bucket_reso_steps": bp.bucket_reso_steps, "bucket_no_upscale": bp.bucket_no_upscale,
                "buckets": {f"{w}x{h}": len(v) for (w, h), v in groups.items()},
                "bucket_info": self._bucket_info(bp, groups, members),
                "num_batches": sum(math.ceil(len(v) / batch_size) for v in groups.values()),
                "num_train_images_x_repeats": _repeated(members, reg=False),
                "num_reg_images_x_repeats": _repeated(members, reg=True),
                "tag_frequency": {Path(s.config.image_dir).name: self._tags(s) for s in members},
                "subsets": subsets,
            })
        dirs: dict[str, dict] = {}
        tags: dict[str, dict[str, int]] = {}
        for s in self._subsets:
            name = Path(s.config.metadata_file or s.config.image_dir).name
            dirs[name] = {"n_repeats": s.config.num_repeats, "img_count": len(s.images)}
            tags[name] = self._tags(s)
        return {
            "source": self.config.source,
            "num_train_images": sum(len(s.images) for s in self._subsets if not s.config.is_reg),
            "num_reg_images": sum(len(s.images) for s in self._subsets if s.config.is_reg),
            "num_train_images_x_repeats": _repeated(self._subsets, reg=False),
            "num_reg_images_x_repeats": _repeated(self._subsets, reg=True),
            "num_samples": len(self._samples),
            "num_batches": len(sampler),
            "skipped": list(self.skipped),
            "datasets": datasets,
            "dataset_dirs": dirs,
            "tag_frequency": tags,
        }

    def _subset_summary(self, s: _Subset) -> dict:
        c = s.config
        return {
            "image_dir": str(c.image_dir), "num_repeats": c.num_repeats, "is_reg": c.is_reg, "img_count": len(s.images),
            "skipped": s.skipped, "class_tokens": c.class_tokens, "caption_extension": dict(s.extensions),
            "shuffle_caption": c.shuffle_caption, "keep_tokens": c.keep_tokens, "flip_aug": c.flip_aug,
            "color_aug": c.color_aug, "random_crop": c.random_crop, "face_crop_aug_range": c.face_crop_aug_range,
            "resize_interpolation": c.resize_interpolation,
            "metadata_file": str(c.metadata_file) if c.metadata_file else None,
            "keep_tokens_separator": c.keep_tokens_separator, "secondary_separator": c.secondary_separator or None,
            "enable_wildcard": c.enable_wildcard, "caption_prefix": c.caption_prefix, "caption_suffix": c.caption_suffix,
        }

    def _tags(self, s: _Subset) -> dict[str, int]:
        return tag_frequency(self._images[i].caption for i in s.images)

    def _bucket_info(self, bp: DatasetBlueprint, groups: dict[tuple[int, int], list[int]],
                     members: list[_Subset]) -> dict | None:
        """sd-scripts' bucket_info: {"buckets": {index: {"resolution": (w, h), "count": samples}},
        "mean_img_ar_error": mean |bucket w/h - image w/h| over images}; None without buckets. The index is the
        bucket's place in sd-scripts' sorted list (every predefined bucket, or the no-upscale buckets in use)."""
        if not bp.enable_bucket:
            return None
        if bp.bucket_no_upscale:
            resos = sorted(groups)
        else:
            lo, hi = adjust_bucket_limits(bp.min_bucket_reso, bp.max_bucket_reso, bp.bucket_reso_steps)
            resos = sorted(make_bucket_resolutions(bp.resolution, lo, hi, bp.bucket_reso_steps))
        buckets = {i: {"resolution": list(r), "count": len(groups[r])} for i, r in enumerate(resos) if groups.get(r)}
        images = [self._images[i] for s in members for i in s.images]
        errors = [abs(im.bucket[0] / im.bucket[1] - im.size[0] / im.size[1]) for im in images]
        return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}


def _repeated(subsets: list[_Subset], *, reg: bool) -> int:
    return sum(len(s.images) * s.config.num_repeats for s in subsets if s.config.is_reg == reg)


def balance_reg_repeats(reg_repeats: list[int], train_total: int) -> list[int]:
    """sd-scripts' balance: regularisation samples add up to the train sample count. Images take their own
    repeats in order until the count is reached (later ones drop out), then, if still short, +1 each in turn."""
    counts = [0] * len(reg_repeats)
    if not reg_repeats:
        return counts
    total = 0
    for i, r in enumerate(reg_repeats):
        if total >= train_total:
            break
        counts[i] = r
        total += r
    while total < train_total:
        for i in range(len(counts)):
            counts[i] += 1
            total += 1
            if total >= train_total:
                break
    return counts


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of sample indices that never mix buckets (nor datasets, which may differ in batch size).

    Deterministic from (seed, epoch): each epoch shuffles within every bucket, cuts batches (the last one of a
    bucket may be short) and shuffles the batch order. `len` is the number of batches of a whole epoch;
    `set_epoch(epoch, skip_batches=k)` resumes mid-epoch by leaving out the first k.
    """

    drop_last = False

    def __init__(self, groups: list[tuple[int, dict[tuple[int, int], list[int]]]], *, seed: int,
                 shuffle: bool = True):
        self.groups = groups
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip_batches = 0
        self.batch_size = max(bs for bs, _ in groups) if groups else 1

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if skip_batches < 0:
            raise ValueError(f"skip_batches {skip_batches}: must be >= 0")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, epoch, 0x5A17])
        out: list[list[int]] = []
        for batch_size, buckets in self.groups:
            for members in buckets.values():
                order = [members[i] for i in rng.permutation(len(members))] if self.shuffle else list(members)
                out.extend(order[i:i + batch_size] for i in range(0, len(order), batch_size))
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip_batches:]

    def __len__(self) -> int:
        return sum(math.ceil(len(m) / bs) for bs, buckets in self.groups for m in buckets.values())


# ---------------------------------------------------------------------------------------------- helpers


def _bucket_chooser(bp: DatasetBlueprint) -> Callable[[tuple[int, int]], BucketFit]:
    """The dataset's bucket rule: sd-scripts' list, no-upscale sizes, or the one resolution without buckets."""
    if not bp.enable_bucket:
        return functools.partial(fit_predefined, buckets=[bp.resolution])
    if bp.bucket_no_upscale:
        return functools.partial(fit_no_upscale, resolution=bp.resolution, steps=bp.bucket_reso_steps)
    lo, hi = adjust_bucket_limits(bp.min_bucket_reso, bp.max_bucket_reso, bp.bucket_reso_steps)
    return functools.partial(fit_predefined, buckets=make_bucket_resolutions(bp.resolution, lo, hi,
                                                                             bp.bucket_reso_steps))


def _inspect(entry: SubsetEntry, sub: SubsetConfig, choose: Callable[[tuple[int, int]], BucketFit], min_side: int):
    """(size, caption, caption file, bucket fit) of one image, or the DatasetError that makes it unusable."""
    path = entry.path
    try:
        size = entry.size if entry.size is not None else probe_image(path, min_side)
        caption_file = None
        caption = entry.caption
        if caption is None:
            caption_file = find_caption_file(path, sub.caption_extension)
            caption = read_caption(caption_file, sub.enable_wildcard) if caption_file else ""
            if not caption and sub.class_tokens:
                caption = sub.class_tokens
        fit = choose(size)
        mask_file = None
        if sub.conditioning_data_dir is not None:
            mask_file = find_mask_file(sub.conditioning_data_dir, path)
            check_mask_file(mask_file, path, size)
        if min(fit.bucket) < 1:
            raise DatasetError(f"image {path} is {size[0]}x{size[1]} px: with bucket_no_upscale each side must be at "
                               "least bucket_reso_steps px")
    except DatasetError as exc:
        return exc
    return size, caption, caption_file, fit, mask_file


def _caption_options(sub: SubsetConfig) -> CaptionOptions:
    return CaptionOptions(**{f.name: getattr(sub, f.name) for f in fields(CaptionOptions)})


def _encode(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encode(pixels).detach().float().cpu()


def _npz_path(image: Path) -> Path:
    return image.parent / (image.stem + ".npz")


def _npz_valid(npz: Path, img: _Image, flip: bool, tag: str, mask: bool = False) -> bool:
    """A cache file is reused only if it was made for this bucket, image size, flip setting and encoder tag (and
    holds the loss mask when one is wanted)."""
    if not npz.is_file():
        return False
    try:
        with np.load(npz, allow_pickle=False) as data:
            return ("latents" in data and tuple(data["bucket"].tolist()) == img.bucket
                    and tuple(data["original_size"].tolist()) == img.size
                    and (not flip or "latents_flipped" in data) and str(data["cache_tag"]) == tag
                    and (not mask or "mask" in data))
    except (OSError, ValueError, KeyError, EOFError):
        return False  # unreadable or from another tool: recompute


def _npz_mask(npz: Path) -> torch.Tensor | None:
    with np.load(npz, allow_pickle=False) as data:
        return torch.from_numpy(np.array(data["mask"])) if "mask" in data else None


def _write_npz(npz: Path, img: _Image, latents: torch.Tensor, flipped: torch.Tensor | None, tag: str,
               mask: torch.Tensor | None = None) -> None:
    arrays = {"latents": latents.numpy(), "bucket": np.array(img.bucket, dtype=np.int32),
              "original_size": np.array(img.size, dtype=np.int32), "cache_tag": np.array(tag)}
    if flipped is not None:
        arrays["latents_flipped"] = flipped.numpy()
    if mask is not None:
        arrays["mask"] = mask.numpy()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=npz.parent, prefix=f".{npz.stem}.", suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, npz)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise DatasetError(f"cannot write latent cache {npz} ({exc.strerror or exc}); use in-memory caching "
                           "(drop --cache_latents_to_disk) or make the image folder writable") from None
