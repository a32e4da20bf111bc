"""The standalone app's model picker above the tabs (the web UIs have their own)."""

from __future__ import annotations

import gradio as gr

from ..backend import StandaloneBackend
from ..compat import _make, _refresh_button
from ..render import _status


def model_status_action(backend: StandaloneBackend, label: str | None) -> str:
    """The status under the picker: the model chosen, or why a typed one cannot be (the last one stays)."""
    try:
        return _status(backend.select_model(label))
    except ValueError as error:
        still = f" (still using {backend.selected})" if backend.selected else ""
        return _status(f"{str(error).splitlines()[0]}{still}", "error")


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

    picker.change(lambda label: model_status_action(backend, label), picker, status)
    refresh.click(refreshed, picker, picker)
