"""Loading a Stable Diffusion model (SD1, SD2, SDXL) into one bundle the rest of ti_core uses."""

from __future__ import annotations

import hashlib
import json
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


def _pipeline_class(folder: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    class_name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    return StableDiffusionXLPipeline if "XL" in class_name else StableDiffusionPipeline


def load_model(
    source: str | Path,
    *,
    config: str | Path | None = None,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TIModel:
    """Load a diffusers folder, a single-file checkpoint (.safetensors/.ckpt) or, online, a hub id.

    ``config`` overrides the diffusers-format config folder used for single files (the built-in
    SD1/SD2/SDXL skeletons by default); ``prediction_type`` ("epsilon" or "v_prediction") overrides
    what the checkpoint implies. ``demo:tiny-sd1`` (ti_core.demo.DEMO_MODEL_ID) is the demo model.
    """
    from .demo import build_demo_model, is_demo

    if is_demo(source):
        return build_demo_model()
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ModelLoadError(f"prediction type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{path}: not a model checkpoint (expected .safetensors or .ckpt)")
        from .single_file import load_single_file

        try:
            pipeline = load_single_file(path, config=config, prediction_type=prediction_type, dtype=dtype)
        except ModelLoadError as error:
            original_config = path.with_suffix(".yaml")
            if config is not None or not error.fits_no_config or not original_config.is_file():
                raise
            return _from_original_config(path, original_config, prediction_type, dtype)
        return from_pipeline(pipeline, str(path), file_path=path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json)")
        pipeline_class = _pipeline_class(path)
        extra = {} if pipeline_class.__name__.endswith("XLPipeline") else {"safety_checker": None}
        try:
            pipeline = pipeline_class.from_pretrained(path, local_files_only=True, torch_dtype=dtype, **extra)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"{path}: cannot load the diffusers folder: {error}") from error
    elif path.exists() or "/" not in str(source) or str(source).count("/") != 1:
        raise ModelLoadError(
            f"{source}: no such model file or folder (give a .safetensors/.ckpt file, a diffusers folder or a hub id)"
        )
    else:
        pipeline = _from_hub(str(source), dtype)
    if prediction_type:
        pipeline.scheduler.register_to_config(prediction_type=prediction_type)
    return from_pipeline(pipeline, str(source))


def _from_original_config(path: Path, original_config: Path, prediction_type: str | None, dtype) -> TIModel:
    """A checkpoint that fits none of the shipped configs, built from the `<checkpoint>.yaml` beside it (the
    web UIs' convention for non-standard models)."""
    from .shared_weights import model_from_tensors, original_config_from_yaml
    from .single_file import read_state_dict, sidecar_prediction_type

    config = original_config_from_yaml(original_config)
    state_dict, _metadata = read_state_dict(path)
    state_dict = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()}
    model = model_from_tensors(
        state_dict,
        source=str(path),
        file_path=path,
        prediction_type=prediction_type or sidecar_prediction_type(path),
        original_config=config,
    )
    model.shares_weights = False  # read from the file for this model alone
    return model


def _from_hub(repo_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype, safety_checker=None)
    except Exception as error:  # hub errors have many types (offline, gated, missing)
        raise ModelLoadError(f"{repo_id}: cannot load from the hub: {error}") from error
