"""A small CNN that reads shape, colour and background colour off synthetic images: the benchmark's image metric.

It is trained on what `library.data.synthetic` draws (the six base shapes plus the concept's checkered heart as a
seventh class), with labels read back from the captions the generator writes, so it knows exactly what the
generator means by "red" or "star". Sampled images from a LoRA are then scored by it: did "a red zkw on a blue
background" come out as a red heart on blue? Light pixel noise during training keeps it usable on the slightly
noisy images a diffusion model samples.

    python bench/shape_classifier.py --out out/shape_classifier.safetensors      # train, report held-out accuracy
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.data.synthetic import COLORS, SHAPES, generate_shapes_dataset  # noqa: E402

SHAPE_CLASSES: tuple[str, ...] = (*SHAPES, "heart")
COLOR_CLASSES: tuple[str, ...] = tuple(COLORS)
HEADS = {"shape": SHAPE_CLASSES, "color": COLOR_CLASSES, "bg": COLOR_CLASSES}
TRIGGER = "zkw"
_CAPTION = re.compile(r"^an? (\w+)(?: (?:striped|dotted))? (\w+) on an? (\w+) background")


def parse_caption(caption: str, trigger: str = TRIGGER) -> tuple[str, str, str]:
    """(shape, colour, background) of a generator caption; the trigger word names the heart."""
    match = _CAPTION.match(caption.strip())
    if match is None:
        raise ValueError(f"caption {caption!r}: not in the generator's 'a <color> <shape> on a <bg> background' form")
    color, shape, bg = match.groups()
    shape = "heart" if shape == trigger else shape
    if shape not in SHAPE_CLASSES or color not in COLOR_CLASSES or bg not in COLOR_CLASSES:
        raise ValueError(f"caption {caption!r}: unknown shape or colour")
    return shape, color, bg


def _generate_chunk(job: tuple[int, int, int, bool]) -> tuple[np.ndarray, list[str]]:
    n, size, seed, concept = job
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_shapes_dataset(tmp, n, size, seed, concept=concept, trigger=TRIGGER)
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
        captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in paths]
    return pixels, captions


def synthetic_examples(n_images: int, size: int = 64, seed: int = 0, workers: int = 1) -> dict[str, torch.Tensor]:
    """`n_images` generator images (1 in 7 the concept heart), as uint8 [N,3,H,W] plus label indices per head.

    Images are written by the generator to a temporary folder and read back with their captions; chunks of at most
    256 images use seeds derived from `seed`, so the set depends only on (n_images, size, seed).
    """
    n_heart = max(1, round(n_images / len(SHAPE_CLASSES)))
    jobs = []
    for concept, count, stream in ((False, n_images - n_heart, 0), (True, n_heart, 1)):
        for k, start in enumerate(range(0, count, 256)):
            jobs.append((min(256, count - start), size, seed * 1_000_003 + stream * 10_007 + k, concept))
    if workers > 1 and len(jobs) > 1:
        # spawn: a fork of this (threaded) process can inherit a held lock and hang
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=spawn) as pool:
            chunks = list(pool.map(_generate_chunk, jobs))
    else:
        chunks = [_generate_chunk(job) for job in jobs]
    pixels = torch.from_numpy(np.concatenate([c[0] for c in chunks])).permute(0, 3, 1, 2).contiguous()
    labels = [parse_caption(caption) for c in chunks for caption in c[1]]
    out = {"pixels": pixels}
    for h, (head, classes) in enumerate(HEADS.items()):
        out[head] = torch.tensor([classes.index(lab[h]) for lab in labels])
    return out


class ShapeClassifier(nn.Module):
    """Four conv blocks (16-32-64-128 channels, each halving the side), global pooling, one linear head each."""

    def __init__(self, size: int = 64):
        super().__init__()
        self.size = size
        chans = (3, 16, 32, 64, 128)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        # mean and max pooling: the background fills the mean, a small shape survives only in the max
        self.heads = nn.ModuleDict({h: nn.Linear(2 * chans[-1], len(c)) for h, c in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float [N,3,size,size] in [0,1]; returns logits per head."""
        f = self.features(x * 2 - 1)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=1)
        return {h: head(pooled) for h, head in self.heads.items()}


