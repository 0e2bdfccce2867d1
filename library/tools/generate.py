"""gen_img.py / generate: images from prompts with a base model and LoRAs, PNGs carrying the prompt.

Prompt lines use gen_img.py's options after the text: `--n` negative prompt, `--w` / `--h` size, `--d` seeds
(comma-separated), `--l` guidance scale, `--s` steps, `--ss` sampler, `--am` LoRA multipliers
(comma-separated, one per `--network_weights`). Seeds follow gen_img.py: `--seed` itself for a single image,
otherwise drawn from `random.Random(--seed)`; `--d` seeds come first.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from library.errors import ConfigError
from library.training.atomic import atomic_file

logger = logging.getLogger(__name__)

SAMPLERS = {  # gen_img.py's names -> (diffusers scheduler class, extra config)
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
SAMPLER_NAMES = [*SAMPLERS, *(f"k_{n}" for n in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a"))]
_OPTION = re.compile(r"(?i)^(n|w|h|d|l|s|ss|am)\s+(.*)$", re.DOTALL)


@dataclass
class PromptJob:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 50
    scale: float = 7.5
    sampler: str = "ddim"
    seeds: list[int] = field(default_factory=list)
    multipliers: list[float] | None = None
    raw: str = ""


def sampler_name(name: str, where: str) -> str:
    name = name.strip().lower().removeprefix("k_")
    if name not in SAMPLERS:
        raise ConfigError(f"{where}: sampler {name!r} is unknown; valid: {', '.join(SAMPLER_NAMES)}")
    return name


def parse_prompt(line: str, defaults: PromptJob, where: str) -> PromptJob:
    """A prompt line with gen_img.py's ` --x value` options; an unknown option stops with its line."""
    parts = line.strip().split(" --")
    job = PromptJob(**{**defaults.__dict__, "prompt": parts[0].strip(), "seeds": [], "raw": line.strip()})
    for part in parts[1:]:
        match = _OPTION.match(part.strip())
        if not match:
            raise ConfigError(
                f"{where}: unknown prompt option '--{part.strip()}'; valid: --n --w --h --d --l --s --ss --am"
            )
        key, value = match[1].lower(), match[2].strip()
        try:
            if key == "n":
                job.negative = value
            elif key in ("w", "h"):
                setattr(job, "width" if key == "w" else "height", int(value))
            elif key == "d":
                job.seeds = [int(s) for s in value.split(",")]
            elif key == "l":
                job.scale = float(value)
            elif key == "s":
                job.steps = max(1, min(1000, int(value)))  # gen_img.py clamps steps to 1..1000
            elif key == "ss":
                job.sampler = sampler_name(value, where)
            else:
                job.multipliers = [float(m) for m in value.split(",")]
        except ValueError:
            raise ConfigError(f"{where}: --{key} {value!r} is not a valid value") from None
    if job.width % 8 or job.height % 8:
        raise ConfigError(f"{where}: size {job.width}x{job.height} must be a multiple of 8")
    return job


