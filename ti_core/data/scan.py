"""The images folder: which files are training images, their sizes and captions, and why others are skipped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import UnidentifiedImageError

from .images import probe_image
from .prompts import read_caption
from .settings import EMPTY_FILE, IMAGE_SUFFIXES, DataConfig, Size

# --- scanning ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    """One readable training image: its caption and upright (width, height) before any resizing."""

    path: Path
    caption: str
    size: Size


@dataclass
class ScanResult:
    """The readable images of a folder, and the files skipped with the reason for each."""

    items: list[ImageItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a log or the UI: counts, then each skipped file and why."""
        text = f"{len(self.items)} images"
        if self.skipped:
            reasons = "; ".join(f"{path.name}: {reason}" for path, reason in self.skipped)
            text += f", {len(self.skipped)} skipped ({reasons})"
        return text


def image_paths(folder: Path, recursive: bool = False) -> list[Path]:
    """Files with an image suffix (any case) in `folder` (and its subfolders when recursive), sorted."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def skip_reason(error: Exception) -> str:
    """A short reason for a file that cannot be used as an image."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can read"
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return message if message == EMPTY_FILE else f"cannot decode: {message}"


def scan_images(config: DataConfig) -> ScanResult:
    """List the readable images under `config.images` with captions; unreadable files go to `skipped`.

    Raises ValueError when the folder is missing or holds no readable image.
    """
    folder = config.images
    if not folder.is_dir():
        raise ValueError(f"images: {folder} is not a folder")
    items: list[ImageItem] = []
    skipped: list[tuple[Path, str]] = []
    for path in image_paths(folder, config.recursive):
        try:
            size = probe_image(path.read_bytes())
        except Exception as error:  # Pillow raises many exception types for corrupt files
            skipped.append((path, skip_reason(error)))
            continue
        items.append(ImageItem(path, read_caption(path), size))
    if not items:
        raise ValueError(_no_images_message(folder, config.recursive, skipped))
    return ScanResult(items, skipped)


def _no_images_message(folder: Path, recursive: bool, skipped: list[tuple[Path, str]]) -> str:
    if skipped:
        shown = "; ".join(f"{path.name}: {reason}" for path, reason in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        return f"no readable images in {folder}: {len(skipped)} skipped ({shown}{more})"
    hint = ""
    if not recursive and any(path.is_dir() for path in folder.iterdir()):
        hint = "; subfolders are searched only with recursive on"
    return f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}{hint}"
