"""Create: an untrained embedding whose vectors start from the init text's token embeddings."""

from __future__ import annotations

import torch

from .embedding import Embedding, spread_vectors
from .names import validate_name
from .vocab import clean_text


def init_token_ids(tokenizer, init_text: str) -> list[int]:
    """The init text's token ids, without BOS/EOS."""
    return tokenizer(clean_text(init_text), add_special_tokens=False).input_ids if init_text.strip() else []


def create_embedding(model, name: str, init_text: str, num_vectors: int) -> Embedding:
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
