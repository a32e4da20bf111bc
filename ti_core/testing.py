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


def text_config(hidden_size: int, layers: int = 2, projection_dim: int | None = None, act: str = "quick_gelu"):
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
        text_encoder = CLIPTextModel(text_config(width_l))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(width_g, projection_dim=32, act="gelu"))
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
    text_encoder = CLIPTextModel(text_config(width, act="gelu" if sd2 else "quick_gelu"))
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


# --------------------------------------------------------------------------------------------------
# Single-file checkpoints in the original LDM/SGM layout (what A1111, Forge and ComfyUI users have)

SINGLE_FILE_FORMATS = ("safetensors", "ckpt")


def tiny_ldm_state_dict(pipeline, architecture: str) -> dict[str, torch.Tensor]:
    """A tiny pipeline's weights under the original single-file key names (SD1 keeps CLIP's position_ids)."""
    from .ldm_keys import SD1_CLIP_PREFIX, pipeline_to_ldm

    state_dict = pipeline_to_ldm(pipeline, architecture)
    if architecture == "sd1":  # real SD1 files carry the CLIP position ids buffer
        state_dict[SD1_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return state_dict


class FakeModelCheckpoint:
    """Looks like pytorch_lightning's ModelCheckpoint callback to pickle (see _LightningModules)."""

    def __init__(self):
        self.monitor = None
        self.save_top_k = -1
        self.dirpath = "logs/checkpoints"
        self.best_model_path = ""
        self.kth_value = torch.tensor(float("inf"))


class _LightningModules:
    """Put a synthetic pytorch_lightning.callbacks.model_checkpoint in sys.modules while pickling."""

    NAMES = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")

    def __enter__(self):
        import sys
        import types

        self.saved = {name: sys.modules.get(name) for name in self.NAMES}
        modules = [types.ModuleType(name) for name in self.NAMES]
        modules[0].callbacks = modules[1]
        modules[1].model_checkpoint = modules[2]
        cls = type("ModelCheckpoint", (FakeModelCheckpoint,), {"__module__": self.NAMES[2]})
        modules[2].ModelCheckpoint = cls
        sys.modules.update(zip(self.NAMES, modules, strict=True))
        return cls

    def __exit__(self, *exc):
        import sys

        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def save_ldm_checkpoint(
    state_dict: dict[str, torch.Tensor], path: Path, fmt: str = "safetensors", legacy: bool = False
) -> Path:
    """Write a single-file checkpoint: plain safetensors, or a Lightning-style .ckpt (``legacy``: pre-zip torch format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path), metadata={"format": "pt"})
    elif fmt == "ckpt":
        with _LightningModules() as model_checkpoint:
            checkpoint = {
                "state_dict": state_dict,
                "epoch": 1,
                "global_step": 10,
                "pytorch-lightning_version": "1.4.2",
                "callbacks": {model_checkpoint: model_checkpoint()},
            }
            try:
                import numpy

                checkpoint["best_model_score"] = numpy.float64(0.25)  # pickled as numpy...multiarray.scalar
            except ImportError:
                pass
            torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    else:
        raise ValueError(f"fmt must be one of {SINGLE_FILE_FORMATS}, not {fmt!r}")
    return path


def save_tiny_single_file(
    path: Path, architecture: str = "sd1", prediction_type: str = "epsilon", fmt: str = "safetensors"
) -> tuple[Path, Path]:
    """A tiny model as an original-layout single file, and its diffusers folder (the matching ``config``).

    Returns (checkpoint file, diffusers folder); the folder is ``<stem>-diffusers`` beside the file.
    """
    path = Path(path)
    pipeline = build_tiny_pipeline(architecture, prediction_type)
    folder = path.parent / f"{path.stem}-diffusers"
    pipeline.save_pretrained(folder, safe_serialization=True)
    save_ldm_checkpoint(tiny_ldm_state_dict(pipeline, architecture), path, fmt)
    return path, folder
