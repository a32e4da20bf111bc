"""An embedding carried in an image's pixels: the coloured side strips of A1111's "embedding as image" cards.

The layout, as A1111's reader expects it: the zlib-compressed JSON is split into low and high 4-bit halves;
each half fills an [height, columns, 3] block (row by row), XOR-ed with the low 4 bits of a fixed LCG stream
(x <- 1664525 x + 1013904223 mod 2**32 from x = 0, each value taken mod 255). The low block is the left
strip and the high block the right one, each one black column away from the picture. The reader crops black
borders, keeps the low 4 bits of every channel, splits at the outermost all-zero columns and undoes the XOR.
The high 4 bits of the strips are free: they carry a pattern drawn from the embedding's first vector, never 0,
so no strip pixel is black and cropping never eats data. A PNG's text chunk holds the same JSON; the pixels are
what survives when a copy loses the chunk (re-saved, converted to lossless WEBP).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

CHANNELS = 3
LCG_MULTIPLIER, LCG_INCREMENT, LCG_MODULUS = 1664525, 1013904223, 2**32
MAX_DATA_BYTES = 64 * 2**20  # the largest SDXL embedding is ~4 MB of JSON; a bigger stream is not ours
_DOT_CELL = 4  # the strip pattern: one dot per 4x4 cell, shaded from the vector


@lru_cache(maxsize=8)
def key_stream(count: int) -> np.ndarray:
    """The first ``count`` LCG values mod 255, low 4 bits, as uint8 (read-only, cached).

    x_{n+k} = A_k x_n + C_k (mod 2**32), so the sequence doubles in length per numpy step instead of
    growing one Python step per value.
    """
    values = np.empty(max(count, 1), dtype=np.uint64)
    values[0] = LCG_INCREMENT  # x_1 from x_0 = 0
    jump_a, jump_c = LCG_MULTIPLIER, LCG_INCREMENT  # A_k, C_k for k = known values
    known = 1
    while known < count:
        take = min(known, count - known)
        # Both factors are below 2**32 and C_k too, so the uint64 arithmetic never wraps.
        values[known : known + take] = (values[:take] * np.uint64(jump_a) + np.uint64(jump_c)) & np.uint64(
            LCG_MODULUS - 1
        )
        jump_a, jump_c = jump_a * jump_a % LCG_MODULUS, (jump_a * jump_c + jump_c) % LCG_MODULUS
        known += take
    stream = ((values[:count] % 255) & 0x0F).astype(np.uint8)
    stream.setflags(write=False)
    return stream


def _shade_pattern(height: int, columns: int, shades: Sequence[int]) -> np.ndarray:
    """High-nibble grey dots (0x10 to 0xF0, never 0), one per cell, shaded by ``shades`` in turn."""
    rows, cols = np.mgrid[0:height, 0:columns]
    cells_per_row = -(-columns // _DOT_CELL)
    cell = (rows // _DOT_CELL) * cells_per_row + cols // _DOT_CELL
    levels = np.asarray(shades or [0x80], dtype=np.uint8) & 0xF0
    dot = levels[cell % len(levels)]
    in_dot = (rows % _DOT_CELL > 0) & (cols % _DOT_CELL > 0)
    pattern = np.where(in_dot, np.maximum(dot, 0x30), 0x10).astype(np.uint8)
    return np.repeat(pattern[:, :, None], CHANNELS, axis=2)


def vector_shades(values: Sequence[float]) -> list[int]:
    """0-255 grey levels from a vector's magnitudes (for the strip pattern)."""
    magnitudes = np.abs(np.asarray(values, dtype=np.float64))[:1024]
    peak = magnitudes.max() if magnitudes.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return [0x80]
    return (magnitudes / peak * 255).astype(np.uint8).tolist()


def add_strips(picture, data: bytes, shades: Sequence[int] = ()):
    """``picture`` (PIL) with ``data`` in side strips: a new RGB image, as wide as the picture plus the strips."""
    from PIL import Image

    picture = picture.convert("RGB")
    height = picture.height
    packed = np.frombuffer(zlib.compress(data, 9), dtype=np.uint8)
    per_column = height * CHANNELS
    columns = -(-packed.size // per_column)
    padded = np.zeros(columns * per_column, dtype=np.uint8)  # the reader's zlib stops at the stream's end
    padded[: packed.size] = packed
    key = key_stream(padded.size).reshape(height, columns, CHANNELS)
    low = ((padded & 0x0F).reshape(key.shape) ^ key) | _shade_pattern(height, columns, shades)
    high = ((padded >> 4).reshape(key.shape) ^ key) | _shade_pattern(height, columns, list(shades)[::-1])
    card = Image.new("RGB", (picture.width + 2 * columns + 2, height), (0, 0, 0))
    card.paste(Image.fromarray(low, "RGB"), (0, 0))
    card.paste(picture, (columns + 1, 0))
    card.paste(Image.fromarray(high, "RGB"), (columns + 1 + picture.width + 1, 0))
    return card


def read_strips(image) -> bytes | None:
    """The data in an image's side strips, or None when it has none (a plain picture, or a lossy copy)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    lit = (pixels > 0).all(axis=2)  # black borders, as the web UIs crop them: any channel at 0
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return None
    low_bits = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    empty = np.flatnonzero(low_bits.sum(axis=(0, 2)) == 0)
    if empty.size < 2:
        return None
    low, high = low_bits[:, : empty[0]], low_bits[:, empty[-1] + 1 :]
    if low.size == 0 or low.shape != high.shape:
        return None
    key = key_stream(low.size).reshape(low.shape)
    packed = (((high ^ key) << 4) | (low ^ key)).tobytes()
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(packed, MAX_DATA_BYTES)
    except zlib.error:
        return None
    if inflater.unconsumed_tail or not inflater.eof:
        return None  # larger than any embedding, or cut short
    return data


CARD_SIZE = 512  # the card's picture when there is no preview, and the largest side of one that is bigger


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow 10.1+: a scalable font
    except TypeError:  # older Pillow: one small bitmap font
        return ImageFont.load_default()


def captioned(picture, title: str, footer: str):
    """The card's middle: ``picture`` (or a plain background) at most CARD_SIZE on a side, with the title on
    a dark band at the top and the footer on one at the bottom."""
    from PIL import Image, ImageDraw

    if picture is None:
        shade = np.linspace(70, 25, CARD_SIZE, dtype=np.float32)[:, None, None] * np.array([0.8, 0.9, 1.2])
        base = Image.fromarray(np.broadcast_to(shade, (CARD_SIZE, CARD_SIZE, 3)).astype(np.uint8), "RGB")
    else:
        base = picture.convert("RGB")
        base.thumbnail((CARD_SIZE, CARD_SIZE))
    width, height = base.size
    size = max(10, min(width // 12, 48))
    band = size + size // 2
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((0, 0, width, band), fill=(0, 0, 0, 150))
    draw.rectangle((0, height - band, width, height), fill=(0, 0, 0, 150))
    for text, font, middle in ((title, _font(size), band // 2), (footer, _font(size * 2 // 3), height - band // 2)):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text((size // 3 - left, middle - (top + bottom) // 2), text, font=font, fill=(255, 255, 255, 230))
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
