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
from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .ldm_keys import (
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SGM_FIRST_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    unet_key,
    vae_key,
)
from .models import ModelLoadError
from .safe_pickle import CHECKPOINTS, RefusedGlobal, load_pickle

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
# Diffusers-format config skeletons (configs only, no weights) of the reference models; see configs/SOURCES.md.
SKELETONS = {
    "sd1": "sd1",  # runwayml/stable-diffusion-v1-5
    "sd2-512": "sd2-512",  # stabilityai/stable-diffusion-2-1-base (epsilon)
    "sd2-768-v": "sd2-768-v",  # stabilityai/stable-diffusion-2-1 (v-prediction)
    "sdxl": "sdxl",  # stabilityai/stable-diffusion-xl-base-1.0
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
NOT_SD = "is not an SD1/SD2/SDXL checkpoint"
LOSS_PREFIX = VAE_PREFIX + "loss."


def skeleton_for(architecture: str, prediction_type: str | None = None) -> Path:
    """The shipped config folder used for a single file of this architecture when no ``config`` is given."""
    if architecture == "sd2":
        return CONFIG_ROOT / SKELETONS["sd2-768-v" if prediction_type == "v_prediction" else "sd2-512"]
    if architecture not in ("sd1", "sdxl"):
        raise ValueError(f"architecture must be sd1, sd2 or sdxl, not {architecture!r}")
    return CONFIG_ROOT / SKELETONS[architecture]


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
# Recognising the architecture


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in keys)


def _count(keys: Sequence[str]) -> str:
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''}, e.g. {keys[0]}" if keys else "no tensors"


def describe_keys(keys: Iterable[str]) -> str:
    """What a set of keys looks like, for error messages: 'a VAE (180 keys, e.g. decoder.conv_in.bias)'."""
    keys = sorted(keys)
    if not keys:
        return "no tensors"
    tops = {key.split(".")[0] for key in keys}
    if any(("lora_" in key or "hada_" in key or "lokr_" in key or key.endswith(".alpha")) for key in keys):
        what = "a LoRA/LyCORIS network"
    elif any(".joint_blocks." in key or key.startswith("joint_blocks.") for key in keys):
        what = "an SD3 model"
    elif any("double_blocks." in key for key in keys):
        what = "a Flux model"
    elif tops <= {"encoder", "decoder", "quant_conv", "post_quant_conv"} or tops == {"first_stage_model"}:
        what = "a VAE"
    elif tops & {"string_to_param", "emb_params", "clip_l", "clip_g", "string_to_token"}:
        what = "a textual-inversion embedding"
    elif tops & {"control_model", "input_hint_block"} or _has_prefix(keys, "controlnet_"):
        what = "a ControlNet"
    elif tops & {"down_blocks", "up_blocks", "mid_block"}:
        what = "diffusers-format UNet weights (give the diffusers model folder instead)"
    elif tops <= {"cond_stage_model", "conditioner", "text_model", "transformer"}:
        what = "text-encoder weights only"
    elif _has_prefix(keys, UNET_PREFIX):
        what = "a diffusion model that is not a Stable Diffusion UNet"
    else:
        what = "unrecognised tensors"
    return f"{what} ({_count(keys)})"


_IN_CHANNEL_KINDS = {
    9: "an inpainting model",
    8: "an instruct-pix2pix model",
    5: "a depth-to-image model",
    7: "an upscaler",
}


