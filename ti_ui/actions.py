"""What the buttons, pickers and the progress poller do: each action takes the components' values and
returns theirs (HTML from `render`, `gr.update(...)` for changes). Errors become one status line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gradio as gr

from ti_core.config import declared
from ti_core.jobs import TrainingJob, current_job
from ti_core.names import plural

from .backend import Backend
from .plot import loss_frame, norm_frame
from .render import (
    PROMPT_TOKENS,
    card_info,
    cards_html,
    embedding_names,
    error_html,
    init_text_info,
    inspect_html,
    progress_html,
    status_html,
)

if TYPE_CHECKING:
    from ti_core.timodel import TIModel


def _tokenizer(backend: Backend):
    model = backend.loaded_model()
    if model is not None:
        return model.tokenizer
    from ti_core.vocab import clip_tokenizer  # every SD model uses CLIP's vocabulary; only padding differs

    return clip_tokenizer()


def init_info_html(backend: Backend, text: str, vectors: float) -> str:
    try:
        return status_html(init_text_info(_tokenizer(backend), text or "", int(vectors)))
    except (ValueError, OSError) as error:  # no CLIP vocabulary installed: say so instead of failing
        return error_html(error)


def dropdown_names(backend: Backend, selected: str | None = None):
    names = embedding_names(backend.embeddings_dir)
    value = selected if selected in names else default_embedding(backend, names)
    return gr.update(choices=names, value=value)


def default_embedding(backend: Backend, names: Sequence[str]) -> str | None:
    """The Train picker's choice when the user has made none: the embedding being trained, else the one written
    last (the one just created, or just trained), not the alphabetically first."""
    from ti_core.formats import list_embeddings

    job = current_job()
    if job is not None and job.running and job.config.name in names:
        return job.config.name
    newest: dict[str, float] = {}
    for path in list_embeddings(backend.embeddings_dir):
        try:
            newest[path.stem] = max(newest.get(path.stem, 0.0), path.stat().st_mtime)
        except OSError:
            continue
    candidates = [name for name in names if name in newest]
    return max(candidates, key=lambda name: newest[name]) if candidates else (names[0] if names else None)


def create_action(backend: Backend, name: str, init_text: str, vectors: float, overwrite: bool):
    """Create button: write the embedding file, tell the host, select it in the Train tab."""
    from ti_core.create import create_embedding_file

    try:
        vectors = _whole(vectors)  # a typed 0 or 76 is refused, not clamped
        embedding, path = create_embedding_file(
            backend.current_model, backend.embeddings_dir, name, init_text, vectors,
            overwrite=overwrite, overwrite_hint="tick Overwrite to replace it",
        )  # fmt: skip
    except (ValueError, OSError) as error:
        return error_html(error), gr.update()
    backend.reload_embeddings()
    text = (
        f"Created {embedding.name} ({plural(vectors, 'vector')}, {PROMPT_TOKENS - vectors} prompt tokens left): {path}"
    )
    return status_html(text, "ok") + name_warning_action(name), dropdown_names(backend, embedding.name)


def _whole(value: Any) -> Any:
    """8.0 -> 8 (gradio 3 sliders give floats); anything else as it is, for the check to name it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def name_warning_action(name: str) -> str:
    """As the name is typed: what would make it fail silently in some UI (the user may keep it), or why it
    cannot be a name at all."""
    from ti_core.names import name_warnings, validate_name

    if (name or "").strip():
        try:
            validate_name(name)
        except ValueError as error:
            return error_html(error)
    return "".join(status_html(f"warning: {warning}", "warning") for warning in name_warnings((name or "").strip()))


