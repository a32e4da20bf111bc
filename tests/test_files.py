"""Managing embedding files: promote a snapshot, rename, delete to the trash; nothing lost, one-line errors."""

from __future__ import annotations

import pytest
import torch

from ti_core.cli import main
from ti_core.embedding import Embedding
from ti_core.files import (
    delete_embedding,
    list_snapshots,
    promote_snapshot,
    rename_embedding,
    trash_dir,
)
from ti_core.formats import list_embeddings, load_embedding, save_embedding_to


def _write(path, value: float, name: str = "cat", step: int = 0):
    embedding = Embedding(name=name, vectors={"clip_l": torch.full((1, 8), value)}, step=step)
    save_embedding_to(embedding, path, overwrite=True)
    return path


@pytest.fixture
def run(tmp_path):
    """An embedding `cat` (vectors of 1) and its run's snapshots at steps 20 and 40 (vectors of 20 and 40)."""
    embeddings, logs = tmp_path / "embeddings", tmp_path / "textual_inversion"
    _write(embeddings / "cat.safetensors", 1.0, step=60)
    for step in (20, 40):
        _write(logs / "cat" / f"cat-{step}.safetensors", float(step), step=step)
    return embeddings, logs


def _value(path) -> float:
    return float(next(iter(load_embedding(path).vectors.values()))[0, 0])


def test_promote_makes_the_snapshot_the_embedding_and_keeps_the_old_one(run):
    embeddings, logs = run
    assert list_snapshots(logs, "cat") == ["20", "40"]
    path = promote_snapshot(embeddings, logs, "cat", 40)
    assert path == embeddings / "cat.safetensors" and _value(path) == 40.0
    trashed = list(trash_dir(embeddings).iterdir())
    assert [p.name for p in trashed] == ["cat.safetensors"] and _value(trashed[0]) == 1.0
    promote_snapshot(embeddings, logs, "cat", "20")  # a second promote keeps both earlier versions
    assert _value(path) == 20.0 and len(list(trash_dir(embeddings).iterdir())) == 2
    assert trash_dir(embeddings) == embeddings.parent / "textual_inversion_trash"
    assert [p.name for p in list_embeddings(embeddings)] == ["cat.safetensors"]  # no temp file left


def test_promote_cli_and_a_missing_step_is_one_line(run, capsys):
    embeddings, logs = run
    args = ["promote", "--embeddings-dir", str(embeddings), "--log-dir", str(logs), "--name", "cat"]
    assert main([*args, "--step", "40"]) == 0
    assert capsys.readouterr().out.strip() == str(embeddings / "cat.safetensors")
    assert _value(embeddings / "cat.safetensors") == 40.0
    assert main([*args, "--step", "30"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cat-30.safetensors" in err and "20, 40" in err
    assert _value(embeddings / "cat.safetensors") == 40.0


def test_delete_moves_the_file_and_its_card_to_the_trash(run):
    embeddings, _ = run
    (embeddings / "cat.preview.png").write_bytes(b"card")
    moved = delete_embedding(embeddings, "cat")
    assert sorted(p.name for p in moved) == ["cat.preview.png", "cat.safetensors"]
    assert list(embeddings.iterdir()) == []
    _write(embeddings / "cat.safetensors", 2.0)
    (again,) = delete_embedding(embeddings, "cat")  # a clash in the trash gets a timestamp, nothing is lost
    assert again.name.startswith("cat-") and again.name.endswith(".safetensors") and _value(again) == 2.0
    assert _value(trash_dir(embeddings) / "cat.safetensors") == 1.0
    with pytest.raises(FileNotFoundError, match="no embedding named cat"):
        delete_embedding(embeddings, "cat")


def test_rename_moves_the_file_and_card_and_refuses_clashes_and_bad_names(run):
    embeddings, _ = run
    (embeddings / "cat.preview.png").write_bytes(b"card")
    _write(embeddings / "dog.safetensors", 3.0, name="dog")
    with pytest.raises(ValueError, match="an embedding named dog already exists"):
        rename_embedding(embeddings, "cat", "dog")
    with pytest.raises(ValueError, match="path separator"):
        rename_embedding(embeddings, "cat", "../cat")
    renamed = rename_embedding(embeddings, "cat", "kitty")
    assert sorted(p.name for p in renamed) == ["kitty.preview.png", "kitty.safetensors"]
    assert sorted(p.name for p in embeddings.iterdir()) == [
        "dog.safetensors",
        "kitty.preview.png",
        "kitty.safetensors",
    ]
    assert _value(embeddings / "kitty.safetensors") == 1.0
