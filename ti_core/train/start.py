"""Where a run starts: a new embedding, a created one never trained, or a resumed one (adopting a file
saved in another format as `<name>.safetensors`)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from ..config import TrainConfig
from ..create import create_embedding
from ..embedding import Embedding
from ..formats import load_embedding, other_files_named, refuse_name_clash, save_embedding_to
from ..names import embedding_path, plural
from ..timodel import TIModel
from .events import AlreadyTrained, StepsReached
from .run_folder import RunFolder


def starting_embedding(model: TIModel, config: TrainConfig, run: RunFolder | None = None) -> tuple[Embedding, str]:
    """The embedding to train (the saved one when resuming, else a new one from the init text), and a note
    for the start message. Resuming from another file than ``<name>.safetensors`` converts it when a `run`
    is given (the main process's): see `adopt_resumed_file`."""
    path = embedding_path(config.embeddings_dir, config.name)
    check_trainable(config)
    if not config.resume:
        refuse_name_clash(config.embeddings_dir, config.name, path, hint="resume to continue training it, or rename")
        if path.exists() and not config.overwrite:
            # Created (step 0) and never trained: that is the embedding to train, from its initial vectors.
            existing = load_embedding(path, widths=model.widths)
            existing.name = config.name
            return existing, f"training {path.name} as it was created ({plural(existing.num_vectors, 'vector')})"
        return create_embedding(model, config.name, config.init_text, config.vectors), ""
    source = resume_source(config)
    embedding = load_embedding(source, widths=model.widths)
    embedding.name = config.name
    if source == path or run is None:
        return embedding, ""
    return embedding, adopt_resumed_file(embedding, source, config, run)


def check_trainable(config: TrainConfig) -> None:
    """Whether this run can start, from the files alone (before any model is loaded): the one check of every
    front end. A new run (no resume, no overwrite) refuses an embedding trained already (AlreadyTrained; a
    created, never trained one is trained from its initial vectors); a resumed run needs a file to resume
    (FileNotFoundError, or FileExistsError for several) trained below `config.steps` (StepsReached)."""
    path = embedding_path(config.embeddings_dir, config.name)
    if config.resume:
        source = resume_source(config)
        step = load_embedding(source).step
        if step >= config.steps:
            raise StepsReached(source, step)
    elif not config.overwrite and path.is_file():
        step = load_embedding(path).step
        if step > 0:
            raise AlreadyTrained(path, step)


def resume_source(config: TrainConfig) -> Path:
    """What a resumed run starts from: ``<name>.safetensors``, else the one other file the web UIs load as
    ``<name>`` (A1111's ``<name>.pt``, a diffusers ``.bin``, a copy in a subfolder)."""
    path = embedding_path(config.embeddings_dir, config.name)
    if path.is_file():
        return path
    others = other_files_named(config.embeddings_dir, config.name, path)
    if len(others) > 1:
        shown = ", ".join(str(other.relative_to(config.embeddings_dir)) for other in others)
        raise FileExistsError(f"cannot resume: several files are named {config.name!r} ({shown}); keep one")
    if not others:
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    return others[0]


def adopt_resumed_file(embedding: Embedding, source: Path, config: TrainConfig, run: RunFolder) -> str:
    """Resuming from another file than ``<name>.safetensors`` (A1111's ``.pt``, say): write the vectors as
    ``<name>.safetensors`` now and move the original into the run's log folder, so the web UI goes on seeing
    exactly one embedding of that name (two files with one name clash) and nothing is lost if the run dies."""
    path = embedding_path(config.embeddings_dir, config.name)
    save_embedding_to(embedding, path, overwrite=False, metadata={"converted_from": source.name})
    kept = run.folder / source.name
    for number in itertools.count(1):
        if not kept.exists():
            break
        kept = run.folder / f"{source.stem}-{number}{source.suffix}"
    run.folder.mkdir(parents=True, exist_ok=True)
    shutil.move(source, kept)
    return f"resumed from {source.name}, now {path.name} (the original is kept as {kept})"
