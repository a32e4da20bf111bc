"""Atomic file writing: a file is either the old one or the complete new one, never half-written."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write_fn: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write_fn(temp_path)`` so it is either the old file or the complete new one.

    The temp file sits in the same folder (so ``os.replace`` is atomic), is fsynced before it replaces
    ``path``, and is removed if anything fails, including ``write_fn`` itself. Creates the folder if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _create_temp(path)
    try:
        mode = temp.stat().st_mode & 0o777
        write_fn(temp)
        if temp.stat().st_mode & 0o777 != mode:  # safetensors replaces the file with its own private one
            os.chmod(temp, mode)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_folder(path.parent)
    return path


def _create_temp(path: Path) -> Path:
    # A hidden ".<name>.<random>.tmp" file: list_embeddings and the web UIs never take it for an embedding.
    # os.open with 0o666 honours the umask (mkstemp would leave the final file private, 0o600).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            os.close(os.open(temp, flags, 0o666))
            return temp
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); best effort."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
