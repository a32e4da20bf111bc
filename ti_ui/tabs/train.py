"""The Train tab: the settings column (fields in `TRAIN_FIELDS` order), Train/Interrupt/Resume and the
progress, loss plot and previews, which a poller keeps up to date."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from ..actions import dropdown_names, interrupt_training, poll_training, scan_action, start_training
from ..backend import Backend
from ..compat import make_component, poll_every_second, refresh_button
from ..plot import CURVES
from ..render import embedding_names, progress_html


def _precision_default(backend: Backend) -> str:
    choice = getattr(backend, "mixed_precision", "no")
    return choice if choice in ("no", "fp16", "bf16") else "no"


def _train_settings_column(backend: Backend) -> tuple[Any, list, list]:
    """The settings column; returns the embedding picker, the components in TRAIN_FIELDS order, and the
    scan inputs."""
    from ti_core.data import BUILTIN_TEMPLATES, LATENT_SAMPLING

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
    with gr.Row():
        images = make_component(
            gr.Textbox,
            label="Dataset folder",
            placeholder="folder of images (+ optional .txt captions)",
            elem_id="ti_train_dataset",
            scale=4,
        )
        recursive = make_component(gr.Checkbox, label="Subfolders", value=False, elem_id="ti_train_recursive", scale=1)
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
    templates = list(BUILTIN_TEMPLATES)
    if backend.templates_dir and Path(backend.templates_dir).is_dir():
        templates += [str(path) for path in sorted(Path(backend.templates_dir).glob("*.txt"))]
    with gr.Row():
        template = make_component(
            gr.Dropdown,
            choices=templates,
            value="subject_filewords",
            label="Prompt template",
            allow_custom_value=True,
            elem_id="ti_train_template",
        )
        learning_rate = make_component(
            gr.Textbox,
            value="0.005",
            label="Learning rate (schedule: 0.005:100, 1e-3:1000, 1e-5)",
            elem_id="ti_train_learning_rate",
        )
    with gr.Row():
        batch = make_component(
            gr.Number, value=1, precision=0, label="Batch size", elem_id="ti_train_batch", minimum=1
        )
        accumulation = make_component(
            gr.Number, value=1, precision=0, label="Gradient accumulation", elem_id="ti_train_accumulation", minimum=1
        )
        steps = make_component(gr.Number, value=2000, precision=0, label="Steps", elem_id="ti_train_steps", minimum=1)
    with gr.Row():
        resolution = make_component(
            gr.Slider,
            minimum=32,
            maximum=2048,
            step=8,
            value=backend.default_resolution(),
            label="Resolution",
            elem_id="ti_train_resolution",
        )
        buckets = make_component(gr.Checkbox, label="Aspect-ratio buckets", value=False, elem_id="ti_train_buckets")
        flip = make_component(gr.Checkbox, label="Random horizontal flip", value=False, elem_id="ti_train_flip")
    with gr.Row():
        shuffle = make_component(gr.Checkbox, label="Shuffle tags", value=False, elem_id="ti_train_shuffle_tags")
        dropout = make_component(
            gr.Slider, minimum=0, maximum=1, step=0.05, value=0, label="Tag dropout", elem_id="ti_train_tag_dropout"
        )
        sampling = make_component(
            gr.Dropdown,
            choices=list(LATENT_SAMPLING),
            value="once",
            label="Latent sampling",
            elem_id="ti_train_latent_sampling",
        )
    with gr.Row():
        precision = make_component(
            gr.Dropdown,
            choices=["no", "fp16", "bf16"],
            value=_precision_default(backend),
            label="Mixed precision",
            elem_id="ti_train_precision",
        )
        checkpointing = make_component(
            gr.Checkbox,
            label="Gradient checkpointing (less memory, slower)",
            value=False,
            elem_id="ti_train_gradient_checkpointing",
        )
    with gr.Row():
        save_every = make_component(
            gr.Number,
            value=500,
            precision=0,
            label="Save a copy every N steps (0: never)",
            elem_id="ti_train_save_every",
            minimum=0,
        )
        preview_every = make_component(
            gr.Number,
            value=500,
            precision=0,
            label="Preview every N steps (0: never)",
            elem_id="ti_train_preview_every",
            minimum=0,
        )
        preview_steps = make_component(
            gr.Number,
            value=20,
            precision=0,
            label="Preview sampling steps",
            elem_id="ti_train_preview_steps",
            minimum=1,
        )
    with gr.Row():
        preview_prompt = make_component(
            gr.Textbox,
            label="Preview prompt (empty: a template line with a caption)",
            elem_id="ti_train_preview_prompt",
            scale=3,
        )
        preview_seed = make_component(
            gr.Number, value=0, precision=0, label="Preview seed", elem_id="ti_train_preview_seed"
        )
    with make_component(gr.Accordion, label="Advanced", open=False, elem_id="ti_train_advanced"), gr.Row():
        warmup = make_component(
            gr.Number, value=0, precision=0, label="Warm-up steps", elem_id="ti_train_warmup", minimum=0
        )
        clip = make_component(
            gr.Radio,
            choices=["disabled", "value", "norm"],
            value="disabled",
            label="Gradient clipping",
            elem_id="ti_train_grad_clip",
        )
        clip_value = make_component(gr.Number, value=0.1, label="Clip at", elem_id="ti_train_grad_clip_value")
        seed = make_component(gr.Number, value=0, precision=0, label="Seed", elem_id="ti_train_seed")
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


def train_tab(demo, backend: Backend):
    with gr.Row():
        with make_component(gr.Column, scale=5, elem_id="ti_train_settings"):
            embedding, fields, _ = _train_settings_column(backend)
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
            previews = make_component(
                gr.Gallery, label="Previews", columns=4, height=260, object_fit="contain", elem_id="ti_train_previews"
            )
            result = make_component(gr.Textbox, label="Embedding file", interactive=False, elem_id="ti_train_result")
    inputs = [embedding, *fields]
    train.click(lambda *values: _start_from_values(backend, False, values), inputs, status)
    resume.click(lambda *values: _start_from_values(backend, True, values), inputs, status)
    interrupt.click(interrupt_training, None, status)
    seen = gr.State({})
    outputs = [progress, plot, previews, status, result, train, resume, interrupt, seen]
    poll_every_second(poll_training, [seen], outputs, elem_id="ti_train_poll")
    return embedding


def _loss_plot():
    """gradio's line plot of `loss_frame` rows. The keywords of every version are given and `make_component` keeps
    those this one knows: gradio 3 draws at a fixed width (it cannot fill its column) with the legend
    below, the newest fills the column."""
    return make_component(
        gr.LinePlot,
        value=None,
        x="step",
        y="loss",
        color="curve",
        color_map={CURVES[0]: "#a8c1ec", CURVES[1]: "#1f4fbf"},  # the noisy curve faint, where gradio can
        x_title="step",
        y_title="loss",
        tooltip=["step", "loss", "curve"],
        color_legend_title=" ",
        color_title=" ",
        color_legend_position="bottom",
        overlay_point=False,
        width=400,
        height=240,
        label="Loss",
        show_label=False,
        elem_id="ti_train_loss_plot",
    )


def _start_from_values(backend: Backend, resume: bool, values: Sequence[Any]) -> str:
    return start_training(backend, resume, values[0], *values[1:])
