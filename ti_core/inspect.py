"""Looking inside an embedding: its layout, vectors, norms and the vocabulary tokens it is nearest to."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .editability import norm_ratios, recorded_mean_norms, vocabulary_mean_norms
from .embedding import REAL_WIDTHS, Embedding
from .timodel import TIModel


def file_layout(path: Path) -> str:
    """A short name for the file's layout, by the tool that writes it ("emb_params (kohya/A1111)", "a1111-pt")."""
    from .formats import read_embedding

    return read_embedding(path)[1]


def architecture_guess(embedding: Embedding) -> str:
    """Which model family an embedding fits, from its keys and real widths."""
    widths = embedding.widths
    if set(widths) >= {"clip_l", "clip_g"}:
        return "sdxl"
    (width,) = widths.values()
    return {REAL_WIDTHS["clip_l"]: "sd1", REAL_WIDTHS["clip_h"]: "sd2"}.get(width, f"unknown ({width} wide)")


def describe(path: Path, embedding: Embedding) -> dict:
    """Everything `inspect` shows, JSON-safe."""
    return {
        "file": str(path),
        "token": embedding.name,
        "format": file_layout(path),
        "architecture": embedding.metadata.get("architecture") or architecture_guess(embedding),
        "vectors": embedding.num_vectors,
        "widths": embedding.widths,
        "step": embedding.step,
        "norms": {key: [round(float(n), 4) for n in tensor.norm(dim=1)] for key, tensor in embedding.vectors.items()},
        # Each norm as a multiple of the vocabulary's mean token norm (1 = a word's scale), as recorded by training.
        "norm_ratios": rounded_ratios(embedding, recorded_mean_norms(embedding.metadata)),
        # architecture is shown above; training_settings below, parsed
        "metadata": {
            key: value
            for key, value in embedding.metadata.items()
            if key not in ("architecture", "training_settings", "vocabulary_norms")
        },
        "training_settings": _json_or_none(embedding.metadata.get("training_settings")),
    }


def rounded_ratios(embedding: Embedding, mean_norms: dict[str, float]) -> dict[str, list[float]]:
    """`norm_ratios` rounded for display ({} without mean norms)."""
    return {key: [round(r, 2) for r in row] for key, row in norm_ratios(embedding.vectors, mean_norms).items()}


def model_norm_ratios(model, embedding: Embedding) -> dict[str, list[float]]:
    """Norm ratios against this model's own vocabulary (for vectors as wide as its encoders)."""
    widths = model.widths
    fitting = {key: tensor for key, tensor in embedding.vectors.items() if widths.get(key) == tensor.shape[1]}
    if not fitting:
        return {}
    return rounded_ratios(Embedding(embedding.name, fitting), vocabulary_mean_norms(model))


def _json_or_none(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def nearest_tokens(model: TIModel, embedding: Embedding, count: int = 5) -> dict[str, list[list[tuple[str, float]]]]:
    """For each vector, the vocabulary tokens with the highest cosine similarity (per encoder)."""
    result = {}
    for encoder in model.encoders:
        vectors = embedding.vectors.get(encoder.key)
        if vectors is None or vectors.shape[1] != encoder.width:
            continue
        table = torch.nn.functional.normalize(encoder.token_table.detach().float(), dim=1)
        similarity = torch.nn.functional.normalize(vectors.float(), dim=1) @ table.T
        scores, ids = similarity.topk(count, dim=1)
        result[encoder.key] = [
            [
                (_token_text(encoder.tokenizer, i), round(float(s), 4))
                for i, s in zip(row_ids.tolist(), row_scores, strict=True)
            ]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]
    return result


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(token_id).replace("</w>", "")
