"""What the UI needs from its host (`Backend`), and the standalone app's own (`StandaloneBackend`).

No gradio here: the web-UI glue (ti_host) subclasses `Backend` without building any UI.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MIRROR_SECONDS = 0.25  # how often a run's progress reaches the host's progress bar

NO_MODEL_HELP = (
    "No model is selected: pick one in the Model list above, or type the path of a .safetensors/.ckpt file, "
    "a diffusers folder or a hub id there."
)


class ProgressMirror:
    """A thread that, while a run lasts, calls `tick` every `seconds`: beside the trainer, so it works whoever
    started the job (the tab or a web UI's HTTP route), and before the first step too (a model loading)."""

    def __init__(self, tick: Callable[[], None], seconds: float = MIRROR_SECONDS) -> None:
        self._tick = tick
        self._seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ti-progress-mirror", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._seconds):
            try:
                self._tick()
            except Exception as error:  # a reporting glitch must never end the run
                log.debug("progress mirror tick failed: %s", error)

    def __enter__(self) -> ProgressMirror:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._tick()  # the final state, so the host does not stop one tick short


class Backend:
    """What the UI needs from its host. The standalone app and the web-UI scripts subclass it.

    Subclasses may turn the plain attributes into properties (a host reads its folders from its settings).
    """

    embeddings_dir: Path = Path("embeddings")
    log_dir: Path = Path("textual_inversion")
    templates_dir: Path | None = None
    has_try_it: bool = False  # the Try-it panel (the hosts have txt2img instead)
    has_model_picker: bool = False  # a model dropdown above the tabs (the hosts have their own)
    inject_assets: bool = False  # add ti.js and style.css to the page (the hosts load them themselves)
    mixed_precision: str = "no"  # the Train tab's default: "no", "fp16" or "bf16"

    def __init__(
        self, embeddings_dir: Path | None = None, log_dir: Path | None = None, templates_dir: Path | None = None
    ) -> None:
        if embeddings_dir is not None:
            self.embeddings_dir = Path(embeddings_dir)
        if log_dir is not None:
            self.log_dir = Path(log_dir)
        if templates_dir is not None:
            self.templates_dir = Path(templates_dir)

    def current_model(self):
        """The model to create and train with (a `TIModel`); ValueError saying how to get one if none."""
        raise ValueError(NO_MODEL_HELP)

    def loaded_model(self):
        """The model if it is at hand without a slow load, else None (for token counts and card badges)."""
        try:
            return self.current_model()
        except ValueError:
            return None

    def model_label(self) -> str:
        model = self.loaded_model()
        return model.name if model is not None else "no model"

    def default_resolution(self) -> int:
        """The Train tab's starting resolution: the model's native one when it is at hand."""
        model = self.loaded_model()
        return int(model.resolution) if model is not None else 512

    def reload_embeddings(self) -> None:
        """Called after an embedding file was written, so the host's prompt parser sees it."""

    def problem(self) -> str | None:
        """One line saying what stops the trainer from working here (shown above the tabs), or None."""
        return None

    def training_context(self) -> AbstractContextManager:
        """Wraps a whole training run: its progress mirrored into the host (`mirrored`); a host also frees its
        own model from the GPU and restores it after."""
        return self.mirrored()

    @contextlib.contextmanager
    def mirrored(self) -> Iterator[None]:
        """The one progress mirror: while a run lasts, `report` gets the job's snapshot four times a second and
        the host's Interrupt button (`interrupt_requested`) cancels the run."""
        with ProgressMirror(self._mirror_tick):
            yield

    def _mirror_tick(self) -> None:
        from ti_core.jobs import current_job

        running = current_job()
        if running is None:
            return
        self.report(running.snapshot())
        if self.interrupt_requested() and running.running and not running.cancelled:
            running.cancel()

    def report(self, snapshot: dict) -> None:
        """While a run lasts, four times a second, `TrainingJob.snapshot()` (a host mirrors it in its progress)."""

    def interrupt_requested(self) -> bool:
        """True when the host's own Interrupt button was pressed."""
        return False

    def txt2img_components(self) -> dict[str, Any]:
        """The host's txt2img components that a run's previews can take their settings from, by name (prompt,
        negative_prompt, sampler, ...): the Train tab passes them to Train/Resume. Empty: no txt2img tab."""
        return {}

    def txt2img_preview_settings(
        self, txt2img: dict[str, Any], fields: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        """The values of `txt2img_components` (by the same names) as preview settings by TrainConfig key, and
        what could not be taken as it is (a few words each); `fields` are the tab's own preview values."""
        return {}, []


class StandaloneBackend(Backend):
    """The standalone app: the --model source, or a model found where people keep them, or the demo model;
    loaded on first use."""

    has_try_it = True
    has_model_picker = True
    inject_assets = True

    def __init__(
        self,
        *,
        model: str | None = None,
        models_dir: Path | None = None,
        embeddings_dir: Path = Path("embeddings"),
        log_dir: Path = Path("textual_inversion"),
        templates_dir: Path | None = None,
        search_from: Path | None = None,
        home: Path | None = None,
        hf_cache: Path | None = None,
    ) -> None:
        from ti_core.discovery import default_entry, default_hf_cache

        super().__init__(embeddings_dir, log_dir, templates_dir)
        self.models_dir = Path(models_dir) if models_dir else None
        self._search = (
            Path(search_from) if search_from else Path.cwd(),
            Path(home) if home else Path.home(),
            Path(hf_cache) if hf_cache else default_hf_cache(),
        )
        self._lock = threading.Lock()
        self._model = None
        self._given: dict[str, str] = {}  # --model and typed sources: label -> source
        self._sources: dict[str, str] = {}
        if model:
            self._given[model] = model
        found = self._found()
        self.selected: str | None = model if model else default_entry(found).label

    def _found(self):
        """Scan for models (Refresh asks again) and remember every picker label's source."""
        from ti_core.discovery import find_models, picker_entries

        start, home, hf_cache = self._search
        found = find_models(start, home, [self.models_dir] if self.models_dir else [], hf_cache)
        self._sources = dict(self._given)
        for entry in picker_entries(found):
            self._sources.setdefault(entry.label, entry.source)
        return found

    def model_choices(self, rescan: bool = True) -> list[str]:
        """The --model source and typed ones, the models found (--models-dir, web UI and ComfyUI folders, the
        Hugging Face cache), and last the demo model, as dropdown labels; `rescan=False`: as last found."""
        if rescan:
            self._found()
        return list(self._sources)

    def select_model(self, label: str | None) -> str:
        """Pick a model by its label, or a typed path or hub id; it is loaded when first needed. A typed source
        that cannot be a model (a mistyped path) is refused at once: ValueError, the selection unchanged."""
        from ti_core.discovery import check_model_source

        label = (label or "").strip()
        if label and label not in self._sources:
            check_model_source(label)
            self._given[label] = label  # typed: a file, a folder or a hub id
            self._sources[label] = label
        if label and label != self.selected:
            with self._lock:
                self.selected = label
                self._model = None
        return self.status_text()

    def status_text(self) -> str:
        from ti_core.demo import DEMO_LABEL, is_demo

        if self.selected is None:
            return NO_MODEL_HELP
        if is_demo(self._sources.get(self.selected, self.selected)):
            return f"Model: {DEMO_LABEL}. Pick or type a real checkpoint above to train for real."
        return f"Model: {self.selected} (loaded when first used; load errors show where you used it)"

    def current_model(self):
        if self.selected is None:
            raise ValueError(NO_MODEL_HELP)
        with self._lock:  # one load at a time; a second caller waits and gets the same model
            if self._model is None:
                from ti_core.models import load_model

                self._model = load_model(self._sources.get(self.selected, self.selected))
            return self._model

    def loaded_model(self):
        return self._model

    def default_resolution(self) -> int:
        from ti_core.demo import is_demo

        if self._model is None and is_demo(self._sources.get(self.selected or "", self.selected)):
            return 64  # the demo model's own size, known without building it
        return super().default_resolution()

    def model_label(self) -> str:
        return self.selected or "no model"


def find_checkpoints(folder: Path) -> list[Path]:
    """Single-file checkpoints (*.safetensors, *.ckpt) and diffusers folders under `folder`, like a host's
    models folder. A diffusers folder's own weight files are not listed separately."""
    if not folder or not folder.is_dir():
        return []
    found: list[Path] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        if (current / "model_index.json").is_file():
            found.append(current)
            continue
        for entry in sorted(current.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                pending.append(entry)
            elif entry.suffix.lower() in (".safetensors", ".ckpt"):
                found.append(entry)
    return sorted(found)
