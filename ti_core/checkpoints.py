"""Recognising a single-file checkpoint: its architecture from key names and shapes, the shipped config
skeleton it fits, and one line naming what it is when it is not SD1/SD2/SDXL."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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
from .timodel import ModelLoadError

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


def text_widths(shapes: Mapping[str, Sequence[int]], architecture: str) -> list[int]:
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
    found = text_widths(shapes, architecture)
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
