"""Training: optimise an embedding's vectors against a frozen Stable Diffusion model.

The loop every trainer shares (the paper, diffusers' example, kohya, OneTrainer, A1111): noise a cached
latent at a uniform random timestep, condition the UNet on a prompt that contains the embedding, and
minimise the MSE to the noise (or to v). Only the new [N, d] vectors are parameters: they are spliced into
the token-embedding lookup (ti_core.prompt), so there is no gradient, optimizer state or restore step
for the 49408-row table, and the UNet, VAE and text encoders are never modified.

Reproducible by construction: the data order is a function of (seed, epoch) and every random draw of a
step a function of (seed, step), so a run resumed from its saved vectors and optimizer state continues
exactly as an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .create import create_embedding
from .data import encode_dataset, load_template, render_prompt, scan_images
from .editability import RunEditability, norm_warning, resolve_method
from .embedding import Embedding
from .formats import (
    atomic_write,
    load_embedding,
    other_files_named,
    refuse_name_clash,
    save_embedding,
    save_embedding_to,
)
from .names import embedding_path, plural
from .prompt import Conditioning, PromptTokenCache, TokenizedPrompt, encode_prompts, encode_tokenized
from .schedule import learning_rate_at, parse_schedule

CSV_COLUMNS = ("step", "epoch", "loss", "learning_rate", "seconds", "validation_loss")
CSV_FLUSH_EVERY = 100  # steps; loss.csv is rewritten whole (atomically), so not every step
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda only


@dataclass
class TrainEvent:
    """A progress report for the callback. kind: start, step, warning, preview, snapshot, validation, done,
    interrupted or error; fields that do not apply to a kind are None."""

    kind: str
    step: int
    total: int
    loss: float | None = None
    lr: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    epoch: int | None = None
    path: Path | None = None
    image: Any = None  # PIL.Image for "preview"
    message: str = ""
    outputs_seconds: float | None = None  # "step": time spent on snapshots, validation and previews so far
    norm_ratio: float | None = None  # "step": the largest vector norm as a multiple of the vocabulary's mean


@dataclass
class TrainResult:
    """How a run ended. stopped: "done", "interrupted", "nan" or "error"; the file holds `step`'s vectors."""

    embedding_path: Path | None
    step: int
    stopped: str
    message: str
    log_dir: Path
    error: BaseException | None = field(default=None, repr=False)


class AlreadyTrained(FileExistsError):
    """Training (not resuming) an embedding that has been trained already."""

    def __init__(self, path: Path, step: int, resume: str = "resume", overwrite: str = "overwrite") -> None:
        self.path, self.step = path, step
        super().__init__(
            f"{path} is already trained to step {step}; {resume} to continue training it (to a step above {step}), "
            f"or {overwrite} to start again"
        )


class TrainingLocked(RuntimeError):
    """Another run is training the same embedding."""


# ----------------------------------------------------------------------------------------------------------------
# The run


