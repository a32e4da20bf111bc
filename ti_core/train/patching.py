"""The model while it trains: frozen, in the mixed-precision dtype, attention called directly, optionally
compiled and checkpointed; each change undone afterwards for whoever uses the model next."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..config import TrainConfig
from ..timodel import TIModel


@contextlib.contextmanager
def training_mode(model: TIModel, config: TrainConfig) -> Iterator[tuple[torch.device, torch.dtype | None]]:
    """Freeze the model for training; undo the temporary parts (checkpointing, train mode) afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = model.unet.device
    half = half_dtype(config.mixed_precision, device)
    encoders = [encoder.model for encoder in model.encoders]
    for module in [model.unet, model.vae, *encoders]:
        module.requires_grad_(False)
    # Weights shared with a web UI's model stay as they are: a cast or a new memory layout would be a copy.
    owned = not model.shares_weights
    if owned and half is not None and casts_frozen_weights(device):
        # Frozen weights in the half dtype halve memory and traffic; the vectors stay float32 (the splice
        # casts them on the way in, and the gradient comes back to float32).
        for module in [model.unet, *encoders]:
            module.to(half)
    model.unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA (flash / memory-efficient kernels)
    try:
        with direct_attention_calls(model.unet), compiled(model, config.compile):
            # channels_last lets the convolutions use their fastest kernels (bench/RESULTS.md: +10 % per
            # step on CPU); it changes only the memory layout, so it is undone for whoever uses the model next.
            if owned:
                model.unet.to(memory_format=torch.channels_last)
            if config.gradient_checkpointing:
                set_checkpointing(model, True)
            yield device, half
    finally:
        if owned:
            model.unet.to(memory_format=torch.contiguous_format)
        if config.gradient_checkpointing:
            set_checkpointing(model, False)


def casts_frozen_weights(device: torch.device) -> bool:
    """Half-precision frozen weights on accelerators; on the CPU, autocast alone: bf16 weights made the CPU
    steps slower (bench/RESULTS.md, "bf16 frozen weights")."""
    return device.type != "cpu"


def half_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 mixed precision needs a GPU; on the CPU use bf16 or no")
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


@contextlib.contextmanager
def direct_attention_calls(unet) -> Iterator[None]:
    """While active, the UNet's attention modules call their processor directly, as diffusers'
    `Attention.forward` does after filtering extra keyword arguments through `inspect.signature` on every
    call: 32 calls a step for SD1.5, 2 % of a CPU step (bench/RESULTS.md) and more of a launch-bound GPU
    step at batch 1. Training passes no extra arguments, so there is nothing to filter. Whatever `forward`
    a module had before (the class's, or someone's patch) is back afterwards."""
    from diffusers.models.attention_processor import Attention

    def direct(module):
        def forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            return module.processor(
                module, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                **kwargs,
            )  # fmt: skip

        return forward

    with forwards_replaced([module for module in unet.modules() if isinstance(module, Attention)], direct):
        yield


@contextlib.contextmanager
def forwards_replaced(modules, make_forward) -> Iterator[None]:
    """Give each module the forward `make_forward(module)` while active; whatever `forward` a module had
    before (the class's, or someone's patch) is back afterwards."""
    patched = {module: vars(module).get("forward") for module in modules}  # None: the class's own
    try:
        for module in modules:
            module.forward = make_forward(module)
        yield
    finally:
        for module, previous in patched.items():
            if previous is not None:
                module.forward = previous
            elif "forward" in vars(module):
                del module.forward


@contextlib.contextmanager
def compiled(model: TIModel, enabled: bool) -> Iterator[None]:
    """While active (and `enabled`), the UNet and the text encoders run through torch.compile, each whole as
    one graph: on the CPU each compiled region's Python wrappers cost about half a millisecond per step, which
    ate the gain of compiling the repeated blocks one by one (bench/RESULTS.md). Compiling happens in the first
    step (and again for a new batch shape); inductor keeps what it built on disk, so later runs start sooner.
    Whatever `forward` a module had before is back afterwards."""
    modules = [model.unet, *(encoder.model for encoder in model.encoders)] if enabled else []
    with forwards_replaced(modules, lambda module: torch.compile(module.forward)):
        yield


def set_checkpointing(model: TIModel, enabled: bool) -> None:
    """Gradient checkpointing on the UNet: recompute its activations in the backward pass (about +50 % of
    its compute) instead of storing them. Only the UNet, as in A1111: with 77 tokens the text encoders keep
    80 MB of activations per SDXL sample in bf16 (19 MB for SD1), against the UNet's gigabytes, and
    recomputing them cost 10 % of a checkpointed CPU step (bench/RESULTS.md)."""
    if enabled:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
    # Older diffusers checkpoint only in training mode. Nothing else changes with it: SD's UNets have no
    # batch norm and their dropout rates are 0.
    model.unet.train(enabled)


def autocast(device: torch.device, half: torch.dtype | None):
    return torch.autocast(device.type, dtype=half, enabled=half is not None)
