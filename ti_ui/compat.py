"""What differs between gradio 3.41, 3.43, 4.40 and the newest, and the component helpers built on it.

Components are built from constructor arguments only (`make_component` drops those a version lacks); the few
version-specific keywords go through `supported_kwargs` and `js_kwargs`; `poll_every_second` is the one periodic update, for all.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import gradio as gr

GRADIO_MAJOR = int(re.match(r"\d+", gr.__version__).group())


def supported_kwargs(factory: Callable, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments `factory` names in its signature (drops those this gradio lacks)."""
    parameters = inspect.signature(factory).parameters
    return {key: value for key, value in kwargs.items() if key in parameters}


def make_component(cls, **kwargs: Any):
    """A component built with only the arguments this gradio version knows."""
    return cls(**supported_kwargs(cls.__init__, **kwargs))


def js_kwargs(code: str) -> dict[str, str]:
    """The keyword for a client-side function: `js_kwargs` on gradio 3, `js` from 4 on."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


POLL_DONE_EVENT = "ti-poll-done"
# An invisible component that is still in the page (for a script to click): visible=False up to gradio 4
# (rendered, hidden by a class); the newest leaves visible=False ones out of the page and has "hidden".
_HIDDEN: bool | str = (
    "hidden" if "hidden" in str(inspect.signature(gr.Button.__init__).parameters["visible"].annotation) else False
)


def poll_every_second(fn: Callable, inputs: list, outputs: list, elem_id: str) -> None:
    """Run `fn` about once a second while the page is open. On gradio 3 (A1111, reForge, SD.Next): whenever
    the hidden button `elem_id` is clicked, which javascript/ti.js does while the button's tab is shown (or a
    run is going), one click at a time; on gradio 4.40 and newer, gr.Timer.

    Each click is an ordinary event, sent outside the queue (`queue=False`: a plain request), so it works
    the same under every gradio and every host's queue. gradio's own pollers do not: `every=` events are
    dropped by SD.Next's patched queue ("Event ... is not in list") and need the queue at all, and
    gr.Timer exists only from 4.40 on. Once the event is over, a client-side step tells ti.js (a DOM
    event), so the next click waits for this one's answer and a slow server is never flooded.
    """
    if hasattr(gr, "Timer"):
        # gradio 4.40 and newer (Forge, the standalone app): its own per-page timer, which those queues keep.
        timer = gr.Timer(1.0)
        timer.tick(fn, inputs, outputs, show_progress="hidden")
        return
    button = make_component(gr.Button, value="Update", visible=_HIDDEN, elem_id=elem_id, elem_classes=["ti-poll"])
    event = button.click(fn, inputs, outputs, show_progress="hidden", queue=False)
    done = f"() => {{ document.dispatchEvent(new CustomEvent({POLL_DONE_EVENT!r}, {{detail: {elem_id!r}}})); }}"
    event.then(None, None, None, queue=False, **js_kwargs(done))


def refresh_button(elem_id: str):
    return make_component(gr.Button, value="Refresh", elem_id=elem_id, size="sm", scale=0, min_width=100)
