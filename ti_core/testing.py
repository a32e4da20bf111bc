"""Tiny Stable Diffusion models with the real architectures and the real CLIP vocabulary.

Tests and the CPU benchmark build these in-process (seed 0): the code paths are the ones real
checkpoints take; only the widths are small. Text encoders keep the real 49408-token vocabulary and
the real special-token ids, so tokenization and embedding lookup are exercised exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .vocab import VOCAB_SIZE, clip_tokenizer

ARCHITECTURES = ("sd1", "sd2", "sdxl")
# Text-encoder widths are deliberately all different so a mixed-up encoder cannot pass a test.
TINY_WIDTHS = {"sd1": {"clip_l": 32}, "sd2": {"clip_h": 48}, "sdxl": {"clip_l": 32, "clip_g": 40}}


def _text_config(hidden_size: int, layers: int = 2, projection_dim: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    # Special-token ids as in the real SD configs (eos_token_id=2 selects the legacy argmax pooling).
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2 + 5,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_pipeline(architecture: str = "sd1", prediction_type: str = "epsilon", unet_widths=(32, 32, 64, 64)):
    """A diffusers pipeline of the given architecture with tiny random weights (seed 0)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {architecture!r}")
    torch.manual_seed(0)
    if architecture == "sdxl":
        width_l, width_g = TINY_WIDTHS["sdxl"]["clip_l"], TINY_WIDTHS["sdxl"]["clip_g"]
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=width_l + width_g,
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(_text_config(width_l))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(width_g, projection_dim=32, act="gelu"))
        return StableDiffusionXLPipeline(
            vae=_tiny_vae(),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer("!"),
            unet=unet,
            scheduler=_scheduler(prediction_type),
            force_zeros_for_empty_prompt=True,
        )
    sd2 = architecture == "sd2"
    width = TINY_WIDTHS[architecture]["clip_h" if sd2 else "clip_l"]
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=tuple(unet_widths),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=width,
        attention_head_dim=(2, 4, 8, 8) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(_text_config(width, act="gelu" if sd2 else "quick_gelu"))
    return StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer("!" if sd2 else "<|endoftext|>"),
        unet=unet,
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(folder: Path, architecture: str = "sd1", prediction_type: str = "epsilon") -> Path:
    """Save a tiny pipeline as a diffusers folder and return the folder."""
    pipeline = build_tiny_pipeline(architecture, prediction_type)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
