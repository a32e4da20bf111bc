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

import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..config import TrainConfig
from ..data import encode_dataset, load_template, render_prompt, scan_images
from ..editability import RunEditability, norm_warning, resolve_method
from ..prompt import PromptTokenCache
from ..timodel import TIModel
from .clock import Clock
from .events import TrainEvent, TrainResult
from .loss import batch_loss, control_norms, noise_scheduler_for, step_generators, vocabulary_norm_limits
from .optimizers import learning_rate_function, make_optimizer
from .outputs import Outputs, detached, preview_prompts, validation_set
from .patching import autocast, training_mode
from .processes import Processes
from .run_folder import RunFolder, model_facts
from .start import starting_embedding
from .tensorboard import reporting

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda only


def train(
    model: TIModel,
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
    run = RunFolder(config, write=procs.is_main)
    main_callback = callback if procs.is_main else None
    with (
        run.locked(),
        reporting(run.folder, main_callback, procs.is_main) as emit,
        training_mode(model, config) as (
            device,
            half,
        ),
    ):
        state = _prepare(model, config, run, procs, emit, device, half)
        try:
            stopped, message, error = *_train_steps(state, cancel), None
        except Exception as exception:  # whatever it was, the last good vectors are saved and it is reported
            stopped, error = "error", exception
            message = _error_message(exception, state.step + 1)

        # Save: the final embedding (and its optimizer state) in the embeddings folder.
        return state.outputs.finish(state.good, state.good_step, state.optimizer, stopped, message, error)


@dataclass
class _RunState:
    """What the steps of a run share: the fixed parts and the vectors, and how far it has got."""

    model: TIModel
    config: TrainConfig
    run: RunFolder
    procs: Processes
    emit: Callable[[TrainEvent], None]
    device: torch.device
    half: torch.dtype | None
    vectors: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: Any
    schedule: Callable[[int], float]  # the learning rate at a step
    noise_scheduler: Any
    norm_limits: dict[str, float]
    tokenize: PromptTokenCache
    template: list[str]
    outputs: Outputs
    stream: Iterator[tuple[int, Any]]
    clock: Clock
    step: int
    good: dict[str, torch.Tensor]  # the last finite vectors, saved on any stop
    good_step: int
    editability: RunEditability
    warned: bool = False  # the norm warning is given once per run


def _prepare(model: TIModel, config: TrainConfig, run: RunFolder, procs: Processes, emit, device, half) -> _RunState:
    """Load the embedding and the images' latents, set up the optimizer and the loss, and report the start."""
    # Load: the embedding (new, or resumed at its step) and the VAE latents of the images.
    with procs.main_first():  # the main process converts a resumed .pt first; the others then read that
        embedding, adopted = starting_embedding(model, config, run if procs.is_main else None)
    start = embedding.step
    # Editability hook: "auto" resolved (a resumed run keeps its method), recorded in settings.json and the file.
    config = run.config = replace(
        config, method=resolve_method(config.method, start, embedding.metadata.get("training_settings"))
    )
    with procs.main_first():  # the main process fills the latent cache; the others then read it
        dataset = _encode_images(model, config, run, device)
    template = load_template(config.data.template)

    # Parameters: only the vectors, in float32 whatever the model's dtype.
    vectors = {key: torch.nn.Parameter(tensor.to(device, torch.float32)) for key, tensor in embedding.vectors.items()}
    # Editability hook: the method's anchors, and a new run's start (on the sphere, or CrossInit's).
    init_text = embedding.metadata.get("init_text", config.init_text)
    editability = RunEditability(model, config, init_text, embedding.num_vectors)
    if start == 0:
        editability.start(vectors)

    # Optimizer, schedule and the fixed parts of the loss.
    optimizer = make_optimizer(config.optimizer, list(vectors.values()), device)
    resume_note = run.load_optimizer_state(optimizer, embedding) if config.resume else ""
    resume_note = "; ".join(note for note in (adopted, resume_note) if note)
    scaler = _grad_scaler(device, enabled=half == torch.float16)
    schedule = learning_rate_function(config)
    noise_scheduler = noise_scheduler_for(model, config)
    norm_limits = vocabulary_norm_limits(model, config.norm_control)
    tokenize = PromptTokenCache(model, {config.name: embedding.num_vectors})
    outputs = Outputs(
        model, config, run, procs, embedding, emit, noise_scheduler,
        validation=validation_set(dataset, template, config, device) if config.validation_every else [],
        preview_prompts=preview_prompts(dataset, template, config),
        half=half, vocabulary_norms=editability.mean_norms,
    )  # fmt: skip
    run.model_facts = model_facts(model)
    run.preview_prompts = outputs.preview_prompts
    run.begin(start)
    message = _start_message(config, len(dataset), procs.world, start, resume_note)
    emit(TrainEvent("start", start, config.steps, message=message))
    outputs.validate(vectors, start)  # the baseline that later values are compared with
    stream = _micro_batches(dataset, config, procs, skip=start * config.gradient_accumulation)
    return _RunState(
        model, config, run, procs, emit, device, half, vectors, optimizer, scaler, schedule, noise_scheduler,
        norm_limits, tokenize, template, outputs, stream, Clock(start, config.steps),
        step=start, good=detached(vectors), good_step=start, editability=editability,
    )  # fmt: skip


def _train_steps(state: _RunState, cancel) -> tuple[str, str]:
    """The loop: one optimizer step per iteration, over `gradient_accumulation` micro-batches, until the last
    step, a cancel or a non-finite loss; returns how it stopped and why."""
    config, procs, vectors = state.config, state.procs, state.vectors
    while state.step < config.steps:
        if procs.any(cancel is not None and cancel.is_set()):
            return "interrupted", ""
        lr = state.schedule(state.step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        epoch, loss = _accumulated_loss(state)
        # Checked before the optimizer step, so a diverged step never reaches the vectors.
        if not math.isfinite(loss):
            return "nan", f"the loss became {loss} at step {state.step + 1}"
        state.editability.before_step(vectors)  # editability hook: directional keeps the gradients' tangent part
        _optimizer_step(state.optimizer, state.scaler, vectors, procs, config)
        state.editability.after_step(vectors)  # editability hook: directional steps back onto the sphere
        control_norms(vectors, state.norm_limits)
        if not all(torch.isfinite(tensor).all() for tensor in vectors.values()):
            return "nan", f"the vectors became infinite or NaN at step {state.step + 1}"
        state.step += 1
        state.good, state.good_step = detached(vectors), state.step
        clock = state.clock
        clock.tick(state.step)
        state.run.log_loss(state.step, epoch, loss, lr, clock.elapsed)
        _report_step(state, epoch, loss, lr)
        with clock.outside_steps():
            state.outputs.periodic(vectors, state.step)
    return "done", ""


def _report_step(state: _RunState, epoch: int, loss: float, lr: float) -> None:
    config, clock = state.config, state.clock
    ratio = state.editability.norm_ratio(state.vectors)
    state.emit(
        TrainEvent(
            "step", state.step, config.steps, loss, lr, clock.rate, clock.eta, epoch,
            outputs_seconds=clock.outputs_seconds, norm_ratio=ratio,
        )
    )  # fmt: skip
    if not state.warned and (warning := norm_warning(ratio)):  # editability hook: once per run
        state.warned = True
        state.emit(TrainEvent("warning", state.step, config.steps, norm_ratio=ratio, message=warning))


def _accumulated_loss(state: _RunState) -> tuple[int, float]:
    """Forward and backward over this step's micro-batches; the epoch and the loss, averaged over processes."""
    config, loss, epoch = state.config, 0.0, 0
    for micro in range(config.gradient_accumulation):
        epoch, batch = next(state.stream)
        noise_rng, prompt_rng = step_generators(config.seed, state.step, micro, state.procs.rank, state.device)
        prompts = [_training_prompt(state.template, config, caption, prompt_rng) for caption in batch.captions]
        tokens = state.tokenize(prompts)
        with autocast(state.device, state.half):
            value = batch_loss(state.model, state.noise_scheduler, state.vectors, batch, tokens, noise_rng, config)
            # Editability hook: the method's loss terms (the logged loss is the diffusion loss alone).
            extra = state.editability.loss(
                state.model, state.tokenize, state.vectors, state.step, micro, state.procs.rank, len(prompts)
            )
        state.scaler.scale((value + extra) / config.gradient_accumulation).backward()
        loss += value.item() / config.gradient_accumulation
    return epoch, state.procs.mean(loss)


def _encode_images(model: TIModel, config: TrainConfig, run: RunFolder, device: torch.device):
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


def _grad_scaler(device: torch.device, enabled: bool):
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


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
