"""The optimizers compared on one LoRA task: teach builtin:tiny-sd the "zkw" concept (a checkered heart).

Every optimizer trains through the trainer users run (`library.cli.parse_args` + `LoRATrainer`, what
`train_network.py` does), with the same data, seed, steps and LoRA settings; only `--optimizer_type` and
`--learning_rate` change. Per optimizer it records:

- a held-out eval loss every N steps: the diffusion loss on concept images the LoRA never trains on, with fixed
  noise and fixed timesteps, so the curve moves only because the weights do;
- steps to reach a target loss (the eval loss AdamW reaches at half the steps) and the final eval loss;
- an image metric: K images sampled for "a <color> zkw on a <bg> background" with fixed seeds, scored by a small
  CNN trained on the synthetic data (`bench/shape_classifier.py`): fraction drawn as a heart, colour accuracy;
- optimizer state bytes per trainable parameter, on this LoRA and on the SD1.5 rank-16 LoRA parameter set;
- ms per training step (median after warm-up) and ms inside `optimizer.step()`.

    python bench/optimizers_lora.py --json $OUT/opt_lora.json --markdown $OUT/opt_lora.md          # GPU, ~5 min
    OMP_NUM_THREADS=1 python bench/optimizers_lora.py --device cpu --quick --json /tmp/q.json       # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import shape_classifier  # noqa: E402
from bench.optimizer_step import state_bytes  # noqa: E402
from library.data.synthetic import COLORS, generate_shapes_dataset  # noqa: E402

DEFAULT_OPTIMIZERS = ("AdamW", "CustomAdamW", "CustomAdamW8bit", "Automagic_Sinkgd", "Automagic_CameAMP", "AdamWSGG",
                      "AdamWSAC", "Prodigy", "Lion", "AdamW8bit")
# The learning rate a user following the docs would pick for this LoRA (see docs/optimizer-benchmark.md).
DEFAULT_LR = {
    "adamw": 1e-3,             # the demo's
    "adamw8bit": 1e-3,         # a drop-in AdamW
    "customadamw": 1e-4,       # docs/seed default; ALLoRA gives lora_up alora_ratio (21) x this
    "customadamw8bit": 1e-4,
    "automagicsinkgd": 1e-4,   # docs default starting value of the per-element lr mask (which adapts)
    "automagiccameamp": 1e-4,
    "adamwsgg": 3e-4,          # the OpenToMe guide's value
    "adamwsac": 3e-4,
    "prodigy": 1.0,            # learns its own step size: keep lr=1
    "lion": 1e-4,              # Lion paper: 3-10x below AdamW's (the registry's 2e-6 is OpenToMe's LLaVA value)
}
FALLBACK_LR = 1e-4
TRIGGER = "zkw"
DEMO_TOML = ROOT / "configs" / "examples" / "demo.toml"


@dataclass
class Plan:
    steps: int = 300
    eval_every: int = 15
    batch_size: int = 4
    n_train: int = 32
    n_eval: int = 16
    eval_timesteps: int = 8
    samples: int = 32
    sample_steps: int = 20
    guidance: float = 7.0
    warmup: int = 5
    network_dim: int = 8
    network_alpha: float = 4.0
    seed: int = 0
    classifier_n: int = 4200
    classifier_steps: int = 600
    classifier_size: int = 64
    classifier_batch: int = 128
    sd15_state: bool = True
    extra_args: list[str] = field(default_factory=list)


def lr_key(name: str) -> str:
    return name.replace("_", "").replace("-", "").replace(".", "").lower()


def default_lr(name: str) -> float:
    return DEFAULT_LR.get(lr_key(name), FALLBACK_LR)


# ---------------------------------------------------------------------------------------------------- data
def write_task(workdir: Path, plan: Plan) -> Path:
    """The concept images (train: seed 0, the demo's set; eval: another seed) and the demo's dataset TOML.

    The TOML is `configs/examples/demo.toml` with only `image_dir` and `batch_size` replaced, so the bench trains
    with whatever caption, repeat and resolution settings the demo uses.
    """
    generate_shapes_dataset(workdir / "concept", plan.n_train, 64, seed=plan.seed, concept=True, trigger=TRIGGER)
    generate_shapes_dataset(workdir / "heldout", plan.n_eval, 64, seed=plan.seed + 1, concept=True, trigger=TRIGGER)
    text = DEMO_TOML.read_text(encoding="utf-8")
    for key, value in (("image_dir", json.dumps(str(workdir / "concept"))), ("batch_size", str(plan.batch_size))):
        text, n = re.subn(rf"^(\s*){key}\s*=.*$", rf"\g<1>{key} = {value}", text, flags=re.M)
        if n != 1:
            raise RuntimeError(f"{DEMO_TOML}: expected one '{key} = ...' line, found {n}")
    toml = workdir / "dataset.toml"
    toml.write_text(text, encoding="utf-8")
    return toml


def sample_prompts(k: int, seed: int) -> list[tuple[str, str, str]]:
    """K (prompt, colour, background) triples with distinct colours, drawn with a fixed seed."""
    rng = random.Random(seed)
    names = list(COLORS)
    out = []
    for _ in range(k):
        color, bg = rng.sample(names, 2)
        out.append((f"{_article(color)} {color} {TRIGGER} on {_article(bg)} {bg} background", color, bg))
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"  # as the generator writes its captions


def train_argv(name: str, lr: float, dataset_toml: Path, out_dir: Path, plan: Plan) -> list[str]:
    """The command line of one run, as a user would type it after `python train_network.py`."""
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--dataset_config", str(dataset_toml),
            "--output_dir", str(out_dir), "--output_name", "lora", "--network_module", "networks.lora",
            "--network_dim", str(plan.network_dim), "--network_alpha", str(plan.network_alpha),
            "--optimizer_type", name, "--learning_rate", repr(lr), "--max_train_steps", str(plan.steps),
            "--seed", str(plan.seed), "--log_with", "none", "--overwrite", *plan.extra_args]


# ---------------------------------------------------------------------------------------------------- measuring
class EvalSet:
    """Held-out concept images as VAE latents, each paired with fixed noise at fixed, evenly spread timesteps."""

    def __init__(self, trainer, folder: Path, timesteps: int, seed: int):
        from library.data.images import load_image

        paths = sorted(folder.glob("*.png"))
        captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]
        pixels = torch.stack([torch.from_numpy(_rgb(load_image(p))).permute(2, 0, 1) for p in paths])
        pixels = pixels.float() / 127.5 - 1
        vae = trainer.model.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(trainer.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        total = trainer.noise_scheduler.config.num_train_timesteps
        ts = [int((k + 0.5) * total / timesteps) for k in range(timesteps)]
        n = len(paths)
        self.latents = latents.to(trainer.weight_dtype).repeat_interleave(timesteps, 0)
        self.captions = [c for c in captions for _ in range(timesteps)]
        self.timesteps = torch.tensor(ts * n, device=trainer.device)
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(self.latents.shape, generator=gen).to(trainer.device, trainer.weight_dtype)

    @torch.no_grad()
    def loss(self, trainer, chunk: int = 64) -> float:
        """Mean MSE of the model's prediction against its training target, through the trainer's own forward."""
        from library.training import losses

        total = 0.0
        for s in range(0, len(self.captions), chunk):
            lat, noise, t = self.latents[s:s + chunk], self.noise[s:s + chunk], self.timesteps[s:s + chunk]
            cond = trainer._conditioning({"caption": self.captions[s:s + chunk]})
            with trainer.accelerator.autocast():
                pred = trainer._unet_forward(lat, noise, t, cond)
            target = losses.training_target(trainer.noise_scheduler, lat, noise, t)
            total += torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="sum").item()
        return total / self.latents.numel()


def _rgb(image):
    import numpy as np

    return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepProbe:
    """Wraps the trainer's optimizer.step(): times it, times whole iterations, runs the eval every N steps.

    The eval runs under a forked RNG, so evaluating never changes what the training run samples; the iteration
    that follows an eval is timed from the eval's end.
    """

    def __init__(self, trainer, evalset: EvalSet, every: int):
        self.trainer, self.evalset, self.every = trainer, evalset, every
        self.step_ms: list[float] = []
        self.opt_ms: list[float] = []
        self.curve: list[tuple[int, float]] = []
        self.steps = 0
        self._last_end: float | None = None
        self._inner = trainer.optimizer.step
        trainer.optimizer.step = self.step

    def evaluate(self) -> None:
        tr = self.trainer
        devices = [tr.device] if tr.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            tr._optimizer_mode("eval")
            self.curve.append((self.steps, self.evalset.loss(tr)))
            tr._optimizer_mode("train")

    def step(self, *args, **kwargs):
        device = self.trainer.device
        _sync(device)
        t0 = time.perf_counter()
        out = self._inner(*args, **kwargs)
        _sync(device)
        t1 = time.perf_counter()
        self.opt_ms.append((t1 - t0) * 1e3)
        if self._last_end is not None:
            self.step_ms.append((t1 - self._last_end) * 1e3)
        self.steps += 1
        if self.steps % self.every == 0 or self.steps == self.trainer.args.max_train_steps:
            self.evaluate()
        self._last_end = time.perf_counter()
        return out


@torch.no_grad()
def sample_and_score(trainer, classifier, prompts: list[tuple[str, str, str]], plan: Plan) -> dict[str, float]:
    """Sample one image per prompt (seed: the run seed + its index) with the LoRA as trained; score them."""
    from library.training import sampling

    model = trainer.model
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    trainer._optimizer_mode("eval")
    model.unet.eval()
    trainer.network.eval()
    images = []
    try:
        with torch.random.fork_rng(devices=devices):  # sampling must not move the training run's RNG
            pipe = sampling.build_pipeline(model, sampling.make_scheduler("ddim", model.v_parameterization))
            pipe.set_progress_bar_config(disable=True)
            for s in range(0, len(prompts), 16):
                part = prompts[s:s + 16]
                gens = [torch.Generator().manual_seed(plan.seed + s + i) for i in range(len(part))]
                images += pipe([p[0] for p in part], width=64, height=64, num_inference_steps=plan.sample_steps,
                               guidance_scale=plan.guidance, generator=gens, output_type="pil").images
    finally:
        trainer.network.train()
        model.unet.train()
        trainer._optimizer_mode("train")
    scores = shape_classifier.score(classifier, images, "heart", [p[1] for p in prompts], [p[2] for p in prompts])
    return {"heart_frac": scores["shape_acc"], "color_acc": scores["color_acc"], "bg_acc": scores["bg_acc"],
            "all_acc": scores["all_acc"]}


def sd15_state_bytes_per_param(name: str, lr: float, device: str) -> float:
    """State bytes per parameter after two steps on the SD1.5 rank-16 LoRA set (384 tensors, 6.78M parameters)."""
    from bench.optimizer_step import make_params
    from library.optimizers.registry import build_optimizer

    params, names = make_params(16, device)
    optimizer = build_optimizer(name, [{"params": params, "names": names}], lr=lr)[0]
    if hasattr(optimizer, "train"):
        optimizer.train()
    for _ in range(2):
        optimizer.step()
    return state_bytes(optimizer) / sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------------- one run
def run_one(name: str, lr: float, dataset_toml: Path, workdir: Path, plan: Plan, classifier, prompts,
            device: str, base_scores: dict) -> dict:
    """Train one LoRA and measure it; any failure becomes the row's `error` (with what was measured before it).

    The first run that gets that far also scores samples of the untouched base model into `base_scores`.
    """
    from library.cli import parse_args
    from library.training.trainer import LoRATrainer

    row: dict = {"optimizer": name, "lr": lr, "error": None}
    out_dir = workdir / "runs" / f"{name}-lr{lr:g}"
    argv = train_argv(name, lr, dataset_toml, out_dir, plan)
    row["argv"] = argv
    trainer = probe = None
    t0 = time.perf_counter()
    try:
        args = parse_args(argv)
        trainer = LoRATrainer(args)
        trainer.setup()
        if trainer.device.type != torch.device(device).type:
            raise RuntimeError(f"the trainer chose {trainer.device}, the bench asked for {device}")
        row["optimizer_class"] = type(trainer.base_optimizer).__name__
        row["trainable_params"] = sum(p.numel() for p in trainer.trainable)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        evalset = EvalSet(trainer, workdir / "heldout", plan.eval_timesteps, plan.seed + 2)
        probe = StepProbe(trainer, evalset, plan.eval_every)
        probe.evaluate()  # step 0: the base model (lora_up starts at zero)
        if not base_scores:
            base_scores.update(sample_and_score(trainer, classifier, prompts, plan))
        trainer.train()
        row["state_bytes"] = state_bytes(trainer.base_optimizer)
        row["state_bytes_per_param"] = row["state_bytes"] / row["trainable_params"]
        if trainer.device.type == "cuda":
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        row.update(sample_and_score(trainer, classifier, prompts, plan))
    except (Exception, SystemExit) as exc:  # a failing optimizer (or a flag argparse rejects) is a row
        row["error"] = traceback.format_exception_only(type(exc), exc)[-1].strip()
        row["traceback"] = traceback.format_exc().splitlines()[-12:]
    finally:
        row["wall_s"] = time.perf_counter() - t0
        if probe is not None:
            row["eval_curve"] = probe.curve
            timed = probe.step_ms[plan.warmup:] or probe.step_ms
            row["ms_step"] = statistics.median(timed) if timed else None
            opt = probe.opt_ms[plan.warmup:] or probe.opt_ms
            row["opt_ms"] = statistics.median(opt) if opt else None
            row["steps_done"] = probe.steps
        del trainer, probe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if plan.sd15_state:
        try:
            row["state_bytes_per_param_sd15"] = sd15_state_bytes_per_param(name, lr, device)
        except Exception as exc:
            row["state_bytes_per_param_sd15"] = None
            row["sd15_error"] = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return row


# ---------------------------------------------------------------------------------------------------- summary
def loss_at(curve: list, step: int) -> float | None:
    """The eval loss at the last eval point at or before `step`."""
    points = [loss for s, loss in curve if s <= step]
    return points[-1] if points else None


def steps_to(curve: list, target: float) -> int | None:
    """First eval step whose loss is at or below `target` (resolution: the eval interval); None if never."""
    return next((s for s, loss in curve if s > 0 and loss <= target), None)


def summarise(rows: list[dict], steps: int) -> dict:
    """Target loss from the reference run (AdamW if it ran, else the first run that finished) and the ratios."""
    ok = [r for r in rows if not r["error"] and r.get("eval_curve")]
    ref = next((r for r in ok if lr_key(r["optimizer"]) == "adamw"), ok[0] if ok else None)
    if ref is None:
        return {"reference": None, "target_loss": None}
    target = loss_at(ref["eval_curve"], steps // 2)
    ref_steps = steps_to(ref["eval_curve"], target)
    for r in rows:
        curve = r.get("eval_curve") or []
        r["final_eval_loss"] = curve[-1][1] if curve and curve[-1][0] > 0 else None
        r["steps_to_target"] = steps_to(curve, target) if curve else None
        r["convergence_vs_ref"] = (ref_steps / r["steps_to_target"]) if r["steps_to_target"] and ref_steps else None
    for r in rows:  # after the loop above: the reference's own final loss is set by now
        for key in ("final_eval_loss", "ms_step", "state_bytes_per_param", "state_bytes_per_param_sd15"):
            if r.get(key) is not None and ref.get(key):
                r[f"{key}_vs_ref"] = r[key] / ref[key]
    return {"reference": f"{ref['optimizer']} lr={ref['lr']:g}", "target_loss": target,
            "target_definition": f"eval loss of the reference at step {steps // 2} (half of {steps})",
            "reference_steps_to_target": ref_steps}


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown_table(result: dict) -> str:
    meta, summary = result["meta"], result["summary"]
    weights = "pretrained" if meta["tiny_sd_pretrained"] else "random (no pretrained file)"
    lines = [f"Device: {meta['device_name']}; tiny-sd weights: {weights}; {meta['steps']} steps, batch {meta['batch_size']}, eval every "
             f"{meta['eval_every']} steps; target loss {_fmt(summary.get('target_loss'), '.4f')} "
             f"({summary.get('target_definition', 'no reference run')}); reference {summary.get('reference')}.",
             "Classifier held-out accuracy: "
             + ", ".join(f"{k} {v:.3f}" for k, v in meta.get("classifier_heldout", {}).items()) + ".",
             "Base model (no LoRA) samples: "
             + (", ".join(f"{k} {v:.2f}" for k, v in result["base_model"].items()) or "not measured") + ".", "",
             "| optimizer | lr | steps to target | x ref | final eval loss | heart | colour | bg | state B/param "
             "(this LoRA) | state B/param (SD1.5 r16) | ms/step | opt ms | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        never = "never" if r.get("eval_curve") else "-"
        lines.append(" | ".join([
            f"| {r['optimizer']}", f"{r['lr']:g}", _fmt(r.get("steps_to_target"), "d", never),
            _fmt(r.get("convergence_vs_ref"), ".2f"), _fmt(r.get("final_eval_loss"), ".4f"),
            _fmt(r.get("heart_frac"), ".0%"), _fmt(r.get("color_acc"), ".0%"), _fmt(r.get("bg_acc"), ".0%"),
            _fmt(r.get("state_bytes_per_param"), ".2f"), _fmt(r.get("state_bytes_per_param_sd15"), ".2f"),
            _fmt(r.get("ms_step"), ".1f"), _fmt(r.get("opt_ms"), ".2f"),
            (r["error"] or "").replace("|", "/")[:120] + " |"]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def get_classifier(args: argparse.Namespace, plan: Plan, device: str) -> tuple:
    """(classifier, its source, held-out accuracy, seconds): loaded, or trained on the generator's images."""
    t0 = time.perf_counter()
    if args.classifier:
        classifier, source = shape_classifier.load(args.classifier, device), str(args.classifier)
    else:
        classifier = shape_classifier.train_classifier(
            plan.classifier_n, plan.classifier_size, plan.seed, device, plan.classifier_steps,
            batch_size=plan.classifier_batch, workers=1 if args.quick else 4)
        source = (f"trained in this run ({plan.classifier_n} images at {plan.classifier_size} px, "
                  f"{plan.classifier_steps} steps)")
        if args.save_classifier:
            shape_classifier.save(classifier, args.save_classifier)
    heldout = shape_classifier.synthetic_examples(max(70, plan.classifier_n // 6), classifier.size, plan.seed + 1)
    return classifier, source, shape_classifier.evaluate(classifier, heldout), time.perf_counter() - t0


def progress_line(row: dict) -> str:
    curve = row.get("eval_curve") or []
    parts = [f"error: {row['error']}" if row["error"] else "ok",
             "eval loss " + " ".join(f"{s}:{v:.4f}" for s, v in curve[::max(1, len(curve) // 6)])]
    if "heart_frac" in row:
        parts.append(f"heart {row['heart_frac']:.0%}, colour {row['color_acc']:.0%}")
    if row.get("ms_step"):
        parts.append(f"{row['ms_step']:.1f} ms/step")
    return "   " + "; ".join([*parts, f"{row['wall_s']:.1f} s"])


def parse_cli(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated registry names (default: " + ",".join(DEFAULT_OPTIMIZERS)
                        + "); AdamW, if present, runs first: it sets the target")
    parser.add_argument("--steps", type=int, default=None, help="training steps per optimizer (default 300)")
    parser.add_argument("--eval-every", type=int, default=None, help="eval-loss interval (default 15)")
    parser.add_argument("--samples", type=int, default=None, help="images sampled per optimizer (default 32)")
    parser.add_argument("--lr", nargs="*", default=[], metavar="NAME=VALUE", help="override an optimizer's lr")
    parser.add_argument("--lr-mult", default="1", help="comma-separated multipliers of each lr (an lr sweep)")
    parser.add_argument("--train-args", default="",
                        help='extra trainer flags for every run, e.g. "--mixed_precision bf16 --cache_latents"')
    parser.add_argument("--classifier", type=Path, help="a saved shape classifier (default: train one first)")
    parser.add_argument("--save-classifier", type=Path, help="save the classifier trained in this run")
    parser.add_argument("--no-sd15-state", action="store_true", help="skip the SD1.5 state-bytes measurement")
    parser.add_argument("--workdir", type=Path, help="keep data and LoRAs here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke test: AdamW and CustomAdamW, 4 steps, tiny eval, 2 samples, tiny classifier")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu")
    plan = Plan()
    if args.quick:
        plan = Plan(steps=4, eval_every=2, batch_size=1, n_train=4, n_eval=2, eval_timesteps=2, samples=2,
                    sample_steps=3, warmup=1, classifier_n=280, classifier_steps=60, classifier_size=32,
                    classifier_batch=64, sd15_state=False)
    if args.optimizers is None:
        args.optimizers = "AdamW,CustomAdamW" if args.quick else ",".join(DEFAULT_OPTIMIZERS)
    plan.steps = args.steps or plan.steps
    plan.eval_every = args.eval_every or plan.eval_every
    plan.samples = args.samples or plan.samples
    plan.sd15_state = plan.sd15_state and not args.no_sd15_state
    plan.extra_args = shlex.split(args.train_args)
    if not [n for n in args.optimizers.split(",") if n.strip()]:
        parser.error("--optimizers: give at least one optimizer name")
    if "--cache_text_encoder_outputs" in plan.extra_args:
        parser.error("--train-args: --cache_text_encoder_outputs would leave the held-out captions unencoded")
    try:
        args.lr = parse_lr_overrides(args.lr)
        args.lr_mult = [float(m) for m in args.lr_mult.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    return args, plan


def parse_lr_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if not name or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"--lr {item!r}: expected NAME=VALUE with a positive VALUE, e.g. --lr Lion=3e-5")
        out[lr_key(name)] = lr
    return out


def main(argv: list[str] | None = None) -> int:
    from library.models.builtin import TINY_SD_WEIGHTS

    args, plan = parse_cli(argv)
    device = args.device
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # what `accelerate launch --cpu` sets: the trainer stays on the CPU
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    names.sort(key=lambda n: lr_key(n) != "adamw")  # stable: AdamW first (it sets the target), the rest as given
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "loraforge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    t_start = time.perf_counter()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="optimizers_lora-")
    workdir = args.workdir or Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        classifier, clf_source, clf_acc, clf_s = get_classifier(args, plan, device)
        print(f"classifier ({clf_source}, {clf_s:.1f} s): held-out "
              + ", ".join(f"{k} {v:.3f}" for k, v in clf_acc.items()), flush=True)
        dataset_toml = write_task(workdir, plan)
        prompts = sample_prompts(plan.samples, plan.seed)
        meta = {"device": device,
                "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "steps": plan.steps, "eval_every": plan.eval_every,
                "batch_size": plan.batch_size, "n_train": plan.n_train, "n_eval": plan.n_eval,
                "eval_timesteps": plan.eval_timesteps, "samples": plan.samples, "sample_steps": plan.sample_steps,
                "guidance": plan.guidance, "warmup_steps_excluded": plan.warmup, "network_dim": plan.network_dim,
                "network_alpha": plan.network_alpha, "seed": plan.seed, "quick": args.quick,
                "tiny_sd_pretrained": TINY_SD_WEIGHTS.is_file(),
                "train_args": plan.extra_args, "classifier": clf_source, "classifier_heldout": clf_acc,
                "classifier_s": clf_s,
                "command": "python bench/optimizers_lora.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
        base_scores: dict = {}
        rows: list[dict] = []
        for name in names:
            for mult in args.lr_mult:
                lr = args.lr.get(lr_key(name), default_lr(name)) * mult
                print(f"-- {name} lr={lr:g}", flush=True)
                rows.append(run_one(name, lr, dataset_toml, workdir, plan, classifier, prompts, device, base_scores))
                print(progress_line(rows[-1]), flush=True)
                meta["total_s"] = time.perf_counter() - t_start
                result = {"meta": meta, "base_model": base_scores, "summary": summarise(rows, plan.steps),
                          "rows": rows}
                if args.json:  # rewritten after every row: a run cut short keeps what it finished
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(result, indent=2))
        table = markdown_table(result)
        print(table)
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(table, encoding="utf-8")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
