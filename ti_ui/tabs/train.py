"""The Train tab: the settings column (fields in `TRAIN_FIELDS` order), Train/Interrupt/Resume and the
progress, loss plot and previews, which a poller keeps up to date."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from ..actions import _dropdown_names, interrupt_training, poll_training, scan_action, start_training
from ..backend import Backend
from ..compat import _make, _poll, _refresh_button
from ..plot import CURVES, NORM_CURVES
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
    with _make(gr.Accordion, label="Editability", open=False, elem_id="ti_train_editability"):
        from ti_core.editability import METHODS

        method = _make(
            gr.Radio,
            choices=list(METHODS),
            value="auto",
            label="Method",
            info="plain: Textual Inversion as everyone trains it (its norm grows and can overpower prompts) · "
            "directional: the norm stays a word's, only the direction is trained · cross_init: starts from the "
            "text encoder's output for the init text · auto: directional for a new embedding, a resumed one "
            "keeps its own",
            elem_id="ti_train_method",
        )
        with gr.Row():
            direction_prior = _make(
                gr.Number,
                value=0.0,
                label="Directional: pull toward the init text (0: off)",
                elem_id="ti_train_direction_prior",
                minimum=0,
            )
            cross_init_weight = _make(
                gr.Number,
                value=1e-5,
                label="CrossInit: pull toward the start",
                elem_id="ti_train_cross_init_weight",
                minimum=0,
            )
            context = _make(
                gr.Number,
                value=0.0,
                label="Context regularization: keep the other words of a prompt as with the init text (0: off)",
                elem_id="ti_train_context_regularization",
                minimum=0,
            )
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
        method,
        direction_prior,
        cross_init_weight,
        context,
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
            plot = _loss_plot()
            norm_plot = _norm_plot()
            previews = _make(
                gr.Gallery, label="Previews", columns=4, height=260, object_fit="contain", elem_id="ti_train_previews"
            )
            result = _make(gr.Textbox, label="Embedding file", interactive=False, elem_id="ti_train_result")
    inputs = [embedding, *fields]
    train.click(lambda *values: _start_from_values(backend, False, values), inputs, status)
    resume.click(lambda *values: _start_from_values(backend, True, values), inputs, status)
    interrupt.click(interrupt_training, None, status)
    seen = gr.State({})
    outputs = [progress, plot, previews, status, result, train, resume, interrupt, norm_plot, seen]
    _poll(poll_training, [seen], outputs, elem_id="ti_train_poll")
    return embedding


def _loss_plot():
    """gradio's line plot of `loss_frame` rows. The keywords of every version are given and `_make` keeps
    those this one knows: gradio 3 draws at a fixed width (it cannot fill its column) with the legend
    below, the newest fills the column."""
    return _make(
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


def _norm_plot():
    """The largest vector's norm as a multiple of the vocabulary's mean, with the warning threshold."""
    return _make(
        gr.LinePlot,
        value=None,
        x="step",
        y="norm",
        color="curve",
        color_map={NORM_CURVES[0]: "#1f4fbf", NORM_CURVES[1]: "#d98200"},
        x_title="step",
        y_title="norm / vocabulary mean",
        tooltip=["step", "norm", "curve"],
        color_legend_title=" ",
        color_title=" ",
        color_legend_position="bottom",
        overlay_point=False,
        width=400,
        height=160,
        label="Vector norm",
        show_label=False,
        elem_id="ti_train_norm_plot",
    )


def _start_from_values(backend: Backend, resume: bool, values: Sequence[Any]) -> str:
    return start_training(backend, resume, values[0], *values[1:])
