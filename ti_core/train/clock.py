"""Steps per second and the time left, with snapshots, previews and validation kept apart."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Clock:
    """Training steps per second over this run so far, and the time left at that pace.

    Snapshots, validation and previews run inside `outside_steps()`: they are not training steps, so their
    time is kept apart (a slow preview neither lowers steps/s nor inflates the ETA) and reported on its own.
    `now` is the time source (injectable, so tests need no real waiting).
    """

    def __init__(self, start: int, total: int, now: Callable[[], float] = time.perf_counter) -> None:
        self.start, self.step, self.total = start, start, total
        self.now = now
        self.began = now()
        self.outputs_seconds = 0.0  # spent in outside_steps()

    def tick(self, step: int) -> None:
        self.step = step

    @contextlib.contextmanager
    def outside_steps(self) -> Iterator[None]:
        began = self.now()
        try:
            yield
        finally:
            self.outputs_seconds += self.now() - began

    @property
    def elapsed(self) -> float:
        """Wall seconds since the run began, outputs included (the loss log's clock)."""
        return self.now() - self.began

    @property
    def training_seconds(self) -> float:
        return self.elapsed - self.outputs_seconds

    @property
    def rate(self) -> float | None:
        done, seconds = self.step - self.start, self.training_seconds
        return done / seconds if done and seconds > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds until the last step at this rate (the remaining previews and snapshots not counted)."""
        rate = self.rate
        return (self.total - self.step) / rate if rate else None
