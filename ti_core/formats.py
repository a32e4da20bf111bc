"""Embedding files: ours are written atomically; every format the web UIs and trainers write is read.

What we write (what A1111, Forge, reForge, SD.Next, ComfyUI and diffusers all read):
- one text encoder (SD1 clip_l, SD2 clip_h): ``{"emb_params": [N, d]}`` (kohya's layout; A1111 asserts one tensor);
- SDXL: ``{"clip_l": [N, 768], "clip_g": [N, 1280]}`` (kohya, A1111, OneTrainer);
float32, with string metadata (name, step, vectors, init text, base model, settings) in the safetensors header.
Exports (``export_embedding``): diffusers ``{token: tensor}`` files, A1111 ``.pt`` in torch's legacy
serialisation, and image cards carrying the embedding in their text chunk and their pixels.

What we read: those; OneTrainer's ``emp_params`` (and its ``*_out`` output embeddings, ignored); any
single-tensor safetensors or diffusers ``{token: tensor}`` (.safetensors or .bin); A1111 ``.pt``
(``string_to_param``), kohya ``.pt``, the original textual_inversion repository's ``ParameterDict`` ``.pt``,
legacy and zip serialisation; PNG/WEBP images carrying A1111's ``sd-ti-embedding`` chunk or, without it, the
embedding in their pixels. Pickle files go through safe_pickle's restricted unpickler, so a payload never runs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__, image_data
from .embedding import Embedding
from .names import embedding_path, validate_name
from .safe_pickle import ParameterDictContents, RefusedGlobal, load_pickle

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
_SINGLE_ON_SDXL = {
    768: "an SD1 embedding (one 768-wide tensor)",
    1024: "an SD2 embedding (one 1024-wide tensor)",
    1280: "only the clip_g half of an SDXL embedding",
}
T5_WIDTH = 4096  # T5-XXL, the third text encoder of SD3 and the second of Flux
_KIND_BY_WIDTHS = {
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


def _write_diffusers(embedding: Embedding, path: Path, key: str, token: str, overwrite: bool) -> Path:
    from safetensors.torch import save_file

    tensor = _float32(embedding.vectors[key])
    _refuse_existing(path, overwrite)
    # "encoder" tells diffusers_loading_code which text encoder the file is for (diffusers ignores the header).
    header = {"format": "pt", **header_metadata(embedding), "encoder": key}
    return atomic_write(path, lambda temp: save_file({token: tensor}, str(temp), metadata=header))


def export_diffusers(embedding: Embedding, path: Path, *, token: str | None = None, overwrite: bool = True) -> Path:
    """Write diffusers' ``{token: [N, d]}`` .safetensors (``load_textual_inversion``); single encoder only."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ValueError(f"{path}: a diffusers export is a .safetensors file")
    _single_tensor(embedding, "diffusers")
    (key,) = embedding.vectors
    return _write_diffusers(embedding, path, key, token or embedding.name, overwrite)


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


def _a1111_data(embedding: Embedding) -> dict[str, Any]:
    """What A1111 reads from a .pt or an image: its own dict for one encoder; ``{"clip_l", "clip_g"}`` and
    nothing else for SDXL (kohya's layout; A1111's SDXL branch turns every value into a tensor)."""
    if set(embedding.vectors) == set(SDXL_KEYS):
        return {key: _float32(embedding.vectors[key]) for key in SDXL_KEYS}
    return _a1111_payload(embedding)


def export_a1111_pt(embedding: Embedding, path: Path, *, overwrite: bool = True) -> Path:
    """Write A1111's .pt layout (``string_to_param {"*": tensor}``, name, step, checkpoint; SDXL: kohya's
    ``{"clip_l", "clip_g"}``) in torch's legacy serialisation, the one every web UI's safe loader reads
    (some reject torch's newer zip files)."""
    path = Path(path)
    payload = _a1111_data(embedding)
    _refuse_existing(path, overwrite)
    return atomic_write(path, lambda temp: torch.save(payload, temp, _use_new_zipfile_serialization=False))


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
    payload = _a1111_data(embedding)
    info = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str) and key != PNG_CHUNK:
            info.add_text(key, value)
    info.add_text(PNG_CHUNK, base64.b64encode(json.dumps(payload, cls=_TensorJSONEncoder).encode()))
    picture = image if image.mode in _PNG_MODES else image.convert("RGBA" if "A" in image.getbands() else "RGB")
    _refuse_existing(path, overwrite)
    return atomic_write(path, lambda temp: picture.save(temp, format="PNG", pnginfo=info))