def export_action(backend: Backend, name: str | None, to: str, folder: str, overwrite: bool) -> str:
    """Export button: the picked embedding written for another tool into the chosen folder."""
    import html

    from ti_core.formats import diffusers_loading_code, export_embedding

    if not name:
        return status_html("Pick an embedding to export (press Refresh if the list is empty).")
    path = _embedding_file(backend, name)
    if path is None:
        return _missing(backend, name)
    out_dir = Path(folder.strip()) if folder and folder.strip() else default_export_dir(backend, to)
    try:
        written = export_embedding(path, to, out_dir, overwrite=bool(overwrite))
    except (ValueError, OSError) as error:
        return error_html(error)
    text = status_html(f"Exported {name} as {to}: {', '.join(str(path) for path in written)}", "ok")
    if to == "diffusers":
        code = diffusers_loading_code(written)
        text += f'<pre class="ti-export-code">{html.escape(code)}</pre>'
    return text


def default_export_dir(backend: Backend, to: str | None = None) -> Path:
    """Under the log folder, not the embeddings folder (a web UI would load an export there as a second
    embedding with the same token), one folder per format: ``exports/<format>`` (``exports`` without one)."""
    from ti_core.formats import default_export_dir as per_format

    return per_format(Path(backend.log_dir), to) if to else Path(backend.log_dir) / "exports"


# The settings the Train tab shows, by TrainConfig key ("data.x" for DataConfig), in declaration order
# (ti_core.settings): `train_settings` takes the tab's values by key, or in this order.
TRAIN_FIELDS = tuple(item.key for item in declared() if item.elem_id)


class PollUpdate(NamedTuple):
    """What one tick of the progress poller updates, by name (the tab wires each to its component)."""

    progress: Any
    plot: Any
    previews: Any
    status: Any
    result: Any
    train: Any
    resume: Any
    interrupt: Any
    norm_plot: Any
    seen: dict


def train_settings(values: Sequence[Any], *, name: str, backend: Backend, resume: bool) -> dict[str, Any]:
    """The TrainConfig dict for the Train tab's values (the same dict the CLI and settings.json use): one
    mapping of setting key to value, or the values in TRAIN_FIELDS order."""
    settings: dict[str, Any] = {
        "name": name or "",
        "embeddings_dir": str(backend.embeddings_dir),
        "log_dir": str(backend.log_dir),
        "resume": resume,
        "data": {},
    }
    if len(values) == 1 and isinstance(values[0], Mapping):
        pairs = list(values[0].items())
    else:
        pairs = list(zip(TRAIN_FIELDS, values, strict=True))
    for key, value in pairs:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # gradio 3 sliders and numbers give 8.0 for 8
        if isinstance(value, str) and key not in ("preview_prompt", "preview_negative_prompt"):
            value = value.strip()
        if key.startswith("data."):
            settings["data"][key[5:]] = value
        else:
            settings[key] = value
    return settings


def start_training(backend: Backend, resume: bool, name: str | None, *values: Any, previews_note: str = "") -> str:
    """Train/Resume buttons: validate the settings into a TrainConfig and start the background job.
    `previews_note` (where the previews' settings came from) follows the started run's status line."""
    from ti_core.config import TrainConfig

    if not name:
        return status_html("Pick an embedding to train (create one in the Create tab first).", "error")
    try:
        _require_file(backend, name)
        settings = train_settings(values, name=name, backend=backend, resume=resume)
        _check_trainable(TrainConfig.from_dict(settings), name)
        # An untrained embedding (step 0, as Create wrote it) is "resumed" from its initial vectors: train()
        # only re-creates an embedding from the init text when told to overwrite it.
        config = TrainConfig.from_dict({**settings, "resume": True})
        _check_optimizer(config)
        _check_images(config)  # before the model loads, and before anything is written
        TrainingJob.start(backend.current_model, config, context=backend.training_context)
    except (ValueError, OSError, RuntimeError) as error:
        return error_html(error)
    verb = "Resuming" if resume else "Training"
    return status_html(f"{verb} {config.name} to step {config.steps}…") + previews_note


