"""The file the web UI loads: the Textual Inversion tab, its settings and its HTTP routes.

A1111, reForge, Forge and SD.Next run every .py under scripts/; this is the only one. The UI is
`extension.create_ui` (host-neutral), the web-UI glue is `ti_host`, the work is `ti_core`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from modules import script_callbacks, shared

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _extension_imports() -> Iterator[None]:
    """Import our top-level modules from this extension's folder, and leave sys.path as it was.

    A1111 prefixes sys.path with the extension folder only while it loads scripts, and other hosts may
    not at all, so the folder is added here for these imports; submodules imported later go through the
    imported packages. `extension` is a common module name: one another extension imported first is put
    aside meanwhile and put back after, and ours stays reachable as `ti_extension`.
    """
    added = str(ROOT) not in sys.path
    if added:
        sys.path.insert(0, str(ROOT))
    foreign = sys.modules.get("extension")
    if foreign is not None and _file_of(foreign) != ROOT / "extension.py":
        del sys.modules["extension"]
    else:
        foreign = None
    try:
        yield
    finally:
        ours = sys.modules.get("extension")
        if ours is not None and _file_of(ours) == ROOT / "extension.py":
            sys.modules["ti_extension"] = ours
        if foreign is not None:
            sys.modules["extension"] = foreign
        if added and str(ROOT) in sys.path:
            sys.path.remove(str(ROOT))


def _file_of(module) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


with _extension_imports():
    from extension import create_ui
    from ti_host import routes, settings
    from ti_host.backend import HostBackend

backend = HostBackend()


def on_ui_tabs():
    return [(create_ui(backend), "Textual Inversion", "ti_tab")]


def on_ui_settings():
    settings.register(shared)


def on_app_started(_demo, app):
    backend.host.app = app  # Forge's API keeps an embedding database of its own, found through the app
    routes.register(app, backend, getattr(shared.cmd_opts, "api_auth", None))


# Every component the web UI builds passes here: the txt2img tab's (built before ours) are kept for the
# Train tab's "Use the txt2img tab's settings" previews.
script_callbacks.on_after_component(backend.txt2img.capture)  # SD.Next's takes no name= either
script_callbacks.on_ui_tabs(on_ui_tabs)  # SD.Next's on_ui_tabs takes no name=
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
