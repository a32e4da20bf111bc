"""The Train tab: the settings column (made from the declared settings, ti_core.settings), Train/Interrupt/Resume and the
progress, loss plot and previews, which a poller keeps up to date."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from ti_core.config import declared, setting_named
from ti_core.settings import Setting

from ..actions import (
    PollUpdate,
    compare_action,
    dropdown_names,
    interrupt_training,
    load_preset_action,
    poll_training,
    promote_action,
    save_preset_action,
    scan_action,
    snapshot_choices,
    snapshot_steps,
    start_training,
    txt2img_previews,
)
from ..backend import Backend
from ..compat import make_component, poll_every_second, refresh_button
from ..plot import CURVES, NORM_CURVES
from ..render import embedding_names, progress_html


def _precision_default(backend: Backend) -> str:
    choice = getattr(backend, "mixed_precision", "no")
    return choice if choice in ("no", "fp16", "bf16") else "no"


# How the declared settings that have a Train tab field (ti_core.settings: those with an elem_id) are laid
# out, row by row; a declared field not placed here gets a row of its own (in Advanced when it is advanced).
ROWS = (
    ("data.template", "learning_rate"),
    ("batch_size", "gradient_accumulation", "steps"),
    ("data.resolution", "data.buckets", "data.flip"),
    ("data.shuffle_tags", "data.tag_dropout", "data.latent_sampling"),
    ("mixed_precision", "gradient_checkpointing"),
    ("save_every", "preview_every"),
)
# In their own accordion, open: what a preview shows is chosen with the run.
PREVIEW_ROWS = (
    ("preview_prompt", "preview_negative_prompt"),
    ("preview_sampler", "preview_steps", "preview_guidance"),
    ("preview_seed", "preview_width", "preview_height"),
    ("negative_embedding",),
)
ADVANCED_ROWS = (
    ("optimizer", "lr_scheduler", "lr_cycles"),
    ("warmup_steps", "grad_clip", "grad_clip_value", "seed"),
    ("data.repeats", "data.alpha_weight", "norm_control"),
    ("min_snr_gamma", "noise_offset", "timestep_min", "timestep_max"),
    ("validation_every", "validation_samples"),
    ("cache_latents", "compile", "save_optimizer_state"),
)
EDITABILITY_ROWS = (("method",), ("direction_prior", "cross_init_weight", "context_regularization"))
METHOD_INFO = (
    "plain: Textual Inversion as everyone trains it (its norm grows and can overpower prompts) · directional: the "
    "norm stays a word's, only the direction is trained · cross_init: starts from the text encoder's output for "
    "the init text · auto: directional for a new embedding, a resumed one keeps its own"
)
DATASET_ROW = ("data.images", "data.recursive")  # beside the dataset's Preview button
TXT2IMG_LABEL = "Use the txt2img tab's prompt, negative prompt, sampler, steps, CFG, seed and size"
TXT2IMG_INFO = "taken when Train or Resume is pressed; the run's settings.json keeps what was used"


def tab_settings() -> list[Setting]:
    """The declared settings the Train tab shows, in declaration order."""
    return [item for item in declared() if item.elem_id]


def _component_options(item: Setting) -> tuple[type, dict[str, Any]]:
    """The gradio component of a declared setting and its keywords, from its type, range and choices."""
    label = item.label or item.help or item.name.replace("_", " ").capitalize()
    value = None if item.required else item.default
    options: dict[str, Any] = {"label": label, "elem_id": item.elem_id}
    if item.kind == "bool":
        return gr.Checkbox, {**options, "value": value}
    if item.choices:
        return gr.Dropdown, {**options, "choices": list(item.choices), "value": value}
    if item.kind in ("int", "float") and item.step is not None:
        return gr.Slider, {
            **options,
            "minimum": item.minimum,
            "maximum": item.maximum,
            "step": item.step,
            "value": value,
        }
    if item.kind in ("int", "float"):
        number = {**options, "value": value, "precision": 0 if item.kind == "int" else None}
        if item.minimum is not None and item.kind == "int":
            number["minimum"] = item.minimum
        return gr.Number, number
    return gr.Textbox, {**options, "value": value or ""}


def _tab_overrides(backend: Backend) -> dict[str, tuple[type | None, dict[str, Any]]]:
    """What the Train tab shows differently from the declaration: the web UI's own defaults and pickers."""
    from ti_core.data import BUILTIN_TEMPLATES
    from ti_core.train.optimizers import usable_optimizers

    templates = list(BUILTIN_TEMPLATES)
    if backend.templates_dir and Path(backend.templates_dir).is_dir():
        templates += [str(path) for path in sorted(Path(backend.templates_dir).glob("*.txt"))]
    return {
        "data.images": (None, {"placeholder": "folder of images (+ optional .txt captions)", "scale": 4}),
        "data.recursive": (None, {"scale": 1}),
        "data.template": (gr.Dropdown, {"choices": templates, "allow_custom_value": True}),
        "data.resolution": (None, {"value": backend.default_resolution()}),
        "mixed_precision": (None, {"value": _precision_default(backend)}),
        "grad_clip": (gr.Radio, {}),
        # adamw8bit only where it can run (CUDA with bitsandbytes); the route and CLI say why elsewhere.
        "optimizer": (None, {"choices": usable_optimizers(setting_named("optimizer").choices)}),
        "method": (gr.Radio, {"info": METHOD_INFO}),
        "preview_prompt": (None, {"lines": 2, "scale": 3}),
        "preview_negative_prompt": (None, {"lines": 2, "scale": 2}),
    }


