"""Forge (lllyasviel/stable-diffusion-webui-forge): its loaded model's parts and its extra embedding database.

Facts used here (Forge's `backend/`):
- `shared.sd_model` is a ForgeDiffusionEngine; `forge_objects.{unet,clip,vae}` hold the parts. The UNet
  (`unet.model.diffusion_model`) and the VAE (`vae.first_stage_model`) use the original LDM key names; the
  text encoders are transformers CLIP models at `clip.cond_stage_model.<clip_l|clip_g|clip_h>.transformer`.
- Forge loads its model under `torch.inference_mode`, so its tensors are inference tensors: they are used
  through normal aliases of the same memory (`autograd_alias`), never copied or written.
- Its memory manager (`backend.memory_management`) moves the parts between the CPU and the GPU; a run asks
  it to load them (`load_models_gpu`), as a generation does, so its bookkeeping stays right.
- Weights stored quantized (fp8, nf4/fp4 via bitsandbytes, gguf) or partly swapped to the CPU cannot be
  trained through: the checkpoint file is loaded instead.
- The API keeps its own embedding database (`Api.embedding_db`, read at start-up), reachable through the
  bound endpoint of its `refresh-embeddings` route.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("ti_host")

MEMORY_MANAGER = "backend.memory_management"
REFRESH_ROUTE = "/sdapi/v1/refresh-embeddings"
# Forge's engines that are SD1, SD2 or SDXL (its flags for the old web UI code), with their text encoders.
ARCHITECTURE_FLAGS = {"is_sd1": "sd1", "is_sd2": "sd2", "is_sdxl": "sdxl"}
TEXT_ENCODERS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
PLAIN_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")


class NotShareable(ValueError):
    """Forge's loaded model cannot be trained on in place; the message says why (one line)."""


def is_forge_model(model: Any) -> bool:
    """Forge's engine. reForge's model carries `forge_objects` too, but is A1111's LatentDiffusion (a torch
    module with the checkpoint's own state dict), which the A1111 path shares."""
    return getattr(model, "forge_objects", None) is not None and not callable(getattr(model, "state_dict", None))


def architecture(model: Any) -> str:
    found = [name for flag, name in ARCHITECTURE_FLAGS.items() if getattr(model, flag, False) is True]
    if len(found) != 1:
        raise NotShareable(f"Forge's model is a {type(model).__name__}, not SD1, SD2 or SDXL")
    if found[0] == "sdxl" and "clip_l" not in _encoders(model):
        raise NotShareable("Forge's model is an SDXL refiner (no CLIP-L text encoder)")
    return found[0]


def _encoders(model: Any) -> dict[str, Any]:
    # Forge's JointTextEncoder is a torch module with one child per text encoder (not a torch ModuleDict).
    joint = getattr(model.forge_objects.clip, "cond_stage_model", None)
    children = getattr(joint, "named_children", None)
    return dict(children()) if callable(children) else {}


def parts(model: Any) -> dict[str, Any]:
    """The torch modules of Forge's model: "unet", "vae", and one per text encoder (transformers CLIP)."""
    objects = model.forge_objects
    found = {"unet": objects.unet.model.diffusion_model, "vae": objects.vae.first_stage_model}
    for key in TEXT_ENCODERS[architecture(model)]:
        encoder = _encoders(model).get(key)
        if encoder is None or not hasattr(encoder, "transformer"):
            raise NotShareable(f"Forge's model has no {key} text encoder")
        found[key] = encoder.transformer
    return found


def _check_plain(name: str, tensors: dict[str, Any]) -> None:
    import torch

    for key, tensor in tensors.items():
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and not key.endswith("position_ids"):
            raise NotShareable(f"its {name} is stored quantized ({type(tensor).__name__} {key})")
        if tensor.is_floating_point() and str(tensor.dtype) not in PLAIN_DTYPES:
            raise NotShareable(f"its {name} is stored as {str(tensor.dtype).removeprefix('torch.')}")


def tensors(model: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]], str]:
    """(UNet and VAE tensors under their checkpoint names, text encoders' tensors by key, architecture).

    Aliases of Forge's own memory; NotShareable (one line) where they cannot be trained through as they are.
    """
    from ti_core.ldm_keys import UNET_PREFIX, VAE_PREFIX
    from ti_core.shared_weights import autograd_alias

    found_architecture = architecture(model)
    modules = parts(model)
    layout: dict[str, Any] = {}
    text: dict[str, dict[str, Any]] = {}
    devices = set()
    for name, module in modules.items():
        state = module.state_dict()  # detached: Forge's parameters keep their flags
        _check_plain(name, state)
        devices |= {tensor.device for tensor in state.values()}
        aliases = {key: autograd_alias(tensor) for key, tensor in state.items()}
        if name == "unet":
            layout.update({UNET_PREFIX + key: tensor for key, tensor in aliases.items()})
        elif name == "vae":
            layout.update({VAE_PREFIX + key: tensor for key, tensor in aliases.items()})
        else:
            text[name] = aliases
    if len(devices) != 1:
        names = ", ".join(sorted(str(device) for device in devices))
        raise NotShareable(f"Forge holds it split over devices ({names}; a low-VRAM swap)")
    return layout, text, found_architecture


def prediction_type(model: Any) -> str | None:
    predictor = getattr(getattr(model.forge_objects.unet, "model", None), "predictor", None)
    found = getattr(predictor, "prediction_type", None)
    return found if found in ("epsilon", "v_prediction") else None


def first_weight(model: Any) -> Any:
    """One UNet parameter, whose memory tells whether Forge has moved or replaced the weights since."""
    return next(model.forge_objects.unet.model.diffusion_model.parameters(), None)


def patchers(model: Any) -> list[Any]:
    objects = model.forge_objects
    return [objects.unet, objects.clip.patcher, objects.vae.patcher]


@contextlib.contextmanager
def on_compute_device(model: Any, memory_management: Any) -> Iterator[None]:
    """The parts where Forge computes with them, loaded by Forge's own memory manager for the run (as a
    generation loads them), so its record of what is where stays right. Nothing to undo after: the parts stay
    loaded until Forge needs the room, as after a generation."""
    if memory_management is not None:
        memory_management.load_models_gpu(patchers(model))
    yield


def load_selected_model(sd_models: Any) -> Any:
    """Forge's selected checkpoint, loaded by Forge as its first generation would (it loads lazily)."""
    reload = getattr(sd_models, "forge_model_reload", None)
    if not callable(reload):
        return None
    model, _changed = reload()
    return model


def api_embedding_database(app: Any) -> Any:
    """The API's own embedding database (Forge's `Api.embedding_db`), found through its refresh route."""
    for route in getattr(app, "routes", None) or []:
        if getattr(route, "path", None) == REFRESH_ROUTE:
            api = getattr(getattr(route, "endpoint", None), "__self__", None)
            return getattr(api, "embedding_db", None)
    return None


def stays_put(model: Any) -> bool:
    """Whether Forge never moves the parts (it loads and offloads to the same device: --always-cpu). Only then
    may aliases of their memory be kept between runs: after a move they would keep the old memory alive."""
    return all(
        str(getattr(patcher, "load_device", "")) == str(getattr(patcher, "offload_device", "?"))
        for patcher in patchers(model)
    )
