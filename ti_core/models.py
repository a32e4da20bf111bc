"""Loading a Stable Diffusion model (SD1, SD2, SDXL) into one bundle the rest of ti_core uses."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .demo import build_demo_model, is_demo
from .shared_weights import model_from_tensors, original_config_from_yaml
from .single_file import load_single_file, read_state_dict, sidecar_prediction_type
from .timodel import SINGLE_FILE_SUFFIXES, ModelLoadError, TextEncoder, TIModel, architecture_of, from_pipeline
from .zero_snr import file_zero_terminal_snr, with_zero_terminal_snr

__all__ = [
    "SINGLE_FILE_SUFFIXES",
    "ModelLoadError",
    "TIModel",
    "TextEncoder",
    "architecture_of",
    "from_pipeline",
    "load_model",
]


def _pipeline_class(folder: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    class_name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    return StableDiffusionXLPipeline if "XL" in class_name else StableDiffusionPipeline


def load_model(
    source: str | Path,
    *,
    config: str | Path | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> TIModel:
    """Load a diffusers folder, a single-file checkpoint (.safetensors/.ckpt) or, online, a hub id.

    ``config`` overrides the diffusers-format config folder used for single files (the built-in
    SD1/SD2/SDXL skeletons by default); ``prediction_type`` ("epsilon" or "v_prediction") and
    ``zero_terminal_snr`` (ti_core.zero_snr) override what the checkpoint implies. ``demo:tiny-sd1``
    (ti_core.demo.DEMO_MODEL_ID) is the demo model.
    """
    model = _load_model(source, config, prediction_type, zero_terminal_snr, dtype)
    if zero_terminal_snr is not None:
        model.scheduler = with_zero_terminal_snr(model.scheduler, zero_terminal_snr)
    return model


def _load_model(source, config, prediction_type: str | None, zero_terminal_snr: bool | None, dtype) -> TIModel:
    if is_demo(source):
        return build_demo_model()
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ModelLoadError(f"prediction type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{path}: not a model checkpoint (expected .safetensors or .ckpt)")
        try:
            pipeline = load_single_file(
                path, config=config, prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr, dtype=dtype
            )
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
    zero_snr = file_zero_terminal_snr(path, state_dict.keys(), _metadata)
    if zero_snr is not None:
        model.scheduler = with_zero_terminal_snr(model.scheduler, zero_snr)
    return model


def _from_hub(repo_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, torch_dtype=dtype, safety_checker=None)
    except Exception as error:  # hub errors have many types (offline, gated, missing)
        raise ModelLoadError(f"{repo_id}: cannot load from the hub: {error}") from error