def _setting_component(item: Setting, overrides: dict[str, tuple[type | None, dict[str, Any]]]):
    cls, options = _component_options(item)
    other, extra = overrides.get(item.key, (None, {}))
    return make_component(other or cls, **{**options, **extra})


def _setting_rows(backend: Backend, rows, advanced_rows) -> tuple[dict[str, Any], Any | None]:
    """The setting fields (but the dataset row's), by setting key, in their rows and the Advanced accordion;
    and in a web UI, the Previews accordion's "Use the txt2img tab's settings" checkbox (None standalone)."""
    overrides = _tab_overrides(backend)
    shown = {item.key: item for item in tab_settings()}
    placed = {key for row in (*rows, *advanced_rows, *PREVIEW_ROWS, *EDITABILITY_ROWS, DATASET_ROW) for key in row}
    extra = [key for key in shown if key not in placed]
    basic = [*rows, *((key,) for key in extra if not shown[key].advanced)]
    advanced = [*advanced_rows, *((key,) for key in extra if shown[key].advanced)]
    fields: dict[str, Any] = {}
    for row in basic:
        with gr.Row():
            fields.update((key, _setting_component(shown[key], overrides)) for key in row if key in shown)
    with make_component(gr.Accordion, label="Previews", open=True, elem_id="ti_train_preview_settings"):
        for row in PREVIEW_ROWS:
            with gr.Row():
                fields.update((key, _setting_component(shown[key], overrides)) for key in row if key in shown)
        use_txt2img = None
        if backend.txt2img_components():
            use_txt2img = make_component(
                gr.Checkbox, label=TXT2IMG_LABEL, info=TXT2IMG_INFO, value=False, elem_id="ti_train_preview_txt2img"
            )
    with make_component(gr.Accordion, label="Editability", open=False, elem_id="ti_train_editability"):
        for row in EDITABILITY_ROWS:
            with gr.Row():
                fields.update((key, _setting_component(shown[key], overrides)) for key in row if key in shown)
    with make_component(gr.Accordion, label="Advanced", open=False, elem_id="ti_train_advanced"):
        for row in advanced:
            with gr.Row():
                fields.update((key, _setting_component(shown[key], overrides)) for key in row if key in shown)
    return fields, use_txt2img


