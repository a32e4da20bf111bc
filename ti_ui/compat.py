"""What differs between gradio 3.41, 3.43, 4.40 and the newest, and the component helpers built on it.

Components are built from constructor arguments only (`_make` drops those a version lacks); the few
version-specific keywords go through `_supported`, `_js` and `_poll`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import gradio as gr

GRADIO_MAJOR = int(re.match(r"\d+", gr.__version__).group())


def _supported(factory: Callable, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments `factory` names in its signature (drops those this gradio lacks)."""
    parameters = inspect.signature(factory).parameters
    return {key: value for key, value in kwargs.items() if key in parameters}


def _make(cls, **kwargs: Any):
    """A component built with only the arguments this gradio version knows."""
    return cls(**_supported(cls.__init__, **kwargs))


def _js(code: str) -> dict[str, str]:
    """The keyword for a client-side function: `_js` on gradio 3, `js` from 4 on."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def _poll(demo, fn: Callable, inputs: list, outputs: list, seconds: float) -> None:
    """Call `fn` every `seconds` while the page is open: gr.Timer where it exists (4.40+), else a load
    event with `every=` (gradio 3, which needs the queue; the hosts and `main` enable it)."""
    if hasattr(gr, "Timer"):
        timer = gr.Timer(seconds)
        timer.tick(fn, inputs, outputs, show_progress="hidden")
    else:
        demo.load(fn, inputs, outputs, every=seconds, show_progress="hidden")


def _refresh_button(elem_id: str):
    return _make(gr.Button, value="Refresh", elem_id=elem_id, size="sm", scale=0, min_width=100)
