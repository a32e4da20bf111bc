"""The embeddings folder as the web UIs see it: which files are embeddings, and which ones share a name."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .. import image_data
from .common import IMAGE_SUFFIXES, LOADABLE_SUFFIXES, SIDECAR_STEMS
from .readers import chunk_text


def _image_has_embedding(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return chunk_text(image) is not None or image_data.read_strips(image) is not None
    except Exception:  # not an image, truncated: not an embedding either
        return False


def is_embedding_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    if path.name.startswith(".") or suffix not in LOADABLE_SUFFIXES:
        return False  # includes the atomic writer's ".<name>.<random>.tmp" files
    if path.stem.lower().endswith(SIDECAR_STEMS):
        return False
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
    except OSError:
        return False
    return suffix not in IMAGE_SUFFIXES or _image_has_embedding(path)


def _files_under(root: Path) -> Iterator[Path]:
    """Every file under ``root``, recursively; symlinked folders are followed once, hidden folders skipped."""
    if not root.is_dir():
        return
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(sub for sub in subfolders if not sub.startswith("."))
        yield from (Path(folder, file) for file in files)


def list_embeddings(embeddings_dir: Path) -> list[Path]:
    """Embedding files under ``embeddings_dir`` (recursive, sorted), skipping previews, sidecars and temp files.

    Images count only when they carry the ``sd-ti-embedding`` chunk. Symlinked folders are followed once.
    """
    return sorted(path for path in _files_under(Path(embeddings_dir)) if is_embedding_file(path))


def embeddings_named(embeddings_dir: Path, name: str) -> list[Path]:
    """The embedding files under ``embeddings_dir`` that a web UI would load as ``name``.

    The web UIs name an embedding after its file stem, in any subfolder, and CLIP lowercases prompts, so
    ``Cat.pt`` and ``sub/cat.safetensors`` are one token. (For an image embedding the host uses the name stored
    in its chunk; the stem is compared here, which is what this tool writes.)
    """
    key = name.casefold()
    files = _files_under(Path(embeddings_dir))
    return sorted(path for path in files if path.stem.casefold() == key and is_embedding_file(path))


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def other_files_named(embeddings_dir: Path, name: str, target: Path) -> list[Path]:
    """``embeddings_named`` without ``target`` itself (the file about to be written or replaced)."""
    return [path for path in embeddings_named(embeddings_dir, name) if not same_file(path, Path(target))]


def refuse_name_clash(embeddings_dir: Path, name: str, target: Path, hint: str = "") -> None:
    """FileExistsError (one line) when a file other than ``target`` already gives the web UIs an embedding
    called ``name``: with two, which one a prompt gets depends on the order the host reads the folder."""
    others = other_files_named(embeddings_dir, name, target)
    if others:
        shown = ", ".join(str(path.relative_to(embeddings_dir)) for path in others)
        raise FileExistsError(
            f"an embedding named {name!r} already exists ({shown} in {embeddings_dir}); the web UIs know an"
            f" embedding by its file name, so a second one would clash: {hint or 'choose another name'}"
        )