def _dataset_rows(backend: Backend) -> tuple[dict[str, Any], Any, Any, Any]:
    """The dataset folder and Subfolders fields with the Preview button, the scan's summary and thumbnails."""
    overrides = _tab_overrides(backend)
    with gr.Row():
        fields = {key: _setting_component(setting_named(key), overrides) for key in DATASET_ROW}
        scan = make_component(
            gr.Button, value="Preview", size="sm", elem_id="ti_train_dataset_scan", scale=0, min_width=90
        )
    dataset_info = make_component(gr.HTML, value="", elem_id="ti_train_dataset_info")
    dataset_preview = make_component(
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
    return fields, scan, dataset_info, dataset_preview


def _preset_row(backend: Backend) -> dict[str, Any]:
    """A preset picker with Load, and a name with Save (ti_core.preset), by part."""
    from ti_core.preset import preset_names

    with make_component(gr.Row, elem_id="ti_train_presets"):
        parts = {
            "preset": make_component(
                gr.Dropdown, choices=preset_names(backend.log_dir), value=None, label="Preset",
                elem_id="ti_train_preset", scale=3,
            ),
            "load": make_component(gr.Button, value="Load", size="sm", elem_id="ti_train_preset_load", scale=0, min_width=70),
            "name": make_component(
                gr.Textbox, label="Save the settings as", placeholder="preset name", elem_id="ti_train_preset_name",
                scale=3,
            ),
            "save": make_component(gr.Button, value="Save", size="sm", elem_id="ti_train_preset_save", scale=0, min_width=70),
        }  # fmt: skip
    return parts


def _wire_presets(backend: Backend, parts: dict[str, Any], fields: dict[str, Any], status) -> None:
    """Load sets the fields from the preset (by setting key); Save writes the fields' values as a preset."""
    keys = list(fields)
    parts["load"].click(
        lambda preset: load_preset_action(backend, preset, keys), parts["preset"], [*fields.values(), status]
    )
    parts["save"].click(
        lambda name, *values: save_preset_action(backend, name, keys, *values),
        [parts["name"], *fields.values()],
        [parts["preset"], status],
    )


def _train_settings_column(backend: Backend) -> tuple[Any, dict[str, Any], dict[str, Any], Any | None]:
    """The settings column; returns the embedding picker, the setting fields by setting key, the preset row's
    parts and the "Use the txt2img tab's settings" checkbox (None standalone)."""
    names = embedding_names(backend.embeddings_dir)
    with gr.Row():
        embedding = make_component(
            gr.Dropdown,
            choices=names,
            value=names[0] if names else None,
            label="Embedding",
            elem_id="ti_train_embedding",
            scale=4,
        )
        refresh = refresh_button("ti_train_refresh")
    refresh.click(lambda current: dropdown_names(backend, current), embedding, embedding)
    presets = _preset_row(backend)
    fields, scan, dataset_info, dataset_preview = _dataset_rows(backend)
    setting_fields, use_txt2img = _setting_rows(backend, ROWS, ADVANCED_ROWS)
    fields.update(setting_fields)
    scan_inputs = [fields[key] for key in ("data.images", "data.recursive", "data.resolution", "data.buckets")]
    images, recursive = fields["data.images"], fields["data.recursive"]
    for trigger in (scan.click, images.submit, recursive.change):
        trigger(scan_action, scan_inputs, [dataset_info, dataset_preview])
    return embedding, fields, presets, use_txt2img


def train_tab(demo, backend: Backend):
    with gr.Row():
        with make_component(gr.Column, scale=5, elem_id="ti_train_settings"):
            embedding, fields, presets, use_txt2img = _train_settings_column(backend)
        with make_component(gr.Column, scale=4, elem_id="ti_train_results"):
            with gr.Row():
                train = make_component(gr.Button, value="Train", variant="primary", elem_id="ti_train_button")
                interrupt = make_component(
                    gr.Button, value="Interrupt", interactive=False, elem_id="ti_train_interrupt"
                )
                resume = make_component(gr.Button, value="Resume", elem_id="ti_train_resume")
            status = make_component(gr.HTML, value="", elem_id="ti_train_status")
            progress = make_component(gr.HTML, value=progress_html(None), elem_id="ti_train_progress")
            plot = _loss_plot()
            norm_plot = _norm_plot()
            previews = make_component(
                gr.Gallery, label="Previews", columns=4, height=260, object_fit="contain", elem_id="ti_train_previews"
            )
            result = make_component(gr.Textbox, label="Embedding file", interactive=False, elem_id="ti_train_result")
            snapshot, promote, compare, snapshot_status = _snapshot_row(backend, embedding.value)
    inputs = [embedding, *fields.values()]
    txt2img = backend.txt2img_components() if use_txt2img is not None else {}
    if txt2img:  # the web UI's txt2img components as inputs too: their values as they are at the click
        inputs += [use_txt2img, *txt2img.values()]
    train.click(_starter(backend, False, list(fields), list(txt2img)), inputs, status)
    resume.click(_starter(backend, True, list(fields), list(txt2img)), inputs, status)
    interrupt.click(interrupt_training, None, status)
    for changed in (embedding.change, result.change):  # another embedding picked, or a run ended
        changed(lambda chosen: snapshot_choices(backend, chosen), embedding, snapshot)
    promote.click(lambda *args: promote_action(backend, *args), [embedding, snapshot], snapshot_status)
    compare.click(_comparer(backend, list(fields), list(txt2img)), inputs, snapshot_status)
    _wire_presets(backend, presets, fields, status)
    seen = gr.State({})
    by_name = {"progress": progress, "plot": plot, "previews": previews, "status": status, "result": result}
    by_name.update(train=train, resume=resume, interrupt=interrupt, norm_plot=norm_plot, seen=seen)
    outputs = [by_name[name] for name in PollUpdate._fields]
    poll_every_second(_poll_values, [seen], outputs, elem_id="ti_train_poll")
    return embedding


def _snapshot_row(backend: Backend, name: str | None) -> tuple[Any, Any, Any, Any]:
    """The run's snapshots (`<name>-<step>` in its log folder), the button that makes one the embedding and the
    one that renders them side by side."""
    steps, last = snapshot_steps(backend, name)
    with gr.Row():
        snapshot = make_component(
            gr.Dropdown,
            choices=steps,
            value=last,
            label="Snapshot (step)",
            elem_id="ti_snapshot_pick",
            scale=2,
        )
        promote = make_component(
            gr.Button, value="Make this the embedding", elem_id="ti_snapshot_promote", scale=1, min_width=120
        )
        compare = make_component(
            gr.Button, value="Compare snapshots", elem_id="ti_snapshot_compare", scale=1, min_width=120
        )
    status = make_component(gr.HTML, value="", elem_id="ti_snapshot_status")
    return snapshot, promote, compare, status


def _loss_plot():
    return _line_plot(
        "loss", "loss", {CURVES[0]: "#a8c1ec", CURVES[1]: "#1f4fbf"}, 240, "Loss", "ti_train_loss_plot"
    )  # the noisy curve faint, where gradio can


def _norm_plot():
    """The largest vector's norm as a multiple of the vocabulary's mean, with the warning threshold."""
    colors = {NORM_CURVES[0]: "#1f4fbf", NORM_CURVES[1]: "#d98200"}
    return _line_plot("norm", "norm / vocabulary mean", colors, 160, "Vector norm", "ti_train_norm_plot")


def _line_plot(y: str, y_title: str, color_map: dict[str, str], height: int, label: str, elem_id: str):
    """gradio's line plot of (step, `y`, curve) rows. The keywords of every version are given and `make_component`
    keeps those this one knows: gradio 3 draws at a fixed width (it cannot fill its column) with the legend
    below, the newest fills the column."""
    return make_component(
        gr.LinePlot,
        value=None,
        x="step",
        y=y,
        color="curve",
        color_map=color_map,
        x_title="step",
        y_title=y_title,
        tooltip=["step", y, "curve"],
        color_legend_title=" ",
        color_title=" ",
        color_legend_position="bottom",
        overlay_point=False,
        width=400,
        height=height,
        label=label,
        show_label=False,
        elem_id=elem_id,
    )


def _starter(backend: Backend, resume: bool, keys: list[str], txt2img_names: list[str]) -> Callable[..., str]:
    """The Train/Resume handler: the embedding's name, then the setting fields' values, passed on by key; in
    a web UI then the txt2img checkbox and the txt2img components' values (`txt2img_names`)."""

    def start(name: str | None, *values: Any) -> str:
        settings, note = _settings_of(backend, keys, txt2img_names, values)
        return start_training(backend, resume, name, settings, previews_note=note)

    return start


def _comparer(backend: Backend, keys: list[str], txt2img_names: list[str]) -> Callable[..., str]:
    """The Compare snapshots handler: the same inputs as Train's, so the txt2img checkbox counts there too."""

    def compare(name: str | None, *values: Any) -> str:
        settings, note = _settings_of(backend, keys, txt2img_names, values)
        return compare_action(backend, name, list(settings), *settings.values()) + note

    return compare


def _settings_of(backend: Backend, keys: list[str], txt2img_names: list[str], values: tuple) -> tuple[dict, str]:
    """The setting fields' values by key, with the txt2img tab's preview settings when its checkbox (the value
    after the fields) is ticked; and the status line saying what the previews take."""
    settings = dict(zip(keys, values[: len(keys)], strict=True))
    if not (txt2img_names and values[len(keys)]):
        return settings, ""
    txt2img = dict(zip(txt2img_names, values[len(keys) + 1 :], strict=True))
    return txt2img_previews(backend, settings, txt2img)


def _poll_values(seen: dict | None) -> tuple:
    """`poll_training`'s named update as the plain tuple gradio takes (gradio 3 sees a named tuple as one value)."""
    return tuple(poll_training(seen))
