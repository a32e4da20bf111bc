"""The snapshots of a run compared side by side: each rendered with the same preview settings and seed, a
row per snapshot, so the step worth keeping can be picked (and promoted, ti_core.files.promote_snapshot).

It runs as a job like a training run (ti_core.jobs: `work=compare_snapshots`), so a web UI gives it the model
and the GPU the same way, and the tab shows its progress and the grid with the previews.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from ..config import TrainConfig
from ..files import comparison_grid_path, list_snapshots
from ..formats import load_embedding
from ..names import embedding_path
from ..preview import image_grid, prompt_lines
from ..timodel import TIModel
from .events import TrainEvent, TrainResult
from .outputs import STEP_GRID_ROWS, render_preview, spread_evenly
from .run_folder import RunFolder


def comparison_prompts(config: TrainConfig, folder: Path) -> list[str]:
    """The setting's prompt lines; else the prompts the run's previews used (its settings.json); else a plain
    one with the token (a negative embedding's: without it)."""
    lines = prompt_lines(config.preview_prompt)
    if lines:
        return lines
    try:
        recorded = json.loads((folder / "settings.json").read_text(encoding="utf-8")).get("preview_prompts")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, list) and recorded and all(isinstance(line, str) for line in recorded):
        return recorded
    return ["a photo"] if config.negative_embedding else [f"a photo of {config.name}"]


def compared_steps(config: TrainConfig) -> list[int]:
    """The snapshot steps a comparison renders (at most STEP_GRID_ROWS, evenly spread, the last always in);
    ValueError (one line, with the fix) when the run saved none."""
    steps = [int(step) for step in list_snapshots(config.log_dir, config.name) if step.isdigit()]
    if not steps:
        folder = Path(config.log_dir) / config.name
        raise ValueError(
            f"{config.name} has no snapshots in {folder}: train with 'Save a copy every N steps' above 0 first"
        )
    return spread_evenly(steps, STEP_GRID_ROWS)


def compare_snapshots(
    model: TIModel,
    config: TrainConfig,
    callback: Callable[[TrainEvent], None] | None = None,
    *,
    cancel: threading.Event | None = None,
) -> TrainResult:
    """Render the run's numbered snapshots (at most STEP_GRID_ROWS, evenly spread, the last always in) with
    the preview settings of `config`, and save the grid as `<log_dir>/<name>/images/<name>-snapshots.png`.
    Reports a "step" event per snapshot and the grid as a "preview"."""
    emit = callback or (lambda event: None)
    run = RunFolder(config, write=True)
    picked = compared_steps(config)
    prompts = comparison_prompts(config, run.folder)
    widths = {encoder.key: encoder.width for encoder in model.encoders}
    without: dict = {}  # a negative embedding's row without it is the same for every snapshot
    # As a run's "start" at the run's last logged step: the tab keeps showing the whole loss history.
    emit(TrainEvent("start", run.last_logged_step(), len(picked), message=f"Comparing {len(picked)} snapshots…"))
    rows = []
    for index, step in enumerate(picked, 1):
        if cancel is not None and cancel.is_set():
            message = f"Comparison interrupted after {index - 1} of {len(picked)} snapshots"
            emit(TrainEvent("interrupted", step, len(picked), message=message))
            return TrainResult(None, step, "interrupted", message, run.folder)
        snapshot = load_embedding(run.folder / f"{config.name}-{step}.safetensors", widths=widths)
        rows.append(render_preview(model, config.name, snapshot.vectors, prompts, config, without))
        emit(TrainEvent("step", index, len(picked), message=f"Rendered the snapshot of step {step}"))
    grid = image_grid([[image] for image in rows], row_labels=[f"step {step}" for step in picked])
    path = run.save_image(grid, comparison_grid_path(config.log_dir, config.name, "snapshots"))
    message = f"Compared {len(picked)} snapshots of {config.name} (steps {picked[0]}-{picked[-1]}): {path}"
    emit(TrainEvent("preview", picked[-1], len(picked), path=path, image=grid, message=message))
    emit(TrainEvent("done", len(picked), len(picked), message=message))
    # The embedding's file, untouched, stays the run's file (the tab keeps showing it).
    return TrainResult(embedding_path(config.embeddings_dir, config.name), len(picked), "done", message, run.folder)
