"""HostBackend: what the extension's UI and HTTP routes need, answered by the web UI it runs in."""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ti_core.jobs import TrainingJob, current_job
from ti_ui.backend import Backend

from . import dependencies, sdnext, settings
from .context import host_job, host_model_freed, queue_slot
from .host import Host, default_mixed_precision
from .txt2img import Txt2imgCapture, preview_from_txt2img

log = logging.getLogger("ti_host")


def _load_file(path: Path):
    """The checkpoint file loaded into a TIModel of its own; errors in the web UI's words, not CLI flags."""
    from ti_core.models import ModelLoadError, load_model

    try:
        return load_model(path)
    except ModelLoadError as error:
        if error.fits_no_config:
            problems = "; ".join(getattr(error, "problems", []))
            raise ModelLoadError(
                f"{path.name} is not a standard SD1, SD2 or SDXL model ({problems}): put its .yaml config "
                f"beside it as {path.with_suffix('.yaml').name}, as the web UI needs for such models"
            ) from None
        raise ModelLoadError(error.message) from None


def release_memory() -> None:
    """Give freed memory back after a run: Python's cycles, the CUDA cache, and glibc's heap.

    glibc keeps freed blocks of a long-lived process for reuse; after a run that allocated gigabytes
    (latents, optimizer, a model copy) the web UI's resident memory would stay that high.
    """
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
        self._owner_ref: weakref.ref | None = None  # the web UI model whose tensors the cached model shares
        self._owner_probe: int | None = None
        self._shared_model = None
        self._unshareable = lambda: None  # (weakref to) a web UI model that failed to map: not tried again
        self._training = False
        self._checkpoint_word: tuple[tuple | None, bool | None] = (None, None)  # (checkpoint key, its ZTSNR word)
        self._shown_preview: str | None = None
        self.txt2img = Txt2imgCapture()  # fed by the web UI's after-component callback (scripts/)

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

    # ---- txt2img's settings for previews --------------------------------------------------------------

    def txt2img_components(self) -> dict[str, Any]:
        return self.txt2img.components()

    def txt2img_preview_settings(
        self, txt2img: dict[str, Any], fields: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        return preview_from_txt2img(self.txt2img.named_values(txt2img), fields)

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
        """The web UI's current checkpoint as a TIModel.

        Built over the web UI's own loaded tensors when it has the checkpoint loaded in a layout we can
        map (A1111/reForge: SD1, SD2, SDXL): instant, and no second copy in memory. Otherwise the file is
        loaded (on the CPU; moved to the web UI's device while training).
        """
        problem = dependencies.import_problem()
        if problem:
            raise ValueError(problem)  # the tab and the API show it as one line, as for any bad input
        path, key = self._checkpoint_key()
        with self._load_lock:
            model = self._at_hand(path, key)
            if model is None:
                log.info("loading %s for the Textual Inversion trainer", path)
                model = _load_file(path)
                self._model_ref, self._model_key = weakref.ref(model), key
            if self._training and not model.shares_weights:
                _move_model(model, self.host.device())
            # Asked on every use: the web UI's setting may have changed since the model was built.
            self._follow_noise_schedule(model, path, key, self.host.loaded_model())
        return model

    def _at_hand(self, path: Path, key: tuple):
        """The model of this checkpoint already in memory, else one over the web UI's tensors, else None."""
        model = self._model_ref() if self._model_ref is not None and self._model_key == key else None
        if model is not None and model.shares_weights and not self._still_shared():
            self._forget_shared()
            model = None
        if model is None:
            model = self._model_over_host_weights(path)
            if model is not None:
                self._model_ref, self._model_key = weakref.ref(model), key
        return model

    def _still_shared(self) -> bool:
        """The web UI still has the model whose tensors we share, and they have not moved (unloaded to RAM)."""
        owner = self._owner_ref() if self._owner_ref is not None else None
        if owner is None or owner is not self.host.loaded_model():
            return False
        first = self.host.first_weight(owner)
        return first is not None and first.data_ptr() == self._owner_probe

    def _forget_shared(self, _gone=None) -> None:
        # Called also when the web UI frees its model: the shared tensors must not outlive it here.
        self._shared_model = None
        self._owner_ref = None

    def _model_over_host_weights(self, path: Path):
        """A TIModel sharing the web UI's loaded tensors, or None where that is not possible."""
        from ti_core.shared_weights import model_from_tensors, original_config_from_yaml, strip_wrappers

        loaded = self.host.loaded_model()
        if sdnext.is_pipeline(loaded):
            return self._model_over_pipeline(loaded, path)
        if loaded is self._unshareable():
            return None  # the file is loaded instead (and not on every refresh: the UI asks often)
        try:
            weights = self.host.model_weights()
            if weights is None:
                return None
            original = original_config_from_yaml(weights.original_config) if weights.original_config else None
            model = model_from_tensors(
                strip_wrappers(weights.tensors),
                source=str(path),
                file_path=path,
                prediction_type=weights.prediction_type,
                original_config=original,
                text_encoders=weights.text_encoders,
            )
        except ValueError as error:  # a layout we do not map, quantized weights: the file path still works
            line = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning("training on a copy of %s: the web UI's loaded model cannot be shared (%s)", path, line)
            self._unshareable = (
                weakref.ref(self.host.loaded_model()) if self.host.loaded_model() is not None else (lambda: None)
            )
            return None
        # Kept while the web UI's model lives (building it again on every refresh or keystroke would cost
        # a second each); dropped as soon as the web UI replaces or frees that model.
        self._owner_ref = weakref.ref(weights.owner, self._forget_shared)
        first = self.host.first_weight(weights.owner)
        self._owner_probe = first.data_ptr() if first is not None else None
        # Where the web UI may move its tensors (Forge off --always-cpu), the aliases are held only while in
        # use: kept, they would hold the old memory alive after a move.
        self._shared_model = model if self.host.keeps_weights_in_place(weights.owner) else None
        return model

    def _model_over_pipeline(self, pipeline: Any, path: Path):
        """A TIModel over SD.Next's loaded pipeline modules, or None (said once per model) where they cannot be
        used as they are."""
        if pipeline is self._unshareable():
            return None
        reason = sdnext.unshareable_reason(pipeline)
        if reason:
            log.warning("training on a copy of %s: SD.Next's loaded model cannot be shared: %s", path, reason)
            self._unshareable = weakref.ref(pipeline)
            return None
        model = sdnext.model_over_pipeline(pipeline, path)
        self._owner_ref = weakref.ref(pipeline, self._forget_shared)
        first = self.host.first_weight(pipeline)
        self._owner_probe = first.data_ptr() if first is not None else None
        self._shared_model = model
        return model

    def _follow_noise_schedule(self, model, path: Path, key: tuple, owner: Any) -> None:
        """Zero terminal SNR (ti_core.zero_snr) when the checkpoint says so (its .yaml, marker key or metadata),
        else as the web UI is set to sample it (its setting may change between runs); the checkpoint's word wins.
        The file's word is read once per checkpoint version (`key`)."""
        from ti_core.single_file import checkpoint_zero_terminal_snr
        from ti_core.zero_snr import with_zero_terminal_snr

        if self._checkpoint_word[0] != key:
            self._checkpoint_word = (key, checkpoint_zero_terminal_snr(path))
        said = self._checkpoint_word[1]
        on = said if said is not None else self.host.samples_with_zero_terminal_snr(owner)
        model.scheduler = with_zero_terminal_snr(model.scheduler, on)

    def loaded_model(self):
        """A TIModel of the current checkpoint if one is at hand without reading the file, else None.

        The web UI's loaded model is shared (cheap); a copy of the file is never loaded here: the UI asks
        this while it is built and on every refresh, and loading a checkpoint is slow and takes gigabytes.
        """
        try:
            path, key = self._checkpoint_key()
        except ValueError:
            return None
        with self._load_lock:
            return self._at_hand(path, key)

    def _release_model(self) -> None:
        """Move the trainer's own copy off the GPU before the web UI's model comes back."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None and not model.shares_weights:
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

        Works whoever started the job (the UI or the HTTP route): the progress mirror (`Backend.mirrored`)
        copies the job's progress into `shared.state` and turns the web UI's Interrupt button into `job.cancel()`.
        """
        job = current_job()

        def cancelled() -> bool:
            # Not shared.state.interrupted: while we wait, that belongs to the generation we wait for.
            return job is not None and job.cancelled

        waiting = lambda: self._say("Waiting for the web UI's current job to finish…")  # noqa: E731
        with queue_slot(self.host, cancelled, waiting) as slot:
            if not slot:  # interrupted while waiting: the job sees its cancel and stops before loading
                yield
                return
            with host_job(self.host), self.mirrored(), self.host.model_for_training():
                # Training on the web UI's own tensors leaves its model where it is; only a copy loaded
                # from the file needs the room on the GPU that the web UI's model takes.
                pipeline = self.host.loaded_model()
                on_pipeline = sdnext.is_pipeline(pipeline) and sdnext.unshareable_reason(pipeline) is None
                shared = on_pipeline or self._shares_host_weights()
                unload = not shared and bool(settings.value(self.host, "ti_trainer_unload_model"))
                keep = _shared if shared else _kept
                lent = sdnext.borrowed(pipeline) if on_pipeline else contextlib.nullcontext()
                try:
                    with (host_model_freed if unload else keep)(self.host, self._release_model) as how, lent:
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
                    release_memory()

    def _shares_host_weights(self) -> bool:
        try:
            return self.host.model_weights() is not None
        except ValueError:  # Forge's quantized or swapped weights: the file is loaded (current_model says why)
            return False

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


@contextlib.contextmanager
def _shared(_host: Host, _before_restore) -> Iterator[str]:
    """host_model_freed's stand-in when the run trains on the web UI's loaded tensors."""
    yield "shared with the trainer (no copy)"
