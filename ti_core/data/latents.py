"""Encoding the images to VAE latents once, with their cache on disk keyed by file, size, crop and VAE."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..timodel import TIModel
from .dataset import LatentDataset, Sample
from .images import Crop, crop_plan, decode_image, fit_image, target_size
from .scan import ImageItem
from .settings import CACHE_VERSION, DataConfig, Size

# --- latents and their cache -------------------------------------------------------------------------


def vae_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE encodes in: fp16 is raised to fp32 because SD VAEs (SDXL's above all) overflow
    to inf/NaN in fp16 activations; bf16 has fp32's range and is kept."""
    return torch.float32 if dtype == torch.float16 else dtype


def vae_identity(vae, compute_dtype: torch.dtype) -> str:
    """A hash that changes when the latents a VAE would produce change: its config (minus load-path
    bookkeeping), the compute dtype and a few encoder tensors' bytes (hashing all 34M+ weights on every
    run would cost more than it protects; a decoder-only fine-tune keeps the same latents and key)."""
    digest = hashlib.sha256()
    config = {key: value for key, value in dict(vae.config).items() if not key.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(str(compute_dtype).encode())
    state = vae.state_dict()
    names = [name for name in state if name.startswith(("encoder.", "quant_conv."))]
    middle = len(names) // 2
    for name in dict.fromkeys(names[:2] + names[middle : middle + 2] + names[-4:]):
        tensor = state[name].detach().to("cpu").contiguous().flatten()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(file_sha256: str, target: Size, crop: Crop, flip: bool, vae_id: str) -> str:
    """The name of one cached latent: what went into the VAE and which VAE encoded it."""
    parts = {
        "version": CACHE_VERSION,
        "image": file_sha256,
        "target": list(target),
        "resized": list(crop.resized),
        "crop": [crop.left, crop.top],
        "flip": flip,
        "vae": vae_id,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _load_cached(path: Path, shape: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
    """A cache file's tensors, or None when it is missing, torn or of the wrong shape (then re-encoded)."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception:  # a torn or foreign file is only a miss; it is rewritten
        return None
    mean, std, alpha = tensors.get("mean"), tensors.get("std"), tensors.get("alpha")
    if mean is None or std is None or tuple(mean.shape) != shape or tuple(std.shape) != shape:
        return None
    if alpha is not None and tuple(alpha.shape) != (1, *shape[1:]):
        return None
    return tensors


def _save_cached(path: Path, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Write a cache file atomically, so a crash never leaves a half file."""
    from safetensors.torch import save_file

    from ..atomic import atomic_write

    metadata = {"format": f"ti_core latent cache v{CACHE_VERSION}", "source": source}
    atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))


@contextlib.contextmanager
def _vae_placed(vae, device, dtype: torch.dtype) -> Iterator[None]:
    """Move the VAE to (device, dtype) for encoding and put it back afterwards: it is shared with the
    preview pipeline, which expects it where and in the dtype the caller loaded it."""
    parameter = next(vae.parameters())
    # The very tensors are put back, not a cast of the moved ones: a round trip through another dtype
    # would be a copy, and the weights may be a web UI's, shared (ti_core.shared_weights).
    before = [(tensor, tensor.data) for tensor in [*vae.parameters(), *vae.buffers()]]
    target = torch.device(device) if device is not None else parameter.device
    if target != parameter.device or dtype != parameter.dtype:  # diffusers warns on every `to(dtype=...)`
        vae.to(device=target, dtype=dtype)
    try:
        yield
    finally:
        for tensor, data in before:
            tensor.data = data


def _pixels(image: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] float32 in [-1, 1], the VAE's input range."""
    array = np.array(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _alpha_weight(alpha: Image.Image, latent_size: Size) -> torch.Tensor:
    """Alpha (already cropped to the target) averaged over each latent cell: [1, h, w] in [0, 1]."""
    small = alpha.resize(latent_size, Image.Resampling.BOX)
    return torch.from_numpy(np.array(small, dtype=np.float32) / 255.0).unsqueeze(0)


@dataclass
class _Job:
    index: int
    flip: bool
    key: str
    pixels: torch.Tensor
    weight: torch.Tensor | None
    time_ids: tuple[int, int, int, int, int, int]


def _time_ids(item_size: Size, crop: Crop, target: Size, flip: bool) -> tuple[int, int, int, int, int, int]:
    """SDXL micro-conditioning: original (h, w), crop (top, left) in the resized image, target (h, w).
    A flipped sample's crop is mirrored, as its pixels are."""
    left = crop.resized[0] - target[0] - crop.left if flip else crop.left
    return (item_size[1], item_size[0], crop.top, left, target[1], target[0])


def _make_sample(mean, std, weight, time_ids, method: str, key: str) -> Sample:
    if method == "random":
        return Sample(mean, std, weight, time_ids)
    if method == "deterministic":
        return Sample(mean, None, weight, time_ids)
    # "once": one draw, seeded by the cache key, so the same image gives the same sample on every run
    # whether it was just encoded or read from the cache.
    generator = torch.Generator().manual_seed(int(key[:15], 16))
    return Sample(mean + std * torch.randn(mean.shape, generator=generator), None, weight, time_ids)


def encode_dataset(
    model: TIModel,
    config: DataConfig,
    items: Sequence[ImageItem],
    *,
    cache_dir: Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
    vae_batch_size: int = 4,
) -> LatentDataset:
    """VAE-encode every image (and its mirror when `config.flip`) once into a LatentDataset.

    Latents are scaled by the VAE's scaling_factor (after subtracting shift_factor when the config has
    one). With `cache_dir`, each (image, size, crop, flip, VAE) is stored as `<key>.safetensors` and read
    back instead of re-encoded. The VAE is used only if something misses the cache; it runs on `device`
    in `dtype` (fp16 raised to fp32, see vae_compute_dtype) and is moved back afterwards.
    `progress(done, total)` is called as images are resolved.
    """
    if not items:
        raise ValueError("no images to encode")
    if isinstance(vae_batch_size, bool) or not isinstance(vae_batch_size, int) or vae_batch_size < 1:
        raise ValueError(f"vae_batch_size must be a whole number of at least 1, not {vae_batch_size!r}")
    encoder = _Encoder(model, config, items, cache_dir, dtype, progress, vae_batch_size)
    with contextlib.ExitStack() as stack:
        for index, item in enumerate(items):
            encoder.resolve(index, item, lambda: stack.enter_context(_vae_placed(model.vae, device, encoder.dtype)))
        encoder.finish()
    counts = encoder.counts
    return LatentDataset(
        config, list(items), encoder.samples, cache_hits=counts["hits"], cache_misses=counts["misses"]
    )


class _Encoder:
    """The state of one `encode_dataset`: the samples resolved so far and the images waiting for the VAE,
    batched by size."""

    def __init__(
        self, model: TIModel, config: DataConfig, items, cache_dir, dtype, progress, vae_batch_size: int
    ) -> None:
        vae = model.vae
        self.vae, self.config, self.items, self.progress = vae, config, items, progress
        self.factor = model.vae_scale_factor
        self.dtype = vae_compute_dtype(dtype)
        self.vae_id = vae_identity(vae, self.dtype)
        self.cache = Path(cache_dir) if cache_dir is not None else None
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(vae.config.get("shift_factor") or 0.0)
        self.flips = (False, True) if config.flip else (False,)
        self.total = len(items) * len(self.flips)
        self.batch_size = vae_batch_size
        self.samples: dict[tuple[int, bool], Sample] = {}
        self.pending: dict[Size, list[_Job]] = {}
        self.counts = {"hits": 0, "misses": 0, "done": 0}
        self.vae_ready = False

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.counts["done"], self.total)

    def resolve(self, index: int, item: ImageItem, place_vae: Callable[[], object]) -> None:
        """The image's samples from the cache, or its pixels queued for the VAE (placed on first need)."""
        config = self.config
        try:
            data = Path(item.path).read_bytes()
        except OSError as error:
            raise ValueError(f"{item.path}: cannot read the image: {error.strerror or error}") from error
        file_sha = hashlib.sha256(data).hexdigest()
        target = target_size(item.size, config.resolution, config.buckets)
        crop = crop_plan(item.size, target)
        latent_size = (target[0] // self.factor, target[1] // self.factor)
        shape = (self.vae.config.latent_channels, latent_size[1], latent_size[0])
        missing = []
        for flip in self.flips:
            key = cache_key(file_sha, target, crop, flip, self.vae_id)
            time_ids = _time_ids(item.size, crop, target, flip)
            stored = _load_cached(self.cache / f"{key}.safetensors", shape) if self.cache is not None else None
            if stored is None:
                missing.append((flip, key, time_ids))
                continue
            self.samples[(index, flip)] = _make_sample(
                stored["mean"], stored["std"], stored.get("alpha"), time_ids, config.latent_sampling, key
            )
            self.counts["hits"] += 1
            self.counts["done"] += 1
            self.report()
        if not missing:
            return
        rgb, alpha = decode_image(data)
        if rgb.size != tuple(item.size):
            raise ValueError(f"{item.path}: the image changed since the folder was scanned; scan it again")
        pixels = _pixels(fit_image(rgb, crop, target))
        weight = _alpha_weight(fit_image(alpha, crop, target), latent_size) if alpha is not None else None
        if not self.vae_ready:
            place_vae()
            self.vae_ready = True
        for flip, key, time_ids in missing:
            # Mirrored pixels are encoded, not a mirrored latent: the VAE is not flip-equivariant.
            job_pixels = pixels.flip(-1) if flip else pixels
            job_weight = weight.flip(-1) if flip and weight is not None else weight
            queue = self.pending.setdefault(target, [])
            queue.append(_Job(index, flip, key, job_pixels, job_weight, time_ids))
            if len(queue) >= self.batch_size:
                self.flush(queue)

    def finish(self) -> None:
        for queue in self.pending.values():
            if queue:
                self.flush(queue)

    def flush(self, jobs: list[_Job]) -> None:
        """Encode the queued images of one size in one VAE call; cache and keep their samples."""
        vae = self.vae
        with torch.no_grad():
            pixels = torch.stack([job.pixels for job in jobs]).to(device=vae.device, dtype=self.dtype)
            distribution = vae.encode(pixels).latent_dist
            means = ((distribution.mean.float() - self.shift) * self.scaling).cpu()
            stds = (distribution.std.float() * self.scaling).cpu()
        for job, mean, std in zip(jobs, means, stds, strict=True):
            # Own, packed storage: not views of the whole batch (and safetensors saves only packed tensors).
            mean, std = (
                mean.clone(memory_format=torch.contiguous_format),
                std.clone(memory_format=torch.contiguous_format),
            )
            if self.cache is not None:
                tensors = {"mean": mean, "std": std} | ({"alpha": job.weight} if job.weight is not None else {})
                _save_cached(self.cache / f"{job.key}.safetensors", tensors, self.items[job.index].path.name)
            self.samples[(job.index, job.flip)] = _make_sample(
                mean, std, job.weight, job.time_ids, self.config.latent_sampling, job.key
            )
        self.counts["misses"] += len(jobs)
        self.counts["done"] += len(jobs)
        jobs.clear()
        self.report()
