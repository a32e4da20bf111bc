"""The entry of the Textual Inversion tab: `create_ui` for the web UIs, and the standalone app.

The UI itself is the `ti_ui` package (one module per tab, the backend, rendering, the actions); this module
keeps the names the web-UI glue and users import from it.

Standalone: ``python extension.py`` (``--model PATH_OR_HUB_ID``, ``--models-dir FOLDER``, ``--verbose``),
then open http://127.0.0.1:7860; without ``--model`` it lists the models it finds, and a demo model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `python extension.py` from elsewhere, or a host that dropped the ext dir
    sys.path.insert(0, str(ROOT))

if __name__ == "__main__" and "--verbose" not in sys.argv[1:]:
    # Before gradio, torch and diffusers are imported: their import-time warnings are library output too.
    import atexit

    from ti_core.quiet import quiet_libraries

    _quiet = quiet_libraries()
    _quiet.__enter__()  # for the process's lifetime (the app owns it)
    # Left to the garbage collector at shutdown, its restoring would find the interpreter half torn down.
    atexit.register(_quiet.__exit__, None, None, None)

from ti_core.jobs import TrainingJob, current_job  # noqa: E402
from ti_ui.actions import (  # noqa: E402
    TRAIN_FIELDS,
    create_action,
    fitting_embeddings,
    inspect_action,
    interrupt_training,
    library_action,
    poll_training,
    render_image,
    scan_action,
    start_training,
    train_settings,
    try_action,
)
from ti_ui.app import client_script, create_ui, css_goes_to_launch, page_assets  # noqa: E402
from ti_ui.backend import NO_MODEL_HELP, Backend, StandaloneBackend, find_checkpoints  # noqa: E402
from ti_ui.compat import GRADIO_MAJOR, js_kwargs, supported_kwargs  # noqa: E402
from ti_ui.plot import loss_frame  # noqa: E402
from ti_ui.render import (  # noqa: E402
    PROMPT_TOKENS,
    CardInfo,
    budget_text,
    card_info,
    cards_html,
    embedding_names,
    format_duration,
    init_text_info,
    inspect_html,
    progress_html,
)

__all__ = [  # what this module has always offered, wherever it now lives
    "GRADIO_MAJOR",
    "NO_MODEL_HELP",
    "PROMPT_TOKENS",
    "TRAIN_FIELDS",
    "Backend",
    "CardInfo",
    "StandaloneBackend",
    "TrainingJob",
    "budget_text",
    "card_info",
    "cards_html",
    "create_action",
    "create_ui",
    "current_job",
    "embedding_names",
    "find_checkpoints",
    "fitting_embeddings",
    "format_duration",
    "init_text_info",
    "inspect_action",
    "inspect_html",
    "interrupt_training",
    "launch",
    "library_action",
    "loss_frame",
    "main",
    "parse_args",
    "poll_training",
    "progress_html",
    "render_image",
    "scan_action",
    "start_training",
    "train_settings",
    "try_action",
    "client_script",  # a host page's test injects ti.js as the web UIs do
    "js_kwargs",
    "_client_script",
    "_js",
]
_client_script, _js = client_script, js_kwargs  # their names before they were public


# =================================================================================================== main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python extension.py",
        description="Textual Inversion: create, train and try embeddings in a local web app.",
    )
    parser.add_argument("--model", help="a diffusers folder, a .safetensors/.ckpt checkpoint or a hub id")
    parser.add_argument(
        "--models-dir", type=Path, help="a folder of checkpoints to pick from (besides the ones found by itself)"
    )
    parser.add_argument("--embeddings-dir", type=Path, default=Path("embeddings"), help="default: ./embeddings")
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path("textual_inversion"),
        help="previews, snapshots, loss log (default: ./textual_inversion)",
    )
    parser.add_argument("--templates-dir", type=Path, help="extra prompt templates (*.txt)")
    parser.add_argument("--port", type=int, default=7860, help="default: 7860")
    parser.add_argument(
        "--listen", action="store_true", help="serve on all interfaces (0.0.0.0), not only this machine"
    )
    parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings, logs and progress bars")
    return parser.parse_args(argv)


def launch(backend: Backend, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Build and serve the standalone app; with block=False return the running Blocks (for tests)."""
    demo = create_ui(backend)
    # gradio 3 runs one queued event at a time by default, so the progress poller would wait behind a render;
    # gradio 4 still names concurrency_count, but only to reject it.
    limits = supported_kwargs(demo.queue, default_concurrency_limit=4) or {"concurrency_count": 4}
    demo.queue(**limits)
    extra = page_assets() if backend.inject_assets and css_goes_to_launch() else {}
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        **supported_kwargs(demo.launch, show_api=False, quiet=not block),
        **extra,
    )
    return demo


def main(argv: Sequence[str] | None = None, *, block: bool = True):
    args = parse_args(argv)
    backend = StandaloneBackend(
        model=args.model,
        models_dir=args.models_dir,
        embeddings_dir=args.embeddings_dir,
        log_dir=args.log_dir,
        templates_dir=args.templates_dir,
    )
    if backend.selected is None:
        print(NO_MODEL_HELP, file=sys.stderr)
    return launch(backend, host="0.0.0.0" if args.listen else "127.0.0.1", port=args.port, block=block)


if __name__ == "__main__":
    main()
