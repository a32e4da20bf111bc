"""SD.Next: training on its loaded diffusers pipeline, module for module, with no copy and nothing unloaded.

SD.Next's model (`shared.sd_model`) is a diffusers StableDiffusion(XL)Pipeline: its `unet`, `vae` and text
encoders are the very modules textual inversion needs. A run borrows them as they are and gives them back as
they were (`borrowed`): the trainer freezes them, swaps attention processors and forwards, may switch on
gradient checkpointing or train mode, and moves the VAE's tensors for encoding; each is put back afterwards.
No tensor of theirs is written.

Two things of SD.Next's are not used:
- its tokenizers: SD.Next adds a token per loaded embedding to them (and resizes the encoders' token tables
  to match). The trainer tokenizes with its own clean CLIP tokenizer, so only the base vocabulary's rows of
  those tables are read, and SD.Next's added rows are neither read nor written.
- its scheduler: that is whichever sampler the user picked. The training noise comes from the
  architecture's own schedule (the model's betas and prediction type where SD.Next's scheduler has them).

Not shared, and the file loaded instead (one log line says why): quantized weights (SDNQ and other
quantizers), modules under accelerate's offload hooks (SD.Next's balanced, model, sequential or group
offload), weights on more than one device or on the meta device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("ti_host")

ENCODER_ATTRIBUTES = ("text_encoder", "text_encoder_2")
# The scheduler settings that define the training noise; the rest of SD.Next's sampler config is sampling.
NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_pipeline(model: Any) -> bool:
    """A diffusers Stable Diffusion pipeline (SD.Next's model), not an LDM model (A1111's)."""
    return all(getattr(model, name, None) is not None for name in ("unet", "vae", "text_encoder")) and not hasattr(
        model, "first_stage_model"
    )


def _modules(pipeline: Any) -> dict[str, torch.nn.Module]:
    parts = {"unet": pipeline.unet, "vae": pipeline.vae}
    for name in ENCODER_ATTRIBUTES:
        encoder = getattr(pipeline, name, None)
        if encoder is not None:
            parts[name] = encoder
    return parts


def unshareable_reason(pipeline: Any) -> str | None:
    """Why SD.Next's loaded pipeline cannot be trained on as it is, or None when it can."""
    if type(pipeline).__name__ not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        return f"{type(pipeline).__name__} is not a Stable Diffusion 1/2/XL pipeline"
    devices = set()
    for name, module in _modules(pipeline).items():
        if getattr(module, "quantization_config", None) is not None or getattr(module, "hf_quantizer", None):
            return f"its {name} is quantized"
        for submodule in module.modules():
            if hasattr(submodule, "_hf_hook"):
                return f"its {name} is under model offload (set SD.Next's Model offload mode to none to share it)"
            if "sdnq" in type(submodule).__module__.lower():
                return f"its {name} is quantized (SDNQ)"
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and tensor.dtype not in FLOAT_DTYPES:
                return f"its {name} holds {tensor.dtype} weights"
            if tensor.dtype in (torch.int8, torch.uint8) or type(tensor).__name__ not in ("Parameter", "Tensor"):
                return f"its {name} is quantized"
            devices.add(tensor.device)
    if any(device.type == "meta" for device in devices):
        return "part of it is not in memory (meta device)"
    if len(devices) > 1:
        return f"its weights are split over {', '.join(sorted(str(device) for device in devices))}"
    return None


def _noise_scheduler(pipeline: Any, architecture: str):
    from diffusers import PNDMScheduler

    from ti_core.checkpoints import skeleton_for

    theirs = dict(getattr(getattr(pipeline, "scheduler", None), "config", {}) or {})
    prediction_type = theirs.get("prediction_type")
    folder = skeleton_for(architecture, prediction_type if prediction_type == "v_prediction" else None)
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(folder / "scheduler"))
    overrides = {key: theirs[key] for key in NOISE_KEYS if theirs.get(key) is not None}
    if overrides.get("prediction_type") not in (None, "epsilon", "v_prediction"):
        overrides.pop("prediction_type")
    if overrides:
        scheduler.register_to_config(**overrides)
        scheduler = PNDMScheduler.from_config(scheduler.config)  # the betas follow the new settings
    return scheduler


def model_over_pipeline(pipeline: Any, path: Path):
    """A TIModel over SD.Next's pipeline modules (shares_weights: nothing copied), with clean tokenizers."""
    from ti_core.models import TextEncoder, TIModel, architecture_of
    from ti_core.single_file import clip_tokenizers

    architecture = architecture_of(pipeline)
    tokenizers = clip_tokenizers(architecture)
    if architecture == "sdxl":
        encoders = [
            TextEncoder("clip_l", tokenizers["tokenizer"], pipeline.text_encoder),
            TextEncoder("clip_g", tokenizers["tokenizer_2"], pipeline.text_encoder_2),
        ]
    else:
        key = "clip_h" if architecture == "sd2" else "clip_l"
        encoders = [TextEncoder(key, tokenizers["tokenizer"], pipeline.text_encoder)]
    return TIModel(
        architecture=architecture,
        encoders=encoders,
        unet=pipeline.unet,
        vae=pipeline.vae,
        scheduler=_noise_scheduler(pipeline, architecture),
        source=str(path),
        name=path.stem if path.is_file() else path.name,
        file_path=path if path.is_file() else None,
        shares_weights=True,
    )


def first_parameter(owner: Any) -> torch.Tensor | None:
    """The first weight of a web UI's model (an LDM module, or a pipeline's UNet): moves when it is unloaded."""
    module = owner.unet if is_pipeline(owner) else owner
    return next(module.parameters(), None)


@contextlib.contextmanager
def borrowed(pipeline: Any) -> Iterator[None]:
    """While active, the pipeline's modules are the trainer's to freeze and patch; afterwards each is as it
    was: requires_grad, train/eval, forwards set on instances, attention processors, gradient checkpointing,
    and every tensor's storage (device, dtype and memory layout)."""
    modules = _modules(pipeline)
    submodules = [sub for module in modules.values() for sub in module.modules()]
    requires_grad = [(tensor, tensor.requires_grad) for module in modules.values() for tensor in module.parameters()]
    storage = [
        (tensor, tensor.data) for module in modules.values() for tensor in [*module.parameters(), *module.buffers()]
    ]
    training = [(sub, sub.training) for sub in submodules]
    forwards = [(sub, vars(sub).get("forward")) for sub in submodules]
    processors = {
        name: module.attn_processors for name, module in modules.items() if hasattr(module, "set_attn_processor")
    }
    checkpointing = {
        name: module.is_gradient_checkpointing
        for name, module in modules.items()
        if hasattr(module, "is_gradient_checkpointing")
    }
    try:
        yield
    finally:
        for name, enabled in checkpointing.items():
            module = modules[name]
            if module.is_gradient_checkpointing != enabled:
                module.enable_gradient_checkpointing() if enabled else module.disable_gradient_checkpointing()
        for name, saved in processors.items():
            if modules[name].attn_processors != saved:
                modules[name].set_attn_processor(saved)
        for sub, forward in forwards:
            if forward is not None:
                sub.forward = forward
            elif "forward" in vars(sub):
                del sub.forward
        for sub, was_training in training:
            sub.training = was_training
        for tensor, data in storage:
            tensor.data = data  # the very storage it had (a move or cast would have replaced it)
        for tensor, flag in requires_grad:
            tensor.requires_grad_(flag)