def to_batch(images, size: int, device: torch.device | str) -> torch.Tensor:
    """PIL images, or uint8/float [N,3,H,W] tensors, as float [N,3,size,size] in [0,1] on `device`."""
    if isinstance(images, torch.Tensor):
        x = images.to(device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    else:
        x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
        x = x.to(device).float() / 255
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and pixel noise of random strength (std up to 0.08)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    std = torch.rand(n, 1, 1, 1, generator=gen, device=x.device) * 0.08
    return (x + std * torch.randn(x.shape, generator=gen, device=x.device)).clamp(0, 1)


def train_classifier(n_images: int = 4200, size: int = 64, seed: int = 0, device: str | torch.device = "cpu",
                     steps: int = 600, *, batch_size: int = 128, lr: float = 3e-3, workers: int = 1,
                     data: dict[str, torch.Tensor] | None = None) -> ShapeClassifier:
    """Train on `n_images` generator images (or on `data` from `synthetic_examples`); returns the model in eval mode."""
    if n_images < 1 or steps < 1:
        raise ValueError(f"n_images {n_images}, steps {steps}: both must be >= 1")
    data = data if data is not None else synthetic_examples(n_images, size, seed, workers)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = ShapeClassifier(size).to(device)
    x_all = to_batch(data["pixels"], size, device)
    y_all = {h: data[h].to(device) for h in HEADS}
    gen = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    n = x_all.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen, device=device)
        logits = model(_augment(x_all[idx], gen))
        loss = sum(F.cross_entropy(logits[h], y_all[h][idx]) for h in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: ShapeClassifier, images, batch_size: int = 256) -> dict[str, list[str]]:
    """Predicted class names per head for PIL images or [N,3,H,W] tensors."""
    device = next(model.parameters()).device
    x = to_batch(images, model.size, device)
    out: dict[str, list[str]] = {h: [] for h in HEADS}
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start:start + batch_size])
        for h, classes in HEADS.items():
            out[h] += [classes[i] for i in logits[h].argmax(1).tolist()]
    return out


def score(model: ShapeClassifier, images, expected_shape, expected_color, expected_bg) -> dict[str, float]:
    """Fractions of images whose predicted shape / colour / background (and all three) match the expected labels.

    Each expected argument is one class name for every image or a list with one per image.
    """
    pred = predict(model, images)
    n = len(pred["shape"])

    def expand(value) -> list[str]:
        return [value] * n if isinstance(value, str) else list(value)

    expected = {"shape": expand(expected_shape), "color": expand(expected_color), "bg": expand(expected_bg)}
    hits = {h: [p == e for p, e in zip(pred[h], expected[h], strict=True)] for h in HEADS}
    result = {f"{h}_acc": sum(v) / n for h, v in hits.items()}
    result["all_acc"] = sum(all(t) for t in zip(*hits.values(), strict=True)) / n
    return result


def evaluate(model: ShapeClassifier, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy per head on a `synthetic_examples` set (e.g. a held-out seed)."""
    labels = [[HEADS[h][i] for i in data[h].tolist()] for h in HEADS]
    return score(model, data["pixels"], *labels)


def save(model: ShapeClassifier, path: str | Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"size": str(model.size), "shapes": ",".join(SHAPE_CLASSES),
                                          "colors": ",".join(COLOR_CLASSES)})


def load(path: str | Path, device: str | torch.device = "cpu") -> ShapeClassifier:
    """A classifier written by `save`; refuses one trained on other class lists."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("shapes") != ",".join(SHAPE_CLASSES) or meta.get("colors") != ",".join(COLOR_CLASSES):
        raise ValueError(f"{path}: classifier classes {meta.get('shapes')!r}/{meta.get('colors')!r} do not match "
                         f"the generator's {SHAPE_CLASSES}/{COLOR_CLASSES}")
    model = ShapeClassifier(int(meta["size"]))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4200, help="training images (default 4200, 1 in 7 hearts)")
    parser.add_argument("--test-n", type=int, default=700, help="held-out images (another seed)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=4, help="processes drawing the training images")
    parser.add_argument("--out", type=Path, help="save the classifier here (safetensors)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    model = train_classifier(args.n, args.size, args.seed, args.device, args.steps, workers=args.workers)
    t1 = time.perf_counter()
    acc = evaluate(model, synthetic_examples(args.test_n, args.size, args.seed + 1, args.workers))
    print(f"trained in {t1 - t0:.1f} s on {args.device}; held-out accuracy: "
          + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    if args.out:
        save(model, args.out)
        print(f"saved to {args.out}")
    return 0 if all(math.isfinite(v) for v in acc.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
