"""Embedding files: ours are written atomically; every format the web UIs and trainers write is read.

What we write (what A1111, Forge, reForge, SD.Next, ComfyUI and diffusers all read):
- one text encoder (SD1 clip_l, SD2 clip_h): ``{"emb_params": [N, d]}`` (kohya's layout; A1111 asserts one tensor);
- SDXL: ``{"clip_l": [N, 768], "clip_g": [N, 1280]}`` (kohya, A1111, OneTrainer);
float32, with string metadata (name, step, vectors, init text, base model, settings) in the safetensors header.

What we read: those; OneTrainer's ``emp_params`` (and its ``*_out`` output embeddings, ignored); any
single-tensor safetensors or diffusers ``{token: tensor}`` (.safetensors or .bin); A1111 ``.pt``
(``string_to_param``), legacy and zip serialisation; PNG images carrying A1111's ``sd-ti-embedding`` chunk.
Pickle files are read with ``weights_only=True``, so a payload in them never runs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .embedding import Embedding
from .names import embedding_path

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".bin")
IMAGE_SUFFIXES = (".png", ".webp")
LOADABLE_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES, *IMAGE_SUFFIXES)
PNG_CHUNK = "sd-ti-embedding"  # A1111's tEXt key: base64 of JSON, tensors as {"TORCHTENSOR": nested list}
A1111_TOKEN_ID = 265  # A1111 writes string_to_token {"*": 265}, the id of "*" in CLIP's vocabulary
TEMP_SUFFIX = ".tmp"
# Files next to embeddings that are not embeddings: A1111's "<name>.preview.png" and "<name>.pt.optim".
SIDECAR_STEMS = (".preview", ".optim")

SINGLE_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")
# Encoder key of a single-tensor file by its width, when the model is not known.
KEY_BY_WIDTH = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
_KIND_BY_WIDTH = {768: "SD1", 1024: "SD2", 1280: "SDXL clip_g"}
_KIND_BY_WIDTHS = {
    (("clip_l", 768),): "SD1",
    (("clip_h", 1024),): "SD2",
    (("clip_g", 1280), ("clip_l", 768)): "SDXL",
}


class EmbeddingFileError(ValueError):
    """An embedding file that cannot be read; the one-line message names the file and says why."""


# ----------------------------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: Path, write_fn: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write_fn(temp_path)`` so it is either the old file or the complete new one.

    The temp file sits in the same folder (so ``os.replace`` is atomic), is fsynced before it replaces
    ``path``, and is removed if anything fails, including ``write_fn`` itself. Creates the folder if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _create_temp(path)
    try:
        mode = temp.stat().st_mode & 0o777
        write_fn(temp)
        if temp.stat().st_mode & 0o777 != mode:  # safetensors replaces the file with its own private one
            os.chmod(temp, mode)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_folder(path.parent)
    return path


def _create_temp(path: Path) -> Path:
    # A hidden ".<name>.<random>.tmp" file: list_embeddings and the web UIs never take it for an embedding.
    # os.open with 0o666 honours the umask (mkstemp would leave the final file private, 0o600).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            os.close(os.open(temp, flags, 0o666))
            return temp
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); best effort."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    # clone(): torch.save writes a view's whole storage, so a row slice of a token table must be copied.
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def _tensors_to_write(embedding: Embedding) -> dict[str, torch.Tensor]:
    keys = set(embedding.vectors)
    if keys == set(SDXL_KEYS):
        return {key: _float32(embedding.vectors[key]) for key in SDXL_KEYS}
    if len(keys) == 1:
        return {SINGLE_KEY: _float32(next(iter(embedding.vectors.values())))}
    raise ValueError(
        f"embedding {embedding.name!r}: cannot store encoders {sorted(keys)} "
        "(expected one text encoder, or clip_l + clip_g for SDXL)"
    )


def _single_tensor(embedding: Embedding, format_name: str) -> torch.Tensor:
    if len(embedding.vectors) != 1:
        raise ValueError(
            f"embedding {embedding.name!r} has {len(embedding.vectors)} text encoders; the {format_name} format holds "
            "one (share SDXL embeddings as the clip_l/clip_g .safetensors file)"
        )
    return _float32(next(iter(embedding.vectors.values())))


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
    _refuse_existing(path, overwrite)
    tensors = _tensors_to_write(embedding)
    header = header_metadata(embedding, metadata)
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=header))


def export_diffusers(embedding: Embedding, path: Path, *, token: str | None = None, overwrite: bool = True) -> Path:
    """Write diffusers' ``{token: [N, d]}`` .safetensors (``load_textual_inversion``); single encoder only."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ValueError(f"{path}: a diffusers export is a .safetensors file")
    tensor = _single_tensor(embedding, "diffusers")
    _refuse_existing(path, overwrite)
    header = {"format": "pt", **header_metadata(embedding)}
    key = token or embedding.name
    return atomic_write(path, lambda temp: save_file({key: tensor}, str(temp), metadata=header))