def train(
    model,
    config: TrainConfig,
    callback: Callable[[TrainEvent], None] | None = None,
    *,
    cancel=None,
    accelerator=None,
) -> TrainResult:
    """Train `config.name`'s vectors on `model` until step `config.steps`, reporting through `callback`.

    `cancel` (a threading.Event) stops the run after the current step, saving what it has. With an
    `accelerate` Accelerator each process trains on its share of every batch and the vectors' gradients
    are averaged, so all processes hold the same vectors; only the main one writes files. On a GPU the
    frozen UNet and text encoders are cast to the mixed-precision dtype in place (load the model in that
    dtype to avoid the copy). Setup problems raise; a failure during training is saved and reported in
    the result.

    On the CPU the same seed gives bit-identical vectors only with MKL_CBWR=AUTO,STRICT in the environment
    before torch's first matrix product (the CLI sets it): otherwise MKL's sums depend on memory alignment,
    and Adam, which divides each gradient component by its own size, amplifies those last-bit differences.
    """
    procs = Processes(accelerator)
    emit = callback if callback and procs.is_main else lambda event: None
    run = RunFolder(config, write=procs.is_main)
    with run.locked(), _training_mode(model, config) as (device, half):
        # Load: the embedding (new, or resumed at its step) and the VAE latents of the images.
        with procs.main_first():  # the main process converts a resumed .pt first; the others then read that
            embedding, adopted = starting_embedding(model, config, run if procs.is_main else None)
        start = embedding.step
        # Editability hook: "auto" resolved (a resumed run keeps its method), recorded in settings.json and the file.
        method = resolve_method(config.method, start, embedding.metadata.get("training_settings"))
        config = run.config = replace(config, method=method)
        with procs.main_first():  # the main process fills the latent cache; the others then read it
            dataset = _encode_images(model, config, run, device)
        template = load_template(config.data.template)

        # Parameters: only the vectors, in float32 whatever the model's dtype.
        vectors = {
            key: torch.nn.Parameter(tensor.to(device, torch.float32)) for key, tensor in embedding.vectors.items()
        }

        # Editability hook: the method's anchors, and a new run's start (on the sphere, or CrossInit's).
        init_text = embedding.metadata.get("init_text", config.init_text)
        editability = RunEditability(model, config, init_text, embedding.num_vectors)
        if start == 0:
            editability.start(vectors)

        # Optimizer, schedule and the fixed parts of the loss.
        optimizer = _adamw(list(vectors.values()), device)
        resume_note = run.load_optimizer_state(optimizer, embedding) if config.resume else ""
        resume_note = "; ".join(note for note in (adopted, resume_note) if note)
        scaler = _grad_scaler(device, enabled=half == torch.float16)
        schedule = parse_schedule(config.learning_rate)
        noise_scheduler = _noise_scheduler(model, config)
        norm_limits = vocabulary_norm_limits(model, config.norm_control)
        tokenize = PromptTokenCache(model, {config.name: embedding.num_vectors})
        outputs = Outputs(
            model, config, run, procs, embedding, emit, noise_scheduler,
            validation=validation_set(dataset, template, config, device) if config.validation_every else [],
            preview_prompt=config.preview_prompt or _default_preview_prompt(dataset, template, config),
            half=half, vocabulary_norms=editability.mean_norms,
        )  # fmt: skip
        run.begin(start)
        message = _start_message(config, len(dataset), procs.world, start, resume_note)
        emit(TrainEvent("start", start, config.steps, message=message))
        outputs.validate(vectors, start)  # the baseline that later values are compared with

        # The loop: one optimizer step per iteration, over `gradient_accumulation` micro-batches.
        stream = _micro_batches(dataset, config, procs, skip=start * config.gradient_accumulation)
        good, good_step, step = _detached(vectors), start, start  # the last finite vectors, saved on any stop
        clock = Clock(start, config.steps)
        stopped, message, error = "done", "", None
        warned = False
        try:
            while step < config.steps:
                if procs.any(cancel is not None and cancel.is_set()):
                    stopped = "interrupted"
                    break
                lr = learning_rate_at(schedule, step, config.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = 0.0
                for micro in range(config.gradient_accumulation):
                    epoch, batch = next(stream)
                    noise_rng, prompt_rng = step_generators(config.seed, step, micro, procs.rank, device)
                    prompts = [_training_prompt(template, config, caption, prompt_rng) for caption in batch.captions]
                    tokens = tokenize(prompts)
                    with _autocast(device, half):
                        value = batch_loss(model, noise_scheduler, vectors, batch, tokens, noise_rng, config)
                        # Editability hook: the method's loss terms (logged loss: the diffusion loss alone).
                        extra = editability.loss(model, tokenize, vectors, step, micro, procs.rank, len(prompts))
                    scaler.scale((value + extra) / config.gradient_accumulation).backward()
                    loss += value.item() / config.gradient_accumulation
                loss = procs.mean(loss)
                # Checked before the optimizer step, so a diverged step never reaches the vectors.
                if not math.isfinite(loss):
                    stopped, message = "nan", f"the loss became {loss} at step {step + 1}"
                    break
                editability.before_step(vectors)  # editability hook: directional keeps the gradients' tangent part
                _optimizer_step(optimizer, scaler, vectors, procs, config)
                editability.after_step(vectors)  # editability hook: directional steps back onto the sphere
                control_norms(vectors, norm_limits)
                if not all(torch.isfinite(tensor).all() for tensor in vectors.values()):
                    stopped, message = "nan", f"the vectors became infinite or NaN at step {step + 1}"
                    break
                step += 1
                good, good_step = _detached(vectors), step
                clock.tick(step)
                run.log_loss(step, epoch, loss, lr, clock.elapsed)
                rate, eta, outputs_seconds = clock.rate, clock.eta, clock.outputs_seconds
                ratio = editability.norm_ratio(vectors)
                emit(
                    TrainEvent(
                        "step", step, config.steps, loss, lr, rate, eta, epoch,
                        outputs_seconds=outputs_seconds, norm_ratio=ratio,
                    )
                )  # fmt: skip
                if not warned and (warning := norm_warning(ratio)):  # editability hook: once per run
                    warned = True
                    emit(TrainEvent("warning", step, config.steps, norm_ratio=ratio, message=warning))
                with clock.outside_steps():
                    outputs.periodic(vectors, step)
        except Exception as exception:  # whatever it was, the last good vectors are saved and it is reported
            stopped, error = "error", exception
            message = _error_message(exception, step + 1)

        # Save: the final embedding (and its optimizer state) in the embeddings folder.
        return outputs.finish(good, good_step, optimizer, stopped, message, error)


# ----------------------------------------------------------------------------------------------------------------
# Setup


def starting_embedding(model, config: TrainConfig, run: RunFolder | None = None) -> tuple[Embedding, str]:
    """The embedding to train (the saved one when resuming, else a new one from the init text), and a note
    for the start message. Resuming from another file than ``<name>.safetensors`` converts it when a `run`
    is given (the main process's): see `adopt_resumed_file`."""
    path = embedding_path(config.embeddings_dir, config.name)
    if not config.resume:
        refuse_name_clash(config.embeddings_dir, config.name, path, hint="resume to continue training it, or rename")
        if path.exists() and not config.overwrite:
            # Created (step 0) and never trained: that is the embedding to train, from its initial vectors.
            existing = load_embedding(path, widths=model.widths)
            if existing.step > 0:
                raise AlreadyTrained(path, existing.step)
            existing.name = config.name
            return existing, f"training {path.name} as it was created ({plural(existing.num_vectors, 'vector')})"
        return create_embedding(model, config.name, config.init_text, config.vectors), ""
    source = resume_source(config)
    embedding = load_embedding(source, widths=model.widths)
    embedding.name = config.name
    if embedding.step >= config.steps:
        raise ValueError(f"{source} is already trained to step {embedding.step}; set more than {embedding.step} steps")
    if source == path or run is None:
        return embedding, ""
    return embedding, adopt_resumed_file(embedding, source, config, run)


def resume_source(config: TrainConfig) -> Path:
    """What a resumed run starts from: ``<name>.safetensors``, else the one other file the web UIs load as
    ``<name>`` (A1111's ``<name>.pt``, a diffusers ``.bin``, a copy in a subfolder)."""
    path = embedding_path(config.embeddings_dir, config.name)
    if path.is_file():
        return path
    others = other_files_named(config.embeddings_dir, config.name, path)
    if len(others) > 1:
        shown = ", ".join(str(other.relative_to(config.embeddings_dir)) for other in others)
        raise FileExistsError(f"cannot resume: several files are named {config.name!r} ({shown}); keep one")
    if not others:
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    return others[0]


def adopt_resumed_file(embedding: Embedding, source: Path, config: TrainConfig, run: RunFolder) -> str:
    """Resuming from another file than ``<name>.safetensors`` (A1111's ``.pt``, say): write the vectors as
    ``<name>.safetensors`` now and move the original into the run's log folder, so the web UI goes on seeing
    exactly one embedding of that name (two files with one name clash) and nothing is lost if the run dies."""
    path = embedding_path(config.embeddings_dir, config.name)
    save_embedding_to(embedding, path, overwrite=False, metadata={"converted_from": source.name})
    kept = run.folder / source.name
    for number in itertools.count(1):
        if not kept.exists():
            break
        kept = run.folder / f"{source.stem}-{number}{source.suffix}"
    run.folder.mkdir(parents=True, exist_ok=True)
    shutil.move(source, kept)
    return f"resumed from {source.name}, now {path.name} (the original is kept as {kept})"


@contextlib.contextmanager
def _training_mode(model, config: TrainConfig) -> Iterator[tuple[torch.device, torch.dtype | None]]:
    """Freeze the model for training; undo the temporary parts (checkpointing, train mode) afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = model.unet.device
    half = _half_dtype(config.mixed_precision, device)
    encoders = [encoder.model for encoder in model.encoders]
    for module in [model.unet, model.vae, *encoders]:
        module.requires_grad_(False)
    # Weights shared with a web UI's model stay as they are: a cast or a new memory layout would be a copy.
    owned = not model.shares_weights
    if owned and half is not None and _casts_frozen_weights(device):
        # Frozen weights in the half dtype halve memory and traffic; the vectors stay float32 (the splice
        # casts them on the way in, and the gradient comes back to float32).
        for module in [model.unet, *encoders]:
            module.to(half)
    model.unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA (flash / memory-efficient kernels)
    try:
        with _direct_attention_calls(model.unet), _compiled(model, config.compile):
            # channels_last lets the convolutions use their fastest kernels (bench/RESULTS.md: +10 % per
            # step on CPU); it changes only the memory layout, so it is undone for whoever uses the model next.
            if owned:
                model.unet.to(memory_format=torch.channels_last)
            if config.gradient_checkpointing:
                _set_checkpointing(model, True)
            yield device, half
    finally:
        if owned:
            model.unet.to(memory_format=torch.contiguous_format)
        if config.gradient_checkpointing:
            _set_checkpointing(model, False)


def _casts_frozen_weights(device: torch.device) -> bool:
    """Half-precision frozen weights on accelerators; on the CPU, autocast alone: bf16 weights made the CPU
    steps slower (bench/RESULTS.md, "bf16 frozen weights")."""
    return device.type != "cpu"


def _half_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 mixed precision needs a GPU; on the CPU use bf16 or no")
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


@contextlib.contextmanager
def _direct_attention_calls(unet) -> Iterator[None]:
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

    with _forwards_replaced([module for module in unet.modules() if isinstance(module, Attention)], direct):
        yield


@contextlib.contextmanager
def _forwards_replaced(modules, make_forward) -> Iterator[None]:
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
def _compiled(model, enabled: bool) -> Iterator[None]:
    """While active (and `enabled`), the UNet and the text encoders run through torch.compile, each whole as
    one graph: on the CPU each compiled region's Python wrappers cost about half a millisecond per step, which
    ate the gain of compiling the repeated blocks one by one (bench/RESULTS.md). Compiling happens in the first
    step (and again for a new batch shape); inductor keeps what it built on disk, so later runs start sooner.
    Whatever `forward` a module had before is back afterwards."""
    modules = [model.unet, *(encoder.model for encoder in model.encoders)] if enabled else []
    with _forwards_replaced(modules, lambda module: torch.compile(module.forward)):
        yield


def _uncompiled():
    """Previews and validation run eagerly: their no-grad passes (and a preview's doubled batch) would each
    compile anew, for a handful of calls."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def _set_checkpointing(model, enabled: bool) -> None:
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


def _encode_images(model, config: TrainConfig, run: RunFolder, device: torch.device):
    scan = scan_images(config.data)
    if not scan.items:
        skipped = (
            f" ({len(scan.skipped)} files skipped, e.g. {scan.skipped[0][0].name}: {scan.skipped[0][1]})"
            if scan.skipped
            else ""
        )
        raise ValueError(f"no training images in {config.data.images}{skipped}")
    cache = run.cache_dir if config.cache_latents else None
    return encode_dataset(model, config.data, scan.items, cache_dir=cache, device=device, dtype=model.vae.dtype)


def _adamw(params: list[torch.Tensor], device: torch.device) -> torch.optim.AdamW:
    # Weight decay 0 as in A1111: decay pulls the vectors towards zero, which is not a neutral prior for
    # token embeddings. Fused kernels on CUDA; with one or two small tensors nothing else matters.
    return torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, fused=True if device.type == "cuda" else None)


def _grad_scaler(device: torch.device, enabled: bool):
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def _autocast(device: torch.device, half: torch.dtype | None):
    return torch.autocast(device.type, dtype=half, enabled=half is not None)


def _noise_scheduler(model, config: TrainConfig):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(model.scheduler.config)
    if model.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"cannot train against a {model.prediction_type!r}-prediction model (epsilon or v only)")
    if config.timestep_max > scheduler.config.num_train_timesteps:
        raise ValueError(
            f"timestep_max {config.timestep_max} is beyond the model's {scheduler.config.num_train_timesteps} timesteps"
        )
    return scheduler


