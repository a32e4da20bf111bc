"""A training run in a background thread, observed by polling: what the web UI's progress display reads.

`train()` reports through a callback on the training thread; a web page asks for progress from request
threads, often after a reload. So the job keeps one summary (`snapshot()`, JSON-safe) that every event
updates under a lock, and the UI never touches the trainer directly. One run at a time per process: two
runs would compete for the same GPU and, in a web UI, for the same model.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the trainer (torch, diffusers) is imported when a run starts, not with the UI
    from .train.events import TrainEvent, TrainResult

# Every change of any job's state gets the next number, so a poller can skip redrawing when nothing changed,
# even across runs (a new run never repeats an old run's number).
_versions = itertools.count(1)
_start_lock = threading.Lock()
_current: TrainingJob | None = None

MAX_LOSS_POINTS = 20_000  # a long run's loss history is thinned beyond this, keeping its shape


class TrainingJob:
    """One training run on its own thread. Create it with `TrainingJob.start(...)`."""

    def __init__(self, config, on_event: Callable[[Any], None] | None = None) -> None:
        self.config = config
        self._on_event = on_event
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._state: dict[str, Any] = {
            "name": getattr(config, "name", ""),
            "running": True,
            "phase": "starting",
            "step": 0,
            "start_step": None,  # set when training starts; None for a run that never got there
            "log_folder": str(Path(getattr(config, "log_dir", ".")) / getattr(config, "name", "")),
            "total": int(getattr(config, "steps", 0) or 0),
            "loss": None,
            "validation_loss": None,
            "lr": None,
            "steps_per_second": None,
            "eta_seconds": None,
            "outputs_seconds": None,  # spent on snapshots, validation and previews, not in steps/s or the ETA
            "epoch": None,
            "message": "Starting…",
            "losses": [],
            "norm_ratios": [],  # (step, largest vector norm / the vocabulary's mean norm)
            "norm_ratio": None,
            "warning": "",  # the run's one-line warning (a vector's norm past the threshold)
            "previews": [],
            "snapshots": [],
            "final_path": None,
            "stopped": None,
            "error": None,
            "started_at": time.time(),
            "finished_at": None,
            "version": next(_versions),
        }

    # ------------------------------------------------------------------------------------------------ control

    @classmethod
    def start(
        cls,
        model_provider: Callable[[], Any],
        config,
        on_event: Callable[[Any], None] | None = None,
        *,
        context: Callable[[], AbstractContextManager] | None = None,
        work: Callable[..., Any] | None = None,
    ) -> TrainingJob:
        """Start `train(model_provider(), config)` on a new thread and return at once.

        The model is fetched on the training thread, so a slow load does not block the caller. `context`
        wraps the whole run (a web UI frees its own model from the GPU there and restores it afterwards).
        `work` replaces `train` with another job on the model that reports the same way (the snapshot
        comparison, ti_core.compare). RuntimeError if another run is still going.
        """
        global _current
        with _start_lock:
            if _current is not None and _current.running:
                raise RuntimeError(
                    f"a training run is already in progress ({_current.config.name!r}, step "
                    f"{_current.snapshot()['step']}); interrupt it or wait for it to finish"
                )
            job = cls(config, on_event)
            job._thread = threading.Thread(
                target=job._run, args=(model_provider, context, work), name=f"ti-train-{config.name}", daemon=True
            )
            _current = job
            job._thread.start()
        return job

    def cancel(self) -> None:
        """Ask the run to stop; the trainer finishes the current step and saves what it has."""
        if not self._cancel.is_set():
            self._cancel.set()
            self._update(message="Interrupting after this step…")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    @property
    def running(self) -> bool:
        with self._lock:
            return self._state["running"]

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def snapshot(self) -> dict[str, Any]:
        """The run's state now, as a JSON-safe dict (a copy: later events do not change it)."""
        with self._lock:
            state = dict(self._state)
            state["losses"] = [list(point) for point in self._state["losses"]]
            state["previews"] = list(self._state["previews"])
            state["norm_ratios"] = [list(point) for point in self._state["norm_ratios"]]
            state["snapshots"] = list(self._state["snapshots"])
        state["elapsed_seconds"] = round((state["finished_at"] or time.time()) - state["started_at"], 3)
        return state

    # ------------------------------------------------------------------------------------------- the thread

    def _run(
        self,
        model_provider: Callable[[], Any],
        context: Callable[[], AbstractContextManager] | None,
        work: Callable[..., Any] | None = None,
    ) -> None:
        try:
            with context() if context is not None else contextlib.nullcontext():
                self._update(phase="loading", message="Loading the model…")
                model = model_provider()
                if self._cancel.is_set():
                    self._finish(stopped="interrupted", message="Interrupted before training started")
                    return
                if work is None:
                    self._update(phase="preparing", message="Preparing the dataset…")
                    from .train import train as work  # heavy (diffusers): imported when a run starts, not with the UI

                result = work(model, self.config, self._handle_event, cancel=self._cancel)
            self._finish_with(result)
        except Exception as error:  # the run's failure is reported to the UI as one line, never raised
            if isinstance(error, (ValueError, OSError)):  # bad input (no images, a refused name): one line
                print(f"Training {self.config.name} failed: {_one_line(error)}", file=sys.stderr)
            else:  # a bug: the traceback is what helps
                traceback.print_exc()
            self._finish(stopped="error", message=f"Training failed: {_one_line(error)}", error=_one_line(error))

    def _handle_event(self, event: TrainEvent) -> None:
        """The trainer's callback: fold the event into the snapshot, then tell the observer."""
        kind = event.kind
        changes: dict[str, Any] = {}
        for field in (
            "step", "total", "lr", "steps_per_second", "eta_seconds", "outputs_seconds", "epoch", "norm_ratio"
        ):  # fmt: skip
            value = getattr(event, field)
            if value is not None:
                changes[field] = _plain(value)
        loss = event.loss
        if loss is not None:  # a validation event's loss is the held-out loss, kept apart from the training loss
            changes["validation_loss" if kind == "validation" else "loss"] = _plain(loss)
        if event.message:
            changes["message"] = event.message
        if kind in ("start", "step"):
            changes["phase"] = "training"
        if kind == "warning":
            changes["warning"] = event.message
        if kind == "start":  # where this run began: a resumed run's earlier steps are in its run folder
            changes["start_step"] = int(event.step or 0)
        path = event.path
        with self._lock:
            if kind == "step" and loss is not None and math.isfinite(float(loss)):
                self._state["losses"].append((int(event.step or 0), float(loss)))
                if len(self._state["losses"]) > MAX_LOSS_POINTS:
                    self._state["losses"] = self._state["losses"][::2]
            ratio = event.norm_ratio
            if kind == "step" and ratio is not None and math.isfinite(float(ratio)):
                self._state["norm_ratios"].append((int(event.step or 0), float(ratio)))
                if len(self._state["norm_ratios"]) > MAX_LOSS_POINTS:
                    self._state["norm_ratios"] = self._state["norm_ratios"][::2]
            if kind == "preview" and path is not None:
                self._state["previews"].append(str(path))
            if kind == "snapshot" and path is not None:
                self._state["snapshots"].append(str(path))
            if kind in ("done", "interrupted") and path is not None:
                changes["final_path"] = str(path)
            self._state.update(changes)
            self._state["version"] = next(_versions)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # an observer's bug must not kill the run
                traceback.print_exc()

    def _finish_with(self, result: TrainResult) -> None:
        stopped, path, step = result.stopped, result.embedding_path, result.step
        message = result.message or _default_message(stopped, step, path)
        changes: dict[str, Any] = {"stopped": stopped, "message": message}
        if path is not None:
            changes["final_path"] = str(path)
        if step is not None:
            changes["step"] = int(step)
        if stopped in ("error", "nan"):
            changes["error"] = message
        self._finish(**changes)

    def _finish(self, **changes: Any) -> None:
        self._update(running=False, phase="finished", finished_at=time.time(), eta_seconds=None, **changes)

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._state.update(changes)
            self._state["version"] = next(_versions)


def current_job() -> TrainingJob | None:
    """The running job, or the last one that ran in this process (its results stay visible), or None."""
    return _current


def _default_message(stopped: str, step: int | None, path: Path | None) -> str:
    where = f" → {path}" if path else ""
    if stopped == "interrupted":
        return f"Training interrupted at step {step}{where}"
    return f"Training finished at step {step}{where}"


def _plain(value: Any) -> Any:
    """A float/int from a tensor or numpy scalar, so the snapshot stays JSON-safe."""
    if isinstance(value, bool | int | str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None  # strict JSON has no NaN; the message says what happened


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
