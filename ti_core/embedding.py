"""The embedding itself: named vectors, one [N, width] tensor per text encoder, and how they start."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

# Text-encoder keys. SD1 uses CLIP ViT-L (768), SD2 OpenCLIP ViT-H (1024), SDXL both CLIP ViT-L and
# OpenCLIP ViT-bigG (1280). SDXL files store "clip_l"/"clip_g" (kohya, A1111, OneTrainer);
# single-encoder files store one tensor.
REAL_WIDTHS = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}
MAX_VECTORS = 75


@dataclass
class Embedding:
    """A textual-inversion embedding: its token (the file stem) and one [N, width] tensor per encoder."""

    name: str
    vectors: dict[str, torch.Tensor]
    step: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError(f"embedding {self.name!r} has no vectors")
        counts = {tensor.shape[0] for tensor in self.vectors.values()}
        if len(counts) != 1 or any(tensor.ndim != 2 for tensor in self.vectors.values()):
            shapes = {key: tuple(tensor.shape) for key, tensor in self.vectors.items()}
            raise ValueError(
                f"embedding {self.name!r}: every encoder needs an [N, width] tensor with the same N: {shapes}"
            )

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {key: tensor.shape[1] for key, tensor in self.vectors.items()}

    @property
    def negative(self) -> bool:
        """Trained as a negative embedding (its recorded settings say so): it belongs in negative prompts."""
        try:
            settings = json.loads(self.metadata.get("training_settings") or "{}")
        except ValueError:
            return False
        return isinstance(settings, dict) and settings.get("negative_embedding") is True


def check_vector_count(num_vectors: int) -> int:
    """`num_vectors` when it is a valid count of vectors per token; ValueError (one line) otherwise."""
    if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or not 1 <= num_vectors <= MAX_VECTORS:
        raise ValueError(f"vectors per token must be between 1 and {MAX_VECTORS}, not {num_vectors}")
    return num_vectors


def spread_vectors(rows: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Spread T token rows [T, d] over N vectors: vector i = row[i * T // N] (A1111's create rule).

    Fewer tokens than vectors repeat blockwise (t0 t0 t1 t1), more are subsampled; no tokens give zeros.
    """
    check_vector_count(num_vectors)
    count, width = rows.shape
    if count == 0:
        return torch.zeros(num_vectors, width, dtype=torch.float32)
    index = torch.arange(num_vectors) * count // num_vectors
    return rows[index].detach().to(torch.float32).clone()
