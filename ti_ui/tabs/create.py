"""The Create tab: name, init text with its token count, vectors per token with the prompt budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from ti_core.embedding import MAX_VECTORS

from ..actions import create_action, init_info_html, name_warning_action
from ..backend import Backend
from ..compat import make_component
from ..render import budget_text, status_html

CREATE_HELP = """
**How it works.** An embedding is a new word for the text encoder: its *name* is the token you type in a
prompt, and it stands for *N vectors* learned from your images in the Train tab.

- **Initialization text** gives the starting vectors: the token vectors of a word close to your subject
  (say *cat* or *watercolor*), spread over the N vectors. Empty text starts from zeros.
- **Vectors per token**: more vectors hold more detail but learn slower and use more of the
  75-token prompt window. 1 to 8 is usual for a subject, more for a style.
"""


def create_tab(backend: Backend) -> Callable[[Any], None]:
    """The Create tab; returns a function that wires the Create button once the Train picker exists."""
    with gr.Row():
        with gr.Column():
            name = make_component(gr.Textbox, label="Name (the token you type in prompts)", elem_id="ti_create_name")
            name_warning = make_component(gr.HTML, value="", elem_id="ti_create_name_warning")
            init_text = make_component(
                gr.Textbox, label="Initialization text", value="*", elem_id="ti_create_init_text"
            )
            init_info = make_component(gr.HTML, value=init_info_html(backend, "*", 1), elem_id="ti_create_init_info")
            vectors = make_component(
                gr.Slider,
                minimum=1,
                maximum=MAX_VECTORS,
                step=1,
                value=1,
                label="Vectors per token",
                elem_id="ti_create_vectors",
            )
            budget = make_component(gr.HTML, value=status_html(budget_text(1)), elem_id="ti_create_budget")
            overwrite = make_component(
                gr.Checkbox,
                label="Overwrite an existing embedding of that name",
                value=False,
                elem_id="ti_create_overwrite",
            )
            button = make_component(gr.Button, value="Create embedding", variant="primary", elem_id="ti_create_button")
            status = make_component(gr.HTML, value="", elem_id="ti_create_status")
        with make_component(gr.Column, scale=0, min_width=320):
            make_component(gr.Markdown, value=CREATE_HELP, elem_id="ti_create_help")

    def info(text: str, count: float) -> str:
        return init_info_html(backend, text, count)

    name.change(name_warning_action, name, name_warning, show_progress="hidden")
    init_text.change(info, [init_text, vectors], init_info, show_progress="hidden")
    vectors.change(info, [init_text, vectors], init_info, show_progress="hidden")
    vectors.change(lambda count: status_html(budget_text(count)), vectors, budget, show_progress="hidden")

    def wire(train_embedding) -> None:
        button.click(
            lambda *args: create_action(backend, *args),
            [name, init_text, vectors, overwrite],
            [status, train_embedding],
        )

    return wire
