"""The Embeddings tab: the cards, inspect, and the standalone app's Try-it panel."""

from __future__ import annotations

import gradio as gr

from ti_core.formats import EXPORT_FORMATS

from ..actions import (
    default_export_dir,
    delete_action,
    export_action,
    inspect_action,
    library_action,
    rename_action,
    try_action,
)
from ..backend import Backend
from ..compat import make_component, refresh_button
from ..render import cards_html, status_html


def _try_panel(backend: Backend) -> None:
    with make_component(gr.Group, elem_id="ti_try"), gr.Row():
        with make_component(gr.Column, scale=3):
            prompt = make_component(
                gr.Textbox,
                label="Try it: prompt (click a card below to add its token)",
                lines=2,
                elem_id="ti_try_prompt",
            )
            negative = make_component(gr.Textbox, label="Negative prompt", lines=1, elem_id="ti_try_negative")
            with gr.Row():
                seed = make_component(gr.Number, value=0, precision=0, label="Seed", elem_id="ti_try_seed")
                steps = make_component(
                    gr.Slider, minimum=1, maximum=100, step=1, value=20, label="Steps", elem_id="ti_try_steps"
                )
                guidance = make_component(
                    gr.Slider, minimum=0, maximum=20, step=0.5, value=7, label="CFG scale", elem_id="ti_try_guidance"
                )
            size = backend.default_resolution()  # the model's own: 512 on the 64-pixel demo model takes minutes
            with gr.Row():
                width = make_component(
                    gr.Slider, minimum=64, maximum=2048, step=8, value=size, label="Width", elem_id="ti_try_width"
                )
                height = make_component(
                    gr.Slider, minimum=64, maximum=2048, step=8, value=size, label="Height", elem_id="ti_try_height"
                )
            button = make_component(gr.Button, value="Generate", variant="primary", elem_id="ti_try_button")
            status = make_component(gr.HTML, value="", elem_id="ti_try_status")
        with make_component(gr.Column, scale=2):
            image = make_component(gr.Image, label="Result", type="pil", interactive=False, elem_id="ti_try_image")
    button.click(
        lambda *args: try_action(backend, *args),
        [prompt, negative, seed, steps, width, height, guidance],
        [image, status],
    )


def embeddings_tab(backend: Backend):
    if backend.has_try_it:
        _try_panel(backend)
    with gr.Row():
        refresh = refresh_button("ti_embeddings_refresh")
        make_component(gr.HTML, value=status_html(f"Folder: {backend.embeddings_dir}"), elem_id="ti_embeddings_folder")
    cards = make_component(gr.HTML, value=cards_html([], ""), elem_id="ti_embeddings_list")
    with make_component(gr.Accordion, label="Inspect and export, rename and delete", open=False, elem_id="ti_inspect"):
        with gr.Row():
            name = make_component(gr.Dropdown, choices=[], label="Embedding", elem_id="ti_inspect_name", scale=4)
            button = make_component(gr.Button, value="Inspect", elem_id="ti_inspect_button", scale=0, min_width=100)
        output = make_component(gr.HTML, value="", elem_id="ti_inspect_output")
        with gr.Row():
            export_format = make_component(
                gr.Dropdown,
                choices=list(EXPORT_FORMATS),
                value="diffusers",
                label="Export for",
                info="diffusers: load_textual_inversion; a1111-pt: older web UIs; image: a PNG card",
                elem_id="ti_export_format",
                scale=1,
            )
            export_dir = make_component(
                gr.Textbox,
                label="Export folder",
                value="",
                placeholder=f"empty: {default_export_dir(backend, 'FORMAT')} (one folder per format)",
                elem_id="ti_export_dir",
                scale=3,
            )
            export_overwrite = make_component(
                gr.Checkbox, label="Overwrite", value=False, elem_id="ti_export_overwrite", scale=0
            )
            export = make_component(gr.Button, value="Export", elem_id="ti_export_button", scale=0, min_width=100)
        export_status = make_component(gr.HTML, value="", elem_id="ti_export_status")
        with gr.Row():
            new_name = make_component(
                gr.Textbox,
                label="New name",
                placeholder="rename the embedding to",
                elem_id="ti_embeddings_rename_name",
                scale=3,
            )
            rename = make_component(gr.Button, value="Rename", elem_id="ti_embeddings_rename", scale=0, min_width=100)
            delete = make_component(
                gr.Button,
                value="Delete (to the trash)",
                variant="stop",
                elem_id="ti_embeddings_delete",
                scale=0,
                min_width=160,
            )
        file_status = make_component(gr.HTML, value="", elem_id="ti_embeddings_file_status")
    rename.click(lambda *args: rename_action(backend, *args), [name, new_name], [file_status, cards, name])
    delete.click(lambda chosen: delete_action(backend, chosen), name, [file_status, cards, name])
    export.click(
        lambda *args: export_action(backend, *args),
        [name, export_format, export_dir, export_overwrite],
        export_status,
    )
    refresh.click(lambda: library_action(backend), None, [cards, name])
    button.click(lambda chosen: inspect_action(backend, chosen), name, output)
    return cards, name
