"""Rendering one image with embeddings that are never registered in a tokenizer: the training previews and
the standalone app's Try-it panel."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .prompt import encode_prompts
from .timodel import TIModel


def uncompiled():
    """Previews and validation run eagerly: their no-grad passes (and a preview's doubled batch) would each
    compile anew, for a handful of calls."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def render_image(
    model: TIModel,
    prompt: str,
    negative: str,
    embeddings: Mapping[str, Any] | Sequence[Any],
    *,
    seed: int,
    steps: int,
    width: int,
    height: int,
    guidance: float,
    sampler: str = "model",
    generator_device: torch.device | str | None = None,
):
    """One image of `prompt` (a PIL image) through diffusers' pipeline of `model`, conditioned by our prompt
    encoder with `embeddings` ({name: vectors} or Embedding objects). ``sampler``: "model" (the model's own
    scheduler) or "dpm++" (DPM-Solver++). The noise comes from a generator on `generator_device` (default:
    the UNet's) seeded with `seed`."""
    from diffusers import DPMSolverMultistepScheduler

    pipeline = model.pipeline()
    if sampler == "dpm++":
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    device = generator_device if generator_device is not None else model.unet.device
    with torch.no_grad(), uncompiled():
        # One call, so the prompt and the negative prompt get the same number of 77-token windows.
        both = encode_prompts(model, [negative, prompt], embeddings)
        extra = {}
        if both.pooled is not None:
            extra = {"pooled_prompt_embeds": both.pooled[1:], "negative_pooled_prompt_embeds": both.pooled[:1]}
        latents = pipeline(
            prompt_embeds=both.hidden_states[1:],
            negative_prompt_embeds=both.hidden_states[:1],
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator(device=device).manual_seed(seed),
            output_type="latent",
            **extra,
        ).images
        # Decoded here in the VAE's own dtype: the UNet may be half precision, the VAE usually is not.
        image = model.vae.decode(latents.to(model.vae.dtype) / model.vae.config.scaling_factor).sample
    return pipeline.image_processor.postprocess(image.float(), output_type="pil")[0]
