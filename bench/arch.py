"""Model architectures for the training benchmark: real SD1.5 / SDXL configs, and scaled-down SD1.5 for CPU.

The real configs are the published diffusers folders' config files (runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0), read from ti_core/configs/ where ti_core ships them for
single-file loading, so the GPU benchmark builds them with random weights and no download. `small` keeps SD1.5's layer layout
(4 down blocks, 3 with cross-attention, 2 layers each, 8 heads, a 12-layer 77-token CLIP with the real
49408-token vocabulary) with every width divided by 8, so the shares of the step's FLOPs (VAE encode :
UNet : text encoder) stay close to SD1.5's while a CPU step takes tens of milliseconds.

Every model is built in-process with seed 0 and saved once as a diffusers folder, which both trainers
load (ours through `ti_core.models.load_model`, the reference with `from_pretrained`, as its script does).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "ti_core" / "configs"


def real_config(model: str, component: str) -> dict:
    """A component's config from the published diffusers folders that ti_core ships for single-file
    loading (ti_core/configs/<model>/<component>/), so the benchmark builds exactly those models."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    config = json.loads((CONFIGS / model / component / name).read_text(encoding="utf-8"))
    # Without diffusers' bookkeeping keys ("_class_name", ...), so the dict goes straight to a constructor
    # (from_config would silently raise a small SD1 UNet's sample_size to 64).
    return {key: value for key, value in config.items() if not key.startswith("_")}


ARCHES = ("tiny", "tiny-sdxl", "small", "sd15", "sdxl")


def small_configs(divisor: int = 8) -> tuple[dict, dict, dict]:
    """SD1.5's UNet, VAE and CLIP-L configs with every width divided by `divisor` (layout unchanged)."""
    unet, vae, clip = (copy.deepcopy(real_config("sd1", part)) for part in ("unet", "vae", "text_encoder"))
    unet["block_out_channels"] = [c // divisor for c in unet["block_out_channels"]]  # 40, 80, 160, 160
    unet["norm_num_groups"] = 8  # 32 groups need >= 32 channels; the group count does not change FLOPs
    vae["block_out_channels"] = [c // divisor for c in vae["block_out_channels"]]  # 16, 32, 64, 64
    vae["norm_num_groups"] = 8
    clip["hidden_size"] //= divisor  # 96: 12 heads of 8
    clip["intermediate_size"] //= divisor
    clip["projection_dim"] //= divisor
    unet["cross_attention_dim"] = clip["hidden_size"]
    return unet, vae, clip


def build_pipeline(arch: str, prediction_type: str = "epsilon"):
    """A diffusers pipeline with random weights (seed 0) of one of ARCHES."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ti_core.testing import build_tiny_pipeline
    from ti_core.vocab import clip_tokenizer

    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, not {arch!r}")
    if arch in ("tiny", "tiny-sdxl"):  # the test models: for the smoke test and the SDXL code path on CPU
        return build_tiny_pipeline("sdxl" if arch == "tiny-sdxl" else "sd1", prediction_type)
    torch.manual_seed(0)
    model = "sdxl" if arch == "sdxl" else "sd1"
    # Both models' training noise schedule, as a DDIM sampler for the previews.
    scheduler = DDIMScheduler.from_config(real_config(model, "scheduler"), prediction_type=prediction_type)
    if arch == "sdxl":
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**real_config("sdxl", "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(real_config("sdxl", "text_encoder"))),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig.from_dict(real_config("sdxl", "text_encoder_2"))
            ),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer("!"),
            unet=UNet2DConditionModel(**real_config("sdxl", "unet")),
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    if arch == "sd15":
        unet, vae, clip = (real_config("sd1", part) for part in ("unet", "vae", "text_encoder"))
    else:
        unet, vae, clip = small_configs()
    if arch == "small":
        unet = {**unet, "sample_size": 16}  # 128 px: the benchmark's CPU resolution
        vae = {**vae, "sample_size": 128}
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(clip)),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**unet),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(arch: str, folder: Path, prediction_type: str = "epsilon") -> Path:
    """Build `arch` and save it as a diffusers folder (safetensors); returns the folder."""
    build_pipeline(arch, prediction_type).save_pretrained(folder, safe_serialization=True)
    return Path(folder)
