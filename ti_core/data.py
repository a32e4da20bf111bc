"""Training data: image folder -> captions -> VAE latents (cached) -> deterministic, sharded batches.

`scan_images` lists the readable images of a folder with their captions (sidecar .txt, else the file name,
as A1111 does) and reports the files it skipped and why. `encode_dataset` VAE-encodes each (image, flip)
once, from the on-disk cache where it can, and returns a `LatentDataset`; its `batches()` yields batches
whose samples share one size (aspect-ratio buckets), in an order fixed by (seed, epoch), split between
processes. Prompts are rendered by the training loop from a template line with `render_prompt`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENT_SAMPLING = ("once", "deterministic", "random")
BUILTIN_TEMPLATES = ("subject", "subject_filewords", "style", "style_filewords", "none")
MIN_RESOLUTION, MAX_RESOLUTION = 32, 2048
# Transparent pixels are composited on white before encoding (always, alpha weighting or not): A1111's
# plain convert("RGB") exposes whatever colour the editor left under alpha 0, and the VAE's receptive field
# would smear that junk into the visible pixels next to it. White is what viewers show behind a cut-out.
BACKGROUND = (255, 255, 255)
# Bump when the pixels fed to the VAE change for the same file and crop (compositing, resampling), so
# caches written by older code are not reused.
CACHE_VERSION = "1"

_TEMPLATE_DIR = Path(__file__).parent / "templates"
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")  # A1111's re_numbers_at_start: "00012-a red car" -> "a red car"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
_EXIF_ORIENTATION = 0x0112
EMPTY_FILE = "empty file"

Size = tuple[int, int]  # (width, height) in pixels


# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how each image becomes a latent; validated on construction."""

    images: Path
    recursive: bool = False
    resolution: int = 512
    buckets: bool = False
    flip: bool = False
    template: str = "subject_filewords"
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    repeats: int = 1
    latent_sampling: str = "once"
    alpha_weight: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.images, (str, os.PathLike)) or not str(self.images).strip():
            raise ValueError("images: give the folder of training images")
        object.__setattr__(self, "images", Path(self.images).expanduser())
        check_resolution(self.resolution)
        if not isinstance(self.template, str) or not self.template.strip():
            raise ValueError("template: give a built-in template name or a template file path")
        dropout = self.tag_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"tag_dropout must be a number from 0 to 1, not {dropout!r}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be a whole number of at least 1, not {self.repeats!r}")
        if self.latent_sampling not in LATENT_SAMPLING:
            raise ValueError(
                f"latent_sampling must be one of {', '.join(LATENT_SAMPLING)}, not {self.latent_sampling!r}"
            )


def check_resolution(resolution: int) -> None:
    """Raise ValueError unless `resolution` is a multiple of 8 from 32 to 2048 (the VAE downsamples 8x)."""
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION
        or resolution % 8
    ):
        raise ValueError(
            f"resolution must be a multiple of 8 from {MIN_RESOLUTION} to {MAX_RESOLUTION}, not {resolution!r}"
        )


# --- templates and prompts -----------------------------------------------------------------------------


def load_template(name_or_path: str | os.PathLike) -> list[str]:
    """The prompt lines of a built-in template (see BUILTIN_TEMPLATES) or of a template file.

    Blank lines are dropped (A1111 keeps them and then trains on an empty prompt now and then).
    """
    text = str(name_or_path).strip()
    path = Path(text).expanduser()
    # A bare built-in name always means the built-in; "subject.txt" (A1111's file name) does unless
    # such a file exists here.
    builtin = text.removesuffix(".txt")
    if text in BUILTIN_TEMPLATES or (builtin in BUILTIN_TEMPLATES and not path.is_file()):
        path = _TEMPLATE_DIR / f"{builtin}.txt"
    if not path.is_file():
        raise ValueError(
            f"template: no built-in template or file named {text!r} (built-ins: {', '.join(BUILTIN_TEMPLATES)})"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"template file {path} is empty")
    return lines


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of a caption, trimmed, empty ones left out."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def render_prompt(
    line: str, name: str, caption: str, *, shuffle_tags: bool, tag_dropout: float, rng: random.Random
) -> str:
    """A template line with [filewords] -> the caption's tags and [name] -> the embedding name.

    Dropout removes each tag with probability `tag_dropout` but always keeps at least one (picked by `rng`)
    when the caption has any: A1111 can drop them all, which silently turns a captioned sample into an
    uncaptioned one; dropping whole captions is a different knob. Shuffling permutes the kept tags. With
    neither, the caption goes in unchanged. Tags are re-joined with ", " (CLIP tokenizes "a,b" and "a, b"
    alike). [filewords] is replaced before [name], as in A1111, so "[name]" in a caption also works.
    """
    filewords = caption.strip()
    if shuffle_tags or tag_dropout > 0:
        tags = split_tags(caption)
        if tag_dropout > 0 and tags:
            kept = [tag for tag in tags if rng.random() >= tag_dropout]
            tags = kept or [rng.choice(tags)]
        if shuffle_tags:
            rng.shuffle(tags)
        filewords = ", ".join(tags)
    return line.replace("[filewords]", filewords).replace("[name]", name)


