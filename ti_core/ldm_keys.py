"""Key layouts of original single-file Stable Diffusion checkpoints (LDM for SD1/SD2, SGM for SDXL).

diffusers reads these layouts in ``from_single_file``; this module writes them, i.e. maps diffusers
state-dict names to the original ones. It follows diffusers' scripts
``convert_diffusers_to_original_stable_diffusion.py`` and ``convert_diffusers_to_original_sdxl.py``,
generalised to any number of blocks and layers per block so that the tiny test models convert too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
# What SGM's GeneralConditioner calls the only (OpenCLIP) text encoder of the SDXL refiner and of SD2 models
# saved by SGM (SD2.1-turbo).
SGM_FIRST_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename_first(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_key(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without ``model.diffusion_model.``) of a diffusers UNet2DConditionModel key."""
    for diffusers_name, ldm_name in _UNET_TOP_LEVEL.items():
        if key.startswith(diffusers_name):
            return ldm_name + key[len(diffusers_name) :]
    per_block = int(config["layers_per_block"]) + 1  # resnets per down block, plus its downsampler slot
    if match := _BLOCK.fullmatch(key):
        direction, block, kind, index, rest = match.groups()
        block, index = int(block), int(index)
        if direction == "down":
            if kind == "downsamplers":
                return f"input_blocks.{(block + 1) * per_block}.0.op.{rest.removeprefix('conv.')}"
            slot = 1 + block * per_block + index
        else:
            if kind == "upsamplers":
                has_attention = "CrossAttn" in config["up_block_types"][block]
                return f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention else 1}.{rest}"
            slot = block * per_block + index
        blocks = "input_blocks" if direction == "down" else "output_blocks"
        if kind == "resnets":
            return f"{blocks}.{slot}.0.{_rename_first(rest, _UNET_RESNET)}"
        return f"{blocks}.{slot}.1.{rest}"
    if match := _MID.fullmatch(key):
        kind, index, rest = match.groups()
        if kind == "resnets":
            return f"middle_block.{2 * int(index)}.{_rename_first(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    raise KeyError(f"no LDM name for the UNet key {key!r}")


def unet_to_ldm(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    return {unet_key(key, config): value for key, value in state_dict.items()}


_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out": "proj_out",
    # names of diffusers before 0.14
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def vae_key(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without ``first_stage_model.``) of a diffusers AutoencoderKL key."""
    if match := _VAE_BLOCK.fullmatch(key):
        part, direction, block, kind, index, rest = match.groups()
        block = int(block)
        if direction == "up":  # the decoder's up blocks are numbered from the bottom in LDM
            block = len(config["block_out_channels"]) - 1 - block
        name = "down" if direction == "down" else "up"
        if kind == "resnets":
            return f"{part}.{name}.{block}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{name}.{block}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    if match := _VAE_MID.fullmatch(key):
        part, kind, index, rest = match.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(index) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        rest = rest.replace("to_out.0.", "to_out.")
        return f"{part}.mid.attn_1.{_rename_first(rest, _VAE_ATTENTION)}"
    return key.replace("conv_norm_out.", "norm_out.")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state_dict.items():
        name = vae_key(key, config)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # LDM's VAE attention uses 1x1 convolutions
        converted[name] = value
    return converted


def _with_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 flattens CLIPTextModel (no ``text_model.``); the checkpoint layouts keep it."""
    return {
        key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": value
        for key, value in state_dict.items()
    }


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenAI-CLIP (transformers) text encoder, as stored under ``...transformer.``."""
    return {k: v for k, v in _with_text_model_prefix(state_dict).items() if not k.startswith("text_projection.")}


_OPENCLIP = [
    ("text_model.encoder.layers.", "transformer.resblocks."),
    (".self_attn.", ".attn."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
]
_QKV = re.compile(r"(.+)\.attn\.([qkv])_proj\.(weight|bias)")


def openclip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder in OpenCLIP's layout (fused ``in_proj``, ``text_projection``)."""
    converted: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in _with_text_model_prefix(state_dict).items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            converted["text_projection"] = value.T.contiguous()  # OpenCLIP computes x @ text_projection
            continue
        for old, new in _OPENCLIP:
            key = key.replace(old, new)
        if match := _QKV.fullmatch(key):
            fused.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            converted[key] = value
    for (block, kind), parts in fused.items():
        converted[f"{block}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def pipeline_to_ldm(pipeline, architecture: str) -> dict[str, torch.Tensor]:
    """The whole diffusers pipeline as an original single-file checkpoint state dict."""
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(pipeline.unet.state_dict(), pipeline.unet.config).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipeline.vae.state_dict(), pipeline.vae.config).items()})
    text = pipeline.text_encoder.state_dict()
    if architecture == "sd1":
        state.update({SD1_CLIP_PREFIX + k: v for k, v in clip_to_ldm(text).items()})
    elif architecture == "sd2":
        openclip = openclip_to_ldm(text)
        width = openclip["token_embedding.weight"].shape[1]
        # SD2 uses the penultimate hidden state and never the projection, but the files carry it.
        openclip.setdefault("text_projection", torch.eye(width, dtype=openclip["token_embedding.weight"].dtype))
        openclip.setdefault("logit_scale", torch.tensor(4.6052))
        state.update({SD2_OPENCLIP_PREFIX + k: v for k, v in openclip.items()})
    elif architecture == "sdxl":
        state.update({SDXL_CLIP_L_PREFIX + k: v for k, v in clip_to_ldm(text).items()})
        openclip = openclip_to_ldm(pipeline.text_encoder_2.state_dict())
        openclip.setdefault("logit_scale", torch.tensor(4.6052))
        state.update({SDXL_CLIP_G_PREFIX + k: v for k, v in openclip.items()})
    else:
        raise ValueError(f"architecture must be sd1, sd2 or sdxl, not {architecture!r}")
    return state