def vocabulary_norm_limits(model, norm_control: float) -> dict[str, float]:
    """Per encoder, the largest norm a vector may reach: `norm_control` × the median token-row norm.

    Unconstrained TI vectors grow to many times the norm of any real token; the text encoder then lets
    them dominate the prompt, which is why heavily trained embeddings ignore the rest of it (poor
    editability, the method's known weak spot). Capping the norm near the vocabulary's keeps them
    word-like (OneTrainer's preserve_embedding_norm does the same).
    """
    if norm_control <= 0:
        return {}
    with torch.no_grad():
        return {e.key: norm_control * e.token_table.float().norm(dim=1).median().item() for e in model.encoders}


# ----------------------------------------------------------------------------------------------------------------
# One step


def _seed(*parts: object) -> int:
    """A 63-bit seed mixed from the parts; the same parts give the same seed in every process and run."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def step_generators(
    seed: int, step: int, micro: int, rank: int, device: torch.device
) -> tuple[torch.Generator, random.Random]:
    """The random sources of one micro-batch: torch (noise, timesteps) and Python (prompt lines, tags)."""
    generator = torch.Generator(device=device).manual_seed(_seed(seed, "noise", step, micro, rank))
    return generator, random.Random(_seed(seed, "prompt", step, micro, rank))


def _micro_batches(dataset, config: TrainConfig, procs: Processes, skip: int) -> Iterator[tuple[int, Any]]:
    """This process's endless stream of (epoch, batch), after skipping the `skip` that a resumed run has
    already trained on. Each epoch's order depends on (seed, epoch) only, so skipping reproduces it."""
    for epoch in itertools.count():
        count = 0
        for batch in dataset.batches(
            config.batch_size, seed=config.seed, epoch=epoch, rank=procs.rank, world_size=procs.world
        ):
            count += 1
            if skip:
                skip -= 1
                continue
            yield epoch, batch
        if count == 0:
            raise ValueError(f"the dataset gave process {procs.rank} of {procs.world} no batch in epoch {epoch}")


