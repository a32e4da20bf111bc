"""Presets: a named set of training settings in a JSON file of the same shape as a run's settings.json (and
`--config`), without what belongs to one run (the name, folders and images). Shipped ones live in
ti_core/presets; a user's are saved to the `presets` folder next to the log folder and take precedence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .config import RUN_RECORDS, TrainConfig
from .names import validate_name

SHIPPED_DIR = Path(__file__).parent / "presets"
RUN_KEYS = ("name", "embeddings_dir", "log_dir", "resume", "overwrite")  # one run's, never in a preset
RUN_DATA_KEYS = ("images",)


def presets_dir(log_dir: Path | str) -> Path:
    """The user's presets: `presets` beside the log folder."""
    return Path(log_dir).absolute().parent / "presets"


def preset_names(log_dir: Path | str) -> list[str]:
    """The saved and shipped presets' names, sorted (a saved one hides a shipped one of the same name)."""
    names = {path.stem for folder in (SHIPPED_DIR, presets_dir(log_dir)) for path in folder.glob("*.json")}
    return sorted(names, key=str.casefold)


def preset_path(name: str, log_dir: Path | str) -> Path:
    for folder in (presets_dir(log_dir), SHIPPED_DIR):
        path = folder / f"{name}.json"
        if name and "/" not in name and "\\" not in name and path.is_file():
            return path
    known = ", ".join(preset_names(log_dir)) or "none"
    raise ValueError(f"no preset named {name!r} (presets: {known})")


def load_preset(name: str, log_dir: Path | str) -> dict[str, Any]:
    """The settings of preset `name` (as in settings.json: data settings under "data"), checked."""
    path = preset_path(name, log_dir)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"preset {name!r} ({path}) cannot be read: {error}") from None
    return check_preset(values, name)


def check_preset(values: Any, name: str = "") -> dict[str, Any]:
    """`values` without one run's keys, or ValueError (one line) for an unknown or invalid setting."""
    where = f"preset {name!r}: " if name else ""
    if not isinstance(values, dict) or not isinstance(values.get("data", {}), dict):
        raise ValueError(f"{where}expected a JSON object of settings")
    settings = {key: value for key, value in values.items() if key not in (*RUN_KEYS, *RUN_RECORDS)}
    settings["data"] = {key: value for key, value in values.get("data", {}).items() if key not in RUN_DATA_KEYS}
    try:  # checked as a whole config would be, with placeholders for one run's keys
        TrainConfig.from_dict(
            {**settings, "name": "preset", "embeddings_dir": ".", "data": {"images": ".", **settings["data"]}}
        )
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None
    return settings


def save_preset(name: str, values: dict[str, Any], log_dir: Path | str) -> Path:
    """Write the settings `values` as preset `name` in the presets folder (atomically); the path written."""
    try:
        name = validate_name(name)
    except ValueError as error:
        raise ValueError(f"preset name: {error}") from None
    settings = check_preset(values, name)
    text = json.dumps(settings, indent=2, ensure_ascii=False) + "\n"
    path = presets_dir(log_dir) / f"{name}.json"
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))
