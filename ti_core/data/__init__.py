"""Training data: image folder -> captions -> VAE latents (cached) -> deterministic, sharded batches.

`scan_images` lists the readable images of a folder with their captions (sidecar .txt, else the file name,
as A1111 does) and reports the files it skipped and why. `encode_dataset` VAE-encodes each (image, flip)
once, from the on-disk cache where it can, and returns a `LatentDataset`; its `batches()` yields batches
whose samples share one size (aspect-ratio buckets), in an order fixed by (seed, epoch), split between
processes. Prompts are rendered by the training loop from a template line with `render_prompt`.

One concern a module: `settings` (DataConfig), `prompts` (templates, captions), `images` (pixels, sizes,
crops), `scan` (the folder), `latents` (VAE encoding and its cache), `dataset` (batches).
"""

from .dataset import Batch, LatentDataset, check_batch_size
from .images import (
    Crop,
    bucket_sizes,
    crop_plan,
    decode_image,
    fit_image,
    open_image,
    probe_image,
    target_size,
    to_rgb,
)
from .latents import cache_key, encode_dataset, vae_compute_dtype, vae_identity
from .prompts import caption_from_filename, load_template, read_caption, render_prompt, split_tags
from .scan import ImageItem, ScanResult, image_paths, scan_images, skip_reason
from .settings import (
    BACKGROUND,
    BUILTIN_TEMPLATES,
    CACHE_VERSION,
    EMPTY_FILE,
    IMAGE_SUFFIXES,
    LATENT_SAMPLING,
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    DataConfig,
    Size,
    check_resolution,
)

__all__ = [
    "BACKGROUND",
    "BUILTIN_TEMPLATES",
    "Batch",
    "CACHE_VERSION",
    "Crop",
    "DataConfig",
    "EMPTY_FILE",
    "IMAGE_SUFFIXES",
    "ImageItem",
    "LATENT_SAMPLING",
    "LatentDataset",
    "MAX_RESOLUTION",
    "MIN_RESOLUTION",
    "ScanResult",
    "Size",
    "bucket_sizes",
    "cache_key",
    "caption_from_filename",
    "check_batch_size",
    "check_resolution",
    "crop_plan",
    "decode_image",
    "encode_dataset",
    "fit_image",
    "image_paths",
    "load_template",
    "open_image",
    "probe_image",
    "read_caption",
    "render_prompt",
    "scan_images",
    "skip_reason",
    "split_tags",
    "target_size",
    "to_rgb",
    "vae_compute_dtype",
    "vae_identity",
]
