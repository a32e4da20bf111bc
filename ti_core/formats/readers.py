"""Reading any embedding file: safetensors, pickles (through the restricted unpickler), PNG/WEBP images."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from .. import image_data
from ..embedding import Embedding
from ..safe_pickle import EMBEDDING_FILES, RefusedGlobal, load_pickle
from .common import (
    IMAGE_SUFFIXES,
    LOADABLE_SUFFIXES,
    PICKLE_SUFFIXES,
    PNG_CHUNK,
    SAFETENSORS_SUFFIX,
    decode_tensor,
    file_error,
    first_line,
)
from .layout import layout_name, select_vectors, split_payload


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # SafetensorError, OSError, and dtype errors for exotic formats
        raise file_error(path, f"not a valid safetensors file, corrupt or truncated ({first_line(error)})") from error
    return tensors, header


def _read_pickle(path: Path) -> Any:
    try:
        return load_pickle(path, EMBEDDING_FILES)
    except RefusedGlobal as error:
        raise file_error(
            path,
            f"holds pickled code or objects other than tensors ({error.name}); refusing to load it "
            "(only plain weights are read, for safety)",
        ) from error
    except Exception as error:  # UnpicklingError, RuntimeError for broken zip archives, EOFError when truncated
        raise file_error(path, f"corrupt, truncated or not a PyTorch file ({first_line(error)})") from error


def chunk_text(image) -> str | None:
    # Pillow reads text chunks before the image data on open; chunks after it need .text (a full decode).
    text = image.info.get(PNG_CHUNK)
    if text is None and hasattr(image, "text"):
        text = image.text.get(PNG_CHUNK)
    return text


def _embedding_json(text: str | bytes) -> Any:
    """A1111's image payload: JSON whose tensors are {"TORCHTENSOR": nested list}; ValueError if it is not."""
    try:
        data = json.loads(text, object_hook=decode_tensor)
    except (ValueError, TypeError, RuntimeError, RecursionError) as error:  # torch.tensor of a ragged list, too
        raise ValueError(first_line(error)) from error
    if not isinstance(data, dict):
        raise ValueError(f"it holds a {type(data).__name__}, not an embedding")
    return data


def _read_image(path: Path) -> tuple[Any, str]:
    """The embedding in an image and where it was: its text chunk, else (as the web UIs do) its pixels."""
    from PIL import Image

    chunk_error = None
    try:
        with Image.open(path) as image:
            text = chunk_text(image)
            if text is not None:
                try:
                    return _embedding_json(base64.b64decode(text)), "text chunk"
                except (ValueError, binascii.Error) as error:  # a damaged chunk: the pixels may still be whole
                    chunk_error = error
            data = image_data.read_strips(image)
    except Exception as error:  # UnidentifiedImageError, truncated files, decompression bombs
        raise file_error(path, f"not a readable image ({first_line(error)})") from error
    if data is None:
        if chunk_error is not None:
            raise file_error(path, f"its {PNG_CHUNK!r} chunk is not base64 JSON of an embedding ({chunk_error})")
        raise file_error(
            path,
            f"has no {PNG_CHUNK!r} text chunk and no embedding in its pixels (a plain image, or a copy saved "
            "lossily, such as a JPEG or lossy WEBP)",
        )
    try:
        return _embedding_json(data), "pixels"
    except ValueError as error:
        raise file_error(path, f"the data in its pixels is not JSON of an embedding ({error})") from error


def _step(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return 0


def _check_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in LOADABLE_SUFFIXES:
        raise file_error(
            path, f"unsupported file type {path.suffix or '(none)'!r}; expected one of {', '.join(LOADABLE_SUFFIXES)}"
        )
    try:
        size = path.stat().st_size
    except OSError as error:
        raise file_error(path, f"cannot be read ({error.strerror or error})") from error
    if not path.is_file():
        raise file_error(path, "is not a file")
    if size == 0:
        raise file_error(path, "is empty (0 bytes)")
    return suffix


def read_embedding(path: Path, *, widths: dict[str, int] | None = None) -> tuple[Embedding, str]:
    """``load_embedding`` and the file's layout by the tool that writes it (as ``inspect`` shows it)."""
    path = Path(path)
    suffix = _check_file(path)
    name, header, source, data = path.stem, {}, "", None
    if suffix == SAFETENSORS_SUFFIX:
        candidates, header = _read_safetensors(path)
        step = _step(header.get("step", 0))
        metadata = {key: value for key, value in header.items() if key not in ("name", "step", "vectors")}
    else:
        if suffix in PICKLE_SUFFIXES:
            data = _read_pickle(path)
        else:
            data, source = _read_image(path)
        candidates, fields = split_payload(path, data)
        if suffix in IMAGE_SUFFIXES and isinstance(data.get("name"), str) and data["name"]:
            name = data["name"]
        step = _step(fields.get("step", 0))
        metadata = {
            key: str(value)
            for key, value in fields.items()
            if isinstance(key, str) and key not in ("name", "step") and isinstance(value, (str, int, float))
        }
    vectors = select_vectors(path, candidates, widths)
    try:
        embedding = Embedding(name=name, vectors=vectors, step=step, metadata=metadata)
    except ValueError as error:
        raise file_error(path, str(error)) from error
    return embedding, layout_name(suffix, data, candidates, header, source)


def load_embedding(path: Path, *, widths: dict[str, int] | None = None) -> Embedding:
    """Read an embedding file of any supported format; EmbeddingFileError (one line, naming the file) if not.

    ``widths`` is the model's ``{encoder key: width}``: a single-tensor file gets the key whose width matches
    (an error if none does, or if the model has two encoders: one tensor is no SDXL embedding), and SDXL files
    must match both. Without it, 768/1024/1280 map to clip_l/clip_h/clip_g and any other width to clip_l.
    The name is the file stem (the token the web UIs use), except for images, where the name stored in the
    image wins, as in A1111. A T5 (SD3/Flux) embedding is refused with a line saying so.
    """
    return read_embedding(path, widths=widths)[0]
