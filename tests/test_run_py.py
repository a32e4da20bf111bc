"""run.py's decisions: which mode and torch build, what counts as already set up (no install is run here;
tests/test_bootstrap.py runs the real thing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_run():
    spec = importlib.util.spec_from_file_location("ti_run_under_test", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_run()


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, ("app", None, [])),
        (
            ["--model", "m.safetensors", "--port", "7861"],
            {},
            ("app", None, ["--model", "m.safetensors", "--port", "7861"]),
        ),
        (["--cpu", "--port", "1"], {"TI_TORCH": "cuda"}, ("app", "cpu", ["--port", "1"])),  # the flag wins
        (["test"], {"TI_TORCH": "CUDA"}, ("test", "cuda", [])),
        (["test", "-k", "names", "--cuda"], {}, ("test", "cuda", ["-k", "names"])),
        (["--model", "test"], {}, ("app", None, ["--model", "test"])),  # only a first `test` is the mode
    ],
)
def test_parse(argv, environ, expected):
    assert run.parse(argv, environ) == expected


@pytest.mark.parametrize(("argv", "environ"), [(["--cpu", "--cuda"], {}), ([], {"TI_TORCH": "rocm"})])
def test_parse_refuses_contradictions_and_unknown_builds(argv, environ):
    with pytest.raises(run.SetupError):
        run.parse(argv, environ)


@pytest.mark.parametrize(
    ("version", "requires", "build"),
    [
        (None, [], None),
        ("2.13.0+cpu", ["filelock", "sympy"], "cpu"),
        ("2.13.0+cu128", ["filelock"], "cuda"),
        ("2.13.0", ["filelock", 'nvidia-cublas-cu12==12.8.4.1; platform_system == "Linux"'], "cuda"),  # PyPI Linux
        ("2.13.0", ["filelock", "sympy"], "cpu"),  # PyPI macOS / Windows
        ("2.13.0+rocm6.4", [], "rocm"),
    ],
)
def test_torch_build(version, requires, build):
    assert run.torch_build(version, requires) == build


def test_a_set_up_counts_until_a_requirement_file_or_the_choice_changes(monkeypatch, tmp_path):
    for name in run.FINGERPRINTED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"{name}\n")
    monkeypatch.setattr(run, "ROOT", tmp_path)
    python = "/env/bin/python"
    stamp = {"app": run.fingerprint("app", None, python)}
    assert run.is_set_up(stamp, "app", None, python)
    assert not run.is_set_up(stamp, "test", None, python)  # the tests need more than the app
    assert run.is_set_up({"test": run.fingerprint("test", None, python)}, "app", None, python)  # and include it
    assert not run.is_set_up(stamp, "app", "cuda", python)
    assert not run.is_set_up(stamp, "app", None, "/other/bin/python")
    (tmp_path / "requirements.txt").write_text("diffusers>=99\n")
    assert not run.is_set_up(stamp, "app", None, python)


def test_a_missing_or_broken_stamp_means_not_set_up(tmp_path):
    assert run.read_stamp(tmp_path / "none.json") == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert run.read_stamp(tmp_path / "bad.json") == {}
    (tmp_path / "list.json").write_text(json.dumps(["app"]))
    assert run.read_stamp(tmp_path / "list.json") == {}


def test_the_requirement_files_exist_and_gradio_is_only_in_the_apps():
    for files in run.REQUIREMENTS.values():
        assert all((ROOT / name).is_file() for name in files)
    assert all((ROOT / name).is_file() for name in run.FINGERPRINTED)
    assert "gradio" in (ROOT / "requirements-app.txt").read_text()
    # A web UI's own gradio must never be touched: the runtime requirements do not name it.
    assert "gradio" not in (ROOT / "requirements.txt").read_text().lower()
