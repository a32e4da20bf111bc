"""The standalone app's model picker above the tabs (the web UIs have their own)."""

from __future__ import annotations

import gradio as gr

from ..backend import StandaloneBackend
from ..compat import _make, _refresh_button
from ..render import _status


def _model_row(backend: StandaloneBackend) -> None:
    with gr.Row():
        choices = backend.model_choices(rescan=False)  # the start-up scan is a moment old
        picker = _make(
            gr.Dropdown,
            choices=choices,
            value=backend.selected,
            label="Model (pick one found on this machine, or type a checkpoint path, a diffusers folder or a hub id)",
            elem_id="ti_model",
            scale=4,
            allow_custom_value=True,
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
        return gr.update(choices=options, value=value)

    picker.change(lambda label: _status(backend.select_model(label)), picker, status)
    refresh.click(refreshed, picker, picker)
