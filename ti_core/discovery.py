"""Finding Stable Diffusion models where people keep them, for the standalone app's Model picker.

Looked at, in this order (the first place a model is found names it):

1. the ``--models-dir`` folders;
2. the web UIs' model folders: ``models/Stable-diffusion`` (AUTOMATIC1111, Forge, reForge, SD.Next),
   SD.Next's ``models/Diffusers`` and ComfyUI's ``models/checkpoints``, in the current folder and its
   sub-folders, its parents, and the home folder and its sub-folders (where ``stable-diffusion-webui`` or
   ``ComfyUI`` is usually cloned);
3. diffusers models in the Hugging Face hub cache.

Nothing is loaded and no weight file is opened: a checkpoint is listed by its name, a diffusers folder by
its ``model_index.json``. Every walk has a depth and an entry budget, so a home folder with a million
files costs milliseconds, not minutes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .demo import DEMO_LABEL, DEMO_MODEL_ID

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
# (folder under a web UI's root, what the label calls it)
WEBUI_MODEL_FOLDERS = (
    ("models/Stable-diffusion", "web UI"),  # AUTOMATIC1111, Forge, reForge, SD.Next
    ("models/Diffusers", "SD.Next"),  # diffusers folders and hub-cache repos
    ("models/checkpoints", "ComfyUI"),
)
# The pipelines ti_core trains on (model_index.json's _class_name) and the parts each one needs.
PIPELINE_PARTS = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
}
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
MAX_DEPTH = 4  # sub-folder levels inside a models folder ("SDXL/anime/..." is common, deeper is not)
MAX_ENTRIES = 5000  # directory entries looked at per models folder
MAX_CHILDREN = 500  # sub-folders of the current and home folders tried as a web UI's root


@dataclass(frozen=True)
class ModelEntry:
    """One model the picker can offer."""

    label: str  # what the picker shows; unique within one find_models() result
    source: str  # what load_model() takes: a file, a diffusers folder, or DEMO_MODEL_ID
    origin: str  # "models-dir", "web UI", "SD.Next", "ComfyUI", "Hugging Face cache" or "demo"

    @property
    def is_demo(self) -> bool:
        return self.source == DEMO_MODEL_ID


DEMO_ENTRY = ModelEntry(DEMO_LABEL, DEMO_MODEL_ID, "demo")


def find_models(
    start: Path, home: Path | None, models_dirs: Sequence[Path] = (), hf_cache: Path | None = None
) -> list[ModelEntry]:
    """The real models found (the demo is not among them: see `picker_entries`), in the order above.

    `start` is the current folder; `hf_cache` the hub cache folder (`default_hf_cache()`), None to skip it.
    """
    entries: list[ModelEntry] = []
    seen: set[str] = set()

    def add(entry: ModelEntry, path: Path) -> None:
        key = os.path.normcase(os.path.realpath(path))
        if key not in seen:  # the same file reached twice (a symlink, a parent that is also the home)
            seen.add(key)
            entries.append(entry)

    for folder in models_dirs:
        for path, name in _models_in(Path(folder)):
            add(ModelEntry(f"{name} ({_short(folder, home)})", str(path), "models-dir"), path)
    for root in _webui_roots(Path(start), home):
        for subfolder, origin in WEBUI_MODEL_FOLDERS:
            for path, name in _models_in(root / subfolder):
                add(ModelEntry(f"{name} ({origin}, {_short(root, home)})", str(path), origin), path)
    if hf_cache is not None:
        for path, repo_id in _hub_cache_models(Path(hf_cache)):
            add(ModelEntry(f"{repo_id} (Hugging Face cache)", str(path), "Hugging Face cache"), path)
    return _unique_labels(entries)


def picker_entries(found: Sequence[ModelEntry]) -> list[ModelEntry]:
    """What the Model picker lists: the models found, then the demo model (last, so never the default
    while a real model is there)."""
    return [*found, DEMO_ENTRY]


def default_entry(found: Sequence[ModelEntry]) -> ModelEntry:
    """The model selected at start without --model: the first one found, the demo model only when none is."""
    return found[0] if found else DEMO_ENTRY


def default_hf_cache(environ: dict[str, str] | None = None, home: Path | None = None) -> Path | None:
    """The Hugging Face hub cache folder as huggingface_hub resolves it (without importing it), if it exists."""
    environ = dict(os.environ if environ is None else environ)
    home = Path.home() if home is None else home
    if environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE"):
        folder = Path(environ.get("HF_HUB_CACHE") or environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    elif environ.get("HF_HOME"):
        folder = Path(environ["HF_HOME"]).expanduser() / "hub"
    else:
        cache = Path(environ["XDG_CACHE_HOME"]).expanduser() if environ.get("XDG_CACHE_HOME") else home / ".cache"
        folder = cache / "huggingface" / "hub"
    return folder if folder.is_dir() else None


# ------------------------------------------------------------------------------------------- walking


def _webui_roots(start: Path, home: Path | None) -> Iterator[Path]:
    """Folders that may be a web UI's root: start, its sub-folders and parents; home and its sub-folders."""
    start = start.absolute()
    yield start
    yield from _subfolders(start)
    yield from start.parents
    if home is not None:
        yield home
        yield from _subfolders(home)


