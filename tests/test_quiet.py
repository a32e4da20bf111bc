"""Quiet by default: the CLI prints only what the project writes, --verbose lets the libraries speak,
and every command loads its model once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import ti_core.models
from ti_core.cli import main
from ti_core.quiet import quiet_libraries

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_WORDS = ("loading pipeline components", "warn", "deprecat", "torchvision", "it/s]")


def run_cli(*args: str, cwd: Path) -> str:
    """stdout and stderr of `python -m ti_core ARGS` as a user gets them: no verbosity variables set."""
    env = {key: value for key, value in os.environ.items() if not key.endswith("_VERBOSITY")}
    env |= {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "ti_core", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_the_apps_help_prints_only_its_usage(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.endswith("_VERBOSITY")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "extension.py"), "--help"], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("usage: python extension.py")
    assert done.stderr == ""  # nothing from the shutdown (the quiet block once failed there)


def lines(text: str) -> list[str]:
    """Lines as a terminal shows them, a progress bar's redraws (carriage returns) each counted."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def embedding_file(tiny_model_dirs, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("emb")
    assert (
        main(["create", "--model", str(tiny_model_dirs["sd1"]), "--name", "look", "--embeddings-dir", str(folder)])
        == 0
    )
    return folder / "look.safetensors"


@pytest.fixture(scope="module")
def tiny_single_file(tmp_path_factory) -> tuple[Path, Path]:
    from ti_core.testing import save_tiny_single_file

    return save_tiny_single_file(tmp_path_factory.mktemp("single") / "tiny.safetensors")


@pytest.mark.parametrize("layout", ["diffusers folder", "single file"])
def test_inspect_with_a_model_prints_only_the_projects_lines(
    layout, embedding_file, tiny_model_dirs, tiny_single_file, tmp_path, capsys
):
    checkpoint, config = tiny_single_file
    model = ["--model", str(tiny_model_dirs["sd1"])]
    if layout == "single file":
        model = ["--model", str(checkpoint), "--model-config", str(config)]
    args = ["inspect", str(embedding_file), *model]
    printed = lines(run_cli(*args, cwd=tmp_path))
    capsys.readouterr()
    assert main(args) == 0
    # Exactly the lines the command itself prints (sorted: safetensors returns metadata in any order).
    assert sorted(printed) == sorted(lines(capsys.readouterr().out))
    assert not [line for line in printed if any(word in line.lower() for word in LIBRARY_WORDS)]
    assert any(line.split(":")[0].strip() == "clip_l[0]" for line in printed)  # the model was used


def test_verbose_lets_the_libraries_output_through_and_shows_one_load(embedding_file, tiny_model_dirs, tmp_path):
    printed = lines(
        run_cli("inspect", str(embedding_file), "--model", str(tiny_model_dirs["sd1"]), "--verbose", cwd=tmp_path)
    )
    loads = [line for line in printed if "Loading pipeline components" in line and " 0/" in line]
    assert len(loads) == 1  # one bar started: the model is loaded once
    assert any("clip_l[0]" in line for line in printed)


def test_every_command_loads_the_model_once(tiny_model_dirs, tmp_path, monkeypatch, capsys, one_thread):
    from PIL import Image

    calls: list[str] = []
    load = ti_core.models.load_model

    def counting(source, **kwargs):
        calls.append(str(source))
        return load(source, **kwargs)

    monkeypatch.setattr(ti_core.models, "load_model", counting)
    model, embeddings = str(tiny_model_dirs["sd1"]), str(tmp_path / "emb")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 40)).save(images / "a red square.png")
    commands = {
        "create": ["create", "--model", model, "--name", "once", "--embeddings-dir", embeddings],
        "inspect": ["inspect", str(tmp_path / "emb" / "once.safetensors"), "--model", model],
        "train": ["train", "--model", model, "--name", "once", "--embeddings-dir", embeddings, "--resume"]
        + ["--images", str(images), "--log-dir", str(tmp_path / "logs"), "--steps", "1", "--resolution", "64"],
    }
    for name, args in commands.items():
        calls.clear()
        assert main(args) == 0, (name, capsys.readouterr().err)
        assert calls == [model], name


def test_quiet_libraries_silences_warnings_and_logs_then_restores_them():
    diffusers_logging = pytest.importorskip("diffusers.utils.logging")
    level, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    accelerate_level = logging.getLogger("accelerate").level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn("a library's deprecation", FutureWarning, stacklevel=1)
            assert diffusers_logging.get_verbosity() == logging.ERROR
            assert not diffusers_logging.is_progress_bar_enabled()
            assert logging.getLogger("accelerate").level == logging.ERROR
        warnings.warn("after", FutureWarning, stacklevel=1)
        with quiet_libraries(verbose=True):
            warnings.warn("verbose", FutureWarning, stacklevel=1)
            assert diffusers_logging.is_progress_bar_enabled() == bars
    assert [str(warning.message) for warning in caught] == ["after", "verbose"]
    assert diffusers_logging.get_verbosity() == level and diffusers_logging.is_progress_bar_enabled() == bars
    assert logging.getLogger("accelerate").level == accelerate_level
