"""What a training run reports: progress events for the callback, the result, and the errors that stop a
run before it starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

EventKind = Literal["start", "step", "warning", "preview", "snapshot", "validation", "done", "interrupted", "error"]
Stopped = Literal["done", "interrupted", "nan", "error"]


@dataclass
class TrainEvent:
    """A progress report for the callback. kind: start, step, warning, preview, snapshot, validation, done,
    interrupted or error; fields that do not apply to a kind are None."""

    kind: EventKind
    step: int
    total: int
    loss: float | None = None
    lr: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    epoch: int | None = None
    path: Path | None = None
    image: Any = None  # PIL.Image for "preview"
    message: str = ""
    outputs_seconds: float | None = None  # "step": time spent on snapshots, validation and previews so far
    norm_ratio: float | None = None  # "step": the largest vector norm as a multiple of the vocabulary's mean


@dataclass
class TrainResult:
    """How a run ended. stopped: "done", "interrupted", "nan" or "error"; the file holds `step`'s vectors."""

    embedding_path: Path | None
    step: int
    stopped: Stopped
    message: str
    log_dir: Path
    error: BaseException | None = field(default=None, repr=False)


class AlreadyTrained(FileExistsError):
    """Training (not resuming) an embedding that has been trained already."""

    def __init__(self, path: Path, step: int, resume: str = "resume", overwrite: str = "overwrite") -> None:
        self.path, self.step = path, step
        super().__init__(
            f"{path} is already trained to step {step}; {resume} to continue training it (to a step above {step}), "
            f"or {overwrite} to start again"
        )


class TrainingLocked(RuntimeError):
    """Another run is training the same embedding."""


class StepsReached(ValueError):
    """Resuming an embedding already trained to the run's last step or beyond."""

    def __init__(self, path: Path, step: int, advice: str = "set more than {step} steps") -> None:
        self.path, self.step = path, step
        super().__init__(f"{path} is already trained to step {step}; {advice.format(step=step)}")