# --- captions ---------------------------------------------------------------------------------------


def caption_from_filename(stem: str) -> str:
    """A1111's caption for an image without a .txt: the file name minus leading digits and dashes."""
    return _LEADING_NUMBERS.sub("", stem).strip()


def read_caption(image_path: Path) -> str:
    """The caption of an image: its sidecar `<stem>.txt` if present, else from its file name."""
    sidecar = image_path.with_suffix(".txt")
    if sidecar.is_file():
        # Taggers write one line, people sometimes several; a caption is one line of text.
        return " ".join(sidecar.read_text(encoding="utf-8-sig", errors="replace").split())
    return caption_from_filename(image_path.stem)


# --- images -------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """An image in any Pillow mode as RGB, plus its alpha channel ("L") if it has real transparency.

    Transparent pixels are composited on BACKGROUND. Fully opaque alpha is dropped (alpha None).
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255, which turns most 16-bit images white; scale the range.
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB"), None
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Palette/grey/RGB images can carry transparency in info (PNG tRNS); RGBA conversion applies it.
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() == (255, 255):
            return rgba.convert("RGB"), None
        composite = Image.new("RGB", rgba.size, BACKGROUND)
        composite.paste(rgba.convert("RGB"), mask=alpha)
        return composite, alpha
    return image.convert("RGB"), None


