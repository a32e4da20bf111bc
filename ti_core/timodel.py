"""The model bundle the rest of ti_core uses: TIModel (its text encoders, UNet, VAE and scheduler), made
from a loaded diffusers pipeline; and the error every model loader raises."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message names it and says why.

    ``cli_hint`` is advice in command-line words (a flag to pass); inside a web UI the glue shows
    ``message`` with advice of its own instead.
    """

    def __init__(self, message: str, cli_hint: str = "") -> None:
        super().__init__(f"{message} ({cli_hint})" if cli_hint else message)
        self.message = message
        self.cli_hint = cli_hint
        self.fits_no_config = False  # the weights have sizes none of the known configs describe


@dataclass
class TextEncoder:
    """One CLIP text encoder with its tokenizer, under the key its embedding tensor is stored with."""

    key: str
    tokenizer: Any
    model: Any

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def token_table(self) -> torch.Tensor:
        """The token embeddings of this tokenizer's vocabulary (a view). A web UI's encoder may have more rows:
        SD.Next appends one per loaded embedding, which no token of ours refers to."""
        return self.model.get_input_embeddings().weight[: len(self.tokenizer)]


@dataclass
class TIModel:
    """The parts of a Stable Diffusion model that textual inversion uses."""

    architecture: str  # "sd1" | "sd2" | "sdxl"
    encoders: list[TextEncoder]
    unet: Any
    vae: Any
    scheduler: Any
    source: str
    name: str
    file_path: Path | None = None
    # True when the weights are another model's tensors (a web UI's loaded checkpoint): they must stay
    # where they are, in their dtype and memory layout, and are never written.
    shares_weights: bool = False
    _sha256: str | None = field(default=None, repr=False)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def zero_terminal_snr(self) -> bool:
        """Trained on betas rescaled to zero terminal SNR (ti_core.zero_snr): its schedulers rescale too."""
        return bool(self.scheduler.config.get("rescale_betas_zero_snr", False))

    @property
    def resolution(self) -> int:
        """The native training/preview resolution in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def widths(self) -> dict[str, int]:
        return {encoder.key: encoder.width for encoder in self.encoders}

    @property
    def tokenizer(self):
        return self.encoders[0].tokenizer

    def sha256(self) -> str | None:
        """SHA-256 of the checkpoint file (what the web UIs show as the model hash), computed once."""
        if self._sha256 is None and self.file_path is not None and self.file_path.is_file():
            digest = hashlib.sha256()
            with open(self.file_path, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def shorthash(self) -> str | None:
        full = self.sha256()
        return full[:10] if full else None

    def pipeline(self):
        """A diffusers pipeline over the same modules (no copies), for rendering previews."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.architecture == "sdxl":
            (clip_l, clip_g) = self.encoders
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=clip_l.model,
                text_encoder_2=clip_g.model,
                tokenizer=clip_l.tokenizer,
                tokenizer_2=clip_g.tokenizer,
                unet=self.unet,
                scheduler=self.scheduler,
            )
        (encoder,) = self.encoders
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=encoder.model,
            tokenizer=encoder.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def architecture_of(pipeline) -> str:
    """sd1, sd2 or sdxl, from a loaded diffusers pipeline."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return "sdxl"
    width = pipeline.text_encoder.get_input_embeddings().weight.shape[1]
    if width in (768, 1024):
        return "sd1" if width == 768 else "sd2"
    # Tiny test models: SD2's UNet is the one with linear projections in its transformer blocks.
    return "sd2" if pipeline.unet.config.get("use_linear_projection") else "sd1"


def from_pipeline(pipeline, source: str, file_path: Path | None = None) -> TIModel:
    """Wrap a diffusers StableDiffusion(XL)Pipeline."""
    architecture = architecture_of(pipeline)
    if architecture == "sdxl":
        encoders = [
            TextEncoder("clip_l", pipeline.tokenizer, pipeline.text_encoder),
            TextEncoder("clip_g", pipeline.tokenizer_2, pipeline.text_encoder_2),
        ]
    else:
        key = "clip_h" if architecture == "sd2" else "clip_l"
        encoders = [TextEncoder(key, pipeline.tokenizer, pipeline.text_encoder)]
    for module in [pipeline.unet, pipeline.vae, *(encoder.model for encoder in encoders)]:
        module.requires_grad_(False)
        module.eval()
    return TIModel(
        architecture=architecture,
        encoders=encoders,
        unet=pipeline.unet,
        vae=pipeline.vae,
        scheduler=pipeline.scheduler,
        source=source,
        name=Path(source).stem if file_path else Path(source.rstrip("/\\")).name,
        file_path=file_path,
    )
