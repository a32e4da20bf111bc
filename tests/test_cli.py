"""The command line: create and inspect, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ti_core.cli import main
from ti_core.create import create_embedding
from ti_core.formats import export_a1111_pt, load_embedding

ROOT = Path(__file__).resolve().parents[1]


def test_create_writes_the_file_and_prints_its_path(tiny_model_dirs, tiny_models, tmp_path, capsys):
    code = main(
        [
            "create",
            "--model",
            str(tiny_model_dirs["sdxl"]),
            "--name",
            "zzzz1234",
            "--init-text",
            "tree",
            "--vectors",
            "2",
            "--embeddings-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out.strip()
    assert code == 0 and out == str(tmp_path / "zzzz1234.safetensors")
    loaded = load_embedding(Path(out))
    expected = create_embedding(tiny_models["sdxl"], "zzzz1234", "tree", 2)
    assert all(torch.equal(loaded.vectors[key], expected.vectors[key]) for key in expected.vectors)
    assert loaded.metadata["init_text"] == "tree" and loaded.metadata["architecture"] == "sdxl"


def test_create_refuses_to_replace_without_overwrite(tiny_model_dirs, tmp_path, capsys):
    args = ["create", "--model", str(tiny_model_dirs["sd1"]), "--name", "dup", "--embeddings-dir", str(tmp_path)]
    assert main(args) == 0
    before = (tmp_path / "dup.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*args, "--init-text", "cat"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and len(err.splitlines()) == 1
    assert (tmp_path / "dup.safetensors").read_bytes() == before
    assert main([*args, "--init-text", "cat", "--overwrite"]) == 0
    assert (tmp_path / "dup.safetensors").read_bytes() != before


def test_create_refuses_a_name_an_a1111_pt_already_gives_even_with_overwrite(
    tiny_model_dirs, tiny_models, tmp_path, capsys
):
    """The web UI would load `Dup.pt` and `dup.safetensors` as the same token; --overwrite replaces only our
    own file, so it does not make the clash acceptable, and the .pt is left alone."""
    (tmp_path / "Dup.pt").write_bytes(b"")  # zero bytes: the web UIs skip it, so it is no clash
    args = ["create", "--model", str(tiny_model_dirs["sd1"]), "--name", "dup", "--embeddings-dir", str(tmp_path)]
    assert main(args) == 0
    (tmp_path / "dup.safetensors").unlink()
    export_a1111_pt(create_embedding(tiny_models["sd1"], "Dup", "cat", 1), tmp_path / "Dup.pt")
    before = (tmp_path / "Dup.pt").read_bytes()
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main([*args, *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "Dup.pt" in err and "clash" in err and len(err.splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Dup.pt"]
    assert (tmp_path / "Dup.pt").read_bytes() == before


@pytest.mark.parametrize("name", ["../escape", "a/b", "CON", ""])
def test_bad_names_are_one_line_errors_and_write_nothing(tiny_model_dirs, tmp_path, capsys, name):
    code = main(
        ["create", "--model", str(tiny_model_dirs["sd1"]), "--name", name, "--embeddings-dir", str(tmp_path / "emb")]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.rglob("*.safetensors"))


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    code = main(["create", "--model", str(tmp_path / "nope"), "--name", "x", "--embeddings-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "no such model" in err and len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2_with_one_line(capsys):
    assert main(["create", "--vectors", "two"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert main(["frobnicate"]) == 2


def test_inspect_json_shows_layout_norms_and_nearest_tokens(tiny_model_dirs, tmp_path, capsys):
    main(
        [
            "create",
            "--model",
            str(tiny_model_dirs["sd1"]),
            "--name",
            "look",
            "--init-text",
            "tree",
            "--vectors",
            "2",
            "--embeddings-dir",
            str(tmp_path),
        ]
    )
    capsys.readouterr()
    code = main(["inspect", str(tmp_path / "look.safetensors"), "--model", str(tiny_model_dirs["sd1"]), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0
    assert info["vectors"] == 2 and info["step"] == 0 and info["token"] == "look"
    assert info["format"].startswith("emb_params")
    assert len(info["norms"]["clip_l"]) == 2 and all(n > 0 for n in info["norms"]["clip_l"])
    # An untrained vector is a vocabulary row, so its nearest token is the init word itself.
    assert info["nearest_tokens"]["clip_l"][0][0][0] == "tree"


def test_inspect_text_output_and_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "broken.safetensors" in err and len(err.strip().splitlines()) == 1


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ti_core", "inspect", str(tmp_path / "missing.safetensors")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