def _training_prompt(template: list[str], config: TrainConfig, caption: str, rng: random.Random) -> str:
    data = config.data
    line = rng.choice(template)
    return render_prompt(
        line, config.name, caption, shuffle_tags=data.shuffle_tags, tag_dropout=data.tag_dropout, rng=rng
    )


def batch_loss(
    model,
    noise_scheduler,
    vectors: Mapping[str, torch.Tensor],
    batch,
    tokenized: Mapping[str, Sequence[TokenizedPrompt]],
    generator,
    config: TrainConfig,
) -> torch.Tensor:
    """The loss of one batch (its prompts tokenized for each encoder) at random timesteps and noise drawn
    from `generator`."""
    device = generator.device
    latents = batch.latents.to(device)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if config.noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model learn overall brightness.
        noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
    timesteps = torch.randint(
        config.timestep_min, config.timestep_max, (len(latents),), generator=generator, device=device
    )
    conditioning = encode_tokenized(model, tokenized, {config.name: vectors})
    weights = None if batch.weights is None else batch.weights.to(device)
    return diffusion_loss(
        model, noise_scheduler, conditioning, latents, noise, timesteps, weights, batch.time_ids, config.min_snr_gamma
    )


def diffusion_loss(
    model,
    noise_scheduler,
    conditioning: Conditioning,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    weights: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Mean MSE between the UNet's prediction and its target (the noise, or v = α·ε − σ·x₀), per sample
    weighted by the alpha map (normalised by its sum, so an opaque image counts like an unweighted one)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    v_prediction = model.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    extra = {}
    if conditioning.pooled is not None:  # SDXL: pooled text embedding and size/crop conditioning
        extra["added_cond_kwargs"] = {"text_embeds": conditioning.pooled, "time_ids": time_ids.to(latents.device)}
    prediction = model.unet(noisy, timesteps, encoder_hidden_states=conditioning.hidden_states, **extra).sample
    error = (prediction.float() - target.float()) ** 2
    if weights is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        coverage = weights.sum(dim=(1, 2, 3)) * error.shape[1]  # weights are [B, 1, h, w]; error is [B, C, h, w]
        per_sample = (error * weights).sum(dim=(1, 2, 3)) / coverage.clamp_min(1e-8)
    if min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma, v_prediction)
    return per_sample.mean()


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v,
    so that easy low-noise timesteps stop dominating the gradient."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma) / (snr + 1 if v_prediction else snr)


