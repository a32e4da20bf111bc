"""HostBackend: what the extension's UI and HTTP routes need, answered by the web UI it runs in."""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from extension import Backend
from ti_core.jobs import TrainingJob, current_job

from . import dependencies, settings
from .context import Watcher, host_job, host_model_freed, queue_slot
from .host import Host, default_mixed_precision

log = logging.getLogger("ti_host")


def _move_model(model: Any, device: Any) -> None:
    for module in (model.unet, model.vae, *(encoder.model for encoder in model.encoders)):
        module.to(device)


class HostBackend(Backend):
    """The extension inside A1111, reForge, Forge or SD.Next.

    The model is the web UI's current checkpoint file, loaded with ti_core (diffusers) on the CPU; inside
    `training_context()` it goes to the web UI's device after the web UI's own copy has left it.
    """

    has_try_it = False

    def __init__(self, host: Host | None = None) -> None:
        self.host = host or Host()
        self._load_lock = threading.Lock()
        # The loaded model is shared while anything holds it (a run, a create) and freed after: a second
        # full copy of an SDXL checkpoint is too much memory to keep around in a web UI.
        self._model_ref: weakref.ref | None = None
        self._model_key: tuple | None = None
        self._training = False
        self._shown_preview: str | None = None

    # ---- folders ---------------------------------------------------------------------------------------

    @property
    def embeddings_dir(self) -> Path:
        return self.host.embeddings_dir()

    @property
    def log_dir(self) -> Path:
        folder = Path(str(settings.value(self.host, "ti_trainer_log_dir") or settings.DEFAULTS["ti_trainer_log_dir"]))
        return folder if folder.is_absolute() else self.host.data_dir() / folder

    @property
    def templates_dir(self) -> Path | None:
        return self.host.templates_dir()

    # ---- the model -------------------------------------------------------------------------------------

    def model_label(self) -> str:
        info = self.host.checkpoint_info()
        title = getattr(info, "title", None) or getattr(info, "name", None)
        if title:
            return f"{title} (the {self.host.label()} model)"
        return f"no model selected in {self.host.label()}"

    def _checkpoint_key(self) -> tuple[Path, tuple]:
        path = self.host.checkpoint_path()
        if path is None:
            raise ValueError(
                "the web UI has no model selected: choose a Stable Diffusion checkpoint at the top of the page"
            )
        if not path.exists():
            raise ValueError(f"the web UI's checkpoint {path} is not a file or folder on this machine")
        stat = path.stat()
        return path, (str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    def problem(self) -> str | None:
        """What stops the trainer from working in this web UI, in one line with the fix (shown in the tab)."""
        return dependencies.known_problem()

    def current_model(self):
        """The web UI's current checkpoint as a TIModel (on its device while training, else on the CPU)."""
        problem = dependencies.import_problem()
        if problem:
            raise ValueError(problem)  # the tab and the API show it as one line, as for any bad input
        from ti_core.models import load_model

        path, key = self._checkpoint_key()
        with self._load_lock:
            model = self._model_ref() if self._model_ref is not None and self._model_key == key else None
            if model is None:
                log.info("loading %s for the Textual Inversion trainer", path)
                model = load_model(path)  # a ModelLoadError (ValueError) says what is wrong with the file
                self._model_ref, self._model_key = weakref.ref(model), key
            if self._training:
                _move_model(model, self.host.device())
        return model

    def loaded_model(self):
        """The trainer's copy of the current checkpoint if one is in memory already, else None.

        Never loads: the UI asks this while it is built and on every refresh, and loading a checkpoint
        is slow and takes gigabytes.
        """
        try:
            _path, key = self._checkpoint_key()
        except ValueError:
            return None
        with self._load_lock:
            return self._model_ref() if self._model_ref is not None and self._model_key == key else None

    def _release_model(self) -> None:
        """Move the trainer's model off the GPU before the web UI's comes back."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None:
            _move_model(model, "cpu")

    @property
    def mixed_precision(self) -> str:
        """The setting, or the best the web UI's device supports when it is "auto"."""
        chosen = str(settings.value(self.host, "ti_trainer_mixed_precision") or "auto")
        return chosen if chosen in ("no", "fp16", "bf16") else default_mixed_precision(self.host.device())

    # ---- after a file is written -----------------------------------------------------------------------

    def reload_embeddings(self) -> None:
        try:
            reloaded = self.host.reload_embeddings()
        except Exception as error:  # the file is written either way; a restart would pick it up
            log.warning("could not reload the web UI's embeddings: %s", error)
            return
        log.info("reloaded the web UI's embeddings: %s", ", ".join(reloaded) or "none found")

    # ---- a training run --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def training_context(self) -> Iterator[None]:
        """Wraps a run on its thread: the web UI's queue slot, its job state, and its model off the GPU.

        Works whoever started the job (the UI or the HTTP route): a watcher thread mirrors the current
        job's progress into `shared.state` and turns the web UI's Interrupt button into `job.cancel()`.
        """
        job = current_job()

        def cancelled() -> bool:
            # Not shared.state.interrupted: while we wait, that belongs to the generation we wait for.
            return job is not None and job.cancelled

        def tick() -> None:
            running = current_job()
            if running is None:
                return
            self.report(running.snapshot())
            if self.interrupt_requested() and running.running and not running.cancelled:
                running.cancel()

        waiting = lambda: self._say("Waiting for the web UI's current job to finish…")  # noqa: E731
        with queue_slot(self.host, cancelled, waiting) as slot:
            if not slot:  # interrupted while waiting: the job sees its cancel and stops before loading
                yield
                return
            with host_job(self.host), Watcher(tick):
                unload = bool(settings.value(self.host, "ti_trainer_unload_model"))
                try:
                    with (host_model_freed if unload else _kept)(self.host, self._release_model) as how:
                        log.info("training; the web UI's model: %s", how)
                        self._training = True
                        try:
                            yield
                        finally:
                            self._training = False
                finally:
                    # The run has written <name>.safetensors (also when interrupted): make the web UI
                    # read it now, after its model is back, so the token works in the next generation.
                    self.reload_embeddings()

    def _say(self, message: str) -> None:
        state = self.host.state
        if state is not None:
            state.textinfo = message

    def interrupt_requested(self) -> bool:
        return bool(getattr(self.host.state, "interrupted", False))

    def report(self, snapshot: dict) -> None:
        """Mirror a job snapshot into `shared.state`, which the web UI's progress bar polls."""
        state = self.host.state
        if state is None:
            return
        total, step = int(snapshot.get("total") or 0), int(snapshot.get("step") or 0)
        state.job_count, state.job_no = 1, 0
        state.sampling_steps, state.sampling_step = total, step
        loss = snapshot.get("loss")
        loss_text = f", loss {loss:.4f}" if isinstance(loss, int | float) else ""
        state.textinfo = f"Textual inversion {snapshot.get('name', '')}: step {step}/{total}{loss_text}. {snapshot.get('message', '')}".strip()
        previews = snapshot.get("previews") or []
        if previews and previews[-1] != self._shown_preview:
            self._shown_preview = previews[-1]
            assign = getattr(state, "assign_current_image", None)
            if callable(assign):
                with contextlib.suppress(Exception):  # a preview that cannot be read is not worth a failure
                    from PIL import Image

                    with Image.open(previews[-1]) as image:
                        assign(image.copy())

    # ---- starting a run (the HTTP route; the UI may use it too) -----------------------------------------

    def start_training(self, config) -> TrainingJob:
        """Start a run of `config` on the web UI's current model; RuntimeError if one is running."""
        return TrainingJob.start(self.current_model, config, context=self.training_context)


@contextlib.contextmanager
def _kept(_host: Host, before_restore) -> Iterator[str]:
    """host_model_freed's stand-in when the setting keeps the web UI's model on the GPU."""
    try:
        yield "kept on the GPU (setting)"
    finally:
        before_restore()
