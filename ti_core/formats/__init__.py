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

One concern a module: `common` (suffixes, keys, the error), `writer` (our layout), `exports` (diffusers, A1111
.pt, image cards), `readers` (every file type), `layout` (which tensors are the embedding), `folder` (the
embeddings folder as the web UIs see it)."""

from ..atomic import TEMP_SUFFIX, atomic_write
from .common import (
    A1111_TOKEN_ID,
    IMAGE_SUFFIXES,
    KEY_BY_WIDTH,
    LOADABLE_SUFFIXES,
    PICKLE_SUFFIXES,
    PNG_CHUNK,
    SAFETENSORS_SUFFIX,
    SDXL_KEYS,
    SIDECAR_STEMS,
    SINGLE_KEY,
    T5_WIDTH,
    EmbeddingFileError,
)
from .exports import (
    EXPORT_FORMATS,
    default_export_dir,
    diffusers_loading_code,
    export_a1111_pt,
    export_diffusers,
    export_embedding,
    preview_picture,
    save_embedding_card,
    save_embedding_png,
)
from .folder import embeddings_named, list_embeddings, other_files_named, refuse_name_clash
from .readers import load_embedding, read_embedding
from .writer import header_metadata, save_embedding, save_embedding_to

__all__ = [
    "A1111_TOKEN_ID",
    "EXPORT_FORMATS",
    "EmbeddingFileError",
    "IMAGE_SUFFIXES",
    "KEY_BY_WIDTH",
    "LOADABLE_SUFFIXES",
    "PICKLE_SUFFIXES",
    "PNG_CHUNK",
    "SAFETENSORS_SUFFIX",
    "SDXL_KEYS",
    "SIDECAR_STEMS",
    "SINGLE_KEY",
    "T5_WIDTH",
    "TEMP_SUFFIX",
    "atomic_write",
    "default_export_dir",
    "diffusers_loading_code",
    "embeddings_named",
    "export_a1111_pt",
    "export_diffusers",
    "export_embedding",
    "header_metadata",
    "list_embeddings",
    "load_embedding",
    "other_files_named",
    "preview_picture",
    "read_embedding",
    "refuse_name_clash",
    "save_embedding",
    "save_embedding_card",
    "save_embedding_png",
    "save_embedding_to",
]