def read_prompts(args: argparse.Namespace, defaults: PromptJob) -> list[PromptJob]:
    if args.prompt is not None and args.from_file is not None:
        raise ConfigError("--prompt and --from_file were both given; use one")
    if args.prompt is not None:
        return [parse_prompt(args.prompt, defaults, "--prompt")]
    if args.from_file is None:
        raise ConfigError("give --prompt TEXT or --from_file FILE (one prompt per line)")
    try:
        lines = Path(args.from_file).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--from_file {args.from_file}: cannot read as UTF-8 text ({exc})") from None
    jobs = [
        parse_prompt(line, defaults, f"--from_file {args.from_file}:{i + 1}")
        for i, line in enumerate(lines)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not jobs:
        raise ConfigError(f"--from_file {args.from_file}: no prompts (one per line; '#' starts a comment)")
    return jobs


def image_seeds(jobs: list[PromptJob], count: int, seed: int | None, rng: random.Random) -> list[list[int]]:
    """Per prompt, `count` seeds: its `--d` seeds (the last repeated), then seeds drawn from `rng`; a single
    image of a single prompt takes `--seed` itself (as gen_img.py does)."""
    if seed is not None and len(jobs) == 1 and count == 1:
        return [[jobs[0].seeds[0] if jobs[0].seeds else seed]]
    out = []
    for job in jobs:
        seeds = []
        for k in range(count):
            if job.seeds:
                seeds.append(job.seeds[min(k, len(job.seeds) - 1)])
            else:
                seeds.append(rng.randint(0, 2**32 - 1))
        out.append(seeds)
    return out


def make_scheduler(name: str, scheduler_config: dict):
    import diffusers

    cls_name, extra = SAMPLERS[name]
    if cls_name == "LMSDiscreteScheduler":
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise ConfigError(
                "sampler lms needs the scipy package (pip install scipy); or pick another sampler"
            ) from None
    return getattr(diffusers, cls_name).from_config({**scheduler_config, **extra})


def png_metadata(job: PromptJob, seed: int, networks: list[tuple[str, float]]) -> PngInfo:
    """gen_img.py's PNG text chunks (prompt, seed, sampler, steps, scale, negative-prompt), plus the LoRAs."""
    info = PngInfo()
    info.add_text("prompt", job.prompt)
    info.add_text("seed", str(seed))
    info.add_text("sampler", job.sampler)
    info.add_text("steps", str(job.steps))
    info.add_text("scale", str(job.scale))
    if job.negative:
        info.add_text("negative-prompt", job.negative)
    if job.raw and job.raw != job.prompt:
        info.add_text("raw-prompt", job.raw)
    if networks:
        info.add_text("networks", ", ".join(f"{Path(p).name}:{m:g}" for p, m in networks))
    return info


def save_png(image, path: Path, info: PngInfo) -> None:
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def output_name(index: int, seed: int, sequential: bool, stamp: str) -> str:
    """gen_img.py's names: `im_<time>_<nnn>_<seed>.png`, or `im_<nnnnnn>.png` with --sequential_file_name."""
    return f"im_{index + 1:06d}.png" if sequential else f"im_{stamp}_{index:03d}_{seed}.png"


def default_size(model_type: str, v_parameterization: bool) -> int:
    return 1024 if model_type == "sdxl" else 768 if (model_type == "sd2" and v_parameterization) else 512


def now_stamp() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime())


