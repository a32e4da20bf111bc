"""Every training setting is declared once (ti_core.settings): a setting added to the declaration shows up
in the command line's options, the Train tab and the web UI route's JSON, with its default and its range."""

from __future__ import annotations

import dataclasses
import types

import pytest

import ti_core.config
from ti_core.config import TrainConfig, declared
from ti_core.settings import setting


@dataclasses.dataclass
class WithMadeUpSetting(TrainConfig):
    made_up_knob: float = setting(
        0.25, "a made-up knob of this test", group="loss", minimum=0, label="Made-up knob",
        elem_id="ti_train_made_up_knob",
    )  # fmt: skip


@pytest.fixture
def made_up(monkeypatch):
    """The declaration with one more setting, as a new field of TrainConfig declares it."""
    monkeypatch.setattr(ti_core.config, "TrainConfig", WithMadeUpSetting)


def test_the_declaration_lists_every_config_field_once():
    keys = [item.key for item in declared()]
    fields = [item.name for item in dataclasses.fields(TrainConfig) if item.name != "data"]
    data = [f"data.{item.name}" for item in dataclasses.fields(ti_core.config.DataConfig)]
    assert sorted(keys) == sorted(fields + data) and len(set(keys)) == len(keys)


def test_a_new_setting_is_a_command_line_option(made_up, capsys, tmp_path):
    from ti_core.cli import build_parser
    from ti_core.train_cli import config_from_args

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--made-up-knob MADE_UP_KNOB a made-up knob of this test (default: 0.25)" in help_text
    required = ["train", "--model", "m", "--name", "x", "--embeddings-dir", str(tmp_path), "--images", str(tmp_path)]
    assert config_from_args(build_parser().parse_args(required)).made_up_knob == 0.25
    args = build_parser().parse_args([*required, "--made-up-knob", "0.5"])
    assert config_from_args(args).made_up_knob == 0.5


def test_a_new_setting_is_a_train_tab_field(made_up, tmp_path):
    gr = pytest.importorskip("gradio")
    from ti_ui.backend import Backend
    from ti_ui.tabs.train import train_tab

    with gr.Blocks() as demo:
        train_tab(demo, Backend(tmp_path / "emb", tmp_path / "log"))
    fields = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    knob = fields["ti_train_made_up_knob"]
    assert isinstance(knob, gr.Number) and knob.value == 0.25 and knob.label == "Made-up knob"


def test_a_new_setting_is_in_the_routes_json(made_up, tmp_path):
    from ti_host import routes

    backend = types.SimpleNamespace(embeddings_dir=tmp_path / "emb", log_dir=tmp_path / "log", mixed_precision="no")
    body = {"name": "x", "data": {"images": str(tmp_path)}}
    assert routes.train_config(backend, body).made_up_knob == 0.25
    assert routes.train_config(backend, {**body, "made_up_knob": 0.5}).made_up_knob == 0.5
    with pytest.raises(ValueError, match="made_up_knob must not be negative, not -1.0"):
        routes.train_config(backend, {**body, "made_up_knob": -1})


def test_without_the_new_setting_the_route_refuses_it(tmp_path):
    from ti_host import routes

    backend = types.SimpleNamespace(embeddings_dir=tmp_path / "emb", log_dir=tmp_path / "log", mixed_precision="no")
    with pytest.raises(ValueError, match="unknown training setting: made_up_knob"):
        routes.train_config(backend, {"name": "x", "data": {"images": str(tmp_path)}, "made_up_knob": 0.5})
