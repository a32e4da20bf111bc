"""Prompt templates and captions: the lines a training prompt is drawn from, with the caption's tags."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from .settings import BUILTIN_TEMPLATES

_TEMPLATE_DIR = Path(__file__).parent.parent / "templates"

_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")  # A1111's re_numbers_at_start: "00012-a red car" -> "a red car"


# --- templates and prompts -----------------------------------------------------------------------------


def load_template(name_or_path: str | os.PathLike) -> list[str]:
    """The prompt lines of a built-in template (see BUILTIN_TEMPLATES) or of a template file.

    Blank lines are dropped (A1111 keeps them and then trains on an empty prompt now and then).
    """
    text = str(name_or_path).strip()
    path = Path(text).expanduser()
    # A bare built-in name always means the built-in; "subject.txt" (A1111's file name) does unless
    # such a file exists here.
    builtin = text.removesuffix(".txt")
    if text in BUILTIN_TEMPLATES or (builtin in BUILTIN_TEMPLATES and not path.is_file()):
        path = _TEMPLATE_DIR / f"{builtin}.txt"
    if not path.is_file():
        raise ValueError(
            f"template: no built-in template or file named {text!r} (built-ins: {', '.join(BUILTIN_TEMPLATES)})"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"template file {path} is empty")
    return lines


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of a caption, trimmed, empty ones left out."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def render_prompt(
    line: str, name: str, caption: str, *, shuffle_tags: bool, tag_dropout: float, rng: random.Random
) -> str:
    """A template line with [filewords] -> the caption's tags and [name] -> the embedding name.

    Dropout removes each tag with probability `tag_dropout` but always keeps at least one (picked by `rng`)
    when the caption has any: A1111 can drop them all, which silently turns a captioned sample into an
    uncaptioned one; dropping whole captions is a different knob. Shuffling permutes the kept tags. With
    neither, the caption goes in unchanged. Tags are re-joined with ", " (CLIP tokenizes "a,b" and "a, b"
    alike). [filewords] is replaced before [name], as in A1111, so "[name]" in a caption also works.
    """
    filewords = caption.strip()
    if shuffle_tags or tag_dropout > 0:
        tags = split_tags(caption)
        if tag_dropout > 0 and tags:
            kept = [tag for tag in tags if rng.random() >= tag_dropout]
            tags = kept or [rng.choice(tags)]
        if shuffle_tags:
            rng.shuffle(tags)
        filewords = ", ".join(tags)
    return line.replace("[filewords]", filewords).replace("[name]", name)


# --- captions ---------------------------------------------------------------------------------------


def caption_from_filename(stem: str) -> str:
    """A1111's caption for an image without a .txt: the file name minus leading digits and dashes."""
    return _LEADING_NUMBERS.sub("", stem).strip()


def read_caption(image_path: Path) -> str:
    """The caption of an image: its sidecar `<stem>.txt` if present, else from its file name."""
    sidecar = image_path.with_suffix(".txt")
    if sidecar.is_file():
        # Taggers write one line, people sometimes several; a caption is one line of text.
        return " ".join(sidecar.read_text(encoding="utf-8-sig", errors="replace").split())
    return caption_from_filename(image_path.stem)
