"""Sample images during training from a prompt file in sd-scripts' syntax.

One prompt per line; options after the prompt: `--n negative`, `--w 512`, `--h 512`, `--s steps`, `--l cfg scale`,
`--d seed`. Lines starting with `#` are comments. Each prompt gets its own seeded generator, so sampling never
disturbs the training RNG (resume stays exact) and the same prompt/seed is comparable across steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import ConfigError

_OPTION = re.compile(r"\s--(n|w|h|s|l|d)\s")


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    scale: float = 7.0
    seed: int | None = None


def parse_prompt_line(line: str, default_size: tuple[int, int], where: str) -> SamplePrompt:
    parts = _OPTION.split(" " + line.strip() + " ")
    sp = SamplePrompt(prompt=parts[0].strip(), width=default_size[0], height=default_size[1])
    converters = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
                  "l": ("scale", float), "d": ("seed", int)}
    for key, value in zip(parts[1::2], parts[2::2], strict=True):  # re.split with one group: equal halves
        field, kind = converters[key]
        try:
            setattr(sp, field, kind(value.strip()))
        except ValueError:
            raise ConfigError(f"{where}: --{key} {value.strip()!r} is not a valid {kind.__name__}") from None
    return sp


def load_prompts(path: str, default_size: tuple[int, int]) -> list[SamplePrompt]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--sample_prompts {path}: cannot read as UTF-8 text ({exc})") from None
    prompts = [parse_prompt_line(line, default_size, f"--sample_prompts {path}:{i + 1}")
               for i, line in enumerate(text.splitlines()) if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"--sample_prompts {path}: no prompts (one per line; '#' starts a comment)")
    return prompts


def make_scheduler(name: str, scheduler_config: dict):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "dpmsolver++": DPMSolverMultistepScheduler}[name]
    return cls.from_config(scheduler_config)


def build_pipeline(model, scheduler):
    """A diffusers pipeline over the training modules (LoRA already applied in place)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = getattr(model.unet, "_orig_mod", model.unet)  # eager: compiled / CUDA-graph U-Nets are for training steps
    if model.model_type == "sdxl":
        return StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
                                         tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=unet,
                                         scheduler=scheduler)
    return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def generate(model, prompts: list[SamplePrompt], sampler: str, scheduler_config: dict, device, base_seed: int,
             clip_skip: int | None = None, max_token_length: int | None = None):
    """Return one PIL image per prompt. Prompts are encoded as sd-scripts' sampling does (long prompts and
    `(word:1.3)` emphasis, `sample_embeddings`)."""
    from library.training.sample_embeddings import pipeline_embeddings

    pipe = build_pipeline(model, make_scheduler(sampler, scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, sp in enumerate(prompts):
        gen = torch.Generator(device="cpu").manual_seed(sp.seed if sp.seed is not None else base_seed + i)
        embeds = pipeline_embeddings(model, sp.prompt, sp.negative, guidance=sp.scale > 1, clip_skip=clip_skip,
                                     max_token_length=max_token_length, device=device)
        out = pipe(**embeds, width=sp.width, height=sp.height, num_inference_steps=sp.steps,
                   guidance_scale=sp.scale, generator=gen, output_type="pil")
        images.append(out.images[0])
    return images
