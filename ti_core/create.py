"""Create: an untrained embedding whose vectors start from the init text's token embeddings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .embedding import Embedding, check_vector_count, spread_vectors
from .formats import refuse_name_clash, save_embedding
from .names import embedding_path, validate_name
from .timodel import TIModel
from .vocab import clean_text


def init_token_ids(tokenizer, init_text: str) -> list[int]:
    """The init text's token ids, without BOS/EOS."""
    return tokenizer(clean_text(init_text), add_special_tokens=False).input_ids if init_text.strip() else []


def create_embedding(model: TIModel, name: str, init_text: str, num_vectors: int) -> Embedding:
    """A new embedding of `num_vectors` vectors per encoder, spread from the init text's tokens.

    Each vector is a row of the text encoder's token-embedding table (before the transformer), so an
    untrained 1-vector embedding made from one word conditions exactly like that word.
    """
    name = validate_name(name)
    vectors = {}
    for encoder in model.encoders:
        ids = init_token_ids(encoder.tokenizer, init_text)
        with torch.no_grad():
            rows = encoder.token_table[torch.tensor(ids, dtype=torch.long)] if ids else encoder.token_table[:0]
        vectors[encoder.key] = spread_vectors(rows.float().cpu(), num_vectors)
    metadata = {
        "init_text": init_text,
        "architecture": model.architecture,
        "base_model": model.name,
    }
    return Embedding(name=name, vectors=vectors, step=0, metadata=metadata)


def create_embedding_file(
    model: TIModel | Callable[[], TIModel],
    embeddings_dir: Path,
    name: str,
    init_text: str = "*",
    vectors: int = 1,
    *,
    overwrite: bool = False,
    overwrite_hint: str = "set overwrite to replace it",
) -> tuple[Embedding, Path]:
    """Create `name` from `init_text` and write ``<embeddings_dir>/<name>.safetensors``, recording the base
    model's hash: the one create action of the command line, the Train tab and the web UI route.

    What needs no model is checked first (the vector count, an existing file, a name another file already
    gives the web UIs), so with `model` given as a loader a mistake is reported before the slow load. An
    existing file without `overwrite` is a FileExistsError ending in `overwrite_hint`, in the caller's words.
    """
    embeddings_dir = Path(embeddings_dir)
    vectors = check_vector_count(vectors)
    target = embedding_path(embeddings_dir, name)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target.name} already exists in {embeddings_dir}; {overwrite_hint}")
    refuse_name_clash(embeddings_dir, name, target)
    if callable(model):
        model = model()
    embedding = create_embedding(model, name, init_text, vectors)
    model_hash = model.shorthash()
    metadata = {"base_model_hash": model_hash} if model_hash else None  # the demo model has no file to hash
    embeddings_dir.mkdir(parents=True, exist_ok=True)
    return embedding, save_embedding(embedding, embeddings_dir, overwrite=overwrite, metadata=metadata)
