"""What every embedding format shares: file suffixes, encoder keys and widths, and the one-line error."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".bin")
IMAGE_SUFFIXES = (".png", ".webp")
LOADABLE_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES, *IMAGE_SUFFIXES)
PNG_CHUNK = "sd-ti-embedding"  # A1111's tEXt key: base64 of JSON, tensors as {"TORCHTENSOR": nested list}
A1111_TOKEN_ID = 265  # A1111 writes string_to_token {"*": 265}, the id of "*" in CLIP's vocabulary

# Files next to embeddings that are not embeddings: A1111's "<name>.preview.png" and "<name>.pt.optim".
SIDECAR_STEMS = (".preview", ".optim")

SINGLE_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")
# Encoder key of a single-tensor file by its width, when the model is not known.
KEY_BY_WIDTH = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
KIND_BY_WIDTH = {768: "SD1", 1024: "SD2", 1280: "SDXL clip_g"}
SINGLE_ON_SDXL = {
    768: "an SD1 embedding (one 768-wide tensor)",
    1024: "an SD2 embedding (one 1024-wide tensor)",
    1280: "only the clip_g half of an SDXL embedding",
}
T5_WIDTH = 4096  # T5-XXL, the third text encoder of SD3 and the second of Flux
KIND_BY_WIDTHS = {
    (("clip_l", 768),): "SD1",
    (("clip_h", 1024),): "SD2",
    (("clip_g", 1280), ("clip_l", 768)): "SDXL",
}


class EmbeddingFileError(ValueError):
    """An embedding file that cannot be read; the one-line message names the file and says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason

    def __reduce__(self):  # the exception crosses processes (accelerate) intact
        return (type(self), (self.path, self.reason))


def first_line(error: BaseException) -> str:
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    text = lines[0].strip() if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def file_error(path: Path, reason: str) -> EmbeddingFileError:
    return EmbeddingFileError(path, " ".join(reason.split()))


def keys_text(keys) -> str:
    keys = [repr(key) for key in keys]
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


class TensorJSONEncoder(json.JSONEncoder):
    def default(self, obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.detach().cpu().tolist()}
        return super().default(obj)


def decode_tensor(obj: dict) -> Any:
    if "TORCHTENSOR" in obj:
        return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float64)
    return obj
