"""A TIModel built over tensors that already exist: an original-layout (LDM/SGM) state dict.

A web UI holds its checkpoint in memory in the original layout. Training on a second copy read from the file
again doubles the memory a run needs (a second SDXL is about 7 GB) and costs the time of reading and
converting it. Here the diffusers modules are built empty (parameters on the meta device) and then given the
web UI's own tensors, renamed by the inverse of `ldm_keys` (``load_state_dict(assign=True)``): every weight
is the same storage, or a view of it where the layouts differ only in shape (fused attention projections,
1x1 convolutions). Nothing is copied, and nothing here ever writes to those tensors: the trainer freezes them
and trains only the new vectors.

The same builder serves checkpoints that fit none of the shipped configs but come with an A1111-style
``<checkpoint>.yaml``: the UNet and VAE configs are derived from that original config.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoints import check_fits, detect_architecture, normalize_keys, skeleton_for
from .ldm_keys import (
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    unet_key,
    vae_key,
)
from .single_file import clip_tokenizers
from .timodel import ModelLoadError, TextEncoder, TIModel

Tensors = Mapping[str, torch.Tensor]


def strip_wrappers(state_dict: Tensors) -> dict[str, torch.Tensor]:
    """Drop the ``wrapped.`` segments A1111's and reForge's hijacks add to their model's key names.

    They wrap the text encoders (``cond_stage_model.wrapped.transformer...``) and the token embeddings
    (``token_embedding.wrapped.weight``); the tensors underneath keep the checkpoint's names.
    """
    return {key.replace(".wrapped.", "."): value for key, value in state_dict.items()}


def autograd_alias(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or where it was made under ``torch.inference_mode`` (Forge loads its models so), a
    normal tensor over the same memory: autograd refuses to save inference tensors for the backward pass,
    and the gradient of a frozen layer's input needs its weight. No copy; the memory is never written."""
    if not torch.is_inference(tensor):
        return tensor
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    with torch.no_grad():
        alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return alias


def original_config_from_yaml(path: Path) -> dict[str, Any]:
    """An original LDM/SGM config (`<checkpoint>.yaml`) as a dict; a one-line error when it is unreadable."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ModelLoadError(f"{path}: cannot read the model config: {error}") from None
    if not isinstance(config, dict) or "model" not in config:
        raise ModelLoadError(f"{path}: not a Stable Diffusion model config (no 'model' section)")
    return config


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _configs(
    state_dict: Tensors, shapes, architecture: str, prediction_type, folder: Path | None, original_config, source
):
    """The diffusers configs to build: the config folder's (the shipped skeleton by default), or for UNet and
    VAE the original config's when the weights do not fit the folder."""
    folder = Path(folder) if folder is not None else skeleton_for(architecture, prediction_type)
    configs = {name: _json(folder / name / "config.json") for name in ("unet", "vae", "text_encoder")}
    if architecture == "sdxl":
        configs["text_encoder_2"] = _json(folder / "text_encoder_2" / "config.json")
    configs["scheduler"] = _json(folder / "scheduler" / "scheduler_config.json")
    try:
        check_fits(shapes, architecture, folder, source)
    except ModelLoadError:
        if original_config is None:
            raise
        from diffusers.loaders.single_file_utils import (
            create_unet_diffusers_config_from_ldm,
            create_vae_diffusers_config_from_ldm,
        )

        try:
            configs["unet"] = create_unet_diffusers_config_from_ldm(original_config, state_dict)
            configs["vae"] = create_vae_diffusers_config_from_ldm(original_config, state_dict)
        except Exception as error:  # diffusers raises KeyError/TypeError/ValueError for configs it cannot read
            raise ModelLoadError(
                f"{source}: its model config does not describe a Stable Diffusion model ({error})"
            ) from None
    return configs


def _assign(module: torch.nn.Module, lookup: Callable[[str], torch.Tensor | None], what: str) -> None:
    """Give every parameter and buffer of an empty module the tensor `lookup` names for it (no copies)."""
    tensors, missing = {}, []
    for name, placeholder in module.state_dict(keep_vars=True).items():
        tensor = lookup(name)
        if tensor is None:
            if placeholder.device.type == "meta":
                missing.append(name)
            continue
        if tuple(tensor.shape) != tuple(placeholder.shape):
            raise ModelLoadError(
                f"{what}: {name} has the shape {tuple(tensor.shape)}, expected {tuple(placeholder.shape)}"
            )
        tensors[name] = tensor
    if missing:
        raise ModelLoadError(f"{what}: the model has no weights for {', '.join(missing[:3])}")
    module.load_state_dict(tensors, strict=False, assign=True)
    # Buffers the file does not carry (CLIP's position ids) were built on the CPU: put them beside the
    # weights. The weights are there already, so `to` returns them as they are.
    module.to(next(iter(tensors.values())).device)
    module.requires_grad_(False)
    module.eval()


