"""What a run writes and reports besides the loss: snapshots, the validation loss, preview images and the
final save."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import TrainConfig
from ..data import render_prompt
from ..embedding import Embedding
from ..formats import save_embedding
from ..names import embedding_path
from ..preview import image_grid, prompt_lines, render_image, uncompiled
from ..prompt import encode_prompts
from ..timodel import TIModel
from .events import TrainEvent, TrainResult
from .loss import diffusion_loss, mixed_seed
from .patching import autocast
from .processes import Processes
from .run_folder import RunFolder


def detached(vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().clone() for key, tensor in vectors.items()}


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
    order = dataset.batches(1, seed=mixed_seed(config.seed, "validation") % 2**32, epoch=0)
    batches = list(itertools.islice(order, config.validation_samples))
    generator = torch.Generator().manual_seed(mixed_seed(config.seed, "validation noise"))
    rng = random.Random(mixed_seed(config.seed, "validation prompts"))
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


def validation_loss(
    model: TIModel, noise_scheduler, name: str, vectors, samples: list[ValidationSample], half=None
) -> float:
    """Mean loss of the fixed validation samples (no min-SNR weighting: comparable across settings)."""
    device = model.unet.device
    total = 0.0
    with torch.no_grad(), autocast(device, half), uncompiled():
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


STEP_GRID_ROWS = 8  # the most preview steps the by-step grid compares (evenly spread, the last always in)


def render_preview(model: TIModel, name: str, vectors, prompts: list[str], config: TrainConfig, without=None):
    """The preview at these vectors: one image per prompt, side by side, all at the same seed (so previews
    compare step to step) with the preview settings. A negative embedding's preview has two rows: each prompt
    without it, and with it in the negative prompt. ``without`` caches the first row by prompt: it does not
    change with the vectors. Returns a PIL image."""
    size = config.data.resolution

    def one(prompt: str, negative: str, embeddings):
        return render_image(
            model, prompt, negative, embeddings, seed=config.preview_seed, steps=config.preview_steps,
            width=config.preview_width or size, height=config.preview_height or size,
            guidance=config.preview_guidance, sampler=config.preview_sampler,
        )  # fmt: skip

    negative = config.preview_negative_prompt
    if not config.negative_embedding:
        images = [one(prompt, negative, {name: vectors}) for prompt in prompts]
        return images[0] if len(images) == 1 else image_grid([images])
    without = {} if without is None else without
    plain = [without.get(prompt) or without.setdefault(prompt, one(prompt, negative, {})) for prompt in prompts]
    negative_with = ", ".join(part for part in (negative.strip(), name) if part)
    used = [one(prompt, negative_with, {name: vectors}) for prompt in prompts]
    return image_grid([plain, used], row_labels=["without", f"negative: {name}"])


def preview_prompts(dataset, template: list[str], config: TrainConfig) -> list[str]:
    """The preview prompts: the setting's lines, else one default. A normal embedding's default is a template
    line with the first image's caption; a negative embedding's is that caption alone (its previews put the
    token in the negative prompt, not in this one)."""
    lines = prompt_lines(config.preview_prompt)
    if lines:
        return lines
    if config.negative_embedding:
        caption = dataset.captions[0].strip() if dataset.captions else ""
        return [caption or "a photo"]
    rng = random.Random(config.preview_seed)
    return [
        render_prompt(
            rng.choice(template), config.name, dataset.captions[0], shuffle_tags=False, tag_dropout=0.0, rng=rng
        )
    ]


def spread_evenly(items: list, count: int) -> list:
    """At most `count` of `items`, evenly spread, the first and the last always in (each item once)."""
    if len(items) <= count:
        return list(items)
    return list(dict.fromkeys(items[round(index * (len(items) - 1) / (count - 1))] for index in range(count)))


def step_grid(run: RunFolder):
    """The run folder's previews compared by step, a row each (at most STEP_GRID_ROWS, evenly spread, the last
    always in), labelled with the step; None with fewer than two previews of the newest one's size."""
    from PIL import Image

    found = run.preview_images()
    if len(found) < 2:
        return None
    picked = spread_evenly(found, STEP_GRID_ROWS)
    images = []
    for step, path in picked:
        with Image.open(path) as image:
            images.append((step, image.convert("RGB")))
    size = images[-1][1].size  # the preview settings may have changed between runs: the newest size only
    images = [(step, image) for step, image in images if image.size == size]
    if len(images) < 2:
        return None
    return image_grid([[image] for _, image in images], row_labels=[f"step {step}" for step, _ in images])


@dataclass
class Outputs:
    """What the run reports and writes besides the loss: snapshots, validation, previews and the final
    save (files from the main process only; events to the callback)."""

    model: TIModel
    config: TrainConfig
    run: RunFolder
    procs: Processes
    embedding: Embedding  # the starting one: its name and metadata
    emit: Callable[[TrainEvent], None]
    noise_scheduler: Any
    validation: list[ValidationSample]
    preview_prompts: list[str]
    half: torch.dtype | None
    vocabulary_norms: dict[str, float] = field(default_factory=dict)
    previews_without: dict[str, Any] = field(default_factory=dict)  # a negative embedding's unchanging row

    def preview(self, vectors):
        return render_preview(
            self.model, self.config.name, vectors, self.preview_prompts, self.config, self.previews_without
        )

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
            image = self.preview(detached(vectors))
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
                image = self.preview(good)
                run.save_image(image, embedding_path(config.embeddings_dir, config.name, ".preview.png"))
            if stopped in ("done", "interrupted") and config.preview_every:
                grid = step_grid(run)
                if grid is not None:
                    run.save_image(grid, run.step_grid_path)
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
