"""Our layout: ``{"emb_params": [N, d]}`` (one text encoder) or ``{"clip_l", "clip_g"}`` (SDXL), float32,
with string metadata in the safetensors header; written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_write
from ..embedding import Embedding
from ..names import embedding_path
from .common import SDXL_KEYS, SINGLE_KEY
from .folder import refuse_name_clash


def refuse_existing(path: Path, overwrite: bool) -> None:
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    # clone(): torch.save writes a view's whole storage, so a row slice of a token table must be copied.
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def _tensors_to_write(embedding: Embedding) -> dict[str, torch.Tensor]:
    keys = set(embedding.vectors)
    if keys == set(SDXL_KEYS):
        return {key: as_float32(embedding.vectors[key]) for key in SDXL_KEYS}
    if len(keys) == 1:
        return {SINGLE_KEY: as_float32(next(iter(embedding.vectors.values())))}
    raise ValueError(
        f"embedding {embedding.name!r}: cannot store encoders {sorted(keys)} "
        "(expected one text encoder, or clip_l + clip_g for SDXL)"
    )


def single_tensor(embedding: Embedding, format_name: str) -> torch.Tensor:
    if len(embedding.vectors) != 1:
        raise ValueError(
            f"embedding {embedding.name!r} has {len(embedding.vectors)} text encoders; the {format_name} format holds "
            "one (share SDXL embeddings as the clip_l/clip_g .safetensors file)"
        )
    return as_float32(next(iter(embedding.vectors.values())))


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def header_metadata(embedding: Embedding, metadata: dict[str, Any] | None = None) -> dict[str, str]:
    """The safetensors header we write: the embedding's metadata, ``tool``, then ``metadata``; None values dropped.

    ``name``, ``step`` and ``vectors`` always describe the embedding itself.
    """
    header: dict[str, str] = {}
    for source in (embedding.metadata, {"tool": f"ti_core {__version__}"}, metadata or {}):
        for key, value in source.items():
            if value is not None:
                header[str(key)] = _to_str(value)
    header.update(name=embedding.name, step=str(int(embedding.step)), vectors=str(embedding.num_vectors))
    return header


def save_embedding(
    embedding: Embedding, embeddings_dir: Path, *, overwrite: bool = False, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``<embeddings_dir>/<name>.safetensors`` atomically; FileExistsError if it exists and not
    ``overwrite``, or if another file (``name.pt``, ``sub/name.safetensors``) already names an embedding so."""
    path = embedding_path(Path(embeddings_dir), embedding.name)
    refuse_name_clash(Path(embeddings_dir), embedding.name, path)
    return save_embedding_to(embedding, path, overwrite=overwrite, metadata=metadata)


def save_embedding_to(
    embedding: Embedding, path: Path, *, overwrite: bool = True, metadata: dict[str, Any] | None = None
) -> Path:
    """Write our .safetensors layout to an explicit path (snapshots, exports), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    refuse_existing(path, overwrite)
    tensors = _tensors_to_write(embedding)
    header = header_metadata(embedding, metadata)
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=header))
