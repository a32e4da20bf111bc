"""Exports for other tools: diffusers ``{token: tensor}`` files, A1111 ``.pt`` in torch's legacy serialisation,
and PNG cards carrying the embedding in their text chunk and their pixels."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import image_data
from ..atomic import atomic_write
from ..embedding import Embedding
from ..names import embedding_path, validate_name
from .common import A1111_TOKEN_ID, PNG_CHUNK, SAFETENSORS_SUFFIX, SDXL_KEYS, TensorJSONEncoder, first_line
from .folder import is_embedding_file, same_file
from .readers import load_embedding
from .writer import as_float32, header_metadata, refuse_existing, single_tensor


def _write_diffusers(embedding: Embedding, path: Path, key: str, token: str, overwrite: bool) -> Path:
    from safetensors.torch import save_file

    tensor = as_float32(embedding.vectors[key])
    refuse_existing(path, overwrite)
    # "encoder" tells diffusers_loading_code which text encoder the file is for (diffusers ignores the header).
    header = {"format": "pt", **header_metadata(embedding), "encoder": key}
    return atomic_write(path, lambda temp: save_file({token: tensor}, str(temp), metadata=header))


def export_diffusers(embedding: Embedding, path: Path, *, token: str | None = None, overwrite: bool = True) -> Path:
    """Write diffusers' ``{token: [N, d]}`` .safetensors (``load_textual_inversion``); single encoder only."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ValueError(f"{path}: a diffusers export is a .safetensors file")
    single_tensor(embedding, "diffusers")
    (key,) = embedding.vectors
    return _write_diffusers(embedding, path, key, token or embedding.name, overwrite)


def _a1111_payload(embedding: Embedding) -> dict[str, Any]:
    """The dict A1111 saves in .pt files and preview images (``Embedding.save``)."""
    meta = embedding.metadata
    checkpoint = meta.get("sd_checkpoint") or (meta.get("base_model_hash") or "")[:10] or None
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": single_tensor(embedding, "A1111 .pt")},
        "name": embedding.name,
        "step": int(embedding.step),
        "sd_checkpoint": checkpoint,
        "sd_checkpoint_name": meta.get("sd_checkpoint_name") or meta.get("base_model"),
    }


def _a1111_data(embedding: Embedding) -> dict[str, Any]:
    """What A1111 reads from a .pt or an image: its own dict for one encoder; ``{"clip_l", "clip_g"}`` and
    nothing else for SDXL (kohya's layout; A1111's SDXL branch turns every value into a tensor)."""
    if set(embedding.vectors) == set(SDXL_KEYS):
        return {key: as_float32(embedding.vectors[key]) for key in SDXL_KEYS}
    return _a1111_payload(embedding)


def export_a1111_pt(embedding: Embedding, path: Path, *, overwrite: bool = True) -> Path:
    """Write A1111's .pt layout (``string_to_param {"*": tensor}``, name, step, checkpoint; SDXL: kohya's
    ``{"clip_l", "clip_g"}``) in torch's legacy serialisation, the one every web UI's safe loader reads
    (some reject torch's newer zip files)."""
    path = Path(path)
    payload = _a1111_data(embedding)
    refuse_existing(path, overwrite)
    return atomic_write(path, lambda temp: torch.save(payload, temp, _use_new_zipfile_serialization=False))


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
    info.add_text(PNG_CHUNK, base64.b64encode(json.dumps(payload, cls=TensorJSONEncoder).encode()))
    picture = image if image.mode in _PNG_MODES else image.convert("RGBA" if "A" in image.getbands() else "RGB")
    refuse_existing(path, overwrite)
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
        text = json.dumps(payload, cls=TensorJSONEncoder, separators=separators).encode()
        card = image_data.add_strips(middle, text, image_data.vector_shades(first_vector))
        if image_data.read_strips(card) == text:
            break
    else:  # every pixel of the strips is non-black by construction, so this does not happen
        raise RuntimeError(f"{path}: the embedding did not survive a round trip through the card's pixels")
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_CHUNK, base64.b64encode(text))
    refuse_existing(path, overwrite)
    return atomic_write(path, lambda temp: card.save(temp, format="PNG", pnginfo=info))


# ----------------------------------------------------------------------------------------------------------------
# Exports: one embedding file, written for another tool into a chosen folder

EXPORT_FORMATS = ("diffusers", "a1111-pt", "image")


def preview_picture(path: Path) -> Path | None:
    """The preview the web UIs show for an embedding file: ``<stem>.preview.png``, else a plain ``<stem>.png``."""
    path = Path(path)
    for candidate in (path.with_name(f"{path.stem}.preview.png"), path.with_name(f"{path.stem}.png")):
        if candidate != path and candidate.is_file() and not is_embedding_file(candidate):
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
                raise ValueError(f"{preview}: not a readable image ({first_line(error)})") from error
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
        if same_file(target, source):
            raise FileExistsError(f"{target} is the file being exported; choose another output folder")
        refuse_existing(target, overwrite)
        clashes = [
            other
            for other in (sorted(out_dir.iterdir()) if out_dir.is_dir() else [])
            if other.stem.casefold() == target.stem.casefold() and other != target and is_embedding_file(other)
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
