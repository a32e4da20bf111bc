"""The Textual Inversion tab: Create, Train and Embeddings, for the web UIs and as a standalone app.

One module for gradio 3.41 (A1111, reForge), 3.43 (SD.Next), 4.40 (Forge) and the newest (standalone). It
keeps to what all of them share: components built from constructor arguments, `gr.update(...)` for
changes, and the few version-specific keywords passed through `_supported`, `_js` and `_poll`. Everything
the host differs in (which model, where files go, progress mirroring) is behind `Backend`; the training itself
runs in `ti_core.jobs.TrainingJob`, which the page polls.

Standalone: ``python extension.py --model PATH_OR_HUB_ID`` (or ``--models-dir FOLDER``), then open
http://127.0.0.1:7860.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import html
import inspect
import io
import math
import re
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `python extension.py` from elsewhere, or a host that dropped the ext dir
    sys.path.insert(0, str(ROOT))

from ti_core.embedding import MAX_VECTORS  # noqa: E402  (light: torch only)
from ti_core.jobs import TrainingJob, current_job  # noqa: E402

GRADIO_MAJOR = int(re.match(r"\d+", gr.__version__).group())
PROMPT_TOKENS = 75  # tokens in one prompt window; an embedding's vectors use that many of them
NO_MODEL_HELP = (
    "No model is loaded. Start the app with `--model` (a diffusers folder, a .safetensors/.ckpt file or a "
    "hub id) or `--models-dir` (a folder of checkpoints to pick from)."
)

# ================================================================================================ backends


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
        """Wraps a whole training run (a host frees its own model from the GPU and restores it after)."""
        return contextlib.nullcontext()

    def report(self, snapshot: dict) -> None:
        """Called on every training event with `TrainingJob.snapshot()` (a host mirrors it in its progress)."""

    def interrupt_requested(self) -> bool:
        """True when the host's own Interrupt button was pressed."""
        return False


class StandaloneBackend(Backend):
    """The standalone app: a model from --model or picked from --models-dir, loaded on first use."""

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
    ) -> None:
        super().__init__(embeddings_dir, log_dir, templates_dir)
        self.models_dir = Path(models_dir) if models_dir else None
        self._lock = threading.Lock()
        self._model = None
        self._sources: dict[str, str] = {}
        choices = self.model_choices()
        self.selected: str | None = model if model else (choices[0] if choices else None)
        if model:
            self._sources.setdefault(model, model)

    def model_choices(self) -> list[str]:
        """The --model source (if any), then the checkpoints in --models-dir, as dropdown labels."""
        sources: dict[str, str] = {}
        for label, source in self._sources.items():
            if source == label:  # the --model argument
                sources[label] = source
        for path in find_checkpoints(self.models_dir) if self.models_dir else []:
            sources[str(path.relative_to(self.models_dir))] = str(path)
        self._sources = sources
        return list(sources)

    def select_model(self, label: str | None) -> str:
        """Pick a model; it is loaded when first needed. Returns the status line."""
        if label and label != self.selected:
            with self._lock:
                self.selected = label
                self._model = None
        return self.status_text()

    def status_text(self) -> str:
        if self.selected is None:
            return NO_MODEL_HELP
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


# ============================================================================================ gradio compat


