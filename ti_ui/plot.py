"""The loss plot."""

from __future__ import annotations

from collections.abc import Sequence


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (a scalable font)
    except TypeError:
        return ImageFont.load_default()


def _smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing), so the curve starts
    at the first loss instead of at zero."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**index))
    return smoothed


def loss_plot(losses: Sequence[Sequence[float]], size: tuple[int, int] = (720, 280)):
    """A PNG-ready PIL image of loss against step: raw values faint, their moving average bold.

    Drawn with PIL rather than a gradio plot component, which differs (or is missing) between versions.
    """
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font(13)
    left, right, top, bottom = 64, width - 16, 28, height - 34
    draw.text((left, 6), "loss (faint: each step, bold: moving average)", fill=(60, 60, 60), font=font)
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    if not losses:
        draw.text((left + 12, top + 12), "No loss values yet.", fill=(120, 120, 120), font=font)
        return image
    steps = [float(step) for step, _ in losses]
    values = [float(loss) for _, loss in losses]
    smoothed = _smooth(values, 0.9 if len(values) > 50 else 0.6)
    ordered = sorted(values)
    low = ordered[0]
    high = ordered[min(len(ordered) - 1, int(0.98 * len(ordered)))]  # one spike must not flatten the curve
    high = max(high, max(smoothed))
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    first, last = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def point(step: float, value: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (right - left)
        y = bottom - (min(max(value, low), high) - low) / (high - low) * (bottom - top)
        return x, y

    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        y = bottom - fraction * (bottom - top)
        draw.line((left, y, right, y), fill=(235, 235, 235))
        draw.text((6, y - 7), f"{value:.4g}", fill=(90, 90, 90), font=font)
    draw.text((left, bottom + 8), f"step {int(first)}", fill=(90, 90, 90), font=font)
    draw.text((right - 90, bottom + 8), f"step {int(steps[-1])}", fill=(90, 90, 90), font=font)
    if len(values) == 1:
        x, y = point(steps[0], values[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(40, 90, 200))
        return image
    draw.line([point(s, v) for s, v in zip(steps, values, strict=True)], fill=(170, 195, 240), width=1)
    draw.line([point(s, v) for s, v in zip(steps, smoothed, strict=True)], fill=(30, 80, 200), width=2)
    return image
