"""Managing embedding files: make a snapshot the embedding, rename one, delete one to the trash.

Nothing is lost: a file that is replaced or deleted is moved to the trash folder beside the embeddings folder
(`textual_inversion_trash`, outside it so that no web UI loads what is there). Every write is atomic and lands
only in the embeddings, log or trash folder.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path

from .atomic import atomic_write
from .formats.folder import embeddings_named
from .names import embedding_path, validate_name

TRASH_FOLDER = "textual_inversion_trash"
PREVIEW_SUFFIX = ".preview.png"  # the card image beside an embedding
_SNAPSHOT = re.compile(r"-(\d+|best)$")


def trash_dir(embeddings_dir: Path) -> Path:
    """The trash folder: next to the embeddings folder, not in it."""
    return Path(embeddings_dir).resolve().parent / TRASH_FOLDER


def move_to_trash(path: Path, embeddings_dir: Path) -> Path:
    """Move ``path`` into the trash (a timestamp added to its stem when the name is taken); the new path."""
    trash = trash_dir(embeddings_dir)
    trash.mkdir(parents=True, exist_ok=True)
    target = _free_name(trash, Path(path).name)
    try:
        os.replace(path, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        atomic_write(target, lambda temp: shutil.copyfile(path, temp))  # another disk: copy, then remove
        os.unlink(path)
    return target


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    if not target.exists():
        return target
    stem, dot, suffix = name.partition(".")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for count in range(1000):
        extra = f"-{count}" if count else ""
        target = folder / f"{stem}-{stamp}{extra}{dot}{suffix}"
        if not target.exists():
            return target
    raise FileExistsError(f"the trash {folder} has too many files named {name}; empty it")


def _files_of(embeddings_dir: Path, name: str) -> list[Path]:
    """The embedding's files (any format, any subfolder) and their preview cards; FileNotFoundError if none."""
    files = embeddings_named(embeddings_dir, validate_name(name))
    if not files:
        raise FileNotFoundError(f"no embedding named {name} in {embeddings_dir}")
    previews = [path.with_name(path.stem + PREVIEW_SUFFIX) for path in files]
    return files + [path for path in previews if path.is_file()]


def delete_embedding(embeddings_dir: Path, name: str) -> list[Path]:
    """Move the embedding ``name`` (its files and preview card) to the trash; where they went."""
    return [move_to_trash(path, embeddings_dir) for path in _files_of(embeddings_dir, name)]


def rename_embedding(embeddings_dir: Path, name: str, new_name: str) -> list[Path]:
    """Rename the embedding ``name`` (its files and preview card) to ``new_name``; the new paths.

    ValueError (one line) for an invalid new name or one another embedding already has."""
    new_name = validate_name(new_name)
    files = _files_of(embeddings_dir, name)
    if new_name.casefold() != validate_name(name).casefold() and embeddings_named(embeddings_dir, new_name):
        raise ValueError(f"an embedding named {new_name} already exists; pick another name or delete it first")
    targets = []
    for path in files:
        suffix = PREVIEW_SUFFIX if path.name.endswith(PREVIEW_SUFFIX) else path.suffix
        target = embedding_path(path.parent, new_name, suffix)
        if target.exists() and not _same(target, path):
            raise ValueError(f"{target.name} already exists in {path.parent}; move it away first")
        targets.append((path, target))
    for path, target in targets:
        os.replace(path, target)
    return [target for _, target in targets]


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def snapshot_path(log_dir: Path, name: str, step: int | str) -> Path:
    """`<log_dir>/<name>/<name>-<step>.safetensors` (step: a number or "best")."""
    name = validate_name(name)
    label = str(step).strip()
    if not (label.isdigit() or label == "best"):
        raise ValueError(f"step must be a snapshot's step number or 'best', not {step!r}")
    return Path(log_dir) / name / f"{name}-{int(label) if label.isdigit() else label}.safetensors"


def list_snapshots(log_dir: Path, name: str) -> list[str]:
    """The steps of the run's snapshots ("best" last), e.g. ["20", "40", "best"]."""
    folder = Path(log_dir) / validate_name(name)
    found = []
    for path in folder.glob(f"{glob_escape(name)}-*.safetensors"):
        match = _SNAPSHOT.search(path.name[: -len(".safetensors")])
        if match and path.name == f"{name}-{match.group(1)}.safetensors":
            found.append(match.group(1))
    return sorted(found, key=lambda step: (not step.isdigit(), int(step) if step.isdigit() else 0))


# The grids that compare a run's images, in <log_dir>/<name>/images/<name>-<kind>.png: its previews by step
# (written at the end of a run) and its snapshots rendered side by side (Compare snapshots).
COMPARISON_GRIDS = ("by-step", "snapshots")


def list_previews(log_dir: Path, name: str) -> list[tuple[int, Path]]:
    """The run's preview images, `images/<name>-<step>.png`, as (step, path) by step."""
    folder = Path(log_dir) / validate_name(name) / "images"
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)$")
    found = [(int(match[1]), path) for path in folder.glob("*.png") if (match := pattern.match(path.stem))]
    return sorted(found)


def comparison_grid_path(log_dir: Path, name: str, kind: str) -> Path:
    """`images/<name>-<kind>.png` of the run (kind: one of COMPARISON_GRIDS)."""
    return Path(log_dir) / validate_name(name) / "images" / f"{name}-{kind}.png"


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def promote_snapshot(embeddings_dir: Path, log_dir: Path, name: str, step: int | str) -> Path:
    """Make the snapshot of ``step`` the embedding ``<embeddings_dir>/<name>.safetensors``; the old file goes to
    the trash first (as a copy: the embedding is never missing), then the snapshot replaces it atomically."""
    source = snapshot_path(log_dir, name, step)
    if not source.is_file():
        steps = list_snapshots(log_dir, name)
        have = f"snapshots: {', '.join(steps)}" if steps else "the run has no snapshots"
        raise FileNotFoundError(f"no snapshot {source.name} in {source.parent} ({have})")
    target = embedding_path(embeddings_dir, name)
    if target.is_file():
        trash = trash_dir(embeddings_dir)
        trash.mkdir(parents=True, exist_ok=True)
        atomic_write(_free_name(trash, target.name), lambda temp: shutil.copyfile(target, temp))
    return atomic_write(target, lambda temp: shutil.copyfile(source, temp))