def _supported(factory: Callable, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments `factory` names in its signature (drops those this gradio lacks)."""
    parameters = inspect.signature(factory).parameters
    return {key: value for key, value in kwargs.items() if key in parameters}


def _make(cls, **kwargs: Any):
    """A component built with only the arguments this gradio version knows."""
    return cls(**_supported(cls.__init__, **kwargs))


def _js(code: str) -> dict[str, str]:
    """The keyword for a client-side function: `_js` on gradio 3, `js` from 4 on."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def _poll(demo, fn: Callable, inputs: list, outputs: list, seconds: float) -> None:
    """Call `fn` every `seconds` while the page is open: gr.Timer where it exists (4.40+), else a load
    event with `every=` (gradio 3, which needs the queue; the hosts and `main` enable it)."""
    if hasattr(gr, "Timer"):
        timer = gr.Timer(seconds)
        timer.tick(fn, inputs, outputs, show_progress="hidden")
    else:
        demo.load(fn, inputs, outputs, every=seconds, show_progress="hidden")


def _status(text: str, kind: str = "info") -> str:
    """One status line as HTML (plain text would turn underscores in paths into emphasis in Markdown)."""
    return f'<div class="ti-status ti-status-{kind}">{html.escape(text)}</div>' if text else ""


def _error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return _status(lines[0] if lines else type(error).__name__, "error")


# ================================================================================================= views


def budget_text(vectors: int) -> str:
    """What N vectors per token cost in a prompt window."""
    vectors = int(vectors)
    return (
        f"{vectors} vector{'s' if vectors != 1 else ''} per token: using this embedding takes {vectors} of the "
        f"{PROMPT_TOKENS} tokens in a prompt window, {PROMPT_TOKENS - vectors} left"
    )


def init_text_info(tokenizer, init_text: str, vectors: int) -> str:
    """How many tokens the init text has and how they fill the vectors (A1111's spread rule)."""
    from ti_core.prompt import token_count

    if not init_text.strip():
        return "Empty init text: the vectors start at zero."
    count = token_count(tokenizer, init_text)
    tokens = f"Init text: {count} token{'s' if count != 1 else ''}"
    if count == vectors:
        return f"{tokens}, one per vector."
    if count < vectors:
        return f"{tokens}, repeated to fill {vectors} vectors."
    return f"{tokens}; only {vectors} of them start the {vectors} vector{'s' if vectors != 1 else ''}."


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def progress_html(snapshot: dict | None) -> str:
    """The progress bar with step, speed, ETA, loss and learning rate."""
    if not snapshot:
        return '<div class="ti-progress ti-idle">No training run yet.</div>'
    step, total = int(snapshot.get("step") or 0), int(snapshot.get("total") or 0)
    percent = 100.0 * step / total if total else 0.0
    parts = [f"Step {step} / {total}"]
    if snapshot.get("steps_per_second"):
        parts.append(f"{snapshot['steps_per_second']:.2f} steps/s")
    if snapshot.get("running"):
        parts.append(f"ETA {format_duration(snapshot.get('eta_seconds'))}")
    else:
        parts.append(f"took {format_duration(snapshot.get('elapsed_seconds'))}")
    if snapshot.get("loss") is not None:
        parts.append(f"loss {snapshot['loss']:.4f}")
    if snapshot.get("validation_loss") is not None:
        parts.append(f"validation loss {snapshot['validation_loss']:.4f}")
    if snapshot.get("lr") is not None:
        parts.append(f"lr {snapshot['lr']:.3g}")
    state = "running" if snapshot.get("running") else (snapshot.get("stopped") or "finished")
    # While running, the trainer's latest message ("Saved …", "Preview …"); at the end the status line has it.
    message = snapshot.get("message") if snapshot.get("running") else ""
    message = f'<div class="ti-progress-message">{html.escape(message)}</div>' if message else ""
    return (
        f'<div class="ti-progress ti-{html.escape(state)}">'
        f'<div class="ti-progress-bar" role="progressbar" aria-valuemin="0" aria-valuemax="{total}" '
        f'aria-valuenow="{step}"><div class="ti-progress-fill" style="width: {percent:.1f}%"></div></div>'
        f'<div class="ti-progress-text">{html.escape(" · ".join(parts))}</div>'
        f"{message}</div>"
    )


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


# ----------------------------------------------------------------------------------------- embeddings view


@dataclass
class CardInfo:
    """What one embedding card shows."""

    name: str
    path: Path
    vectors: int | None = None
    step: int | None = None
    architecture: str = ""
    base_model: str = ""
    fits: bool | None = None  # None: no model to compare with
    fit_text: str = ""
    preview: Path | None = None
    error: str = ""


def describe_widths(widths: dict[str, int]) -> str:
    return " + ".join(f"{key} {width}" for key, width in widths.items())


def preview_path(path: Path) -> Path | None:
    """`<name>.preview.png`, else `<name>.png` (unless that is the embedding itself), as the web UIs look."""
    for candidate in (path.with_name(f"{path.stem}.preview.png"), path.with_name(f"{path.stem}.png")):
        if candidate != path and candidate.is_file():
            return candidate
    return None


_card_cache: dict[str, tuple[tuple, CardInfo]] = {}


def card_info(path: Path, model_widths: dict[str, int] | None) -> CardInfo:
    """The card of one embedding file, read again only when the file changed (a refresh of a big folder
    is then cheap). The preview image is looked up every time: training writes it after the file."""
    try:
        stat = path.stat()
    except OSError:
        return _read_card(path, model_widths)
    key = (stat.st_mtime_ns, stat.st_size, tuple(sorted((model_widths or {}).items())))
    cached = _card_cache.get(str(path))
    if cached is None or cached[0] != key:
        cached = _card_cache[str(path)] = (key, _read_card(path, model_widths))
    return dataclasses.replace(cached[1], preview=preview_path(path))


def _read_card(path: Path, model_widths: dict[str, int] | None) -> CardInfo:
    """Read one embedding file for its card; a file that cannot be read becomes a card with the reason."""
    from ti_core.formats import load_embedding
    from ti_core.inspect import architecture_guess

    card = CardInfo(name=path.stem, path=path)
    try:
        embedding = load_embedding(path)
    except ValueError as error:
        card.error = str(error).splitlines()[0]
        return card
    card.name, card.vectors, card.step = embedding.name, embedding.num_vectors, embedding.step
    card.architecture = embedding.metadata.get("architecture") or architecture_guess(embedding)
    card.base_model = embedding.metadata.get("base_model") or embedding.metadata.get("sd_checkpoint_name") or ""
    if model_widths is not None:
        card.fits, card.fit_text = _fit(path, embedding, model_widths)
    return card


def _fit(path: Path, embedding, model_widths: dict[str, int]) -> tuple[bool, str]:
    """Whether the embedding's vectors are as wide as the model's text encoders (or it is not usable)."""
    from ti_core.formats import load_embedding

    try:  # with the model's widths a single-tensor file is matched to the encoder of its width
        fitted = load_embedding(path, widths=model_widths)
        if fitted.widths == model_widths:
            return True, "fits this model"
    except ValueError:
        pass
    return (
        False,
        f"does not fit: the model needs {describe_widths(model_widths)}, this has {describe_widths(embedding.widths)}",
    )


_thumb_cache: dict[tuple[str, int], str] = {}


def thumbnail_uri(path: Path, size: int = 192) -> str | None:
    """A small JPEG data URI (inline, so no version's file-serving rules are involved); cached by mtime."""
    from PIL import Image

    try:
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _thumb_cache:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
            _thumb_cache[key] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return _thumb_cache[key]
    except OSError:
        return None


def cards_html(cards: Sequence[CardInfo], model_label: str) -> str:
    """The card grid. Each card is a <button> (keyboard reachable); ti.js toggles its token in the prompt."""
    if not cards:
        return (
            '<div class="ti-cards-empty">No embeddings yet: create one in the Create tab, or put embedding files '
            "into the embeddings folder and press Refresh.</div>"
        )
    items = [_card_html(card) for card in cards]
    return (
        f'<div class="ti-cards-note">{len(cards)} embedding{"s" if len(cards) != 1 else ""} · model: '
        f"{html.escape(model_label)} · click a card to add its token to the prompt, click again to remove it</div>"
        f'<div class="ti-cards" role="list">{"".join(items)}</div>'
        '<div id="ti_embeddings_insert_status" class="ti-insert-status" aria-live="polite"></div>'
    )


def _card_html(card: CardInfo) -> str:
    name = html.escape(card.name, quote=True)
    image = thumbnail_uri(card.preview) if card.preview else None
    picture = (
        f'<img class="ti-card-image" src="{image}" alt="" loading="lazy">'
        if image
        else f'<span class="ti-card-image ti-card-noimage" aria-hidden="true">{html.escape(card.name[:1].upper())}</span>'
    )
    if card.error:
        return (
            f'<div class="ti-card ti-card-broken" role="listitem" title="{html.escape(card.error, quote=True)}">'
            f'{picture}<span class="ti-card-name">{name}</span>'
            f'<span class="ti-card-meta ti-card-error">{html.escape(card.error)}</span></div>'
        )
    fit_class = {True: "ti-fits", False: "ti-misfit", None: "ti-fit-unknown"}[card.fits]
    fit_text = card.fit_text or "no model loaded to compare with"
    meta = f"{card.vectors} vector{'s' if card.vectors != 1 else ''} · step {card.step}"
    origin = " · ".join(part for part in (card.architecture, card.base_model and f"base {card.base_model}") if part)
    return (
        f'<button type="button" class="ti-card {fit_class}" role="listitem" data-ti-name="{name}" '
        f'title="Add {name} to the prompt (click again to remove it)">'
        f'{picture}<span class="ti-card-name">{name}</span>'
        f'<span class="ti-card-meta">{html.escape(meta)}</span>'
        f'<span class="ti-card-meta">{html.escape(origin)}</span>'
        f'<span class="ti-card-fit">{html.escape(fit_text)}</span></button>'
    )


def embedding_names(embeddings_dir: Path) -> list[str]:
    """Tokens of the embedding files in the folder (the file stem, as the web UIs use)."""
    from ti_core.formats import list_embeddings

    return sorted({path.stem for path in list_embeddings(embeddings_dir)}, key=str.lower)


def inspect_html(path: Path, model) -> str:
    """Norms per vector and, with a model, the nearest vocabulary tokens, as an HTML table."""
    from ti_core.formats import load_embedding
    from ti_core.inspect import nearest_tokens

    embedding = load_embedding(path, widths=model.widths if model is not None else None)
    nearest = nearest_tokens(model, embedding) if model is not None else {}
    rows = []
    for key, tensor in embedding.vectors.items():
        norms = tensor.float().norm(dim=1).tolist()
        for index, norm in enumerate(norms):
            tokens = ", ".join(f"{token} ({score:.2f})" for token, score in nearest.get(key, [[]] * len(norms))[index])
            rows.append(
                f"<tr><td>{html.escape(key)}</td><td>{index}</td><td>{norm:.4f}</td>"
                f"<td>{html.escape(tokens or '–')}</td></tr>"
            )
    note = "" if model is not None else "<p>Load a model to see the nearest vocabulary tokens.</p>"
    head = (
        f"<p><b>{html.escape(embedding.name)}</b>: {embedding.num_vectors} vectors, step {embedding.step}, "
        f"{html.escape(describe_widths(embedding.widths))} · {html.escape(str(path))}</p>{note}"
    )
    table = (
        '<table class="ti-inspect"><thead><tr><th>encoder</th><th>vector</th><th>norm</th>'
        f"<th>nearest tokens (cosine)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return head + table


# ================================================================================================ actions


def _tokenizer(backend: Backend):
    model = backend.loaded_model()
    if model is not None:
        return model.tokenizer
    from ti_core.vocab import clip_tokenizer  # every SD model uses CLIP's vocabulary; only padding differs

    return clip_tokenizer()


def _init_info(backend: Backend, text: str, vectors: float) -> str:
    try:
        return _status(init_text_info(_tokenizer(backend), text or "", int(vectors)))
    except (ValueError, OSError) as error:  # no CLIP vocabulary installed: say so instead of failing
        return _error(error)


def _dropdown_names(backend: Backend, selected: str | None = None):
    names = embedding_names(backend.embeddings_dir)
    value = selected if selected in names else (names[0] if names else None)
    return gr.update(choices=names, value=value)


def create_action(backend: Backend, name: str, init_text: str, vectors: float, overwrite: bool):
    """Create button: write the embedding file, tell the host, select it in the Train tab."""
    from ti_core.create import create_embedding
    from ti_core.formats import refuse_name_clash, save_embedding
    from ti_core.names import embedding_path

    vectors = int(vectors)
    try:
        target = embedding_path(backend.embeddings_dir, name)
        if target.exists() and not overwrite:
            raise ValueError(f"{target.name} already exists in {target.parent}; tick Overwrite to replace it")
        refuse_name_clash(Path(backend.embeddings_dir), name, target)
        embedding = create_embedding(backend.current_model(), name, init_text, vectors)
        path = save_embedding(embedding, backend.embeddings_dir, overwrite=overwrite)
    except (ValueError, OSError) as error:
        return _error(error), gr.update()
    backend.reload_embeddings()
    text = f"Created {embedding.name} ({vectors} vectors, {PROMPT_TOKENS - vectors} prompt tokens left): {path}"
    return _status(text, "ok"), _dropdown_names(backend, embedding.name)


# Train tab field -> TrainConfig key ("data.x" for DataConfig). The handler receives the components' values
# in this order, so adding a setting is one line here plus its component.
TRAIN_FIELDS = (
    "data.images",
    "data.recursive",
    "data.template",
    "learning_rate",
    "batch_size",
    "gradient_accumulation",
    "steps",
    "data.resolution",
    "data.buckets",
    "data.flip",
    "data.shuffle_tags",
    "data.tag_dropout",
    "data.latent_sampling",
    "mixed_precision",
    "gradient_checkpointing",
    "save_every",
    "preview_every",
    "preview_prompt",
    "preview_seed",
    "preview_steps",
    "warmup_steps",
    "grad_clip",
    "grad_clip_value",
    "seed",
)


def train_settings(values: Sequence[Any], *, name: str, backend: Backend, resume: bool) -> dict[str, Any]:
    """The TrainConfig dict for the Train tab's values (the same dict the CLI and settings.json use)."""
    settings: dict[str, Any] = {
        "name": name or "",
        "embeddings_dir": str(backend.embeddings_dir),
        "log_dir": str(backend.log_dir),
        "resume": resume,
        "data": {},
    }
    for key, value in zip(TRAIN_FIELDS, values, strict=True):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # gradio 3 sliders and numbers give 8.0 for 8
        if isinstance(value, str) and key != "preview_prompt":
            value = value.strip()
        if key.startswith("data."):
            settings["data"][key[5:]] = value
        else:
            settings[key] = value
    return settings


def start_training(backend: Backend, resume: bool, name: str | None, *values: Any) -> str:
    """Train/Resume buttons: validate the settings into a TrainConfig and start the background job."""
    from ti_core.config import TrainConfig

    if not name:
        return _status("Pick an embedding to train (create one in the Create tab first).", "error")
    try:
        trained_to = _trained_step(backend, name)
        if trained_to and not resume:
            raise ValueError(
                f"{name} is already trained to step {trained_to}: press Resume to continue it (with more steps), "
                "or create a new embedding to start again"
            )
        # An untrained embedding (step 0, as Create wrote it) is "resumed" from its initial vectors: train()
        # only re-creates an embedding from the init text when told to overwrite it.
        config = TrainConfig.from_dict(train_settings(values, name=name, backend=backend, resume=True))
        TrainingJob.start(backend.current_model, config, _host_observer(backend), context=backend.training_context)
    except (ValueError, RuntimeError) as error:
        return _error(error)
    verb = "Resuming" if resume else "Training"
    return _status(f"{verb} {config.name} to step {config.steps}…")


def _host_observer(backend: Backend) -> Callable[[Any], None]:
    """On every training event: mirror the progress into the host, and honour the host's Interrupt button."""

    def on_event(_event) -> None:
        job = current_job()  # the job this event belongs to: one runs at a time
        if job is None:
            return
        backend.report(job.snapshot())
        if backend.interrupt_requested():
            job.cancel()

    return on_event


def _trained_step(backend: Backend, name: str) -> int:
    """The step an existing embedding file was trained to (0 for a new one); ValueError if it is missing."""
    from ti_core.formats import load_embedding
    from ti_core.names import embedding_path

    path = embedding_path(backend.embeddings_dir, name)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: create the embedding in the Create tab first (or press Refresh)")
    return load_embedding(path).step


def interrupt_training() -> str:
    job = current_job()
    if job is None or not job.running:
        return _status("No training run is in progress.")
    job.cancel()
    return _status("Interrupting: the run stops after this step and saves the embedding.")


def poll_training(seen: dict | None):
    """The timer's tick: redraw the progress widgets only for what changed since this page last saw."""
    seen = dict(seen or {})
    job = current_job()
    snapshot = job.snapshot() if job is not None else None
    version = snapshot["version"] if snapshot else 0
    if version == seen.get("version"):
        return (gr.update(),) * 8 + (seen,)
    seen["version"] = version
    if snapshot is None:
        return (
            progress_html(None),
            gr.update(),
            gr.update(),
            gr.update(),
            gr.update(),
            gr.update(interactive=True),
            gr.update(interactive=True),
            gr.update(interactive=False),
            seen,
        )
    plot = gr.update()
    if len(snapshot["losses"]) != seen.get("losses") or not snapshot["running"]:
        seen["losses"] = len(snapshot["losses"])
        plot = loss_plot(snapshot["losses"])
    gallery = gr.update()
    if len(snapshot["previews"]) != seen.get("previews"):
        seen["previews"] = len(snapshot["previews"])
        gallery = _preview_items(snapshot["previews"])
    running = snapshot["running"]
    status = gr.update()
    if not running:
        kind = "ok" if snapshot.get("stopped") == "done" else ("error" if snapshot.get("error") else "info")
        status = _status(snapshot.get("message") or "", kind)
    return (
        progress_html(snapshot),
        plot,
        gallery,
        status,
        snapshot.get("final_path") or "",
        gr.update(interactive=not running),
        gr.update(interactive=not running),
        gr.update(interactive=running),
        seen,
    )


def _preview_items(paths: Sequence[str]) -> list:
    """Preview images as (image, caption) pairs, newest first. PIL images, because gradio 4+ refuses to
    serve files from folders it was not told about, and a host's log folder may be anywhere."""
    from PIL import Image

    items = []
    for path in reversed(paths[-24:]):
        try:
            with Image.open(path) as image:
                items.append((image.convert("RGB"), Path(path).stem))
        except OSError:
            continue
    return items


def scan_action(folder: str, recursive: bool, resolution: float, buckets: bool):
    """The dataset preview: thumbnails with captions, and the count of skipped files with reasons."""
    from PIL import Image

    from ti_core.data import DataConfig, scan_images

    hidden = gr.update(value=[], visible=False)
    if not (folder or "").strip():
        return _status("Enter the folder of training images."), hidden
    try:
        result = scan_images(
            DataConfig(
                images=Path(folder.strip()),
                recursive=bool(recursive),
                resolution=int(resolution),
                buckets=bool(buckets),
            )
        )
    except (ValueError, OSError) as error:
        return _error(error), hidden
    thumbs = []
    for item in result.items[:32]:
        try:
            with Image.open(item.path) as image:
                image = image.convert("RGB")
                image.thumbnail((160, 160))
                thumbs.append((image, item.caption[:120]))
        except OSError:
            continue
    lines = [f"{len(result.items)} image{'s' if len(result.items) != 1 else ''} in {folder.strip()}"]
    if len(result.items) > len(thumbs):
        lines[0] += f" (showing {len(thumbs)})"
    if result.skipped:
        lines.append(
            f"{len(result.skipped)} skipped: " + "; ".join(f"{p.name}: {why}" for p, why in result.skipped[:10])
        )
        if len(result.skipped) > 10:
            lines[-1] += f"; and {len(result.skipped) - 10} more"
    kind = "warning" if result.skipped else "ok"
    return "".join(_status(line, kind) for line in lines), gr.update(value=thumbs, visible=True)


def library_action(backend: Backend):
    """Refresh of the Embeddings tab: cards and the inspect picker."""
    from ti_core.formats import list_embeddings

    model = backend.loaded_model()
    widths = model.widths if model is not None else None
    cards = [card_info(path, widths) for path in list_embeddings(backend.embeddings_dir)]
    names = sorted({card.name for card in cards if not card.error}, key=str.lower)
    return cards_html(cards, backend.model_label()), gr.update(choices=names, value=names[0] if names else None)


def inspect_action(backend: Backend, name: str | None) -> str:
    from ti_core.formats import list_embeddings

    if not name:
        return _status("Pick an embedding to inspect.")
    paths = [path for path in list_embeddings(backend.embeddings_dir) if path.stem == name]
    if not paths:
        return _status(f"No embedding named {name} in {backend.embeddings_dir}; press Refresh.", "error")
    try:
        return inspect_html(paths[0], backend.loaded_model())
    except ValueError as error:
        return _error(error)


# ------------------------------------------------------------------------------------------------- try it

_fitting_cache: dict[str, tuple[tuple, Any]] = {}


def fitting_embeddings(embeddings_dir: Path, model) -> list:
    """Every embedding in the folder that fits the model (others are skipped, as the web UIs skip them).
    Files are read again only when they change."""
    from ti_core.formats import list_embeddings

    embeddings = {}
    for path in list_embeddings(embeddings_dir):
        embedding = _fitting(path, model.widths)
        if embedding is not None:
            embeddings[embedding.name] = embedding  # a later file with the same token wins, as in A1111
    return list(embeddings.values())


def _fitting(path: Path, widths: dict[str, int]):
    from ti_core.formats import load_embedding

    try:
        stat = path.stat()
    except OSError:
        return None
    key = (stat.st_mtime_ns, stat.st_size, tuple(sorted(widths.items())))
    cached = _fitting_cache.get(str(path))
    if cached is None or cached[0] != key:
        try:
            embedding = load_embedding(path, widths=widths)
            embedding = embedding if embedding.widths == widths else None
        except ValueError:
            embedding = None
        cached = _fitting_cache[str(path)] = (key, embedding)
    return cached[1]


def render_image(
    model,
    prompt: str,
    negative: str,
    embeddings: Sequence,
    *,
    seed: int,
    steps: int,
    width: int,
    height: int,
    guidance: float,
):
    """One image from the model's own pipeline, conditioned by our prompt encoder (tokens never added to
    the tokenizer, so the files on disk stay the only source of embeddings)."""
    import torch

    from ti_core.prompt import encode_prompts

    pipeline = model.pipeline()
    if torch.cuda.is_available():
        pipeline.to("cuda")
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        condition = encode_prompts(model, [prompt, negative], embeddings)  # one batch: same window count
        extra = {}
        if condition.pooled is not None:
            extra = {
                "pooled_prompt_embeds": condition.pooled[:1],
                "negative_pooled_prompt_embeds": condition.pooled[1:],
            }
        result = pipeline(
            prompt_embeds=condition.hidden_states[:1],
            negative_prompt_embeds=condition.hidden_states[1:],
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            **extra,
        )
    return result.images[0]


def try_action(
    backend: Backend,
    prompt: str,
    negative: str,
    seed: float,
    steps: float,
    width: float,
    height: float,
    guidance: float,
):
    job = current_job()
    if job is not None and job.running:
        return None, _status("Training is running on this model; generate after it finishes.", "error")
    try:
        model = backend.current_model()
        embeddings = fitting_embeddings(backend.embeddings_dir, model)
        image = render_image(
            model,
            prompt or "",
            negative or "",
            embeddings,
            seed=int(seed),
            steps=int(steps),
            width=int(width),
            height=int(height),
            guidance=float(guidance),
        )
    except (ValueError, RuntimeError, OSError) as error:
        return None, _error(error)
    used = [e.name for e in embeddings if re.search(rf"(?<![\w-]){re.escape(e.name)}(?![\w-])", prompt or "", re.I)]
    note = f" with {', '.join(used)}" if used else ""
    return image, _status(f"{model.name}: seed {int(seed)}, {int(steps)} steps{note}", "ok")


# ================================================================================================= layout


def _refresh_button(elem_id: str):
    return _make(gr.Button, value="Refresh", elem_id=elem_id, size="sm", scale=0, min_width=100)


CREATE_HELP = """
**How it works.** An embedding is a new word for the text encoder: its *name* is the token you type in a
prompt, and it stands for *N vectors* learned from your images in the Train tab.

- **Initialization text** gives the starting vectors: the token vectors of a word close to your subject
  (say *cat* or *watercolor*), spread over the N vectors. Empty text starts from zeros.
- **Vectors per token**: more vectors hold more detail but learn slower and use more of the
  75-token prompt window. 1 to 8 is usual for a subject, more for a style.
"""


def _create_tab(backend: Backend) -> Callable[[Any], None]:
    """The Create tab; returns a function that wires the Create button once the Train picker exists."""
    with gr.Row():
        with gr.Column():
            name = _make(gr.Textbox, label="Name (the token you type in prompts)", elem_id="ti_create_name")
            init_text = _make(gr.Textbox, label="Initialization text", value="*", elem_id="ti_create_init_text")
            init_info = _make(gr.HTML, value=_init_info(backend, "*", 1), elem_id="ti_create_init_info")
            vectors = _make(
                gr.Slider,
                minimum=1,
                maximum=MAX_VECTORS,
                step=1,
                value=1,
                label="Vectors per token",
                elem_id="ti_create_vectors",
            )
            budget = _make(gr.HTML, value=_status(budget_text(1)), elem_id="ti_create_budget")
            overwrite = _make(
                gr.Checkbox,
                label="Overwrite an existing embedding of that name",
                value=False,
                elem_id="ti_create_overwrite",
            )
            button = _make(gr.Button, value="Create embedding", variant="primary", elem_id="ti_create_button")
            status = _make(gr.HTML, value="", elem_id="ti_create_status")
        with _make(gr.Column, scale=0, min_width=320):
            _make(gr.Markdown, value=CREATE_HELP, elem_id="ti_create_help")

    def info(text: str, count: float) -> str:
        return _init_info(backend, text, count)

    init_text.change(info, [init_text, vectors], init_info, show_progress="hidden")
    vectors.change(info, [init_text, vectors], init_info, show_progress="hidden")
    vectors.change(lambda count: _status(budget_text(count)), vectors, budget, show_progress="hidden")

    def wire(train_embedding) -> None:
        button.click(
            lambda *args: create_action(backend, *args),
            [name, init_text, vectors, overwrite],
            [status, train_embedding],
        )

    return wire


def _precision_default(backend: Backend) -> str:
    choice = getattr(backend, "mixed_precision", "no")
    return choice if choice in ("no", "fp16", "bf16") else "no"


def _train_settings_column(backend: Backend) -> tuple[Any, list, list]:
    """The settings column; returns the embedding picker, the components in TRAIN_FIELDS order, and the
    scan inputs."""
    from ti_core.data import BUILTIN_TEMPLATES, LATENT_SAMPLING

    names = embedding_names(backend.embeddings_dir)
    with gr.Row():
        embedding = _make(
            gr.Dropdown,
            choices=names,
            value=names[0] if names else None,
            label="Embedding",
            elem_id="ti_train_embedding",
            scale=4,
        )
        refresh = _refresh_button("ti_train_refresh")
    refresh.click(lambda current: _dropdown_names(backend, current), embedding, embedding)
    with gr.Row():
        images = _make(
            gr.Textbox,
            label="Dataset folder",
            placeholder="folder of images (+ optional .txt captions)",
            elem_id="ti_train_dataset",
            scale=4,
        )
        recursive = _make(gr.Checkbox, label="Subfolders", value=False, elem_id="ti_train_recursive", scale=1)
        scan = _make(gr.Button, value="Preview", size="sm", elem_id="ti_train_dataset_scan", scale=0, min_width=90)
    dataset_info = _make(gr.HTML, value="", elem_id="ti_train_dataset_info")
    dataset_preview = _make(
        gr.Gallery,
        label="Dataset",
        show_label=False,
        columns=8,
        height=180,
        object_fit="cover",
        allow_preview=False,
        visible=False,
        elem_id="ti_train_dataset_preview",
    )
    templates = list(BUILTIN_TEMPLATES)
    if backend.templates_dir and Path(backend.templates_dir).is_dir():
        templates += [str(path) for path in sorted(Path(backend.templates_dir).glob("*.txt"))]
    with gr.Row():
        template = _make(
            gr.Dropdown,
            choices=templates,
            value="subject_filewords",
            label="Prompt template",
            allow_custom_value=True,
            elem_id="ti_train_template",
        )
        learning_rate = _make(
            gr.Textbox,
            value="0.005",
            label="Learning rate (schedule: 0.005:100, 1e-3:1000, 1e-5)",
            elem_id="ti_train_learning_rate",
        )
    with gr.Row():
        batch = _make(gr.Number, value=1, precision=0, label="Batch size", elem_id="ti_train_batch", minimum=1)
        accumulation = _make(
            gr.Number, value=1, precision=0, label="Gradient accumulation", elem_id="ti_train_accumulation", minimum=1
        )
        steps = _make(gr.Number, value=2000, precision=0, label="Steps", elem_id="ti_train_steps", minimum=1)
    with gr.Row():
        resolution = _make(
            gr.Slider,
            minimum=32,
            maximum=2048,
            step=8,
            value=backend.default_resolution(),
            label="Resolution",
            elem_id="ti_train_resolution",
        )
        buckets = _make(gr.Checkbox, label="Aspect-ratio buckets", value=False, elem_id="ti_train_buckets")
        flip = _make(gr.Checkbox, label="Random horizontal flip", value=False, elem_id="ti_train_flip")
    with gr.Row():
        shuffle = _make(gr.Checkbox, label="Shuffle tags", value=False, elem_id="ti_train_shuffle_tags")
        dropout = _make(
            gr.Slider, minimum=0, maximum=1, step=0.05, value=0, label="Tag dropout", elem_id="ti_train_tag_dropout"
        )
        sampling = _make(
            gr.Dropdown,
            choices=list(LATENT_SAMPLING),
            value="once",
            label="Latent sampling",
            elem_id="ti_train_latent_sampling",
        )
    with gr.Row():
        precision = _make(
            gr.Dropdown,
            choices=["no", "fp16", "bf16"],
            value=_precision_default(backend),
            label="Mixed precision",
            elem_id="ti_train_precision",
        )
        checkpointing = _make(
            gr.Checkbox,
            label="Gradient checkpointing (less memory, slower)",
            value=False,
            elem_id="ti_train_gradient_checkpointing",
        )
    with gr.Row():
        save_every = _make(
            gr.Number,
            value=500,
            precision=0,
            label="Save a copy every N steps (0: never)",
            elem_id="ti_train_save_every",
            minimum=0,
        )
        preview_every = _make(
            gr.Number,
            value=500,
            precision=0,
            label="Preview every N steps (0: never)",
            elem_id="ti_train_preview_every",
            minimum=0,
        )
        preview_steps = _make(
            gr.Number,
            value=20,
            precision=0,
            label="Preview sampling steps",
            elem_id="ti_train_preview_steps",
            minimum=1,
        )
    with gr.Row():
        preview_prompt = _make(
            gr.Textbox,
            label="Preview prompt (empty: a template line with a caption)",
            elem_id="ti_train_preview_prompt",
            scale=3,
        )
        preview_seed = _make(gr.Number, value=0, precision=0, label="Preview seed", elem_id="ti_train_preview_seed")
    with _make(gr.Accordion, label="Advanced", open=False, elem_id="ti_train_advanced"), gr.Row():
        warmup = _make(gr.Number, value=0, precision=0, label="Warm-up steps", elem_id="ti_train_warmup", minimum=0)
        clip = _make(
            gr.Radio,
            choices=["disabled", "value", "norm"],
            value="disabled",
            label="Gradient clipping",
            elem_id="ti_train_grad_clip",
        )
        clip_value = _make(gr.Number, value=0.1, label="Clip at", elem_id="ti_train_grad_clip_value")
        seed = _make(gr.Number, value=0, precision=0, label="Seed", elem_id="ti_train_seed")
    fields = [
        images,
        recursive,
        template,
        learning_rate,
        batch,
        accumulation,
        steps,
        resolution,
        buckets,
        flip,
        shuffle,
        dropout,
        sampling,
        precision,
        checkpointing,
        save_every,
        preview_every,
        preview_prompt,
        preview_seed,
        preview_steps,
        warmup,
        clip,
        clip_value,
        seed,
    ]
    scan_inputs = [images, recursive, resolution, buckets]
    for trigger in (scan.click, images.submit, recursive.change):
        trigger(scan_action, scan_inputs, [dataset_info, dataset_preview])
    return embedding, fields, scan_inputs


def _train_tab(demo, backend: Backend):
    with gr.Row():
        with _make(gr.Column, scale=5, elem_id="ti_train_settings"):
            embedding, fields, _ = _train_settings_column(backend)
        with _make(gr.Column, scale=4, elem_id="ti_train_results"):
            with gr.Row():
                train = _make(gr.Button, value="Train", variant="primary", elem_id="ti_train_button")
                interrupt = _make(gr.Button, value="Interrupt", interactive=False, elem_id="ti_train_interrupt")
                resume = _make(gr.Button, value="Resume", elem_id="ti_train_resume")
            status = _make(gr.HTML, value="", elem_id="ti_train_status")
            progress = _make(gr.HTML, value=progress_html(None), elem_id="ti_train_progress")
            plot = _make(
                gr.Image,
                value=loss_plot([]),
                type="pil",
                label="Loss",
                show_label=False,
                interactive=False,
                elem_id="ti_train_loss_plot",
            )
            previews = _make(
                gr.Gallery, label="Previews", columns=4, height=260, object_fit="contain", elem_id="ti_train_previews"
            )
            result = _make(gr.Textbox, label="Embedding file", interactive=False, elem_id="ti_train_result")
    inputs = [embedding, *fields]
    train.click(lambda *values: _start_from_values(backend, False, values), inputs, status)
    resume.click(lambda *values: _start_from_values(backend, True, values), inputs, status)
    interrupt.click(interrupt_training, None, status)
    seen = gr.State({})
    _poll(demo, poll_training, [seen], [progress, plot, previews, status, result, train, resume, interrupt, seen], 1.0)
    return embedding


def _start_from_values(backend: Backend, resume: bool, values: Sequence[Any]) -> str:
    return start_training(backend, resume, values[0], *values[1:])


def _try_panel(backend: Backend) -> None:
    with _make(gr.Group, elem_id="ti_try"), gr.Row():
        with _make(gr.Column, scale=3):
            prompt = _make(
                gr.Textbox,
                label="Try it: prompt (click a card below to add its token)",
                lines=2,
                elem_id="ti_try_prompt",
            )
            negative = _make(gr.Textbox, label="Negative prompt", lines=1, elem_id="ti_try_negative")
            with gr.Row():
                seed = _make(gr.Number, value=0, precision=0, label="Seed", elem_id="ti_try_seed")
                steps = _make(
                    gr.Slider, minimum=1, maximum=100, step=1, value=20, label="Steps", elem_id="ti_try_steps"
                )
                guidance = _make(
                    gr.Slider, minimum=0, maximum=20, step=0.5, value=7, label="CFG scale", elem_id="ti_try_guidance"
                )
            with gr.Row():
                width = _make(
                    gr.Slider, minimum=64, maximum=2048, step=8, value=512, label="Width", elem_id="ti_try_width"
                )
                height = _make(
                    gr.Slider, minimum=64, maximum=2048, step=8, value=512, label="Height", elem_id="ti_try_height"
                )
            button = _make(gr.Button, value="Generate", variant="primary", elem_id="ti_try_button")
            status = _make(gr.HTML, value="", elem_id="ti_try_status")
        with _make(gr.Column, scale=2):
            image = _make(gr.Image, label="Result", type="pil", interactive=False, elem_id="ti_try_image")
    button.click(
        lambda *args: try_action(backend, *args),
        [prompt, negative, seed, steps, width, height, guidance],
        [image, status],
    )


def _embeddings_tab(backend: Backend):
    if backend.has_try_it:
        _try_panel(backend)
    with gr.Row():
        refresh = _refresh_button("ti_embeddings_refresh")
        _make(gr.HTML, value=_status(f"Folder: {backend.embeddings_dir}"), elem_id="ti_embeddings_folder")
    cards = _make(gr.HTML, value=cards_html([], ""), elem_id="ti_embeddings_list")
    with _make(gr.Accordion, label="Inspect", open=False, elem_id="ti_inspect"):
        with gr.Row():
            name = _make(gr.Dropdown, choices=[], label="Embedding", elem_id="ti_inspect_name", scale=4)
            button = _make(gr.Button, value="Inspect", elem_id="ti_inspect_button", scale=0, min_width=100)
        output = _make(gr.HTML, value="", elem_id="ti_inspect_output")
    refresh.click(lambda: library_action(backend), None, [cards, name])
    button.click(lambda chosen: inspect_action(backend, chosen), name, output)
    return cards, name


def _model_row(backend: StandaloneBackend) -> None:
    with gr.Row():
        choices = backend.model_choices()
        picker = _make(
            gr.Dropdown,
            choices=choices,
            value=backend.selected,
            label="Model",
            elem_id="ti_model",
            scale=4,
            interactive=bool(choices),
        )
        refresh = _refresh_button("ti_model_refresh")
    status = _make(
        gr.HTML,
        value=_status(backend.status_text(), "info" if backend.selected else "error"),
        elem_id="ti_model_status",
    )

    def refreshed(current):
        options = backend.model_choices()
        value = current if current in options else backend.selected if backend.selected in options else None
        return gr.update(choices=options, value=value, interactive=bool(options))

    picker.change(lambda label: _status(backend.select_model(label)), picker, status)
    refresh.click(refreshed, picker, picker)


def create_ui(backend: Backend):
    """The whole tab as a gr.Blocks: Create, Train, Embeddings (with Try it in the standalone app)."""
    with gr.Blocks(**_blocks_kwargs(backend)) as demo:
        with _make(gr.Column, elem_id="ti_root", elem_classes=["ti-root"]):
            problem = backend.problem()
            if problem:
                _make(gr.HTML, value=_status(problem, "error"), elem_id="ti_problem")
            if backend.has_model_picker:
                _model_row(backend)
            with gr.Tabs(elem_id="ti_tabs"):
                with _make(gr.Tab, label="Create", elem_id="ti_create_tab"):
                    wire_create = _create_tab(backend)
                with _make(gr.Tab, label="Train", elem_id="ti_train_tab"):
                    train_embedding = _train_tab(demo, backend)
                with _make(gr.Tab, label="Embeddings", elem_id="ti_embeddings_tab") as library_tab:
                    cards, inspect_name = _embeddings_tab(backend)
        wire_create(train_embedding)
        if backend.inject_assets:
            demo.load(None, None, None, **_js(_client_script()))
        # Filled when the tab is opened, not on page load: a web UI's page loads often, and a user's embeddings
        # folder may hold hundreds of files.
        library_tab.select(lambda: library_action(backend), None, [cards, inspect_name])
    return demo


def _css_goes_to_launch() -> bool:
    return "css" in inspect.signature(gr.Blocks.launch).parameters  # gradio 6 moved css from Blocks to launch


def _page_assets() -> dict[str, Any]:
    """The standalone page's css and theme. Before gradio 5 the default theme loads its fonts from Google;
    a local app has no business calling out, so those versions get the system fonts."""
    assets: dict[str, Any] = {"css": (ROOT / "style.css").read_text(encoding="utf-8")}
    if GRADIO_MAJOR < 5:
        assets["theme"] = gr.themes.Default(
            font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
        )
    return assets


def _blocks_kwargs(backend: Backend) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"analytics_enabled": False, "title": "Textual Inversion"}
    if backend.inject_assets and not _css_goes_to_launch():
        kwargs.update(_page_assets())
    return kwargs


def _client_script() -> str:
    """javascript/ti.js as a page-load function: the same file the hosts inject into <head>."""
    return "() => {\n" + (ROOT / "javascript" / "ti.js").read_text(encoding="utf-8") + "\n}"


# =================================================================================================== main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python extension.py",
        description="Textual Inversion: create, train and try embeddings in a local web app.",
    )
    parser.add_argument("--model", help="a diffusers folder, a .safetensors/.ckpt checkpoint or a hub id")
    parser.add_argument("--models-dir", type=Path, help="a folder of checkpoints to pick from")
    parser.add_argument("--embeddings-dir", type=Path, default=Path("embeddings"), help="default: ./embeddings")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path("textual_inversion"),
        help="previews, snapshots, loss log (default: ./textual_inversion)",
    )
    parser.add_argument("--templates-dir", type=Path, help="extra prompt templates (*.txt)")
    parser.add_argument("--port", type=int, default=7860, help="default: 7860")
    parser.add_argument(
        "--listen", action="store_true", help="serve on all interfaces (0.0.0.0), not only this machine"
    )
    return parser.parse_args(argv)


def launch(backend: Backend, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Build and serve the standalone app; with block=False return the running Blocks (for tests)."""
    demo = create_ui(backend)
    # gradio 3 runs one queued event at a time by default, so the progress poller would wait behind a render;
    # gradio 4 still names concurrency_count, but only to reject it.
    limits = _supported(demo.queue, default_concurrency_limit=4) or {"concurrency_count": 4}
    demo.queue(**limits)
    extra = _page_assets() if backend.inject_assets and _css_goes_to_launch() else {}
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        **_supported(demo.launch, show_api=False, quiet=not block),
        **extra,
    )
    return demo


def main(argv: Sequence[str] | None = None, *, block: bool = True):
    args = parse_args(argv)
    backend = StandaloneBackend(
        model=args.model,
        models_dir=args.models_dir,
        embeddings_dir=args.embeddings_dir,
        log_dir=args.log_dir,
        templates_dir=args.templates_dir,
    )
    if backend.selected is None:
        print(NO_MODEL_HELP, file=sys.stderr)
    return launch(backend, host="0.0.0.0" if args.listen else "127.0.0.1", port=args.port, block=block)


if __name__ == "__main__":
    main()
