"""Rendering images with embeddings that are never registered in a tokenizer (the training previews and
the standalone app's Try-it panel), and laying previews out in labelled grids."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .prompt import encode_prompts
from .timodel import TIModel

# The preview samplers by name (ti_core.config.PREVIEW_SAMPLERS): a diffusers scheduler class and what its
# config changes. Each is made from the model's own scheduler config, so the betas, the prediction type and
# zero-terminal SNR (ti_core.zero_snr) carry over.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def prompt_lines(text: str) -> list[str]:
    """The prompts of a several-prompt field: its non-empty lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def sampling_scheduler(name: str, scheduler: Any) -> Any:
    """The scheduler that samples with `name` (a SAMPLERS key; "model": `scheduler` itself)."""
    import diffusers

    if name == "model":
        return scheduler
    if name not in SAMPLERS:
        raise ValueError(f"unknown preview sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    class_name, changes = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config({**scheduler.config, **changes})


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
    sampler: str = "dpm++_2m",
    generator_device: torch.device | str | None = None,
):
    """One image of `prompt` (a PIL image) through diffusers' pipeline of `model`, conditioned by our prompt
    encoder with `embeddings` ({name: vectors} or Embedding objects). ``sampler``: a SAMPLERS name, or
    "model" (the model's own scheduler). The noise comes from a generator on `generator_device` (default:
    the UNet's) seeded with `seed`."""
    pipeline = model.pipeline()
    pipeline.scheduler = sampling_scheduler(sampler, model.scheduler)
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


def image_grid(rows: Sequence[Sequence[Any]], row_labels: Sequence[str] = ()):
    """PIL images laid out in rows (each row as many as the first; every image the first's size), with an
    optional label left of each row (no labels: no strip)."""
    from PIL import Image, ImageDraw

    width, height = rows[0][0].size
    left = 8 + 7 * max((len(label) for label in row_labels), default=0) if row_labels else 0
    grid = Image.new("RGB", (left + len(rows[0]) * width, len(rows) * height), "white")
    draw = ImageDraw.Draw(grid)
    for row_index, row in enumerate(rows):
        y = row_index * height
        if row_index < len(row_labels):  # the default bitmap font is 11 px high
            draw.text((4, y + height // 2 - 6), row_labels[row_index], fill="black")
        for column, image in enumerate(row):
            grid.paste(image.convert("RGB"), (left + column * width, y))
    return grid