def _optimizer_step(
    optimizer, scaler, vectors: Mapping[str, torch.Tensor], procs: Processes, config: TrainConfig
) -> None:
    params = list(vectors.values())
    for param in params:
        if param.grad is None:  # a prompt without the embedding; every process must still take part below
            param.grad = torch.zeros_like(param)
    procs.average_gradients(params)
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    if config.grad_clip == "value":
        torch.nn.utils.clip_grad_value_(params, config.grad_clip_value)
    elif config.grad_clip == "norm":
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip_value)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def control_norms(vectors: Mapping[str, torch.Tensor], limits: Mapping[str, float]) -> None:
    """Scale down, in place, each vector whose norm exceeds its encoder's limit (see vocabulary_norm_limits)."""
    with torch.no_grad():
        for key, limit in limits.items():
            norms = vectors[key].norm(dim=1, keepdim=True)
            vectors[key].mul_((limit / norms.clamp_min(1e-12)).clamp(max=1.0))


def _detached(vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().clone() for key, tensor in vectors.items()}


# ----------------------------------------------------------------------------------------------------------------
# Validation and previews


@dataclass
class ValidationSample:
    latents: torch.Tensor  # [1, 4, h, w]
    prompt: str
    noise: torch.Tensor
    timesteps: torch.Tensor  # [1]
    weights: torch.Tensor | None
    time_ids: torch.Tensor


def validation_set(dataset, template: list[str], config: TrainConfig, device: torch.device) -> list[ValidationSample]:
    """A fixed set of (latent, prompt, noise, timestep), drawn once with its own seed, so the validation
    loss moves only when the vectors do. Timesteps are spread evenly over the training range."""
    order = dataset.batches(1, seed=_seed(config.seed, "validation") % 2**32, epoch=0)
    batches = list(itertools.islice(order, config.validation_samples))
    generator = torch.Generator().manual_seed(_seed(config.seed, "validation noise"))
    rng = random.Random(_seed(config.seed, "validation prompts"))
    span = config.timestep_max - config.timestep_min
    samples = []
    for index, batch in enumerate(batches):
        timestep = config.timestep_min + int((index + 0.5) * span / len(batches))
        samples.append(
            ValidationSample(
                latents=batch.latents.to(device),
                prompt=render_prompt(
                    rng.choice(template), config.name, batch.captions[0], shuffle_tags=False, tag_dropout=0.0, rng=rng
                ),
                noise=torch.randn(batch.latents.shape, generator=generator).to(device),
                timesteps=torch.tensor([timestep], device=device),
                weights=None if batch.weights is None else batch.weights.to(device),
                time_ids=batch.time_ids,
            )
        )
    return samples


def validation_loss(model, noise_scheduler, name: str, vectors, samples: list[ValidationSample], half=None) -> float:
    """Mean loss of the fixed validation samples (no min-SNR weighting: comparable across settings)."""
    device = model.unet.device
    total = 0.0
    with torch.no_grad(), _autocast(device, half), _uncompiled():
        for sample in samples:
            conditioning = encode_prompts(model, [sample.prompt], {name: vectors})
            total += diffusion_loss(
                model,
                noise_scheduler,
                conditioning,
                sample.latents,
                sample.noise,
                sample.timesteps,
                sample.weights,
                sample.time_ids,
            ).item()
    return total / len(samples)


