"""Presets: shipped ones are valid settings, saved ones land only in the presets folder, whole or not at all."""

from __future__ import annotations

import json

import pytest

from ti_core.config import TrainConfig
from ti_core.preset import SHIPPED_DIR, load_preset, preset_names, presets_dir, save_preset


@pytest.mark.parametrize(
    "name", ["subject (1-4 vectors)", "style (8-16 vectors)", "SDXL subject", "negative embedding (8 vectors)"]
)
def test_each_shipped_preset_makes_a_valid_config(tmp_path, name):
    settings = load_preset(name, tmp_path / "logs")
    config = TrainConfig.from_dict(
        {**settings, "name": "tok", "embeddings_dir": str(tmp_path), "data": {**settings["data"], "images": "x"}}
    )
    assert config.steps == settings["steps"]
    assert (SHIPPED_DIR / f"{name}.json").is_file()


def test_the_shipped_presets_cover_subject_style_and_sdxl(tmp_path):
    style, sdxl = load_preset("style (8-16 vectors)", tmp_path), load_preset("SDXL subject", tmp_path)
    assert 8 <= style["vectors"] <= 16 and 1 <= load_preset("subject (1-4 vectors)", tmp_path)["vectors"] <= 4
    assert sdxl["data"]["resolution"] == 1024
    assert load_preset("negative embedding (8 vectors)", tmp_path)["negative_embedding"] is True


def test_a_saved_preset_hides_a_shipped_one_and_keeps_no_run_keys(tmp_path):
    logs = tmp_path / "logs"
    values = {"name": "cat", "log_dir": str(logs), "steps": 77, "data": {"images": "/photos", "flip": True}}
    path = save_preset("SDXL subject", values, logs)
    assert path == tmp_path / "presets" / "SDXL subject.json" and path.parent == presets_dir(logs)
    assert json.loads(path.read_text()) == {"steps": 77, "data": {"flip": True}}
    assert load_preset("SDXL subject", logs) == {"steps": 77, "data": {"flip": True}}
    assert preset_names(logs).count("SDXL subject") == 1


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("../escape", {"steps": 5}, r"^preset name: .*path separator"),
        ("", {"steps": 5}, r"^preset name: "),
        ("ok", {"steps": 0}, r"^preset 'ok': steps must be at least 1, not 0$"),
        ("ok", {"stepz": 5}, r"^preset 'ok': unknown training setting: stepz$"),
        ("ok", {"optimizer": "sgd"}, r"^preset 'ok': optimizer must be one of adamw, adafactor"),
    ],
)
def test_bad_presets_are_one_line_and_write_nothing(tmp_path, name, values, message):
    with pytest.raises(ValueError, match=message):
        save_preset(name, values, tmp_path / "logs")
    assert not any(tmp_path.rglob("*.json"))
    assert not (tmp_path / "escape.json").exists()


def test_a_broken_saved_preset_is_one_line(tmp_path):
    folder = presets_dir(tmp_path / "logs")
    folder.mkdir()
    (folder / "half.json").write_text('{"steps": ')
    with pytest.raises(ValueError, match=r"^preset 'half' .* cannot be read: "):
        load_preset("half", tmp_path / "logs")
