"""Single-file Stable Diffusion checkpoints (.safetensors, .ckpt) loaded fully offline.

* Reading is safe: ``.safetensors`` through safetensors (the header alone is read to recognise the model
  before any weight is); ``.ckpt`` through a restricted unpickler that builds tensors and containers,
  stands in inert placeholders for the training-framework objects real checkpoints carry (Lightning
  callbacks, OmegaConf hyper-parameters) and refuses every other global, so no pickled code ever runs.
* The architecture (SD1, SD2, SDXL base) is recognised from key names and shapes; anything else
  (SDXL refiner, inpainting, SD3, Flux, LoRA, VAE, ...) is refused with one line naming the file.
* diffusers' ``from_single_file`` builds the pipeline from the shipped diffusers-format config skeletons
  in ``ti_core/configs`` (or a ``config`` folder given by the caller) and the built-in CLIP tokenizers,
  with ``local_files_only=True``: nothing is looked up on a hub.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import zipfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoints import (
    CONV_IN_KEY,
    NOT_SD,
    PREDICTION_TYPES,
    check_fits,
    detect_architecture,
    normalize_keys,
    skeleton_for,
    text_widths,
)
from .safe_pickle import CHECKPOINTS, RefusedGlobal, load_pickle
from .timodel import ModelLoadError
from .zero_snr import (
    file_zero_terminal_snr,
    sidecar_zero_terminal_snr,
    with_zero_terminal_snr,
    zero_terminal_snr_from_checkpoint,
)

# --------------------------------------------------------------------------------------------------
# Safe .ckpt reading


def safe_torch_load(path: Path) -> Any:
    """A .ckpt/.pt through the restricted unpickler's checkpoint allow-list; ModelLoadError (one line) if it
    holds code or is no checkpoint."""
    path = Path(path)
    mmap = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
            # torch.load hands TorchScript archives to torch.jit.load, which runs their code.
            raise ModelLoadError(f"{path} is a TorchScript archive, not a checkpoint")
        mmap = True
    try:
        try:
            return load_pickle(path, CHECKPOINTS, mmap=mmap)
        except RefusedGlobal:
            raise
        except Exception:
            if not mmap:
                raise
            return load_pickle(path, CHECKPOINTS)  # some older zip checkpoints do not memory-map
    except RefusedGlobal as error:
        raise ModelLoadError(
            f"refusing to load {path}: '{error.name}' is not allowed in a checkpoint (it could run code); "
            "convert it to .safetensors with a tool you trust"
        ) from None
    except Exception as error:  # zip, pickle and storage errors of truncated or foreign files have many types
        raise ModelLoadError(
            f"cannot read {path}: not a valid PyTorch checkpoint (truncated or corrupt?): {error}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Reading


def _sniff(path: Path) -> str:
    """'safetensors' or 'torch' from the file's first bytes (renamed files are common)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if not head:
        raise ModelLoadError(f"{path} {NOT_SD}: the file is empty")
    if head.startswith(b"version https://git-lfs"):
        raise ModelLoadError(f"{path} {NOT_SD}: it is a Git LFS pointer, not the model (fetch it with git lfs pull)")
    raise ModelLoadError(f"{path} {NOT_SD}: it is neither a safetensors file nor a PyTorch checkpoint")


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata from the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (not iterable)
            metadata = handle.metadata() or {}
    except Exception as error:  # SafetensorError and OSError
        raise ModelLoadError(
            f"cannot read {path}: not a valid safetensors file (truncated or corrupt?): {error}"
        ) from None
    return shapes, metadata