def _a1111_payload(embedding: Embedding) -> dict[str, Any]:
    """The dict A1111 saves in .pt files and preview images (``Embedding.save``)."""
    meta = embedding.metadata
    checkpoint = meta.get("sd_checkpoint") or (meta.get("base_model_hash") or "")[:10] or None
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": _single_tensor(embedding, "A1111 .pt")},
        "name": embedding.name,
        "step": int(embedding.step),
        "sd_checkpoint": checkpoint,
        "sd_checkpoint_name": meta.get("sd_checkpoint_name") or meta.get("base_model"),
    }


def export_a1111_pt(embedding: Embedding, path: Path, *, overwrite: bool = True) -> Path:
    """Write A1111's .pt layout (``string_to_param {"*": tensor}``, name, step, checkpoint); single encoder only."""
    path = Path(path)
    payload = _a1111_payload(embedding)
    _refuse_existing(path, overwrite)
    return atomic_write(path, lambda temp: torch.save(payload, temp))


class _TensorJSONEncoder(json.JSONEncoder):
    def default(self, obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.detach().cpu().tolist()}
        return super().default(obj)


def _decode_tensor(obj: dict) -> Any:
    if "TORCHTENSOR" in obj:
        return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float64)
    return obj


_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def save_embedding_png(embedding: Embedding, path: Path, image, *, overwrite: bool = True) -> Path:
    """Save a PIL ``image`` as a PNG carrying the embedding in A1111's ``sd-ti-embedding`` chunk, atomically.

    Single-encoder embeddings carry A1111's .pt dict; SDXL ones ``{"clip_l", "clip_g"}`` only, the layout
    A1111 accepts (its SDXL branch converts every value to a tensor). The image's text chunks are kept.
    """
    from PIL import PngImagePlugin

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: an embedding image must be a .png file")
    if set(embedding.vectors) == set(SDXL_KEYS):
        payload: dict[str, Any] = {key: _float32(embedding.vectors[key]) for key in SDXL_KEYS}
    else:
        payload = _a1111_payload(embedding)
    info = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str) and key != PNG_CHUNK:
            info.add_text(key, value)
    info.add_text(PNG_CHUNK, base64.b64encode(json.dumps(payload, cls=_TensorJSONEncoder).encode()))
    picture = image if image.mode in _PNG_MODES else image.convert("RGBA" if "A" in image.getbands() else "RGB")
    _refuse_existing(path, overwrite)
    return atomic_write(path, lambda temp: picture.save(temp, format="PNG", pnginfo=info))


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _first_line(error: BaseException) -> str:
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    text = lines[0].strip() if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _fail(path: Path, reason: str) -> EmbeddingFileError:
    return EmbeddingFileError(f"{path}: {' '.join(reason.split())}")


def _keys_text(keys) -> str:
    keys = [repr(key) for key in keys]
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # SafetensorError, OSError, and dtype errors for exotic formats
        raise _fail(path, f"not a valid safetensors file, corrupt or truncated ({_first_line(error)})") from error
    return tensors, header


def _read_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError for broken zip archives, EOFError when truncated
        text = str(error)
        refused = re.search(r"Unsupported global: (?:GLOBAL )?(\S+)", text)
        if refused:
            raise _fail(
                path,
                f"holds pickled code or objects other than tensors ({refused.group(1)}); refusing to load it "
                "(only plain weights are read, for safety)",
            ) from error
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        reason = (detail.group(1).strip()[:200] or "unreadable pickle data") if detail else _first_line(error)
        raise _fail(path, f"corrupt, truncated or not a PyTorch file ({reason})") from error


