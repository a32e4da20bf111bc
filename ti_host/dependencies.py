"""Whether the trainer's libraries work in the web UI's Python, said in one line (with the fix) when not.

install.py picks a diffusers release the web UI's transformers can import, and checks it. This side tells
the user in the tab when that could not be done (no network, --skip-install, a hand-installed diffusers):
`known_problem()` is cheap enough for building the tab (installed versions only, no import), and
`import_problem()` imports diffusers' pipelines once, before the first model load, so the first Create or
Train says what is wrong instead of failing with an ImportError.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
_import_result: list[str | None] = []  # filled by the first import_problem()


@functools.cache
def _installer() -> ModuleType:
    """install.py as a module (its version table and checks; importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("ti_trainer_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fix(transformers: str | None) -> str:
    spec = _installer().diffusers_spec(transformers)
    return (
        "restart the web UI without --skip-install so the extension installs one that works, or install "
        f'"diffusers{spec}" into the web UI\'s Python yourself'
    )


def known_problem() -> str | None:
    """What is known to be wrong without importing anything, or None (then an import may still fail)."""
    if _import_result and _import_result[0]:
        return _import_result[0]
    diffusers, transformers = _version("diffusers"), _version("transformers")
    if diffusers is None:
        return f"The Textual Inversion trainer needs diffusers, which is not installed: {_fix(transformers)}"
    misfit = _installer().diffusers_misfit({"diffusers": diffusers, "transformers": transformers or ""})
    if misfit:
        return f"The Textual Inversion trainer cannot use diffusers here: {misfit}; {_fix(transformers)}"
    return None


def import_problem() -> str | None:
    """Import what the trainer needs from diffusers (once per process); one line saying why it fails, or None."""
    if not _import_result:
        try:
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
        except Exception as error:  # ImportError, or whatever a half-compatible release raises
            lines = str(error).strip().splitlines()
            reason = _installer().without_path(lines[0]) if lines else type(error).__name__
            transformers = _version("transformers")
            _import_result.append(
                f"The Textual Inversion trainer cannot import diffusers {_version('diffusers') or ''} with"
                f" transformers {transformers or '(none)'} ({reason}): {_fix(transformers)}".replace("  ", " ")
            )
        else:
            _import_result.append(None)
    return _import_result[0]