def detect_architecture(shapes: Mapping[str, Sequence[int]], source: str | Path = "checkpoint") -> str:
    """'sd1', 'sd2' or 'sdxl' from key names and shapes; ModelLoadError naming ``source`` otherwise."""
    keys = list(shapes)
    conv_in = shapes.get(CONV_IN_KEY)
    if conv_in is None:
        raise ModelLoadError(f"{source} {NOT_SD}: found {describe_keys(keys)}")
    in_channels = conv_in[1] if len(conv_in) == 4 else None
    if in_channels != 4:
        kind = _IN_CHANNEL_KINDS.get(in_channels, "an unsupported UNet")
        raise ModelLoadError(
            f"{source} {NOT_SD}: found {kind} (its UNet takes {in_channels} input channels; text-to-image takes 4)"
        )
    has = lambda prefix: _has_prefix(keys, prefix)  # noqa: E731
    if has(SDXL_CLIP_G_PREFIX) and has(SDXL_CLIP_L_PREFIX):
        return "sdxl"
    if has(SGM_FIRST_OPENCLIP_PREFIX):
        width = shapes.get(SGM_FIRST_OPENCLIP_PREFIX + "ln_final.weight")
        if not has(UNET_PREFIX + "label_emb.") and tuple(width or ()) == (1024,):
            return "sd2"  # an SD2 model saved by SGM (SD2.1-turbo): renamed by normalize_keys
        raise ModelLoadError(
            f"{source} {NOT_SD}: found an SDXL refiner (an OpenCLIP-G text encoder only; {_count(sorted(keys))})"
        )
    if has(SD2_OPENCLIP_PREFIX):
        return "sd2"
    if has(SD1_CLIP_PREFIX):
        return "sd1"
    raise ModelLoadError(f"{source} {NOT_SD}: found a UNet without a text encoder ({_count(sorted(keys))})")


# Old SD1 files (transformers < 4.?) lack ``text_model.`` in the CLIP keys, as A1111's
# checkpoint_dict_replacements_sd1 notes; SD2.1-turbo stores SD2's text encoder under SGM's name.
_SD1_OLD_CLIP = ("embeddings.", "encoder.", "final_layer_norm.")