def _chunk_text(image) -> str | None:
    # Pillow reads text chunks before the image data on open; chunks after it need .text (a full decode).
    text = image.info.get(PNG_CHUNK)
    if text is None and hasattr(image, "text"):
        text = image.text.get(PNG_CHUNK)
    return text


def _read_image(path: Path) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = _chunk_text(image)
    except Exception as error:  # UnidentifiedImageError, truncated files, decompression bombs
        raise _fail(path, f"not a readable image ({_first_line(error)})") from error
    if text is None:
        raise _fail(path, f"has no {PNG_CHUNK!r} text chunk (a plain image, not an embedding)")
    try:
        return json.loads(base64.b64decode(text), object_hook=_decode_tensor)
    except Exception as error:
        raise _fail(
            path, f"its {PNG_CHUNK!r} chunk is not base64 JSON of an embedding ({_first_line(error)})"
        ) from error


def _split_payload(path: Path, data: Any) -> tuple[dict[Any, Any], dict[str, Any]]:
    """The candidate tensors and the other fields of a .pt/.bin/image payload."""
    if isinstance(data, torch.Tensor):
        return {"*": data}, {}
    if not isinstance(data, dict):
        raise _fail(path, f"unknown layout: holds a {type(data).__name__}, not a dict of tensors")
    if "string_to_param" not in data:
        return data, {}
    params = data["string_to_param"]
    if not isinstance(params, dict) or len(params) != 1:
        count = len(params) if isinstance(params, dict) else type(params).__name__
        raise _fail(path, f"unknown layout: string_to_param must hold exactly one tensor, not {count}")
    fields = {key: value for key, value in data.items() if key not in ("string_to_param", "string_to_token")}
    return dict(params), fields