def checkpoint_zero_terminal_snr(path: Path) -> bool | None:
    """What a checkpoint says about zero terminal SNR without loading its tensors: a diffusers folder's scheduler
    config; the `.yaml` beside a file, else a safetensors file's marker key and metadata (ti_core.zero_snr);
    None when it says nothing or is unreadable.
    For a model a web UI has loaded, whose tensors are shared rather than read."""
    path = Path(path)
    if path.is_dir():  # a diffusers folder: its scheduler config (which saves `false` as a default: no word)
        config = path / "scheduler" / "scheduler_config.json"
        if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("rescale_betas_zero_snr"):
            return True
        return None
    said = sidecar_zero_terminal_snr(path)
    if said is not None or path.suffix.lower() != ".safetensors":
        return said
    try:
        shapes, metadata = read_safetensors_header(path)
    except ModelLoadError:
        return None
    return zero_terminal_snr_from_checkpoint(shapes.keys(), metadata)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:
        raise ModelLoadError(
            f"cannot read {path}: not a valid safetensors file (truncated or corrupt?): {error}"
        ) from None


def unwrap_state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, out of Lightning's ``state_dict`` wrapper(s)."""
    while isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ModelLoadError(f"{path} {NOT_SD}: it holds a {type(checkpoint).__name__}, not a state dict")
    return {
        key: value for key, value in checkpoint.items() if isinstance(key, str) and isinstance(value, torch.Tensor)
    }


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a single-file checkpoint (and safetensors metadata), read safely."""
    path = Path(path)
    if _sniff(path) == "safetensors":
        _, metadata = read_safetensors_header(path)
        return _load_safetensors(path), metadata
    return unwrap_state_dict(safe_torch_load(path), path), {}


# --------------------------------------------------------------------------------------------------
# Prediction type


_PARAMETERIZATION = re.compile(r"^\s*parameterization\s*:\s*['\"]?(\w+)['\"]?", re.MULTILINE)


def sidecar_prediction_type(path: Path) -> str | None:
    """From an A1111-style ``<checkpoint stem>.yaml`` beside the file (an LDM or SGM config), if any."""
    yaml_path = Path(path).with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    text = yaml_path.read_text(encoding="utf-8", errors="replace")
    if match := _PARAMETERIZATION.search(text):
        return {"v": "v_prediction", "eps": "epsilon"}.get(match[1])
    if "VScaling" in text:  # SGM denoiser_config ... scaling_config: VScaling
        return "v_prediction"
    if "EpsScaling" in text or "LatentDiffusion" in text:  # LDM's default parameterization is eps
        return "epsilon"
    return None


def prediction_type_from_checkpoint(keys: Collection[str], metadata: Mapping[str, str]) -> str | None:
    """A ``v_pred`` marker key (as ComfyUI reads it), else the SAI model-spec metadata, else None."""
    if "v_pred" in keys:
        return "v_prediction"
    spec = str(metadata.get("modelspec.prediction_type", "")).lower()
    return {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}.get(spec)


def is_real_size_sd2(shapes: Mapping[str, Sequence[int]]) -> bool:
    return shapes.get(CONV_IN_KEY, (0,))[0] == 320 and text_widths(shapes, "sd2") == [1024]


def predicts_v(unet) -> bool:
    """A1111's is_using_v_parameterization_for_sd2: one UNet call at t=999 on 0.5-filled inputs.

    An epsilon model's output stays near its input there; a v model's is strongly negative.
    """
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    compute = torch.float32 if device.type == "cpu" else dtype  # half precision on CPU is slow or missing
    if compute != dtype:
        unet.to(compute)
    try:
        with torch.no_grad():
            sample = torch.full((1, 4, 8, 8), 0.5, device=device, dtype=compute)
            context = torch.full((1, 2, 1024), 0.5, device=device, dtype=compute)
            output = unet(sample, torch.tensor([999], device=device), encoder_hidden_states=context).sample
            return (output - sample).mean().item() < -1
    finally:
        if compute != dtype:
            unet.to(dtype)


# --------------------------------------------------------------------------------------------------
# Loading


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _checkpoint_supplied(state_dict: dict[str, torch.Tensor]):
    """Make diffusers' pipeline ``from_single_file`` use our safely read state dict.

    diffusers (0.28 ... 0.42) reads the file through ``load_single_file_checkpoint`` imported into
    ``diffusers.loaders.single_file``; its sub-model loaders take the dict it returns.
    """
    import diffusers.loaders.single_file as module

    original = getattr(module, "load_single_file_checkpoint", None)
    if original is None:
        raise ModelLoadError(
            "this diffusers version has no diffusers.loaders.single_file.load_single_file_checkpoint; "
            "single-file checkpoints need diffusers 0.28 to 0.42"
        )
    with _PATCH_LOCK:
        module.load_single_file_checkpoint = lambda *args, **kwargs: state_dict
        try:
            yield
        finally:
            module.load_single_file_checkpoint = original


def clip_tokenizers(architecture: str) -> dict[str, Any]:
    from .vocab import clip_tokenizer

    if architecture == "sdxl":
        return {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer("!")}
    return {"tokenizer": clip_tokenizer("!" if architecture == "sd2" else "<|endoftext|>")}


def _load_unet(state_dict, folder: Path, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_single_file(
        state_dict, config=str(folder), subfolder="unet", torch_dtype=dtype, local_files_only=True
    )


def _build_pipeline(path: Path, state_dict, architecture: str, folder: Path, dtype: torch.dtype, unet=None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components: dict[str, Any] = clip_tokenizers(architecture)
    if architecture == "sdxl":
        pipeline_class = StableDiffusionXLPipeline
    else:
        pipeline_class = StableDiffusionPipeline
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if unet is not None:
        components["unet"] = unet
    try:
        with _checkpoint_supplied(state_dict):
            return pipeline_class.from_single_file(
                str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, **components
            )
    except ModelLoadError:
        raise
    except Exception as error:  # diffusers raises many types for mismatched weights or configs
        raise ModelLoadError(
            f"cannot load {path} as an {architecture} model with the config {folder}: {error}"
        ) from error


def load_single_file(
    path: Path,
    *,
    config: str | Path | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
    dtype: torch.dtype = torch.float32,
):
    """A diffusers StableDiffusion(XL)Pipeline from a single-file SD1/SD2/SDXL checkpoint, offline.

    Prediction type: ``prediction_type`` > a ``<stem>.yaml`` beside the file > a ``v_pred`` key or
    model-spec metadata > (SD2 without ``config`` only) A1111's one-step UNet test > the config's.
    Zero terminal SNR (ti_core.zero_snr): ``zero_terminal_snr`` > the yaml > a ``ztsnr`` key or metadata.
    """
    path = Path(path)
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ModelLoadError(f"prediction type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    if _sniff(path) == "safetensors":
        shapes, metadata = read_safetensors_header(path)
        architecture = detect_architecture(shapes, path)  # before reading any weight
        state_dict = _load_safetensors(path)
    else:
        state_dict, metadata = unwrap_state_dict(safe_torch_load(path), path), {}
        shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
        architecture = detect_architecture(shapes, path)
    state_dict = normalize_keys(state_dict, architecture)
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}

    predicted = (
        prediction_type or sidecar_prediction_type(path) or prediction_type_from_checkpoint(state_dict, metadata)
    )
    unet = None
    if config is not None:
        folder = Path(config)
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"{folder}: not a diffusers config folder (no model_index.json) for {path}")
    else:
        if architecture == "sd2" and predicted is None and is_real_size_sd2(shapes):
            check_fits(shapes, architecture, skeleton_for("sd2"), path)
            try:
                unet = _load_unet(state_dict, skeleton_for("sd2"), dtype)
            except Exception as error:
                raise ModelLoadError(f"cannot load the UNet of {path}: {error}") from error
            predicted = "v_prediction" if predicts_v(unet) else "epsilon"
            if predicted == "v_prediction":
                unet = None  # the 768-v skeleton's UNet config differs (sample size, attention upcast)
        folder = skeleton_for(architecture, predicted)
    check_fits(shapes, architecture, folder, path)
    pipeline = _build_pipeline(path, state_dict, architecture, folder, dtype, unet=unet)
    if predicted:
        pipeline.scheduler.register_to_config(prediction_type=predicted)
    zero_snr = (
        zero_terminal_snr if zero_terminal_snr is not None else file_zero_terminal_snr(path, state_dict, metadata)
    )
    if zero_snr is not None:
        pipeline.scheduler = with_zero_terminal_snr(pipeline.scheduler, zero_snr)
    return pipeline