def txt2img_previews(
    backend: Backend, values: Mapping[str, Any], txt2img: Mapping[str, Any]
) -> tuple[dict[str, Any], str]:
    """The Train tab's values (by setting key) with the preview settings taken from the host's txt2img tab
    (`txt2img`: its components' values by name), and one status line saying what the previews use."""
    fields = {key: value for key, value in values.items() if key.startswith("preview_")}
    taken, notes = backend.txt2img_preview_settings(dict(txt2img), fields)
    merged = {**values, **taken}
    shown = {key: _whole(merged.get(key)) for key in fields}
    width, height = shown.get("preview_width"), shown.get("preview_height")
    size = f"{width or 'training'}x{height or 'training'}" if width or height else "the training size"
    summary = (
        f"Previews from the txt2img tab: {shown.get('preview_sampler')}, {shown.get('preview_steps')} steps, "
        f"CFG {shown.get('preview_guidance')}, seed {shown.get('preview_seed')}, {size}"
    )
    line = summary + (f" ({'; '.join(notes)})" if notes else "")
    return merged, status_html(line, "warning" if notes else "info")


def compare_action(backend: Backend, name: str | None, keys: Sequence[str], *values: Any) -> str:
    """Compare snapshots: the picked embedding's snapshots rendered with the tab's preview settings, as a job
    the progress and the previews gallery follow (ti_core.train.compare)."""
    from ti_core.config import TrainConfig

    if not name:
        return status_html("Pick an embedding whose run saved snapshots first.", "error")
    settings = train_settings([dict(zip(keys, values, strict=True))], name=name, backend=backend, resume=True)
    settings["data"]["images"] = settings["data"].get("images") or "."  # the comparison reads no images
    try:
        from ti_core.train.compare import compare_snapshots, compared_steps

        config = TrainConfig.from_dict(settings)
        compared_steps(config)  # none saved: said now, before the job and the model
        TrainingJob.start(backend.current_model, config, context=backend.training_context, work=compare_snapshots)
    except (ValueError, OSError, RuntimeError) as error:
        return error_html(error)
    return status_html(f"Comparing the snapshots of {name}: the grid comes with the previews.")


def _check_optimizer(config) -> None:
    """ValueError (one line) when the optimizer cannot run here (prodigy without prodigyopt; adamw8bit off CUDA)."""
    from ti_core.train.optimizers import optimizer_available

    if problem := optimizer_available(config.optimizer):
        raise ValueError(problem)


def _check_images(config) -> None:
    """ValueError (one line) when the dataset folder is missing or holds no image the trainer can read."""
    from ti_core.data import scan_images

    scan = scan_images(config.data)
    if not scan.items:
        raise ValueError(f"no training images in {config.data.images}")


def _require_file(backend: Backend, name: str) -> None:
    """The Train tab trains embeddings that exist (made in the Create tab): ValueError if it is missing."""
    from ti_core.names import embedding_path

    path = embedding_path(backend.embeddings_dir, name)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: create the embedding in the Create tab first (or press Refresh)")


def _check_trainable(config, name: str) -> None:
    """ti_core's check whether the run can start, its advice in the Train tab's words."""
    from ti_core.train import AlreadyTrained, StepsReached, check_trainable

    try:
        check_trainable(config)
    except AlreadyTrained as error:
        raise ValueError(
            f"{name} is already trained to step {error.step}: press Resume to continue it (with more steps), "
            "or create a new embedding to start again"
        ) from None
    except StepsReached as error:
        raise ValueError(
            f"{name} is already trained to step {error.step}: set Steps above {error.step} to continue it"
        ) from None


def interrupt_training() -> str:
    job = current_job()
    if job is None or not job.running:
        return status_html("No training run is in progress.")
    job.cancel()
    return status_html("Interrupting: the run stops after this step and saves the embedding.")