def decode_image(data: bytes) -> tuple[Image.Image, Image.Image | None]:
    """Decode image file bytes: EXIF orientation applied, then `to_rgb`."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def open_image(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """An image file, upright, as RGB plus its alpha channel or None (see `to_rgb`)."""
    return decode_image(Path(path).read_bytes())


def probe_image(data: bytes) -> Size:
    """The upright (width, height) of image file bytes, after checking that they decode completely.

    Raises (ValueError, OSError or another Pillow error) for an empty, truncated or non-image file.
    """
    if not data:
        raise ValueError(EMPTY_FILE)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # the rotations by 90 degrees
            width, height = height, width
        # A JPEG decoded at 1/8 scale still reads the whole stream (so truncation shows) at a fraction
        # of the cost; other formats ignore draft().
        image.draft(None, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
        image.load()
        to_rgb(image)  # an unsupported mode fails here, at scan time
    return width, height


@dataclass(frozen=True)
class Crop:
    """Resize an image to `resized`, then cut the target-sized box whose top-left corner is (left, top)."""

    resized: Size
    left: int
    top: int


def crop_plan(size: Size, target: Size) -> Crop:
    """Scale `size` to cover `target` (keeping its aspect ratio) and centre the crop box."""
    (width, height), (target_w, target_h) = size, target
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    return Crop(resized, (resized[0] - target_w) // 2, (resized[1] - target_h) // 2)


def fit_image(image: Image.Image, crop: Crop, target: Size) -> Image.Image:
    """Apply a crop plan: resize (Lanczos down, bicubic up, which rings less), then crop to `target`."""
    if image.size != crop.resized:
        shrinking = crop.resized[0] < image.size[0]
        resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
        image = image.resize(crop.resized, resample)
    box = (crop.left, crop.top, crop.left + target[0], crop.top + target[1])
    return image if box == (0, 0, *image.size) else image.crop(box)


def bucket_sizes(resolution: int) -> list[Size]:
    """Aspect-ratio buckets of at most resolution^2 pixels, sides from resolution/2 to 2*resolution.

    Sides are multiples of 64 (the SD UNet's total downsampling in pixels) from 256 px up; tiny test
    resolutions use multiples of 8 (the VAE's). The square bucket is always included.
    """
    check_resolution(resolution)
    step = 64 if resolution >= 256 else 8
    low, high, area = resolution // 2, resolution * 2, resolution * resolution
    side = resolution // step * step
    sizes = {(side, side)}
    for width in range(step, high + 1, step):
        height = area // width // step * step
        if width >= low and low <= height <= high:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def target_size(size: Size, resolution: int, buckets: bool) -> Size:
    """The training size of an image: resolution x resolution, or its aspect-ratio bucket."""
    if not buckets:
        return (resolution, resolution)
    aspect = math.log(size[0] / size[1])
    # Closest aspect ratio; among equals, the larger area.
    return min(bucket_sizes(resolution), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


# --- scanning ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    """One readable training image: its caption and upright (width, height) before any resizing."""

    path: Path
    caption: str
    size: Size


@dataclass
class ScanResult:
    """The readable images of a folder, and the files skipped with the reason for each."""

    items: list[ImageItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a log or the UI: counts, then each skipped file and why."""
        text = f"{len(self.items)} images"
        if self.skipped:
            reasons = "; ".join(f"{path.name}: {reason}" for path, reason in self.skipped)
            text += f", {len(self.skipped)} skipped ({reasons})"
        return text


def image_paths(folder: Path, recursive: bool = False) -> list[Path]:
    """Files with an image suffix (any case) in `folder` (and its subfolders when recursive), sorted."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def skip_reason(error: Exception) -> str:
    """A short reason for a file that cannot be used as an image."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can read"
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return message if message == EMPTY_FILE else f"cannot decode: {message}"


def scan_images(config: DataConfig) -> ScanResult:
    """List the readable images under `config.images` with captions; unreadable files go to `skipped`.

    Raises ValueError when the folder is missing or holds no readable image.
    """
    folder = config.images
    if not folder.is_dir():
        raise ValueError(f"images: {folder} is not a folder")
    items: list[ImageItem] = []
    skipped: list[tuple[Path, str]] = []
    for path in image_paths(folder, config.recursive):
        try:
            size = probe_image(path.read_bytes())
        except Exception as error:  # Pillow raises many exception types for corrupt files
            skipped.append((path, skip_reason(error)))
            continue
        items.append(ImageItem(path, read_caption(path), size))
    if not items:
        raise ValueError(_no_images_message(folder, config.recursive, skipped))
    return ScanResult(items, skipped)


def _no_images_message(folder: Path, recursive: bool, skipped: list[tuple[Path, str]]) -> str:
    if skipped:
        shown = "; ".join(f"{path.name}: {reason}" for path, reason in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        return f"no readable images in {folder}: {len(skipped)} skipped ({shown}{more})"
    hint = ""
    if not recursive and any(path.is_dir() for path in folder.iterdir()):
        hint = "; subfolders are searched only with recursive on"
    return f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}{hint}"


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

    from .atomic import atomic_write

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
class _Sample:
    latent: torch.Tensor  # [C, h, w]: the stored sample ("once"), or the mean ("deterministic", "random")
    std: torch.Tensor | None  # "random" only
    weight: torch.Tensor | None  # [1, h, w] alpha weights; None for opaque images
    time_ids: tuple[int, int, int, int, int, int]


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


def _make_sample(mean, std, weight, time_ids, method: str, key: str) -> _Sample:
    if method == "random":
        return _Sample(mean, std, weight, time_ids)
    if method == "deterministic":
        return _Sample(mean, None, weight, time_ids)
    # "once": one draw, seeded by the cache key, so the same image gives the same sample on every run
    # whether it was just encoded or read from the cache.
    generator = torch.Generator().manual_seed(int(key[:15], 16))
    return _Sample(mean + std * torch.randn(mean.shape, generator=generator), None, weight, time_ids)


def encode_dataset(
    model,
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
    vae = model.vae
    factor = model.vae_scale_factor
    compute_dtype = vae_compute_dtype(dtype)
    vae_id = vae_identity(vae, compute_dtype)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    channels = vae.config.latent_channels
    scaling = float(vae.config.scaling_factor)
    shift = float(vae.config.get("shift_factor") or 0.0)
    flips = (False, True) if config.flip else (False,)
    total = len(items) * len(flips)
    samples: dict[tuple[int, bool], _Sample] = {}
    pending: dict[Size, list[_Job]] = {}
    counts = {"hits": 0, "misses": 0, "done": 0}

    def report() -> None:
        if progress is not None:
            progress(counts["done"], total)

    def flush(jobs: list[_Job]) -> None:
        with torch.no_grad():
            pixels = torch.stack([job.pixels for job in jobs]).to(device=vae.device, dtype=compute_dtype)
            distribution = vae.encode(pixels).latent_dist
            means = ((distribution.mean.float() - shift) * scaling).cpu()
            stds = (distribution.std.float() * scaling).cpu()
        for job, mean, std in zip(jobs, means, stds, strict=True):
            # Own, packed storage: not views of the whole batch (and safetensors saves only packed tensors).
            mean, std = (
                mean.clone(memory_format=torch.contiguous_format),
                std.clone(memory_format=torch.contiguous_format),
            )
            if cache is not None:
                tensors = {"mean": mean, "std": std} | ({"alpha": job.weight} if job.weight is not None else {})
                _save_cached(cache / f"{job.key}.safetensors", tensors, items[job.index].path.name)
            samples[(job.index, job.flip)] = _make_sample(
                mean, std, job.weight, job.time_ids, config.latent_sampling, job.key
            )
        counts["misses"] += len(jobs)
        counts["done"] += len(jobs)
        jobs.clear()
        report()

    with contextlib.ExitStack() as stack:
        vae_ready = False
        for index, item in enumerate(items):
            try:
                data = Path(item.path).read_bytes()
            except OSError as error:
                raise ValueError(f"{item.path}: cannot read the image: {error.strerror or error}") from error
            file_sha = hashlib.sha256(data).hexdigest()
            target = target_size(item.size, config.resolution, config.buckets)
            crop = crop_plan(item.size, target)
            latent_size = (target[0] // factor, target[1] // factor)
            shape = (channels, latent_size[1], latent_size[0])
            missing = []
            for flip in flips:
                key = cache_key(file_sha, target, crop, flip, vae_id)
                time_ids = _time_ids(item.size, crop, target, flip)
                stored = _load_cached(cache / f"{key}.safetensors", shape) if cache is not None else None
                if stored is None:
                    missing.append((flip, key, time_ids))
                    continue
                samples[(index, flip)] = _make_sample(
                    stored["mean"], stored["std"], stored.get("alpha"), time_ids, config.latent_sampling, key
                )
                counts["hits"] += 1
                counts["done"] += 1
                report()
            if not missing:
                continue
            rgb, alpha = decode_image(data)
            if rgb.size != tuple(item.size):
                raise ValueError(f"{item.path}: the image changed since the folder was scanned; scan it again")
            pixels = _pixels(fit_image(rgb, crop, target))
            weight = _alpha_weight(fit_image(alpha, crop, target), latent_size) if alpha is not None else None
            if not vae_ready:
                stack.enter_context(_vae_placed(vae, device, compute_dtype))
                vae_ready = True
            for flip, key, time_ids in missing:
                # Mirrored pixels are encoded, not a mirrored latent: the VAE is not flip-equivariant.
                job_pixels = pixels.flip(-1) if flip else pixels
                job_weight = weight.flip(-1) if flip and weight is not None else weight
                queue = pending.setdefault(target, [])
                queue.append(_Job(index, flip, key, job_pixels, job_weight, time_ids))
                if len(queue) >= vae_batch_size:
                    flush(queue)
        for queue in pending.values():
            if queue:
                flush(queue)
    return LatentDataset(config, list(items), samples, cache_hits=counts["hits"], cache_misses=counts["misses"])


# --- the dataset and its batches ---------------------------------------------------------------------


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
        samples: dict[tuple[int, bool], _Sample],
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
