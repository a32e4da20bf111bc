"""The encoded images as batches: the order a function of (seed, epoch), split over processes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .images import target_size
from .scan import ImageItem
from .settings import DataConfig, Size

# --- the dataset and its batches ---------------------------------------------------------------------


@dataclass
class Sample:
    """One encoded image (or its mirror) as the dataset keeps it."""

    latent: torch.Tensor  # [C, h, w]: the stored sample ("once"), or the mean ("deterministic", "random")
    std: torch.Tensor | None  # "random" only
    weight: torch.Tensor | None  # [1, h, w] alpha weights; None for opaque images
    time_ids: tuple[int, int, int, int, int, int]


@dataclass
class Batch:
    """Samples of one size: latents [B, C, h, w] float32, raw captions (filewords), alpha weights
    [B, 1, h, w] in [0, 1] (None unless alpha_weight is on), SDXL time ids [B, 6] (orig_h, orig_w,
    crop_top, crop_left, target_h, target_w), the images' indices and whether each is mirrored."""

    latents: torch.Tensor
    captions: list[str]
    weights: torch.Tensor | None
    time_ids: torch.Tensor
    indices: list[int]
    flipped: list[bool] = field(default_factory=list)


class LatentDataset:
    """Encoded training images, held in memory; built by `encode_dataset`."""

    def __init__(
        self,
        config: DataConfig,
        items: list[ImageItem],
        samples: dict[tuple[int, bool], Sample],
        *,
        cache_hits: int = 0,
        cache_misses: int = 0,
    ) -> None:
        self.config = config
        self.items = items
        self._samples = samples
        self.cache_hits = cache_hits
        self.cache_misses = cache_misses
        self.sizes: list[Size] = [target_size(item.size, config.resolution, config.buckets) for item in items]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    @property
    def samples_per_epoch(self) -> int:
        return len(self.items) * self.config.repeats

    def bucket_counts(self) -> dict[Size, int]:
        """Images per training size (one entry unless buckets are on)."""
        counts: dict[Size, int] = {}
        for size in self.sizes:
            counts[size] = counts.get(size, 0) + 1
        return counts

    def batches_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Full batches each process gets per epoch (incomplete batches of a bucket are dropped)."""
        repeats = self.config.repeats
        return sum(count * repeats // batch_size for count in self.bucket_counts().values()) // world_size

    def latent(self, index: int, flip: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sample's latent [C, h, w], drawn per latent_sampling ("random" draws with `generator`)."""
        return self._draw(index, flip, generator).clone()

    def _draw(self, index: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
        sample = self._samples[(index, flip)]
        if sample.std is None:
            return sample.latent  # stored tensor itself: callers copy (torch.stack does)
        return sample.latent + sample.std * torch.randn(sample.latent.shape, generator=generator)

    def epoch_plan(self, batch_size: int, *, seed: int, epoch: int) -> tuple[list[list[tuple[int, bool]]], int]:
        """Every process's batches of one epoch as (image index, flipped) lists, and a noise seed.

        Each image appears `repeats` times; samples are shuffled within their size bucket, cut into full
        batches, and the batches shuffled. Only (seed, epoch) and the dataset decide the result.
        """
        rng = random.Random(f"ti_core.data/{seed}/{epoch}")
        pools: dict[Size, list[int]] = {}
        for index, size in enumerate(self.sizes):
            pools.setdefault(size, []).extend([index] * self.config.repeats)
        plan: list[list[int]] = []
        for size in sorted(pools):
            pool = pools[size]
            rng.shuffle(pool)
            plan.extend(pool[start : start + batch_size] for start in range(0, len(pool) - batch_size + 1, batch_size))
        rng.shuffle(plan)
        flip = self.config.flip
        batches = [[(index, flip and rng.random() < 0.5) for index in batch] for batch in plan]
        return batches, rng.getrandbits(62)

    def batches(
        self, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        """One epoch of batches for process `rank` of `world_size`.

        Process r takes every world_size-th batch of the shared sequence, after the sequence is cut to a
        multiple of world_size, so all processes step the same number of times on disjoint samples.
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a whole number of at least 1, not {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be from 0 to {world_size - 1}, not {rank!r}")
        check_batch_size(self, batch_size, world_size)
        plan, noise_seed = self.epoch_plan(batch_size, seed=seed, epoch=epoch)
        usable = len(plan) // world_size * world_size
        for position in range(rank, usable, world_size):
            # Noise per global batch position, so "random" latents do not depend on the process count.
            generator = torch.Generator().manual_seed(noise_seed + position)
            yield self._collate(plan[position], generator)

    def _collate(self, plan: list[tuple[int, bool]], generator: torch.Generator) -> Batch:
        latents = torch.stack([self._draw(index, flip, generator) for index, flip in plan])
        weights = None
        if self.config.alpha_weight:
            ones = torch.ones(1, *latents.shape[-2:])  # images without transparency count everywhere
            stored = [self._samples[key].weight for key in plan]
            weights = torch.stack([weight if weight is not None else ones for weight in stored])
        time_ids = torch.tensor([self._samples[key].time_ids for key in plan], dtype=torch.float32)
        return Batch(
            latents=latents,
            captions=[self.items[index].caption for index, _ in plan],
            weights=weights,
            time_ids=time_ids,
            indices=[index for index, _ in plan],
            flipped=[flip for _, flip in plan],
        )


def check_batch_size(dataset: LatentDataset, batch_size: int, world_size: int = 1) -> None:
    """Raise ValueError unless every one of `world_size` processes gets at least one full batch an epoch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a whole number of at least 1, not {batch_size!r}")
    if dataset.batches_per_epoch(batch_size, world_size) > 0:
        return
    counts = dataset.bucket_counts()
    detail = f"{len(dataset)} images x {dataset.config.repeats} repeats"
    if len(counts) > 1:
        largest = max(counts.values()) * dataset.config.repeats
        detail += f" in {len(counts)} size buckets (the largest holds {largest} samples)"
    if world_size > 1:
        detail += f" shared by {world_size} processes"
    raise ValueError(f"batch size {batch_size} is too large for the dataset: {detail}; lower it or raise repeats")
