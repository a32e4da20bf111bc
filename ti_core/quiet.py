"""Quiet libraries: what a user of the CLI or the app sees is what this project writes.

diffusers, transformers, huggingface_hub, accelerate and torch print import notices ("requires
torchvision"), deprecation warnings, log lines and progress bars ("Loading pipeline components...") that
tell a user of the trainer nothing. ``quiet_libraries()`` turns all of that off while it is active and
puts every setting back when it ends; ``quiet_libraries(verbose=True)`` changes nothing (``--verbose``).

The libraries are configured through their own switches (``set_verbosity_error``,
``disable_progress_bar``). A library that is not imported yet is configured the moment it is: importing
diffusers takes seconds, and `inspect` without a model must not pay for it just to be quiet.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType

# Python loggers of libraries that log through the standard logging module without a switch of their own.
PLAIN_LOGGERS = ("accelerate", "torch", "huggingface_hub")

Restore = Callable[[], None]


def _quiet_hf_logging(module: ModuleType) -> Restore:
    """diffusers.utils.logging and transformers.utils.logging share one API."""
    level = module.get_verbosity()
    bars = module.is_progress_bar_enabled()
    module.set_verbosity_error()
    module.disable_progress_bar()

    def restore() -> None:
        module.set_verbosity(level)
        if bars:
            module.enable_progress_bar()

    return restore


def _quiet_hub(module: ModuleType) -> Restore:
    """huggingface_hub.utils: download and upload bars."""
    disabled = module.are_progress_bars_disabled()
    module.disable_progress_bars()
    return (lambda: None) if disabled else module.enable_progress_bars


# The module that holds each library's switches, and how to turn it down.
SWITCHES: dict[str, Callable[[ModuleType], Restore]] = {
    "diffusers.utils.logging": _quiet_hf_logging,
    "transformers.utils.logging": _quiet_hf_logging,
    "huggingface_hub.utils": _quiet_hub,
}


class _Loader(importlib.abc.Loader):
    """Runs a module as its own loader would, then `after(module)`."""

    def __init__(self, loader, after: Callable[[ModuleType], None]) -> None:
        self.loader, self.after = loader, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.after(module)

    def __getattr__(self, name: str):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self.loader, name)


class _WhenImported(importlib.abc.MetaPathFinder):
    """Calls `pending[name](module)` right after `name` is first imported, without importing anything now."""

    def __init__(self, pending: dict[str, Callable[[ModuleType], None]]) -> None:
        self.pending = pending

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, lambda module: self._imported(name, module))
                return spec
        return None

    def _imported(self, name: str, module: ModuleType) -> None:
        # Popped only now: a find_spec() that only asks whether the module exists imports nothing.
        after = self.pending.pop(name, None)
        if after is not None:
            after(module)


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Silence library warnings, logs and progress bars inside the block (nothing changes when `verbose`).

    The project's own output (print, its tqdm bars) is untouched. Use it around a whole command, or
    around the app's lifetime; warnings filters are process-wide, so it is not meant for one thread.
    """
    if verbose:
        yield
        return
    restores: list[Restore] = []

    def quiet(name: str, module: ModuleType) -> None:
        with contextlib.suppress(AttributeError):  # a library version without that switch stays as it is
            restores.append(SWITCHES[name](module))

    hook = _WhenImported({})
    for name in SWITCHES:
        if name in sys.modules:
            quiet(name, sys.modules[name])
        else:
            hook.pending[name] = lambda module, name=name: quiet(name, module)
    levels = {name: logging.getLogger(name).level for name in PLAIN_LOGGERS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PLAIN_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        sys.meta_path.insert(0, hook)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(hook)
            for restore in reversed(restores):
                restore()
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
