"""Sample images during training from a prompt file in sd-scripts' syntax (read by `sample_prompts.py`).

Each prompt gets its own seeded generator (its `--d` seed, else `--seed` + its index), so sampling never disturbs
the training RNG (resume stays exact) and the same prompt is comparable across steps. sd-scripts draws an unseeded
prompt from a fresh random seed instead, which also reseeds training's own generator.
"""

from __future__ import annotations

import torch

from library.training.sample_prompts import SAMPLERS, SamplePrompt

# sd-scripts' sampling schedule (get_my_scheduler): the SD noise schedule, whatever the model's config says
_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def make_scheduler(name: str, v_parameterization: bool):
    """The diffusers scheduler sd-scripts uses for the sampler `name`, configured as sd-scripts configures it."""
    import diffusers

    cls = getattr(diffusers, SAMPLERS[name])
    kwargs = dict(_SCHEDULE)
    if name in ("dpmsolver", "dpmsolver++"):
        kwargs["algorithm_type"] = name
    if name == "dpmsolver":  # current diffusers refuses first-order DPM-Solver's default final step to sigma 0
        kwargs["final_sigmas_type"] = "sigma_min"
    if v_parameterization:
        kwargs["prediction_type"] = "v_prediction"
    scheduler = cls(**kwargs)
    if getattr(scheduler.config, "clip_sample", None) is False:  # sd-scripts turns clipping on where it exists
        scheduler.register_to_config(clip_sample=True)
    return scheduler


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
def generate(model, prompts: list[SamplePrompt], sampler: str, device, base_seed: int,
             clip_skip: int | None = None, max_token_length: int | None = None):
    """Return one PIL image per prompt; a prompt's own sampler (`--ss`) replaces `sampler`. Prompts are encoded
    as sd-scripts' sampling does (long prompts and `(word:1.3)` emphasis, `sample_embeddings`)."""
    from library.training.sample_embeddings import pipeline_embeddings

    pipe = build_pipeline(model, make_scheduler(sampler, model.v_parameterization))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, sp in enumerate(prompts):
        pipe.scheduler = make_scheduler(sp.sampler or sampler, model.v_parameterization)
        gen = torch.Generator(device="cpu").manual_seed(sp.seed if sp.seed is not None else base_seed + i)
        embeds = pipeline_embeddings(model, sp.prompt, sp.negative, guidance=sp.scale > 1, clip_skip=clip_skip,
                                     max_token_length=max_token_length, device=device)
        out = pipe(**embeds, width=sp.width, height=sp.height, num_inference_steps=sp.steps,
                   guidance_scale=sp.scale, generator=gen, output_type="pil")
        images.append(out.images[0])
    return images
