"""The standalone app's model picker above the tabs (the web UIs have their own)."""

from __future__ import annotations

import gradio as gr

from ..backend import StandaloneBackend
from ..compat import make_component, refresh_button
from ..render import status_html


def model_status_action(backend: StandaloneBackend, label: str | None) -> str:
    """The status under the picker: the model chosen, or why a typed one cannot be (the last one stays)."""
    try:
        return status_html(backend.select_model(label))
    except ValueError as error:
        still = f" (still using {backend.selected})" if backend.selected else ""
        return status_html(f"{str(error).splitlines()[0]}{still}", "error")


def model_row(backend: StandaloneBackend) -> None:
    with gr.Row():
        choices = backend.model_choices(rescan=False)  # the start-up scan is a moment old
        picker = make_component(
            gr.Dropdown,
            choices=choices,
            value=backend.selected,
            label="Model (pick one found on this machine, or type a checkpoint path, a diffusers folder or a hub id)",
            elem_id="ti_model",
            scale=4,
            allow_custom_value=True,
        )
        refresh = refresh_button("ti_model_refresh")
    status = make_component(
        gr.HTML,
        value=status_html(backend.status_text(), "info" if backend.selected else "error"),
        elem_id="ti_model_status",
    )

    def refreshed(current):
        options = backend.model_choices()
        value = current if current in options else backend.selected if backend.selected in options else None
        return gr.update(choices=options, value=value)

    picker.change(lambda label: model_status_action(backend, label), picker, status)
    refresh.click(refreshed, picker, picker)
