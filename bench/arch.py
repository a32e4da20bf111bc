"""Model architectures for the training benchmark: real SD1.5 / SDXL configs, and scaled-down SD1.5 for CPU.

The real configs are the values of the published diffusers folders (runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder*/ config.json), written out here so
the GPU benchmark builds them with random weights and no download. `small` keeps SD1.5's layer layout
(4 down blocks, 3 with cross-attention, 2 layers each, 8 heads, a 12-layer 77-token CLIP with the real
49408-token vocabulary) with every width divided by 8, so the shares of the step's FLOPs (VAE encode :
UNet : text encoder) stay close to SD1.5's while a CPU step takes tens of milliseconds.

Every model is built in-process with seed 0 and saved once as a diffusers folder, which both trainers
load (ours through `ti_core.models.load_model`, the reference with `from_pretrained`, as its script does).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": False,
}
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CLIP_L = {  # SD1.x text_encoder and SDXL text_encoder (openai/clip-vit-large-patch14)
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
CLIP_G = {  # SDXL text_encoder_2 (OpenCLIP ViT-bigG/14)
    **CLIP_L,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_VAE = {**SD15_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}
SCHEDULER = {  # both models' training noise schedule (the DDPMScheduler the example builds from scheduler/)
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

ARCHES = ("tiny", "tiny-sdxl", "small", "sd15", "sdxl")


def small_configs(divisor: int = 8) -> tuple[dict, dict, dict]:
    """SD1.5's UNet, VAE and CLIP-L configs with every width divided by `divisor` (layout unchanged)."""
    unet, vae, clip = copy.deepcopy(SD15_UNET), copy.deepcopy(SD15_VAE), copy.deepcopy(CLIP_L)
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
    scheduler = DDIMScheduler(**{**SCHEDULER, "prediction_type": prediction_type})
    if arch == "sdxl":
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer("!"),
            unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    unet, vae, clip = (SD15_UNET, SD15_VAE, CLIP_L) if arch == "sd15" else small_configs()
    if arch == "small":
        unet = {**unet, "sample_size": 16}  # 128 px: the benchmark's CPU resolution
        vae = {**vae, "sample_size": 128}
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip)),
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