def normalize_keys(state_dict: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """Rename the layouts diffusers does not read into the ones it does (new dict only if needed)."""
    if architecture == "sd1" and any(
        key.startswith(SD1_CLIP_PREFIX + old) for key in state_dict for old in _SD1_OLD_CLIP
    ):
        old_prefixes = tuple(SD1_CLIP_PREFIX + old for old in _SD1_OLD_CLIP)
        return {
            SD1_CLIP_PREFIX + "text_model." + key[len(SD1_CLIP_PREFIX) :]
            if key.startswith(old_prefixes)
            else key: value
            for key, value in state_dict.items()
        }
    if architecture == "sd2" and _has_prefix(state_dict, SGM_FIRST_OPENCLIP_PREFIX):
        return {
            SD2_OPENCLIP_PREFIX + key[len(SGM_FIRST_OPENCLIP_PREFIX) :]
            if key.startswith(SGM_FIRST_OPENCLIP_PREFIX)
            else key: value
            for key, value in state_dict.items()
        }
    return state_dict


def _text_widths(shapes: Mapping[str, Sequence[int]], architecture: str) -> list[int]:
    keys = {
        "sd1": [SD1_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"],
        "sd2": [SD2_OPENCLIP_PREFIX + "token_embedding.weight"],
        "sdxl": [
            SDXL_CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight",
            SDXL_CLIP_G_PREFIX + "token_embedding.weight",
        ],
    }[architecture]
    return [shapes[key][1] if key in shapes else -1 for key in keys]


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _comparable(shape: Sequence[int]) -> tuple[int, ...]:
    """A shape with 1x1 kernel dimensions dropped: LDM stores some linear layers as 1x1 convolutions (SD1's
    transformer projections, the VAE's attention) and the converters reshape them either way."""
    shape = tuple(shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


@cache
def _expected_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """The original-layout key -> shape of the UNet and VAE the config folder describes (built on the meta
    device: no memory, a fraction of a second)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(folder)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(_load_json(path / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_load_json(path / "vae" / "config.json"))
    shapes = {UNET_PREFIX + unet_key(name, unet.config): tuple(t.shape) for name, t in unet.state_dict().items()}
    shapes.update({VAE_PREFIX + vae_key(name, vae.config): tuple(t.shape) for name, t in vae.state_dict().items()})
    return shapes


def first_shape_difference(shapes: Mapping[str, Sequence[int]], folder: Path) -> str | None:
    """The first UNet or VAE weight whose shape (or presence) differs between the checkpoint and the config
    folder, in words; None when every one matches. Only parts the checkpoint carries are compared."""
    expected = _expected_shapes(str(folder))
    for prefix, part in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")):
        # A VAE saved from training may carry its discriminator (`loss.`); nothing builds it.
        stored = {k: shape for k, shape in shapes.items() if k.startswith(prefix) and not k.startswith(LOSS_PREFIX)}
        if not stored:
            continue
        wanted = {key: shape for key, shape in expected.items() if key.startswith(prefix)}
        # A differing shape says more than a missing key (which follows from it), so it is named first.
        for key in sorted(wanted.keys() & stored.keys()):
            if _comparable(stored[key]) != _comparable(wanted[key]):
                return f"{key} is {tuple(stored[key])} in the checkpoint, {tuple(wanted[key])} in the config"
        if missing := sorted(wanted.keys() - stored.keys()):
            return f"the checkpoint has no {missing[0]} (one of {len(missing)} {part} weights of the config it lacks)"
        if extra := sorted(stored.keys() - wanted.keys()):
            return f"the checkpoint has {extra[0]} (one of {len(extra)} {part} weights the config does not have)"
    return None


def check_fits(shapes: Mapping[str, Sequence[int]], architecture: str, folder: Path, source: str | Path) -> None:
    """A clear error when the checkpoint's sizes do not match the config folder it would be built from.

    Every UNet and VAE weight is compared (a model can share SD's widths and differ in channel multipliers or
    block counts); the text encoders by width.
    """
    try:
        index = _load_json(folder / "model_index.json")
        unet = _load_json(folder / "unet" / "config.json")
        encoders = ["text_encoder", "text_encoder_2"] if architecture == "sdxl" else ["text_encoder"]
        widths = [_load_json(folder / name / "config.json")["hidden_size"] for name in encoders]
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{folder}: not a usable diffusers config folder for {source}: {error}") from None
    problems = []
    if ("XL" in index.get("_class_name", "")) != (architecture == "sdxl"):
        problems.append(f"the checkpoint is {architecture}, the config is a {index.get('_class_name')}")
    conv_in = shapes.get(CONV_IN_KEY, (None,))[0]
    if conv_in != unet["block_out_channels"][0]:
        problems.append(f"UNet width {conv_in} vs {unet['block_out_channels'][0]}")
    context = next(
        (
            shape[1]
            for key, shape in shapes.items()
            if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")
        ),
        None,
    )
    if context is not None and context != unet["cross_attention_dim"]:
        problems.append(f"cross-attention width {context} vs {unet['cross_attention_dim']}")
    found = _text_widths(shapes, architecture)
    if found != widths:
        problems.append(f"text encoder width {found} vs {widths}")
    if not problems:
        try:
            difference = first_shape_difference(shapes, folder)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"{folder}: not a usable diffusers config folder for {source}: {error}") from None
        if difference:
            problems.append(difference)
    if problems:
        error = ModelLoadError(
            f"{source} does not fit the model config {folder}: {'; '.join(problems)}",
            cli_hint="put its .yaml config beside it, or pass a matching diffusers config folder with --config",
        )
        error.fits_no_config, error.problems = True, problems
        raise error


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
    return shapes.get(CONV_IN_KEY, (0,))[0] == 320 and _text_widths(shapes, "sd2") == [1024]


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


def _tokenizers(architecture: str) -> dict[str, Any]:
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

    components: dict[str, Any] = _tokenizers(architecture)
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
    dtype: torch.dtype = torch.float32,
):
    """A diffusers StableDiffusion(XL)Pipeline from a single-file SD1/SD2/SDXL checkpoint, offline.

    Prediction type: ``prediction_type`` > a ``<stem>.yaml`` beside the file > a ``v_pred`` key or
    model-spec metadata > (SD2 without ``config`` only) A1111's one-step UNet test > the config's.
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
    return pipeline