_HALF = (torch.float16, torch.bfloat16)


def compute_in_float32(module: torch.nn.Module) -> None:
    """Let a module whose weights are stored in half precision on the CPU compute in float32, as the web UIs
    do there (Forge keeps its text encoders in fp16 on the CPU and casts per layer): each layer casts its
    weights for the call only, so the stored tensors stay as they are and no second copy stays in memory.
    CPU kernels such as layer norm refuse mixed dtypes. Changes only this module's own forwards."""

    def cast(value):
        return value.float() if isinstance(value, torch.Tensor) and value.dtype in _HALF else value

    def in_float32(layer: torch.nn.Module):
        forward = layer.forward
        if isinstance(layer, torch.nn.Embedding):  # a lookup: only the rows it returns are cast

            def embedding_forward(*args, **kwargs):
                return cast(forward(*args, **kwargs))

            return embedding_forward

        def layer_forward(*args, **kwargs):
            stored = dict(layer._parameters)
            try:
                for name, parameter in stored.items():
                    if parameter is not None and parameter.dtype in _HALF:
                        layer._parameters[name] = parameter.float()  # for this call only
                return forward(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
            finally:
                layer._parameters.update(stored)

        return layer_forward

    for layer in module.modules():
        own = [p for p in layer._parameters.values() if p is not None]
        if own and any(p.dtype in _HALF for p in own):
            layer.forward = in_float32(layer)


def _stored_half_on_cpu(module: torch.nn.Module) -> bool:
    return any(p.device.type == "cpu" and p.dtype in _HALF for p in module.parameters())


def _clip_lookup(state_dict: Tensors, prefix: str) -> Callable[[str], torch.Tensor | None]:
    """A transformers CLIPTextModel key -> the OpenAI-CLIP tensor stored under ``prefix``."""

    def lookup(name: str) -> torch.Tensor | None:
        stored = name if name.startswith("text_model.") else f"text_model.{name}"
        return state_dict.get(prefix + stored)

    return lookup


_OPENCLIP_PARTS = [
    ("encoder.layers.", "transformer.resblocks."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    ("final_layer_norm.", "ln_final."),
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
]


def _openclip_lookup(state_dict: Tensors, prefix: str) -> Callable[[str], torch.Tensor | None]:
    """A transformers CLIP key -> the OpenCLIP tensor under ``prefix`` (views of the fused q/k/v)."""

    def lookup(name: str) -> torch.Tensor | None:
        if name == "text_projection.weight":
            projection = state_dict.get(prefix + "text_projection")
            # OpenCLIP computes x @ text_projection. The transpose is copied (one width x width matrix, a
            # few MB): a strided view would give the same pooled output only to rounding.
            return None if projection is None else projection.T.contiguous()
        name = name.removeprefix("text_model.")
        for part in ("q", "k", "v"):
            marker = f".self_attn.{part}_proj."
            if marker in name:
                block, kind = name.split(marker)
                fused = state_dict.get(
                    prefix + block.replace("encoder.layers.", "transformer.resblocks.") + f".attn.in_proj_{kind}"
                )
                if fused is None:
                    return None
                width = fused.shape[0] // 3
                index = "qkv".index(part)
                return fused[index * width : (index + 1) * width]
        for old, new in _OPENCLIP_PARTS:
            name = name.replace(old, new)
        return state_dict.get(prefix + name)

    return lookup


def _transformers_lookup(tensors: Tensors) -> Callable[[str], torch.Tensor | None]:
    """A transformers CLIP key -> the tensor of a transformers CLIP state dict (with or without the
    ``text_model.`` level, which transformers >= 5.6 drops)."""

    def lookup(name: str) -> torch.Tensor | None:
        found = tensors.get(name)
        if found is None:
            other = name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"
            found = tensors.get(other)
        return found

    return lookup


def _vae_lookup(state_dict: Tensors, config: Mapping[str, Any]) -> Callable[[str], torch.Tensor | None]:
    def lookup(name: str) -> torch.Tensor | None:
        stored = vae_key(name, config)
        tensor = state_dict.get(VAE_PREFIX + stored)
        if tensor is not None and ".mid.attn_1." in stored and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # LDM's VAE attention is 1x1 convolutions; diffusers' is linear
        return tensor

    return lookup


def _text_encoder(config: dict[str, Any], with_projection: bool, lookup, what: str):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    try:  # skip the random initialisation of weights that are replaced at once (a second on the CPU)
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    text_config = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    # Parameters on the meta device; buffers (position ids) built for real.
    with init_empty_weights(), no_init_weights():
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text_config)
    _assign(model, lookup, what)
    return model


# Per architecture, each text encoder: (key, tokenizer, config part, with projection, lookup, key prefix).
TEXT_ENCODERS = {
    "sd1": [("clip_l", "tokenizer", "text_encoder", False, _clip_lookup, SD1_CLIP_PREFIX)],
    "sd2": [("clip_h", "tokenizer", "text_encoder", False, _openclip_lookup, SD2_OPENCLIP_PREFIX)],
    "sdxl": [
        ("clip_l", "tokenizer", "text_encoder", False, _clip_lookup, SDXL_CLIP_L_PREFIX),
        ("clip_g", "tokenizer_2", "text_encoder_2", True, _openclip_lookup, SDXL_CLIP_G_PREFIX),
    ],
}


# Where each text encoder's token embedding sits in the original layout (detection and width checks read it).
_TOKEN_EMBEDDING_KEYS = {
    "clip_l": [SD1_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"],
    "clip_h": [SD2_OPENCLIP_PREFIX + "token_embedding.weight"],
}


def _text_encoder_shapes(text_encoders: Mapping[str, Tensors]) -> dict[str, tuple[int, ...]]:
    """The original-layout token-embedding shapes of text encoders given in the transformers layout."""
    found = {}
    for key, tensors in text_encoders.items():
        lookup = _transformers_lookup(tensors)
        embedding = lookup("text_model.embeddings.token_embedding.weight")
        if embedding is None:
            raise ModelLoadError(f"the {key} text encoder has no token embedding")
        if key == "clip_g" or (key == "clip_l" and "clip_g" in text_encoders):
            names = [
                (SDXL_CLIP_G_PREFIX if key == "clip_g" else SDXL_CLIP_L_PREFIX)
                + ("token_embedding.weight" if key == "clip_g" else "text_model.embeddings.token_embedding.weight")
            ]
        else:
            names = _TOKEN_EMBEDDING_KEYS[key]
        found.update({name: tuple(embedding.shape) for name in names})
    return found


def model_from_tensors(
    state_dict: Tensors,
    *,
    source: str,
    file_path: Path | None = None,
    prediction_type: str | None = None,
    config: Path | None = None,
    original_config: Mapping[str, Any] | None = None,
    text_encoders: Mapping[str, Tensors] | None = None,
) -> TIModel:
    """A TIModel whose UNet, VAE and text encoders use the tensors of an original-layout state dict.

    ``config`` is a diffusers config folder (the shipped SD1/SD2/SDXL skeletons by default);
    ``original_config`` (a parsed `<checkpoint>.yaml`) describes UNet and VAE when they fit none of the
    shipped configs. ``text_encoders`` gives text encoders in the transformers CLIP layout instead, by key
    (``clip_l``, ``clip_g``, ``clip_h``), as Forge and diffusers hold them. The tensors keep their device and
    dtype; none is copied or written.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

    text_encoders = dict(text_encoders or {})
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    shapes.update(_text_encoder_shapes(text_encoders))
    architecture = detect_architecture(shapes, source)
    state_dict = normalize_keys(dict(state_dict), architecture)
    configs = _configs(state_dict, shapes, architecture, prediction_type, config, original_config, source)

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    _assign(unet, lambda name: state_dict.get(UNET_PREFIX + unet_key(name, unet.config)), f"{source} (UNet)")
    _assign(vae, _vae_lookup(state_dict, vae.config), f"{source} (VAE)")

    tokenizers = clip_tokenizers(architecture)
    encoders = [
        TextEncoder(
            key,
            tokenizers[tokenizer],
            _text_encoder(
                configs[part],
                projection,
                _transformers_lookup(text_encoders[key]) if key in text_encoders else lookup(state_dict, prefix),
                f"{source} ({key})",
            ),
        )
        for key, tokenizer, part, projection, lookup, prefix in TEXT_ENCODERS[architecture]
    ]

    for module in (unet, vae, *(encoder.model for encoder in encoders)):
        if _stored_half_on_cpu(module):
            compute_in_float32(module)

    schedulers = {cls.__name__: cls for cls in (DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler)}
    scheduler_config = configs["scheduler"]
    scheduler = schedulers.get(scheduler_config.get("_class_name"), PNDMScheduler).from_config(scheduler_config)
    if prediction_type:
        scheduler.register_to_config(prediction_type=prediction_type)
    return TIModel(
        architecture=architecture,
        encoders=encoders,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        source=source,
        name=Path(source).stem,
        file_path=file_path,
        shares_weights=True,
    )