def save_embedding_card(embedding: Embedding, path: Path, picture=None, *, overwrite: bool = True) -> Path:
    """A PNG card carrying the embedding twice, as A1111's "embedding as image": in the ``sd-ti-embedding``
    text chunk and in side strips of its pixels (which survive a copy that loses the chunk).

    ``picture`` (PIL, e.g. the preview) is the middle of the card, captioned with the token, vectors, step and
    base model; without one a plain background is drawn. The strips are decoded again before writing.
    """
    from PIL import PngImagePlugin

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: an embedding card must be a .png file")
    payload = _a1111_data(embedding)
    first_vector = next(iter(embedding.vectors.values()))[0].tolist()
    base_model = embedding.metadata.get("base_model") or embedding.metadata.get("sd_checkpoint_name") or ""
    footer = f"{embedding.num_vectors}v {embedding.step}s" + (f"  {base_model}" if base_model else "")
    middle = image_data.captioned(picture, f"<{embedding.name}>", footer)
    for separators in ((", ", ": "), (",", ":")):  # a second spelling of the same JSON, in case one fails
        text = json.dumps(payload, cls=_TensorJSONEncoder, separators=separators).encode()
        card = image_data.add_strips(middle, text, image_data.vector_shades(first_vector))
        if image_data.read_strips(card) == text:
            break
    else:  # every pixel of the strips is non-black by construction, so this does not happen
        raise RuntimeError(f"{path}: the embedding did not survive a round trip through the card's pixels")
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_CHUNK, base64.b64encode(text))
    _refuse_existing(path, overwrite)
    return atomic_write(path, lambda temp: card.save(temp, format="PNG", pnginfo=info))


# ----------------------------------------------------------------------------------------------------------------
# Exports: one embedding file, written for another tool into a chosen folder

EXPORT_FORMATS = ("diffusers", "a1111-pt", "image")


def preview_picture(path: Path) -> Path | None:
    """The preview the web UIs show for an embedding file: ``<stem>.preview.png``, else a plain ``<stem>.png``."""
    path = Path(path)
    for candidate in (path.with_name(f"{path.stem}.preview.png"), path.with_name(f"{path.stem}.png")):
        if candidate != path and candidate.is_file() and not _is_embedding_file(candidate):
            return candidate
    return None


def _export_plan(embedding: Embedding, to: str, out_dir: Path, preview: Path | None) -> dict[Path, Callable]:
    """Each file an export writes, with the function that writes it (given the path and ``overwrite``)."""
    name = embedding.name
    if to == "diffusers":
        if set(embedding.vectors) == set(SDXL_KEYS):  # one file per text encoder, as diffusers loads them
            return {
                embedding_path(out_dir, f"{name}_{key}"): (
                    lambda path, overwrite, key=key: _write_diffusers(embedding, path, key, name, overwrite)
                )
                for key in SDXL_KEYS
            }
        return {
            embedding_path(out_dir, name): lambda path, overwrite: export_diffusers(
                embedding, path, overwrite=overwrite
            )
        }
    if to == "a1111-pt":
        return {
            embedding_path(out_dir, name, ".pt"): lambda path, overwrite: export_a1111_pt(
                embedding, path, overwrite=overwrite
            )
        }
    if to == "image":

        def write_card(path: Path, overwrite: bool) -> Path:
            from PIL import Image

            if preview is None:
                return save_embedding_card(embedding, path, overwrite=overwrite)
            try:
                with Image.open(preview) as opened:
                    picture = opened.convert("RGB")
            except Exception as error:
                raise ValueError(f"{preview}: not a readable image ({_first_line(error)})") from error
            return save_embedding_card(embedding, path, picture, overwrite=overwrite)

        return {embedding_path(out_dir, name, ".png"): write_card}
    raise ValueError(f"unknown export format {to!r}; expected one of {', '.join(EXPORT_FORMATS)}")


