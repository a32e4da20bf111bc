"""Images as the VAE takes them: RGB with an alpha mask, sizes, buckets and the crop to a target size."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .settings import BACKGROUND, EMPTY_FILE, Size, check_resolution

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")

_EXIF_ORIENTATION = 0x0112


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