def poll_training(seen: dict | None):
    """The timer's tick: redraw the progress widgets only for what changed since this page last saw.

    The plot and the previews show the embedding's whole history: what its run folder holds from earlier runs
    (before a resume) and this run's steps. A run that was refused before its first step leaves the last run's
    progress, plot and previews as they were; the refusal is the status line above them.
    """
    seen = dict(seen or {})
    job = current_job()
    snapshot = job.snapshot() if job is not None else None
    version = snapshot["version"] if snapshot else 0
    if version == seen.get("version"):
        return PollUpdate(*(gr.update(),) * 9, seen)
    fresh_page = "version" not in seen
    seen["version"] = version
    if snapshot is None:
        return PollUpdate(
            progress=progress_html(None),
            plot=gr.update(),
            previews=gr.update(),
            status=gr.update(),
            result=gr.update(),
            train=gr.update(interactive=True),
            resume=gr.update(interactive=True),
            interrupt=gr.update(interactive=False),
            norm_plot=gr.update(),
            seen=seen,
        )
    running = snapshot["running"]
    never_started = snapshot.get("start_step") is None and not snapshot["losses"]
    earlier_losses, earlier_previews = run_history(snapshot.get("log_folder"), snapshot.get("name") or "")
    start = snapshot.get("start_step")
    losses = [point for point in earlier_losses if start is None or point[0] <= start] + [
        point for point in snapshot["losses"] if start is None or point[0] > start
    ]
    previews = list(dict.fromkeys([*earlier_previews, *snapshot["previews"]]))
    plot, gallery, norm_plot = gr.update(), gr.update(), gr.update()
    keep_last_run = never_started and not running and not fresh_page  # refused or failed before its first step
    if not keep_last_run:
        if len(losses) != seen.get("losses") or not running:
            seen["losses"] = len(losses)
            plot = loss_frame(losses)
        norms = snapshot.get("norm_ratios") or []  # this run's steps (loss.csv keeps no norms)
        trained = bool(norms or snapshot["losses"])  # a comparison of snapshots trains nothing: the plot stays
        if trained and (len(norms) != seen.get("norms") or not running):
            from ti_core.editability import NORM_WARNING_RATIO

            seen["norms"] = len(norms)
            norm_plot = norm_frame(norms, NORM_WARNING_RATIO)
        if len(previews) != seen.get("previews"):
            seen["previews"] = len(previews)
            gallery = _preview_items(previews)
    status = gr.update()
    if not running:
        stopped = snapshot.get("stopped")
        kind = {"done": "ok", "interrupted": "warning"}.get(stopped, "error" if snapshot.get("error") else "info")
        status = status_html(snapshot.get("message") or "", kind)
    if never_started and not running:
        progress = progress_html(None) if fresh_page else gr.update()
    else:
        progress = progress_html(snapshot)
    return PollUpdate(
        progress=progress,
        plot=plot,
        previews=gallery,
        status=status,
        result=gr.update() if keep_last_run else snapshot.get("final_path") or "",
        train=gr.update(interactive=not running),
        resume=gr.update(interactive=not running),
        interrupt=gr.update(interactive=running),
        norm_plot=norm_plot,
        seen=seen,
    )


_history_cache: dict[str, tuple[tuple, list]] = {}


def run_history(folder: str | None, name: str) -> tuple[list[tuple[int, float]], list[str]]:
    """The (step, loss) rows of `<folder>/loss.csv` and the preview images in `<folder>/images`, by step: an
    embedding's history across its runs. The loss file is read again only when it changed."""
    import csv

    if not folder:
        return [], []
    root = Path(folder)
    losses: list[tuple[int, float]] = []
    path = root / "loss.csv"
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is not None:
        key = (stat.st_mtime_ns, stat.st_size)
        cached = _history_cache.get(str(path))
        if cached is None or cached[0] != key:
            rows = []
            try:
                with open(path, newline="", encoding="utf-8") as handle:
                    for row in csv.DictReader(handle):
                        try:
                            rows.append((int(row["step"]), float(row["loss"])))
                        except (KeyError, TypeError, ValueError):
                            continue
            except OSError:
                rows = []
            cached = _history_cache[str(path)] = (key, rows)
        losses = list(cached[1])
    from ti_core.files import COMPARISON_GRIDS, comparison_grid_path, list_previews

    previews = [str(path) for _, path in list_previews(root.parent, name)] if name else []
    # The comparisons come last, so the gallery (newest first) shows them first: the previews by step, and
    # the snapshots rendered side by side (Compare snapshots).
    grids = [comparison_grid_path(root.parent, name, kind) for kind in COMPARISON_GRIDS] if name else []
    return losses, previews + [str(grid) for grid in grids if grid.is_file()]


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
        return status_html("Enter the folder of training images."), hidden
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
        return error_html(error), hidden
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
    return "".join(status_html(line, kind) for line in lines), gr.update(value=thumbs, visible=True)


