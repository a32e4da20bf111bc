"""TensorBoard event files of a run, `<log_dir>/<name>/tensorboard/`, beside loss.csv: the loss, learning rate,
norm ratio, validation loss and preview images, written from the run's events (the loop's maths untouched).
Only when the `tensorboard` package is installed; without it nothing is written."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .events import TrainEvent

TENSORBOARD_FOLDER = "tensorboard"


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class EventLog:
    """Writes the run's events as TensorBoard scalars and images. The writer (and its folder) is made at the
    first step, so a run that fails to start leaves no file."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.writer: Any = None

    def record(self, event: TrainEvent) -> None:
        if event.kind == "step":
            self._scalar("train/loss", event.loss, event.step)
            self._scalar("train/learning_rate", event.lr, event.step)
            self._scalar("train/norm_ratio", event.norm_ratio, event.step)
        elif event.kind == "validation":
            self._scalar("validation/loss", event.loss, event.step)
        elif event.kind == "preview" and event.image is not None:
            import numpy as np

            picture = np.asarray(event.image.convert("RGB"))
            self._open().add_image("preview", picture, event.step, dataformats="HWC")

    def _scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is not None:
            self._open().add_scalar(tag, value, step)

    def _open(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.folder))
        return self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def reporting(
    folder: Path, callback: Callable[[TrainEvent], None] | None, write: bool
) -> Iterator[Callable[[TrainEvent], None]]:
    """The run's `emit`: the callback (when given), and the TensorBoard log when this process writes files and
    tensorboard is installed."""
    log = EventLog(Path(folder) / TENSORBOARD_FOLDER) if write and tensorboard_available() else None

    def emit(event: TrainEvent) -> None:
        if log is not None:
            log.record(event)
        if callback is not None:
            callback(event)

    try:
        yield emit
    finally:
        if log is not None:
            log.close()
