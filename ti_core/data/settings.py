"""What a training set is made of: the images folder, captions, resolution, buckets and latent sampling."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..settings import setting

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

EMPTY_FILE = "empty file"

Size = tuple[int, int]  # (width, height) in pixels

# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how each image becomes a latent; validated on construction."""

    images: Path = setting(
        help="folder of training images (captions: .txt beside them, or the file name)", group="data",
        label="Dataset folder", elem_id="ti_train_dataset",
    )  # fmt: skip
    recursive: bool = setting(
        False, "also read images in subfolders", group="data", label="Subfolders", elem_id="ti_train_recursive"
    )
    resolution: int = setting(
        512, "training size in pixels, a multiple of 8 (default: the model's own)", group="data",
        minimum=MIN_RESOLUTION, maximum=MAX_RESOLUTION, step=8, label="Resolution", elem_id="ti_train_resolution",
    )  # fmt: skip
    buckets: bool = setting(
        False, "aspect-ratio buckets instead of square crops", group="data",
        label="Aspect-ratio buckets", elem_id="ti_train_buckets",
    )  # fmt: skip
    flip: bool = setting(
        False, "mirror images at random", group="data", label="Random horizontal flip", elem_id="ti_train_flip"
    )
    template: str = setting(
        "subject_filewords", f"prompt template: {', '.join(BUILTIN_TEMPLATES)} or a file", group="data",
        label="Prompt template", elem_id="ti_train_template",
    )  # fmt: skip
    shuffle_tags: bool = setting(False, group="data", label="Shuffle tags", elem_id="ti_train_shuffle_tags")
    tag_dropout: float = setting(
        0.0, "probability of leaving out each caption tag", group="data", minimum=0, maximum=1, step=0.05,
        label="Tag dropout", elem_id="ti_train_tag_dropout",
    )  # fmt: skip
    repeats: int = setting(
        1, "times each image appears per epoch", group="data", advanced=True, minimum=1,
        label="Repeats (times each image appears per epoch)", elem_id="ti_train_repeats",
    )  # fmt: skip
    latent_sampling: str = setting(
        "once", group="data", choices=LATENT_SAMPLING, label="Latent sampling", elem_id="ti_train_latent_sampling"
    )
    alpha_weight: bool = setting(
        False, "weight the loss by the images' alpha channel", group="data", advanced=True,
        label="Use the alpha channel as the loss weight", elem_id="ti_train_alpha_weight",
    )  # fmt: skip

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
