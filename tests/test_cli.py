"""The command line: create and inspect, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

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


def test_create_warns_about_a_name_some_uis_miss_but_creates_it(tiny_model_dirs, tmp_path, capsys):
    args = ["create", "--model", str(tiny_model_dirs["sd1"]), "--embeddings-dir", str(tmp_path)]
    assert main([*args, "--name", "my cat"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "my cat.safetensors")
    # (stderr also carries the model loader's progress bars)
    (warning,) = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert warning.startswith("warning: `my cat` has a space: ComfyUI") and "`my_cat`" in warning
    assert load_embedding(tmp_path / "my cat.safetensors").name == "my cat"
    assert main([*args, "--name", "zzzz1234"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_inspect_lists_each_field_once_and_says_when_a_file_does_not_fit(tiny_model_dirs, tmp_path, capsys):
    main(["create", "--model", str(tiny_model_dirs["sd1"]), "--name", "zzzz1234", "--embeddings-dir", str(tmp_path)])
    capsys.readouterr()
    path = tmp_path / "zzzz1234.safetensors"
    assert main(["inspect", str(path), "--model", str(tiny_model_dirs["sd1"])]) == 0
    fields = [line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines()]
    assert len(fields) == len(set(fields)) and fields.count("architecture") == 1
    assert {"format", "fits", "init_text", "clip_l[0]"} <= set(fields)
    # The tiny SD1 file on the tiny SDXL model: shown, with why it does not fit (no half-embedding).
    assert main(["inspect", str(path), "--model", str(tiny_model_dirs["sdxl"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fits"] is False and "does not fit this SDXL model" in info["does_not_fit_because"]
    assert "nearest_tokens" not in info and info["format"] == "emb_params (kohya/A1111), ti_core"


def test_inspect_names_a_kohya_pt_and_refuses_t5_in_one_line(tmp_path, capsys):
    torch.save({"emb_params": torch.randn(2, 768)}, tmp_path / "kohya.pt")
    assert main(["inspect", str(tmp_path / "kohya.pt")]) == 0
    assert "format: emb_params (kohya .pt)" in capsys.readouterr().out
    save_file({"clip_l": torch.zeros(1, 768), "t5": torch.zeros(1, 4096)}, tmp_path / "flux.safetensors")
    assert main(["inspect", str(tmp_path / "flux.safetensors")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "T5" in line and "not for SD1, SD2 or SDXL" in line


def test_export_prints_the_files_and_the_diffusers_lines(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    main(["create", "--model", str(tiny_model_dirs["sdxl"]), "--name", "Cat", "--embeddings-dir", str(tmp_path)])
    capsys.readouterr()
    source = tmp_path / "Cat.safetensors"
    assert main(["export", str(source), "--to", "diffusers", "--out", str(tmp_path / "d")]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[:2] == [
        str(tmp_path / "d" / "Cat_clip_l.safetensors"),
        str(tmp_path / "d" / "Cat_clip_g.safetensors"),
    ]
    assert lines[2].startswith("# pipe:") and len(lines) == 5
    assert all(line.startswith("pipe.load_textual_inversion(") for line in lines[3:])
    (warning,) = captured.err.strip().splitlines()
    assert warning.startswith("warning: `Cat` has capital letters")
    monkeypatch.chdir(tmp_path / "d")  # the default --out is exports/<format> in the current folder
    assert main(["export", str(source), "--to", "image"]) == 0
    assert capsys.readouterr().out.strip() == str(Path("exports", "image", "Cat.png"))
    assert load_embedding(tmp_path / "d" / "exports" / "image" / "Cat.png").num_vectors == 1
    # Exporting again is refused (one line), as is an unknown format (a usage error).
    assert main(["export", str(source), "--to", "image"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "--overwrite" in line
    assert main(["export", str(source), "--to", "image", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["export", str(source), "--to", "ckpt"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_format_exports_to_its_default_folder(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    main(["create", "--model", str(tiny_model_dirs["sd1"]), "--name", "circle_ti", "--embeddings-dir", str(tmp_path)])
    monkeypatch.chdir(tmp_path)
    for to in ("diffusers", "a1111-pt", "image"):
        assert main(["export", "circle_ti.safetensors", "--to", to]) == 0, capsys.readouterr().err
    written = sorted(path.relative_to(tmp_path).as_posix() for path in (tmp_path / "exports").rglob("*.*"))
    assert written == [
        "exports/a1111-pt/circle_ti.pt",
        "exports/diffusers/circle_ti.safetensors",
        "exports/image/circle_ti.png",
    ]


def test_export_to_a_folder_that_cannot_be_made_is_one_readable_line(tiny_model_dirs, tmp_path, capsys):
    main(["create", "--model", str(tiny_model_dirs["sd1"]), "--name", "circle_ti", "--embeddings-dir", str(tmp_path)])
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert (
        main(["export", str(tmp_path / "circle_ti.safetensors"), "--to", "a1111-pt", "--out", str(blocker / "sub")])
        == 1
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot write the export to {blocker / 'sub'}")
    assert "[Errno" not in line and "choose another --out folder" in line


def test_create_checks_its_arguments_before_loading_the_model(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("ti_core.models.load_model", refuse)
    base = ["create", "--model", "demo:tiny-sd1", "--embeddings-dir", str(tmp_path)]
    for vectors in ("0", "76"):
        assert main([*base, "--name", "cat_ti", "--vectors", vectors]) == 1
        assert capsys.readouterr().err == f"error: vectors per token must be between 1 and 75, not {vectors}\n"
    assert main([*base, "--name", "..", "--vectors", "1"]) == 1
    assert capsys.readouterr().err == "error: embedding name '..' contains '..'\n"
    assert not any(tmp_path.iterdir())


def test_inspect_aligns_its_keys_in_a_fixed_order_without_empty_values(tmp_path, capsys):
    from safetensors.torch import save_file as save

    # The same metadata stored in two orders: the header keeps none, so inspect must fix one.
    metadata = {"name": "cat_ti", "step": "0", "vectors": "1", "init_text": "cat", "base_model": "demo",
                "base_model_hash": "", "tool": "ti_core", "architecture": "sd1", "zz_extra": "x"}  # fmt: skip
    outputs = []
    for index, items in enumerate((list(metadata.items()), list(reversed(metadata.items())))):
        path = tmp_path / f"{index}" / "cat_ti.safetensors"
        path.parent.mkdir()
        save({"emb_params": torch.ones(1, 768)}, str(path), metadata=dict(items))
        assert main(["inspect", str(path)]) == 0
        outputs.append(capsys.readouterr().out.replace(str(path), "FILE"))
    assert outputs[0] == outputs[1]
    lines = outputs[0].splitlines()
    assert len({line.index(": ") for line in lines}) == 1  # one key column
    keys = [line.split(": ")[0].strip() for line in lines]
    assert keys[-4:] == ["init_text", "base_model", "tool", "zz_extra"]
    assert "base_model_hash" not in keys
