"""The loss plot: the rows gradio's LinePlot draws (axes with their titles, hover values, a legend).

gradio 3.41 draws it with Vega from an Altair chart, the newest with its own Vega spec; both take the same
table of (step, loss, curve) rows. The table is thinned, since the poller sends it again after every step.
"""

from __future__ import annotations

from collections.abc import Sequence

LOSS_PLOT_STEPS = 500  # steps drawn per curve: plenty for the shape, a few kB to send each second
CURVES = ("each step", "moving average")


def _smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing), so the curve starts
    at the first loss instead of at zero."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**index))
    return smoothed


def _thinned(count: int, limit: int) -> list[int]:
    """At most about `limit` evenly spaced indices of `count`, the first and the last included."""
    stride = max(1, -(-count // limit))
    indices = list(range(0, count, stride))
    if indices and indices[-1] != count - 1:
        indices.append(count - 1)
    return indices


def loss_frame(losses: Sequence[Sequence[float]], limit: int = LOSS_PLOT_STEPS):
    """Loss against step as a pandas DataFrame of (step, loss, curve) rows: each step's loss and its
    moving average (over every step, before thinning), or None before the first step (an empty plot)."""
    import pandas as pd  # a gradio dependency, needed only once there is something to plot

    if not losses:
        return None
    steps = [int(step) for step, _ in losses]
    values = [float(loss) for _, loss in losses]
    smoothed = _smooth(values, 0.9 if len(values) > 50 else 0.6)
    keep = _thinned(len(values), limit)
    rows = [(steps[i], float(f"{values[i]:.4g}"), CURVES[0]) for i in keep]
    rows += [(steps[i], float(f"{smoothed[i]:.4g}"), CURVES[1]) for i in keep]
    return pd.DataFrame(rows, columns=["step", "loss", "curve"])


NORM_CURVES = ("largest vector", "warning threshold")


def norm_frame(ratios: Sequence[Sequence[float]], threshold: float, limit: int = LOSS_PLOT_STEPS):
    """The vectors' norm as a multiple of the vocabulary's mean against step, with the warning threshold as a
    flat line, as (step, norm, curve) rows; None before the first step."""
    import pandas as pd

    if not ratios:
        return None
    keep = _thinned(len(ratios), limit)
    rows = [(int(ratios[i][0]), float(f"{float(ratios[i][1]):.4g}"), NORM_CURVES[0]) for i in keep]
    rows += [(int(ratios[i][0]), float(threshold), NORM_CURVES[1]) for i in (keep[0], keep[-1])]
    return pd.DataFrame(rows, columns=["step", "norm", "curve"])