def dtype_for(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    if args.fp16 and args.bf16:
        raise ConfigError("--fp16 and --bf16 were both given; choose one")
    if args.fp16 and device.type == "cpu":
        raise ConfigError("--fp16: half precision does not run on the CPU; use --bf16 or a CUDA --device")
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def check_networks(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(file, multiplier) per `--network_weights`; only networks.lora files (kohya LoRA / LoCon) are read."""
    files = args.network_weights or []
    modules = args.network_module or []
    if modules and len(modules) not in (1, len(files)):
        raise ConfigError(f"--network_module: {len(modules)} values for {len(files)} --network_weights")
    for module in modules:
        if module != "networks.lora":
            raise ConfigError(
                f"--network_module {module}: only networks.lora (kohya LoRA/LoCon files) is supported"
            )
    if files and not modules:
        raise ConfigError("--network_weights needs --network_module networks.lora (as gen_img.py)")
    muls = args.network_mul if args.network_mul else [1.0] * len(files)
    if len(muls) != len(files):
        raise ConfigError(f"--network_mul: {len(muls)} values for {len(files)} --network_weights")
    for file in files:
        if not Path(file).is_file():
            raise ConfigError(f"--network_weights: LoRA file not found: {file}")
    return list(zip(files, muls, strict=True))


def attach_networks(model, networks: list[tuple[str, float]], merge: bool, device, dtype) -> list:
    """Each LoRA hooked into the model (or merged into its weights with --network_merge)."""
    from library.tools.checkpoint import check_lora_fits, lora_layers
    from library.tools.lora_files import split_modules
    from library.tools.sdxl_names import to_diffusers_names
    from networks.files import read_lora_file
    from networks.lora import create_network_from_weights

    layers = lora_layers(model)
    attached = []
    for file, mul in networks:
        state = read_lora_file(file)
        if model.model_type == "sdxl":
            state = to_diffusers_names(state, file)
        check_lora_fits(split_modules(state, file), layers, file, model)
        network, weights = create_network_from_weights(
            mul, file, model.vae, model.text_encoders, model.unet, weights_sd=state
        )
        network.load_state_dict(weights)
        network.to(device=device, dtype=dtype)
        if merge:
            network.merge_to()
        else:
            network.apply_to(model.text_encoders, model.unet)
        attached.append(network)
        logger.info("LoRA %s at %g%s", file, mul, " (merged)" if merge else "")
    return attached


@torch.no_grad()
def generate_images(args: argparse.Namespace) -> list[Path]:
    from library.models import load_sd_model
    from library.tools.checkpoint import model_flags
    from library.tools.runner import progress, resolve_device
    from library.training.sampling import build_pipeline

    if not args.ckpt:
        raise ConfigError(
            "--ckpt is required: a .safetensors/.ckpt file, a diffusers folder or builtin:tiny-sd"
        )
    device = (
        resolve_device(args.device)
        if args.device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = dtype_for(args, device)
    for flag in ("images_per_prompt", "n_iter", "batch_size", "steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    networks = check_networks(args)
    advice = {"sd1": "drop --v2/--sdxl", "sd2": "use --v2", "sdxl": "use --sdxl"}
    args.v2, args.sdxl = model_flags(args.ckpt, v2=args.v2, sdxl=args.sdxl, advice=advice)
    model_type = "sdxl" if args.sdxl else "sd2" if args.v2 else "sd1"
    size = default_size(model_type, args.v_parameterization)
    defaults = PromptJob(
        prompt="",
        width=args.W or size,
        height=args.H or size,
        steps=args.steps,
        scale=args.scale,
        sampler=sampler_name(args.sampler, "--sampler"),
    )
    jobs = read_prompts(args, defaults)
    for job in jobs:
        if job.multipliers is not None and len(job.multipliers) != len(networks):
            raise ConfigError(
                f"prompt {job.prompt!r}: --am has {len(job.multipliers)} values for "
                f"{len(networks)} --network_weights"
            )
        if job.multipliers is not None and args.network_merge:
            raise ConfigError(
                "--am changes LoRA multipliers per prompt, which merged LoRAs cannot; drop --network_merge"
            )
    model = load_sd_model(
        args.ckpt, v2=args.v2, sdxl=args.sdxl, v_parameterization=args.v_parameterization, dtype=dtype
    )
    for part in (*model.text_encoders, model.vae, model.unet):
        part.to(device)
    attached = attach_networks(model, networks, args.network_merge, device, dtype)
    pipe = build_pipeline(model, make_scheduler(defaults.sampler, model.scheduler_config))
    pipe.set_progress_bar_config(leave=False, disable=None)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng, stamp, written = random.Random(args.seed), now_stamp(), []
    for _ in range(args.n_iter):
        seeds_per_job = image_seeds(
            jobs, args.images_per_prompt, args.seed if args.n_iter == 1 else None, rng
        )
        for job, seeds in progress("prompts")(list(zip(jobs, seeds_per_job, strict=True))):
            muls = job.multipliers if job.multipliers is not None else [m for _, m in networks]
            if not args.network_merge:
                for network, mul in zip(attached, muls, strict=True):
                    network.set_multiplier(mul)
            pipe.scheduler = make_scheduler(job.sampler, model.scheduler_config)
            for start in range(0, len(seeds), args.batch_size):
                batch = seeds[start : start + args.batch_size]
                images = pipe(
                    [job.prompt] * len(batch),
                    negative_prompt=[job.negative] * len(batch),
                    width=job.width,
                    height=job.height,
                    num_inference_steps=job.steps,
                    guidance_scale=job.scale,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in batch],
                ).images
                for image, seed in zip(images, batch, strict=True):
                    path = outdir / output_name(len(written), seed, args.sequential_file_name, stamp)
                    save_png(
                        image,
                        path,
                        png_metadata(job, seed, [(f, m) for (f, _), m in zip(networks, muls, strict=True)]),
                    )
                    written.append(path)
    logger.info("%d images written to %s", len(written), outdir)
    return written