def default_export_dir(root: Path, to: str) -> Path:
    """Where an export goes when no folder is chosen: ``<root>/exports/<format>``. One folder per format, so
    exporting a second format of the same embedding is not refused as a second file of the same token."""
    return Path(root) / "exports" / to


def export_embedding(
    path: Path, to: str, out_dir: Path, *, overwrite: bool = False, preview: Path | None = None
) -> list[Path]:
    """Write the embedding file ``path`` for another tool into ``out_dir``; returns the files written.

    ``to`` is one of ``EXPORT_FORMATS``:
    - ``diffusers``: ``<name>.safetensors`` holding ``{name: [N, d]}``, what diffusers' ``load_textual_inversion``
      loads in one call; SDXL: ``<name>_clip_l.safetensors`` and ``<name>_clip_g.safetensors``, one call per
      text encoder (``diffusers_loading_code`` gives the lines);
    - ``a1111-pt``: ``<name>.pt``, A1111's layout in torch's legacy serialisation;
    - ``image``: ``<name>.png``, a card carrying the embedding in its text chunk and its pixels, around
      ``preview`` (default: the file's own preview, see ``preview_picture``).

    Each file is written atomically and only inside ``out_dir``. FileExistsError (one line) for a file that
    exists (unless ``overwrite``), for the source file itself, or when another file in ``out_dir`` already
    gives the web UIs an embedding of that name; EmbeddingFileError/ValueError for a bad file or format.
    """
    source = Path(path)
    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {to!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    embedding = load_embedding(source)
    try:  # an image's stored name becomes a file name here: it has to be a safe one
        validate_name(embedding.name)
    except ValueError as error:
        raise ValueError(f"{source}: cannot export it under its stored name: {error}") from error
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is not a folder")
    plan = _export_plan(embedding, to, out_dir, preview if preview is not None else preview_picture(source))
    for target in plan:
        if _same_file(target, source):
            raise FileExistsError(f"{target} is the file being exported; choose another output folder")
        _refuse_existing(target, overwrite)
        clashes = [
            other
            for other in (sorted(out_dir.iterdir()) if out_dir.is_dir() else [])
            if other.stem.casefold() == target.stem.casefold() and other != target and _is_embedding_file(other)
        ]
        if clashes:
            raise FileExistsError(
                f"{out_dir} already holds {clashes[0].name}, which the web UIs would load as the same token as "
                f"{target.name}; export to another folder"
            )
    return [write(target, overwrite) for target, write in plan.items()]


# diffusers pipelines keep SDXL's second text encoder (OpenCLIP bigG, "clip_g") and its tokenizer here.
_DIFFUSERS_SECOND_ENCODER = ("text_encoder_2", "tokenizer_2")


def diffusers_loading_code(paths: Sequence[Path]) -> str:
    """The Python lines that load a diffusers export (``export_embedding(..., "diffusers", ...)``'s files) into
    a diffusers pipeline called ``pipe``: one ``load_textual_inversion`` call per file."""
    from safetensors import safe_open

    files = []
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            (token,) = handle.keys()
            files.append((Path(path).absolute(), token, (handle.metadata() or {}).get("encoder", "")))
    two_encoders = any(encoder == "clip_g" for _, _, encoder in files)
    lines = ["# pipe: the diffusers pipeline of the model the embedding was trained on"]
    for path, token, encoder in files:
        arguments = [json.dumps(str(path), ensure_ascii=False), f"token={json.dumps(token, ensure_ascii=False)}"]
        if two_encoders:  # SDXL: each file goes into its own text encoder and tokenizer
            text_encoder, tokenizer = (
                _DIFFUSERS_SECOND_ENCODER if encoder == "clip_g" else ("text_encoder", "tokenizer")
            )
            arguments += [f"text_encoder=pipe.{text_encoder}", f"tokenizer=pipe.{tokenizer}"]
        lines.append(f"pipe.load_textual_inversion({', '.join(arguments)})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _first_line(error: BaseException) -> str:
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    text = lines[0].strip() if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _fail(path: Path, reason: str) -> EmbeddingFileError:
    return EmbeddingFileError(path, " ".join(reason.split()))


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
        return load_pickle(path)
    except RefusedGlobal as error:
        raise _fail(
            path,
            f"holds pickled code or objects other than tensors ({error.name}); refusing to load it "
            "(only plain weights are read, for safety)",
        ) from error
    except Exception as error:  # UnpicklingError, RuntimeError for broken zip archives, EOFError when truncated
        raise _fail(path, f"corrupt, truncated or not a PyTorch file ({_first_line(error)})") from error


def _chunk_text(image) -> str | None:
    # Pillow reads text chunks before the image data on open; chunks after it need .text (a full decode).
    text = image.info.get(PNG_CHUNK)
    if text is None and hasattr(image, "text"):
        text = image.text.get(PNG_CHUNK)
    return text


def _embedding_json(text: str | bytes) -> Any:
    """A1111's image payload: JSON whose tensors are {"TORCHTENSOR": nested list}; ValueError if it is not."""
    try:
        data = json.loads(text, object_hook=_decode_tensor)
    except (ValueError, TypeError, RuntimeError, RecursionError) as error:  # torch.tensor of a ragged list, too
        raise ValueError(_first_line(error)) from error
    if not isinstance(data, dict):
        raise ValueError(f"it holds a {type(data).__name__}, not an embedding")
    return data


def _read_image(path: Path) -> tuple[Any, str]:
    """The embedding in an image and where it was: its text chunk, else (as the web UIs do) its pixels."""
    from PIL import Image

    chunk_error = None
    try:
        with Image.open(path) as image:
            text = _chunk_text(image)
            if text is not None:
                try:
                    return _embedding_json(base64.b64decode(text)), "text chunk"
                except (ValueError, binascii.Error) as error:  # a damaged chunk: the pixels may still be whole
                    chunk_error = error
            data = image_data.read_strips(image)
    except Exception as error:  # UnidentifiedImageError, truncated files, decompression bombs
        raise _fail(path, f"not a readable image ({_first_line(error)})") from error
    if data is None:
        if chunk_error is not None:
            raise _fail(path, f"its {PNG_CHUNK!r} chunk is not base64 JSON of an embedding ({chunk_error})")
        raise _fail(
            path,
            f"has no {PNG_CHUNK!r} text chunk and no embedding in its pixels (a plain image, or a copy saved "
            "lossily, such as a JPEG or lossy WEBP)",
        )
    try:
        return _embedding_json(data), "pixels"
    except ValueError as error:
        raise _fail(path, f"the data in its pixels is not JSON of an embedding ({error})") from error


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


def _model_kind(widths: dict[str, int]) -> str | None:
    return _KIND_BY_WIDTHS.get(tuple(sorted(widths.items())))


def _hint(file_kind: str | None, widths: dict[str, int]) -> str:
    model_kind = _model_kind(widths)
    if file_kind and model_kind:
        return f" (an {file_kind} embedding on an {model_kind} model?)"
    return ""


def _key_for_single(path: Path, width: int, widths: dict[str, int] | None) -> str:
    if widths is None:
        return KEY_BY_WIDTH.get(width, "clip_l")
    if len(widths) > 1:
        # One tensor on SDXL would condition one text encoder and leave the other on its own: the web UIs
        # skip such a file (its width is not the 2048 of clip_l + clip_g), so it does not fit.
        what = _SINGLE_ON_SDXL.get(width, f"a single {width}-wide tensor")
        kind = "SDXL" if set(widths) == set(SDXL_KEYS) else ""
        needs = " + ".join(f"{key} [N, {model_width}]" for key, model_width in widths.items())
        raise _fail(
            path,
            f"does not fit this {kind or 'two-encoder'} model: it is {what}, and {kind or 'the model'} needs {needs}; "
            "the web UIs skip it",
        )
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


def _without_outputs(candidates: dict[Any, Any]) -> dict[Any, Any]:
    # OneTrainer stores output embeddings next to the input ones ("clip_l_out", "emp_params_out"): not ours.
    return {
        key: value
        for key, value in candidates.items()
        if not (isinstance(key, str) and key.endswith("_out") and key[: -len("_out")] in candidates)
    }


def _is_t5(key: Any, tensor: torch.Tensor) -> bool:
    return (isinstance(key, str) and key.lower().startswith("t5")) or (
        tensor.ndim >= 1 and tensor.shape[-1] == T5_WIDTH
    )


def _select_vectors(path: Path, candidates: dict[Any, Any], widths: dict[str, int] | None) -> dict[str, torch.Tensor]:
    layout = _without_outputs(candidates)
    not_tensors = [key for key, value in layout.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        verb = "is not a tensor" if len(not_tensors) == 1 else "are not tensors"
        raise _fail(path, f"unknown layout: {_keys_text(not_tensors)} {verb}")
    if not layout:
        raise _fail(path, "holds no tensors")
    t5 = [f"{key} {list(tensor.shape)}" for key, tensor in layout.items() if _is_t5(key, tensor)]
    if t5:
        raise _fail(
            path,
            f"is a T5 text-encoder embedding ({', '.join(t5)}), for SD3 or Flux models: it is not for SD1, SD2 or "
            "SDXL, whose text encoders are CLIP",
        )
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


def _layout_name(suffix: str, data: Any, candidates: dict[Any, Any], header: dict[str, str], source: str) -> str:
    """The file's layout by the tool that writes it, e.g. "emb_params (kohya/A1111)", "a1111-pt"."""
    if suffix in IMAGE_SUFFIXES:
        return f"a1111-image ({source})"
    keys = set(_without_outputs(candidates))
    with_outputs = len(keys) < len(candidates)
    ours = ", ti_core" if header.get("tool", "").startswith("ti_core") else ""
    pickled = suffix in PICKLE_SUFFIXES
    if pickled and isinstance(data, torch.Tensor):
        return "bare tensor (.pt)"
    if pickled and isinstance(data, dict) and "string_to_param" in data:
        if isinstance(data["string_to_param"], ParameterDictContents):
            return "textual-inversion-pt (ParameterDict, original textual_inversion repository)"
        return "a1111-pt"
    if set(SDXL_KEYS) <= keys:
        return "sdxl (clip_l + clip_g)" + (
            ", kohya .pt" if pickled else ours or (", OneTrainer" if with_outputs else "")
        )
    if keys == {"emb_params"}:
        return "emb_params (kohya .pt)" if pickled else f"emb_params (kohya/A1111){ours}"
    if keys == {"emp_params"}:
        return "emp_params (OneTrainer)"
    if len(keys) == 1:
        return "diffusers-bin" if pickled else "single tensor (diffusers)"
    return f"{len(keys)} tensors"


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
        candidates, fields = _split_payload(path, data)
        if suffix in IMAGE_SUFFIXES and isinstance(data.get("name"), str) and data["name"]:
            name = data["name"]
        step = _step(fields.get("step", 0))
        metadata = {
            key: str(value)
            for key, value in fields.items()
            if isinstance(key, str) and key not in ("name", "step") and isinstance(value, (str, int, float))
        }
    vectors = _select_vectors(path, candidates, widths)
    try:
        embedding = Embedding(name=name, vectors=vectors, step=step, metadata=metadata)
    except ValueError as error:
        raise _fail(path, str(error)) from error
    return embedding, _layout_name(suffix, data, candidates, header, source)


def load_embedding(path: Path, *, widths: dict[str, int] | None = None) -> Embedding:
    """Read an embedding file of any supported format; EmbeddingFileError (one line, naming the file) if not.

    ``widths`` is the model's ``{encoder key: width}``: a single-tensor file gets the key whose width matches
    (an error if none does, or if the model has two encoders: one tensor is no SDXL embedding), and SDXL files
    must match both. Without it, 768/1024/1280 map to clip_l/clip_h/clip_g and any other width to clip_l.
    The name is the file stem (the token the web UIs use), except for images, where the name stored in the
    image wins, as in A1111. A T5 (SD3/Flux) embedding is refused with a line saying so.
    """
    return read_embedding(path, widths=widths)[0]


# ----------------------------------------------------------------------------------------------------------------
# Listing


def _image_has_embedding(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return _chunk_text(image) is not None or image_data.read_strips(image) is not None
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
    return suffix not in IMAGE_SUFFIXES or _image_has_embedding(path)


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