def render_preview(model, name: str, vectors, prompt: str, config: TrainConfig):
    """One image of `prompt` with the embedding's current vectors (never registered in a tokenizer), at a
    fixed seed, with DPM-Solver++ through diffusers. Returns a PIL image."""
    from diffusers import DPMSolverMultistepScheduler

    pipeline = model.pipeline()
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    device, size = model.unet.device, config.data.resolution
    with torch.no_grad(), _uncompiled():
        # One call, so the prompt and the negative prompt get the same number of 77-token windows.
        both = encode_prompts(model, [config.preview_negative_prompt, prompt], {name: vectors})
        extra = {}
        if both.pooled is not None:
            extra = {"pooled_prompt_embeds": both.pooled[1:], "negative_pooled_prompt_embeds": both.pooled[:1]}
        latents = pipeline(
            prompt_embeds=both.hidden_states[1:],
            negative_prompt_embeds=both.hidden_states[:1],
            height=size,
            width=size,
            num_inference_steps=config.preview_steps,
            guidance_scale=config.preview_guidance,
            generator=torch.Generator(device=device).manual_seed(config.preview_seed),
            output_type="latent",
            **extra,
        ).images
        # Decoded here in the VAE's own dtype: the UNet may be half precision, the VAE usually is not.
        image = model.vae.decode(latents.to(model.vae.dtype) / model.vae.config.scaling_factor).sample
    return pipeline.image_processor.postprocess(image.float(), output_type="pil")[0]


def _default_preview_prompt(dataset, template: list[str], config: TrainConfig) -> str:
    rng = random.Random(config.preview_seed)
    return render_prompt(
        rng.choice(template), config.name, dataset.captions[0], shuffle_tags=False, tag_dropout=0.0, rng=rng
    )


@dataclass
class Outputs:
    """What the run reports and writes besides the loss: snapshots, validation, previews and the final
    save (files from the main process only; events to the callback)."""

    model: Any
    config: TrainConfig
    run: RunFolder
    procs: Processes
    embedding: Embedding  # the starting one: its name and metadata
    emit: Callable[[TrainEvent], None]
    noise_scheduler: Any
    validation: list[ValidationSample]
    preview_prompt: str
    half: torch.dtype | None
    vocabulary_norms: dict[str, float] = field(default_factory=dict)

    def at(self, vectors, step: int) -> Embedding:
        """The embedding with these vectors at this step, with what the web UIs and a re-run need to know."""
        model, config = self.model, self.config
        metadata = {
            **self.embedding.metadata,
            "training_settings": json.dumps(config.to_dict()),
            "base_model": model.name,
            "base_model_hash": model.shorthash() or "",
            "architecture": model.architecture,
            "init_text": self.embedding.metadata.get("init_text", config.init_text),
            # Editability hook: the scale of a word, so a file's norms read as multiples of it without the model.
            "vocabulary_norms": json.dumps({key: round(norm, 6) for key, norm in self.vocabulary_norms.items()}),
        }
        tensors = {key: tensor.detach().float().cpu() for key, tensor in vectors.items()}
        return Embedding(name=config.name, vectors=tensors, step=step, metadata=metadata)

    def periodic(self, vectors, step: int) -> None:
        """Snapshots, validation and previews due at `step`."""
        config, run, total = self.config, self.run, self.config.steps
        if not self.procs.is_main:
            return
        if _due(step, config.save_every):
            path = run.save_snapshot(self.at(vectors, step))
            self.emit(TrainEvent("snapshot", step, total, path=path, message=f"Saved {path}"))
        if _due(step, config.validation_every):
            self.validate(vectors, step)
        if _due(step, config.preview_every):
            image = render_preview(self.model, config.name, _detached(vectors), self.preview_prompt, config)
            path = run.save_image(image, run.image_path(step))
            self.emit(TrainEvent("preview", step, total, path=path, image=image, message=f"Preview {path}"))

    def validate(self, vectors, step: int) -> None:
        """The loss on the fixed validation samples; the lowest so far is kept as `<name>-best`."""
        if not (self.validation and self.procs.is_main):
            return
        value = validation_loss(
            self.model, self.noise_scheduler, self.config.name, vectors, self.validation, self.half
        )
        best = self.run.log_validation(step, value, self.at(vectors, step))
        message = f"Validation loss {value:.5f}" + (f"; new best, saved {best}" if best else "")
        self.emit(TrainEvent("validation", step, self.config.steps, loss=value, path=best, message=message))

    def finish(self, good, step: int, optimizer, stopped: str, message: str, error) -> TrainResult:
        """Save the last good vectors to the embeddings folder and report how the run ended."""
        config, run, procs = self.config, self.run, self.procs
        final = self.at(good, step)
        path = embedding_path(config.embeddings_dir, config.name)
        if procs.is_main:
            save_embedding(final, config.embeddings_dir, overwrite=True)
            if stopped in ("done", "interrupted"):  # after a failure the optimizer state may be the bad step's
                run.save_optimizer_state(optimizer, final)
            if stopped == "done" and config.preview_every:  # the card image the web UIs show for the embedding
                image = render_preview(self.model, config.name, good, self.preview_prompt, config)
                run.save_image(image, embedding_path(config.embeddings_dir, config.name, ".preview.png"))
            run.flush()
        if stopped == "done" and procs.world > 1:
            message = f"{procs.world} processes finished with {'identical' if procs.identical(good) else 'DIFFERENT'} vectors"
        text = {
            "done": f"Trained {config.name} to step {step}; saved {path}",
            "interrupted": f"Training interrupted at step {step}; saved {path}",
            "nan": f"Training stopped: {message}; saved the last finite vectors (step {step}) to {path}",
            "error": f"Training failed: {message}; saved step {step} to {path}",
        }[stopped]
        if stopped == "done" and message:
            text += f" ({message})"
        self.emit(
            TrainEvent(
                "error" if stopped in ("nan", "error") else stopped, step, config.steps, path=path, message=text
            )
        )
        return TrainResult(path, step, stopped, text, run.folder, error)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