_norms_cache: dict[int, dict[str, float]] = {}


def _vocabulary_norms(model) -> dict[str, float] | None:
    """The loaded model's vocabulary mean norms, once per model (the cards' norm ratios)."""
    from ti_core.editability import vocabulary_mean_norms

    if model is None:
        return None
    key = id(model.encoders[0].model)
    if key not in _norms_cache:
        _norms_cache.clear()
        _norms_cache[key] = vocabulary_mean_norms(model)
    return _norms_cache[key]


def library_action(backend: Backend):
    """Refresh of the Embeddings tab: cards and the inspect picker."""
    from ti_core.formats import list_embeddings

    model = backend.loaded_model()
    widths = model.widths if model is not None else None
    norms = _vocabulary_norms(model)
    cards = [card_info(path, widths, norms) for path in list_embeddings(backend.embeddings_dir)]
    names = sorted({card.name for card in cards if not card.error}, key=str.lower)
    return cards_html(cards, backend.model_label()), gr.update(choices=names, value=names[0] if names else None)


def snapshot_steps(backend: Backend, name: str | None) -> tuple[list[str], str | None]:
    """The snapshot steps of the embedding's run, and the one to preselect: the last numbered one."""
    from ti_core.files import list_snapshots

    try:
        steps = list_snapshots(backend.log_dir, name) if name else []
    except ValueError:
        steps = []
    numbered = [step for step in steps if step.isdigit()]
    return steps, numbered[-1] if numbered else (steps[-1] if steps else None)


def snapshot_choices(backend: Backend, name: str | None):
    """The Train tab's snapshot picker for the picked embedding."""
    steps, last = snapshot_steps(backend, name)
    return gr.update(choices=steps, value=last)


def promote_action(backend: Backend, name: str | None, step: str | None) -> str:
    """ "Make this the embedding": the snapshot replaces the embedding file (the old one to the trash)."""
    from ti_core.files import promote_snapshot, trash_dir

    if not name or not step:
        return status_html("Pick an embedding and one of its snapshots first.", "error")
    job = current_job()
    if job is not None and job.running and job.config.name == name:
        return status_html(f"{name} is training: interrupt the run before replacing its file.", "error")
    try:
        path = promote_snapshot(backend.embeddings_dir, backend.log_dir, name, step)
    except (ValueError, OSError) as error:
        return error_html(error)
    return status_html(
        f"{path.name} is now the snapshot of step {step} (the old file is in {trash_dir(path.parent)})", "ok"
    )


def _file_change(backend: Backend, change: Callable[[], str], name: str | None) -> tuple:
    """Run a rename or delete of `name`; its status line, then the refreshed cards and inspect picker."""
    job = current_job()
    if not name:
        status = status_html("Pick an embedding first.", "error")
    elif job is not None and job.running and job.config.name == name:
        status = status_html(f"{name} is training: interrupt the run first.", "error")
    else:
        try:
            status = status_html(change(), "ok")
        except (ValueError, OSError) as error:
            status = error_html(error)
    return (status, *library_action(backend))


def rename_action(backend: Backend, name: str | None, new_name: str | None) -> tuple:
    from ti_core.files import rename_embedding

    def rename() -> str:
        paths = rename_embedding(backend.embeddings_dir, name, new_name or "")
        return f"Renamed {name} to {paths[0].stem}"

    return _file_change(backend, rename, name)