def _as_vectors(path: Path, key: Any, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise _fail(path, f"tensor {key!r} has dtype {tensor.dtype}, not floating point")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise _fail(path, f"tensor {key!r} has shape {list(tensor.shape)}, expected [vectors, width]")
    return tensor.detach().to(torch.float32).contiguous()


def _describe_widths(widths: dict[str, int]) -> str:
    if len(widths) == 1:
        return f"this model's text encoder is {next(iter(widths.values()))} wide"
    listed = " and ".join(f"{width} ({key})" for key, width in widths.items())
    return f"this model's text encoders are {listed} wide"


def _hint(file_kind: str | None, widths: dict[str, int]) -> str:
    model_kind = _KIND_BY_WIDTHS.get(tuple(sorted(widths.items())))
    if file_kind and model_kind:
        return f" (an {file_kind} embedding on an {model_kind} model?)"
    return ""


def _key_for_single(path: Path, width: int, widths: dict[str, int] | None) -> str:
    if widths is None:
        return KEY_BY_WIDTH.get(width, "clip_l")
    for key, model_width in widths.items():
        if model_width == width:
            return key
    hint = _hint(_KIND_BY_WIDTH.get(width), widths)
    raise _fail(path, f"has width {width} but {_describe_widths(widths)}{hint}")


def _check_sdxl(path: Path, vectors: dict[str, torch.Tensor], widths: dict[str, int] | None) -> None:
    if widths is None:
        return
    if not set(SDXL_KEYS) <= set(widths):
        hint = _hint("SDXL", widths)
        raise _fail(path, f"is an SDXL embedding (clip_l + clip_g) but {_describe_widths(widths)}{hint}")
    wrong = [
        f"{key} has width {vectors[key].shape[1]}, not {widths[key]}"
        for key in SDXL_KEYS
        if vectors[key].shape[1] != widths[key]
    ]
    if wrong:
        raise _fail(path, f"does not fit this SDXL model: {'; '.join(wrong)}")


def _select_vectors(path: Path, candidates: dict[Any, Any], widths: dict[str, int] | None) -> dict[str, torch.Tensor]:
    # OneTrainer stores output embeddings next to the input ones ("clip_l_out", "emp_params_out"): not ours.
    layout = {
        key: value
        for key, value in candidates.items()
        if not (isinstance(key, str) and key.endswith("_out") and key[: -len("_out")] in candidates)
    }
    not_tensors = [key for key, value in layout.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        verb = "is not a tensor" if len(not_tensors) == 1 else "are not tensors"
        raise _fail(path, f"unknown layout: {_keys_text(not_tensors)} {verb}")
    if not layout:
        raise _fail(path, "holds no tensors")
    if all(key in layout for key in SDXL_KEYS):
        if len(layout) != 2:
            raise _fail(path, f"unknown layout: clip_l + clip_g plus other tensors ({_keys_text(layout)})")
        vectors = {key: _as_vectors(path, key, layout[key]) for key in SDXL_KEYS}
        _check_sdxl(path, vectors, widths)
        return vectors
    if len(layout) != 1:
        raise _fail(
            path,
            f"unknown layout: {len(layout)} tensors ({_keys_text(layout)}); expected one tensor, or clip_l + clip_g",
        )
    ((key, tensor),) = layout.items()
    tensor = _as_vectors(path, key, tensor)
    return {_key_for_single(path, tensor.shape[1], widths): tensor}


def _step(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return 0


def load_embedding(path: Path, *, widths: dict[str, int] | None = None) -> Embedding:
    """Read an embedding file of any supported format; EmbeddingFileError (one line, naming the file) if not.

    ``widths`` is the model's ``{encoder key: width}``: a single-tensor file gets the key whose width matches
    (an error if none does), and SDXL files must match both. Without it, 768/1024/1280 map to
    clip_l/clip_h/clip_g and any other width to clip_l. The name is the file stem (the token the web UIs use),
    except for images, where the name stored in the chunk wins, as in A1111.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LOADABLE_SUFFIXES:
        raise _fail(
            path, f"unsupported file type {path.suffix or '(none)'!r}; expected one of {', '.join(LOADABLE_SUFFIXES)}"
        )
    try:
        size = path.stat().st_size
    except OSError as error:
        raise _fail(path, f"cannot be read ({error.strerror or error})") from error
    if not path.is_file():
        raise _fail(path, "is not a file")
    if size == 0:
        raise _fail(path, "is empty (0 bytes)")

    name = path.stem
    if suffix == SAFETENSORS_SUFFIX:
        candidates, header = _read_safetensors(path)
        step = _step(header.get("step", 0))
        metadata = {key: value for key, value in header.items() if key not in ("name", "step", "vectors")}
    else:
        data = _read_pickle(path) if suffix in PICKLE_SUFFIXES else _read_image(path)
        candidates, fields = _split_payload(path, data)
        if suffix in IMAGE_SUFFIXES and isinstance(data, dict) and isinstance(data.get("name"), str) and data["name"]:
            name = data["name"]
        step = _step(fields.get("step", 0))
        metadata = {
            key: str(value)
            for key, value in fields.items()
            if isinstance(key, str) and key not in ("name", "step") and isinstance(value, (str, int, float))
        }
    vectors = _select_vectors(path, candidates, widths)
    try:
        return Embedding(name=name, vectors=vectors, step=step, metadata=metadata)
    except ValueError as error:
        raise _fail(path, str(error)) from error


# ----------------------------------------------------------------------------------------------------------------
# Listing


def _image_has_chunk(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return _chunk_text(image) is not None
    except Exception:  # not an image, truncated: not an embedding either
        return False


def _is_embedding_file(path: Path) -> bool:
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
    return suffix not in IMAGE_SUFFIXES or _image_has_chunk(path)


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
    return sorted(path for path in _files_under(Path(embeddings_dir)) if _is_embedding_file(path))


def embeddings_named(embeddings_dir: Path, name: str) -> list[Path]:
    """The embedding files under ``embeddings_dir`` that a web UI would load as ``name``.

    The web UIs name an embedding after its file stem, in any subfolder, and CLIP lowercases prompts, so
    ``Cat.pt`` and ``sub/cat.safetensors`` are one token. (For an image embedding the host uses the name stored
    in its chunk; the stem is compared here, which is what this tool writes.)
    """
    key = name.casefold()
    files = _files_under(Path(embeddings_dir))
    return sorted(path for path in files if path.stem.casefold() == key and _is_embedding_file(path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def other_files_named(embeddings_dir: Path, name: str, target: Path) -> list[Path]:
    """``embeddings_named`` without ``target`` itself (the file about to be written or replaced)."""
    return [path for path in embeddings_named(embeddings_dir, name) if not _same_file(path, Path(target))]


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
