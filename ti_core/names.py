"""Embedding names: the token is the file stem, so a name must be a safe file name on every OS."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

MAX_NAME_LENGTH = 100
# The file name is the name plus a suffix (".safetensors", ".preview.png") and, while the atomic writer
# runs, a temp prefix/suffix; ext4 and NTFS allow 255 bytes/UTF-16 units per name.
MAX_NAME_BYTES = 200
WINDOWS_FORBIDDEN = set('<>:"|?*')
# Windows reserves these device names in any case and with any extension ("con.safetensors");
# it also treats the superscript digits ¹²³ as digits here.
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{device}{digit}" for device in ("COM", "LPT") for digit in "123456789¹²³"
}
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9_-]+)+$")


def _bad_character(name: str) -> str | None:
    for char in name:
        category = unicodedata.category(char)
        if category == "Cc" or char in "\u2028\u2029":
            return f"a control character ({ascii(char)})"
        if category == "Cs":
            return f"an invalid character ({ascii(char)})"
        if char in WINDOWS_FORBIDDEN:
            return f"the character {char!r}, which Windows does not allow in file names"
    return None


def plural(count: int, word: str) -> str:
    """`1 vector`, `2 vectors`."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def validate_name(name: str) -> str:
    """The name with surrounding whitespace removed; ValueError (one line) when it cannot be a file stem."""
    if not isinstance(name, str):
        raise ValueError(f"embedding name must be text, not {type(name).__name__}")
    name = name.strip()
    if not name:
        raise ValueError("embedding name is empty")
    shown = ascii(name) if len(name) <= 40 else ascii(name[:40] + "…")
    if "/" in name or "\\" in name:
        raise ValueError(f"embedding name {shown} contains a path separator (/ or \\)")
    if ".." in name:
        raise ValueError(f"embedding name {shown} contains '..'")
    if name.startswith("."):
        raise ValueError(f"embedding name {shown} starts with a dot (a hidden file)")
    bad = _bad_character(name)
    if bad:
        raise ValueError(f"embedding name {shown} contains {bad}")
    if name.endswith("."):
        raise ValueError(f"embedding name {shown} ends with a dot, which Windows drops")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"embedding name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"embedding name {shown} is too long as a file name ({MAX_NAME_BYTES} bytes at most)")
    if name.split(".")[0].rstrip(" ").upper() in _RESERVED:
        raise ValueError(f"embedding name {shown} is a device name reserved by Windows")
    return name


def embedding_path(embeddings_dir: Path, name: str, suffix: str = ".safetensors") -> Path:
    """``embeddings_dir / (name + suffix)`` for a valid name; ValueError if it would land outside the folder."""
    name = validate_name(name)
    if not _SUFFIX.match(suffix):
        raise ValueError(f"file suffix must look like '.safetensors', not {suffix!r}")
    embeddings_dir = Path(embeddings_dir)
    path = embeddings_dir / f"{name}{suffix}"
    folder = embeddings_dir.resolve()
    # resolve() follows a symlink already standing at the target, so a link out of the folder is caught too.
    resolved = path.resolve()
    if not resolved.is_relative_to(folder):
        raise ValueError(f"embedding name {name!r} would be saved outside {embeddings_dir}")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Names that work in one UI and silently fail in another. The token is the name everywhere, but each UI reads it
# its own way: ComfyUI's `embedding:NAME` ends at the first space; A1111, Forge and reForge tokenize the name with
# the prompt (lowercased, emphasis brackets parsed), while diffusers and SD.Next add it to the tokenizer as a new
# token, refusing or ignoring one that is already a vocabulary entry.

_EMPHASIS = set("()[]")


@lru_cache(maxsize=1)
def _vocabulary() -> frozenset[str]:
    from .vocab import find_vocab_file, read_vocab

    try:
        return frozenset(read_vocab(find_vocab_file())[0])
    except (OSError, ValueError):  # no vocabulary installed: that check is skipped, the others still run
        return frozenset()


def suggested_name(name: str) -> str:
    """A name close to ``name`` that works the same in every UI: lowercase, ``_`` for spaces and brackets,
    and ``_ti`` after a vocabulary word (``My Cat`` -> ``my_cat``, ``cat`` -> ``cat_ti``)."""
    # Letters, digits, _ and - only: spaces and brackets, and the dots a file name cannot start or end with.
    safe = re.sub(r"[^\w-]+", "_", name.strip()).strip("_").lower() or "embedding"
    if safe in _vocabulary():
        safe += "_ti"
    try:
        validate_name(safe)
    except ValueError:  # "con": a Windows device name once lowercased
        safe += "_ti"
    return safe if safe != "embedding" else "my_embedding"


def name_warnings(name: str) -> list[str]:
    """What would make ``name`` silently fail in some UI, one sentence each, naming a safe alternative.

    Empty when the name works the same everywhere. Warnings, not errors: the user decides. The name is
    taken as typed (surrounding spaces ignored); whether it is a valid file name is validate_name's job.
    """
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        return []
    alternative = f"a name such as `{suggested_name(name)}` works in every UI"
    warnings = []
    if any(char.isspace() for char in name):
        first = name.split()[0]
        warnings.append(
            f"`{name}` has a space: ComfyUI's `embedding:{name}` looks up only `{first}`, so the embedding is "
            f"never used there; {alternative}."
        )
    if _EMPHASIS & set(name):
        warnings.append(
            f"`{name}` has brackets: A1111, Forge, reForge and SD.Next read ( ) and [ ] in a prompt as emphasis "
            f"(ComfyUI reads ( ) as weights), so the token never matches there; {alternative}."
        )
    if name in _vocabulary():
        warnings.append(
            f"`{name}` is already a word of the CLIP vocabulary: diffusers' load_textual_inversion refuses to load "
            "it and SD.Next keeps the ordinary word and ignores the vectors (A1111, Forge and reForge replace the "
            f"word in every prompt); {alternative}."
        )
    if name != name.lower():
        warnings.append(
            f"`{name}` has capital letters: A1111, Forge and reForge lowercase it with the prompt, but diffusers "
            "on transformers 4 (SD.Next, and the A1111-era stacks) matches it only typed with the same capitals, "
            f"and ComfyUI's `embedding:` lookup is case-sensitive on Linux; {alternative}."
        )
    return warnings
