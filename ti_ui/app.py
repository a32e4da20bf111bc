"""The whole UI as one gr.Blocks (`create_ui`), and the standalone page's css, theme and script."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import gradio as gr

from .actions import library_action, page_load_action
from .backend import Backend
from .compat import GRADIO_MAJOR, js_kwargs, make_component
from .render import status_html
from .tabs.create import create_tab
from .tabs.embeddings import embeddings_tab
from .tabs.model import model_row
from .tabs.train import train_tab

ROOT = Path(__file__).resolve().parents[1]


def create_ui(backend: Backend):
    """The whole tab as a gr.Blocks: Create, Train, Embeddings (with Try it in the standalone app)."""
    with gr.Blocks(**_blocks_kwargs(backend)) as demo:
        with make_component(gr.Column, elem_id="ti_root", elem_classes=["ti-root"]):
            problem = backend.problem()
            if problem:
                make_component(gr.HTML, value=status_html(problem, "error"), elem_id="ti_problem")
            if backend.has_model_picker:
                model_row(backend)
            with gr.Tabs(elem_id="ti_tabs"):
                with make_component(gr.Tab, label="Create", elem_id="ti_create_tab"):
                    wire_create = create_tab(backend)
                with make_component(gr.Tab, label="Train", elem_id="ti_train_tab"):
                    train_embedding = train_tab(demo, backend)
                with make_component(gr.Tab, label="Embeddings", elem_id="ti_embeddings_tab") as library_tab:
                    cards, inspect_name = embeddings_tab(backend)
        wire_create(train_embedding)
        if backend.inject_assets:
            demo.load(None, None, None, **js_kwargs(client_script()))
        # The pickers and cards are filled on every page load (a component's value is otherwise the one it had
        # when the UI was built), and the cards again when their tab is opened, to show files written since.
        # Each file's card is cached until the file changes, so a big folder is read once, not per load.
        demo.load(
            lambda: page_load_action(backend),
            None,
            [train_embedding, cards, inspect_name],
            show_progress="hidden",
        )
        library_tab.select(lambda: library_action(backend), None, [cards, inspect_name])
    return demo


def css_goes_to_launch() -> bool:
    return "css" in inspect.signature(gr.Blocks.launch).parameters  # gradio 6 moved css from Blocks to launch


def page_assets() -> dict[str, Any]:
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
    if backend.inject_assets and not css_goes_to_launch():
        kwargs.update(page_assets())
    return kwargs


def client_script() -> str:
    """javascript/ti.js as a page-load function: the same file the hosts inject into <head>."""
    return "() => {\n" + (ROOT / "javascript" / "ti.js").read_text(encoding="utf-8") + "\n}"