# ----------------------------------------------------------------------------------------------------------------
# Saving and ending


def _error_message(error: Exception, step: int) -> str:
    if isinstance(error, OutOfMemoryError):
        return (
            f"out of memory at step {step}: use a smaller batch size, gradient checkpointing, "
            "a lower resolution or fp16/bf16 mixed precision"
        )
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__} at step {step}: {first_line}"


def _start_message(config: TrainConfig, images: int, processes: int, start: int, resume_note: str) -> str:
    where = f" on {processes} processes" if processes > 1 else ""
    begin = f"from step {start}" if start else "from the start"
    note = f"; {resume_note}" if resume_note else ""
    method = f"; method: {config.method}" if config.method != "plain" else ""
    return f"Training {config.name} on {images} images{where}, {begin} to step {config.steps}{note}{method}"


class Clock:
    """Training steps per second over this run so far, and the time left at that pace.

    Snapshots, validation and previews run inside `outside_steps()`: they are not training steps, so their
    time is kept apart (a slow preview neither lowers steps/s nor inflates the ETA) and reported on its own.
    `now` is the time source (injectable, so tests need no real waiting).
    """

    def __init__(self, start: int, total: int, now: Callable[[], float] = time.perf_counter) -> None:
        self.start, self.step, self.total = start, start, total
        self.now = now
        self.began = now()
        self.outputs_seconds = 0.0  # spent in outside_steps()

    def tick(self, step: int) -> None:
        self.step = step

    @contextlib.contextmanager
    def outside_steps(self) -> Iterator[None]:
        began = self.now()
        try:
            yield
        finally:
            self.outputs_seconds += self.now() - began

    @property
    def elapsed(self) -> float:
        """Wall seconds since the run began, outputs included (the loss log's clock)."""
        return self.now() - self.began

    @property
    def training_seconds(self) -> float:
        return self.elapsed - self.outputs_seconds

    @property
    def rate(self) -> float | None:
        done, seconds = self.step - self.start, self.training_seconds
        return done / seconds if done and seconds > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds until the last step at this rate (the remaining previews and snapshots not counted)."""
        rate = self.rate
        return (self.total - self.step) / rate if rate else None


# ----------------------------------------------------------------------------------------------------------------
# Processes (accelerate) and the run folder


class Processes:
    """This process's place among the training processes: one, unless launched with `accelerate launch`."""

    def __init__(self, accelerator=None) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0

    def _sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        return self.accelerator.reduce(torch.tensor(values, device=self.accelerator.device), reduction="sum").tolist()

    def mean(self, value: float) -> float:
        return self._sum([value])[0] / self.world

    def any(self, flag: bool) -> bool:
        """True in every process if it is true in one (so all stop at the same step)."""
        return self._sum([float(flag)])[0] > 0

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        if self.world > 1:
            for param in params:
                param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    def identical(self, vectors: Mapping[str, torch.Tensor]) -> bool:
        flat = torch.cat([tensor.flatten() for _, tensor in sorted(vectors.items())]).to(self.accelerator.device)
        gathered = self.accelerator.gather(flat[None])
        return bool((gathered == gathered[0]).all())

    def main_first(self):
        return self.accelerator.main_process_first() if self.accelerator else contextlib.nullcontext()