def delete_action(backend: Backend, name: str | None) -> tuple:
    from ti_core.files import delete_embedding, trash_dir

    def delete() -> str:
        delete_embedding(backend.embeddings_dir, name)
        return f"Moved {name} to {trash_dir(backend.embeddings_dir)}"

    return _file_change(backend, delete, name)


def page_load_action(backend: Backend):
    """Every page load: the Train picker, then the Embeddings cards and inspect picker, as the folder is now.
    Without it a (re)loaded page shows what the folder held when the UI was built, until Refresh."""
    return (dropdown_names(backend), *library_action(backend))


def _embedding_file(backend: Backend, name: str) -> Path | None:
    """The file the picker's `name` stands for (the first, as the web UIs load the first of a name)."""
    from ti_core.formats import list_embeddings

    return next((path for path in list_embeddings(backend.embeddings_dir) if path.stem == name), None)


def _missing(backend: Backend, name: str) -> str:
    return status_html(f"No embedding named {name} in {backend.embeddings_dir}; press Refresh.", "error")


def inspect_action(backend: Backend, name: str | None) -> str:
    if not name:
        return status_html("Pick an embedding to inspect.")
    path = _embedding_file(backend, name)
    if path is None:
        return _missing(backend, name)
    try:
        return inspect_html(path, backend.loaded_model())
    except ValueError as error:
        return error_html(error)


# ------------------------------------------------------------------------------------------------- try it

_fitting_cache: dict[str, tuple[tuple, Any]] = {}


def fitting_embeddings(embeddings_dir: Path, model: TIModel) -> list:
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
    model: TIModel,
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

    from ti_core.preview import render_image as render

    if torch.cuda.is_available():
        model.unet.to("cuda")  # as the pipeline's .to("cuda") did: the model stays there for the next image
        model.vae.to("cuda")
        for encoder in model.encoders:
            encoder.model.to("cuda")
    return render(
        model, prompt, negative, embeddings, seed=seed, steps=steps, width=width, height=height,
        guidance=guidance, generator_device="cpu",
    )  # fmt: skip


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
        return None, status_html("Training is running on this model; generate after it finishes.", "error")
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
        return None, error_html(error)
    used = [e.name for e in embeddings if re.search(rf"(?<![\w-]){re.escape(e.name)}(?![\w-])", prompt or "", re.I)]
    note = f" with {', '.join(used)}" if used else ""
    return image, status_html(f"{model.name}: seed {int(seed)}, {int(steps)} steps{note}", "ok")


def load_preset_action(backend: Backend, preset: str | None, keys: Sequence[str]) -> list[Any]:
    """Load: the tab's fields (in `keys` order) set from the preset's settings (the others unchanged), then
    the status line."""
    from ti_core.preset import load_preset

    unchanged = [gr.update() for _ in keys]
    if not preset:
        return [*unchanged, status_html("Pick a preset to load.", "error")]
    try:
        settings = load_preset(preset, backend.log_dir)
    except ValueError as error:
        return [*unchanged, error_html(error)]
    flat = {key: value for key, value in settings.items() if key != "data"}
    flat.update({f"data.{key}": value for key, value in settings.get("data", {}).items()})
    values = [gr.update(value=flat[key]) if key in flat else gr.update() for key in keys]
    loaded = [key for key in flat if key in keys]
    return [*values, status_html(f"Loaded preset {preset}: {plural(len(loaded), 'setting')}.")]


def save_preset_action(backend: Backend, name: str | None, keys: Sequence[str], *values: Any) -> tuple[Any, str]:
    """Save: the tab's settings as preset `name` in the presets folder; the preset picker and the status line."""
    from ti_core.preset import preset_names, save_preset

    settings = train_settings([dict(zip(keys, values, strict=True))], name="", backend=backend, resume=False)
    try:
        path = save_preset((name or "").strip(), settings, backend.log_dir)
    except (ValueError, OSError) as error:
        return gr.update(), error_html(error)
    return gr.update(choices=preset_names(backend.log_dir), value=path.stem), status_html(f"Saved preset {path}")