def _subfolders(folder: Path) -> Iterator[Path]:
    try:
        with os.scandir(folder) as scan:
            names = sorted(entry.name for entry in scan if not entry.name.startswith(".") and _is_dir(entry))
    except OSError:
        return
    for name in names[:MAX_CHILDREN]:
        yield folder / name


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _models_in(folder: Path) -> Iterator[tuple[Path, str]]:
    """(path, name relative to `folder`) of the checkpoints, diffusers folders and hub-cache repos in `folder`."""
    if not folder.is_dir():
        return
    budget = MAX_ENTRIES
    pending = [(folder, 0)]
    found: list[tuple[Path, str]] = []
    while pending and budget > 0:
        current, depth = pending.pop()
        try:
            with os.scandir(current) as scan:
                children = sorted(scan, key=lambda entry: entry.name.lower())
        except OSError:
            continue
        budget -= len(children)
        for entry in children:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if _is_dir(entry):
                if entry.name.startswith("models--"):  # SD.Next keeps hub downloads in the cache layout
                    snapshot = _hub_snapshot(path)
                    if snapshot is not None:
                        found.append((snapshot, _repo_id(entry.name)))
                elif _is_diffusers_model(path):
                    found.append((path, path.relative_to(folder).as_posix()))
                elif depth < MAX_DEPTH:
                    pending.append((path, depth + 1))
            elif _is_checkpoint_name(entry.name):
                found.append((path, path.relative_to(folder).as_posix()))
    yield from sorted(found, key=lambda item: item[1].lower())


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_source(source: str) -> str:
    """What a typed model source is ("checkpoint", "diffusers", "hub id", "demo"), checked without loading it;
    ValueError (one line, saying what to type) for a path that does not lead to a model."""
    from .demo import is_demo

    text = source.strip()
    if is_demo(text):
        return "demo"
    path = Path(text).expanduser()
    if path.is_file():
        if _is_checkpoint_name(path.name):
            return "checkpoint"
        raise ValueError(f"{text} is not a checkpoint: give a .safetensors or .ckpt file, or a diffusers folder")
    if path.is_dir():
        if _is_diffusers_model(path):
            return "diffusers"
        raise ValueError(f"{text} is a folder but not a diffusers model (no model_index.json with weights)")
    if HUB_ID.match(text) and not _is_checkpoint_name(text) and not text.startswith("."):
        return "hub id"
    raise ValueError(f"no file or folder at {text}: check the path (a checkpoint, a diffusers folder or a hub id)")


def _is_checkpoint_name(name: str) -> bool:
    lower = name.lower()
    # `model.vae.safetensors` beside `model.safetensors` is the web UIs' convention for a VAE, not a model.
    return lower.endswith(CHECKPOINT_SUFFIXES) and ".vae." not in lower


def _is_diffusers_model(folder: Path) -> bool:
    """A diffusers SD1/SD2/SDXL pipeline folder whose parts have weights (not only their configs)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    parts = PIPELINE_PARTS.get(index.get("_class_name", "") if isinstance(index, dict) else "")
    if parts is None or not all(part in index for part in parts):
        return False
    weighted = [part for part in parts if not part.startswith("tokenizer")]
    # exists() follows the hub cache's symlinks into blobs/, so a half-finished download does not count.
    return all(any(path.exists() for p in WEIGHT_PATTERNS for path in (folder / part).glob(p)) for part in weighted)


def _hub_cache_models(cache: Path) -> Iterator[tuple[Path, str]]:
    try:
        with os.scandir(cache) as scan:
            repos = sorted(entry.name for entry in scan if entry.name.startswith("models--") and _is_dir(entry))
    except OSError:
        return
    for name in repos[:MAX_ENTRIES]:
        snapshot = _hub_snapshot(cache / name)
        if snapshot is not None:
            yield snapshot, _repo_id(name)


def _hub_snapshot(repo: Path) -> Path | None:
    """The snapshot of a hub-cache repo folder that holds a complete diffusers model: refs/main's, else the
    newest one that does."""
    snapshots = repo / "snapshots"
    try:
        main = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        main = ""
    if main and _is_diffusers_model(snapshots / main):
        return snapshots / main
    try:
        candidates = sorted(snapshots.iterdir(), key=lambda path: path.stat().st_mtime, reverse=True)
    except OSError:
        return None
    return next((path for path in candidates if _is_diffusers_model(path)), None)


def _repo_id(folder_name: str) -> str:
    """`models--stabilityai--sdxl-turbo` -> `stabilityai/sdxl-turbo`."""
    return "/".join(folder_name.split("--")[1:])


def _short(folder: Path, home: Path | None) -> str:
    """A folder as the label shows it: `~/stable-diffusion-webui` under the home folder."""
    folder = Path(folder).absolute()
    if home is not None:
        try:
            return str(Path("~") / folder.relative_to(Path(home).absolute()))
        except ValueError:
            pass
    return str(folder)


def _unique_labels(entries: list[ModelEntry]) -> list[ModelEntry]:
    """Two different files can get the same label (the same name in two places of one folder tree)."""
    counts: dict[str, int] = {}
    unique = []
    for entry in entries:
        counts[entry.label] = counts.get(entry.label, 0) + 1
        if counts[entry.label] > 1:
            entry = ModelEntry(f"{entry.label} [{counts[entry.label]}]", entry.source, entry.origin)
        unique.append(entry)
    return unique