class RunFolder:
    """`<log_dir>/<name>/`: snapshots, preview images, loss.csv, settings.json, the optimizer state, the
    lock and the latent cache. Only the main process writes, and every file is written atomically."""

    def __init__(self, config: TrainConfig, write: bool) -> None:
        self.config, self.write = config, write
        self.folder = Path(config.log_dir) / config.name
        self.rows: list[dict[str, Any]] = []
        self.best = math.inf
        self.seconds_before = 0.0

    name = property(lambda self: self.config.name)
    cache_dir = property(lambda self: self.folder / "latents")
    csv_path = property(lambda self: self.folder / "loss.csv")
    best_path = property(lambda self: self.folder / f"{self.name}-best.safetensors")
    optimizer_path = property(lambda self: self.folder / f"{self.name}.optim.safetensors")

    def image_path(self, step: int) -> Path:
        return self.folder / "images" / f"{self.name}-{step}.png"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The run's lock. A run that fails to start (no images, a refused name) leaves no empty folder."""
        if not self.write:
            yield
            return
        missing = [folder for folder in (self.folder, *self.folder.parents) if not folder.exists()]
        try:
            with exclusive_lock(self.folder / ".lock"):
                yield
        except BaseException:
            if missing:  # the folders this run made (the log folder too, on a first run), as far as they are empty
                _remove_empty_folders(self.folder)
                for folder in missing[1:]:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            raise

    def begin(self, start: int) -> None:
        """settings.json, and the loss log of a resumed run kept up to its step."""
        if not self.write:
            return
        text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        atomic_write(self.folder / "settings.json", lambda temp: temp.write_text(text, encoding="utf-8"))
        if self.config.resume and self.csv_path.is_file():
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= start]
            self.seconds_before = float(self.rows[-1]["seconds"]) if self.rows else 0.0
        if self.config.resume and self.best_path.is_file():
            with contextlib.suppress(ValueError, KeyError):
                self.best = float(load_embedding(self.best_path).metadata["validation_loss"])

    def log_loss(self, step: int, epoch: int, loss: float, lr: float, seconds: float) -> None:
        row = {
            "step": step,
            "epoch": epoch,
            "loss": f"{loss:.6g}",
            "learning_rate": f"{lr:.6g}",
            "validation_loss": "",
        }
        self.rows.append({**row, "seconds": f"{self.seconds_before + seconds:.2f}"})
        if step % CSV_FLUSH_EVERY == 0:
            self.flush()

    def flush(self) -> None:
        if not self.write or not self.rows:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.csv_path, lambda temp: temp.write_text(buffer.getvalue(), encoding="utf-8"))

    def save_snapshot(self, embedding: Embedding) -> Path:
        path = self.folder / f"{self.name}-{embedding.step}.safetensors"
        save_embedding_to(embedding, path, overwrite=True)
        self.flush()
        return path

    def log_validation(self, step: int, value: float, embedding: Embedding) -> Path | None:
        """Record a validation loss; keep the embedding as `<name>-best` when it is the lowest so far."""
        if self.rows and int(self.rows[-1]["step"]) == step:
            self.rows[-1]["validation_loss"] = f"{value:.6g}"
        if value >= self.best:
            return None
        self.best = value
        return save_embedding_to(embedding, self.best_path, overwrite=True, metadata={"validation_loss": repr(value)})

    def save_image(self, image, path: Path) -> Path:
        return atomic_write(path, lambda temp: image.save(temp, format="PNG"))

    def save_optimizer_state(self, optimizer, embedding: Embedding) -> None:
        """`<name>.optim.safetensors`: AdamW's moments and step count per encoder key, with the hash of the
        vectors they belong to (tensors only; no pickle)."""
        from safetensors.torch import save_file

        if not (self.write and self.config.save_optimizer_state):
            return
        state = optimizer.state_dict()["state"]
        if not state:  # stopped before the first step: nothing to continue
            return
        tensors = {}
        for index, key in enumerate(embedding.vectors):
            for name in ("exp_avg", "exp_avg_sq", "step"):
                value = torch.as_tensor(state[index][name]).detach().float().cpu()
                tensors[f"{key}.{name}"] = value.reshape(1) if name == "step" else value.contiguous()
        metadata = {
            "vectors_sha256": vectors_hash(embedding.vectors),
            "step": str(embedding.step),
            "optimizer": "AdamW",
        }
        atomic_write(self.optimizer_path, lambda temp: save_file(tensors, str(temp), metadata=metadata))

    def load_optimizer_state(self, optimizer, embedding: Embedding) -> str:
        """Restore the optimizer state saved with these exact vectors; otherwise say why a fresh one is used."""
        from safetensors import safe_open

        if not self.optimizer_path.is_file():
            return "no saved optimizer state, starting a fresh optimizer"
        with safe_open(str(self.optimizer_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        if metadata.get("vectors_sha256") != vectors_hash(embedding.vectors):
            return "the saved optimizer state belongs to other vectors, starting a fresh optimizer"
        state = {}
        for index, key in enumerate(embedding.vectors):
            state[index] = {
                "step": tensors[f"{key}.step"].reshape(()),
                "exp_avg": tensors[f"{key}.exp_avg"],
                "exp_avg_sq": tensors[f"{key}.exp_avg_sq"],
            }
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        return "optimizer state restored"


def vectors_hash(vectors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the vectors as saved (float32), to tie an optimizer state to them."""
    digest = hashlib.sha256()
    for key in sorted(vectors):
        digest.update(key.encode())
        digest.update(vectors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _remove_empty_folders(folder: Path) -> None:
    """Remove `folder` and the folders in it, as far as they hold no file."""
    for path in sorted(folder.rglob("*"), key=lambda path: len(path.parts), reverse=True):
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold `path` (created with O_EXCL, holding our PID) while training; TrainingLocked if a live process
    holds it. A lock left by a process that no longer runs is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_owner(path)
            if pid is not None and _process_alive(pid):
                raise TrainingLocked(
                    f"{path.parent.name} is already being trained by process {pid} (lock file {path})"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(handle, "w") as lock_file:
            lock_file.write(str(os.getpid()))
        break
    else:
        raise TrainingLocked(f"could not take the training lock {path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a run in another thread of this process (the web UI)
    if sys.platform == "win32":
        # os.kill(pid, 0) would terminate the process on Windows; ask for its exit code instead.
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
