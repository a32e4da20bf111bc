"""Embedding names are file stems: anything accepted must be a safe file name inside the embeddings folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ti_core.names import MAX_NAME_LENGTH, embedding_path, name_warnings, suggested_name, validate_name

RESERVED = ["CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cat-toy", "cat-toy"),
        ("  my style  ", "my style"),
        ("my style v2", "my style v2"),
        ("a.b", "a.b"),
        ("<cat>"[1:-1], "cat"),
        ("Émilie_ü_日本", "Émilie_ü_日本"),
        ("x" * MAX_NAME_LENGTH, "x" * MAX_NAME_LENGTH),
        ("CONSOLE", "CONSOLE"),
        ("COM10", "COM10"),
        ("LPT0", "LPT0"),
        ("nul-style", "nul-style"),
    ],
)
def test_valid_names(raw, expected):
    assert validate_name(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("../escape", "path separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        (".hidden", "starts with a dot"),
        ("tab\there", "control character"),
        ("new\nline", "control character"),
        ("nul\x00byte", "control character"),
        ("del\x7f", "control character"),
        ("a<b", "Windows"),
        ("a>b", "Windows"),
        ("a:b", "Windows"),
        ('a"b', "Windows"),
        ("a|b", "Windows"),
        ("a?b", "Windows"),
        ("a*b", "Windows"),
        ("trailing.", "ends with a dot"),
        ("x" * (MAX_NAME_LENGTH + 1), "limit"),
        ("日" * 80, "too long"),
        ("con", "reserved"),
        ("CON", "reserved"),
        ("Aux.safetensors", "reserved"),
        ("nul.tar.gz", "reserved"),
        ("com1", "reserved"),
        ("LPT9", "reserved"),
        ("CON .x", "reserved"),
        ("COM¹", "reserved"),
        ("\ud800", "invalid character"),
    ],
)
def test_invalid_names(raw, fragment):
    with pytest.raises(ValueError, match=None) as caught:
        validate_name(raw)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message


def test_not_a_string():
    with pytest.raises(ValueError, match="text"):
        validate_name(None)  # type: ignore[arg-type]


def test_embedding_path(tmp_path):
    assert embedding_path(tmp_path, " my style ") == tmp_path / "my style.safetensors"
    assert embedding_path(tmp_path, "cat", ".preview.png") == tmp_path / "cat.preview.png"
    with pytest.raises(ValueError, match="suffix"):
        embedding_path(tmp_path, "cat", "/../x")
    with pytest.raises(ValueError, match="separator"):
        embedding_path(tmp_path, "../cat")


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_embedding_path_refuses_a_symlink_out_of_the_folder(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    (folder / "evil.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match="outside"):
        embedding_path(folder, "evil")
    # A symlinked embeddings folder itself is fine.
    (tmp_path / "linked").symlink_to(folder)
    assert embedding_path(tmp_path / "linked", "cat") == tmp_path / "linked" / "cat.safetensors"


_FOLDER = Path(tempfile.mkdtemp(prefix="ti-names-"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=120), st.text(alphabet="ab .·/\\:*\x00\tCONULP1¹é日", max_size=12)))
def test_accepted_names_stay_inside_the_folder(raw):
    try:
        name = validate_name(raw)
    except ValueError as error:
        assert "\n" not in str(error)
        return
    assert validate_name(name) == name  # idempotent
    path = embedding_path(_FOLDER, name)
    assert path.resolve().parent == _FOLDER.resolve()
    assert path.stem == name  # the token the web UIs derive from the file name is the name
    # The OS accepts it as a file name, together with the atomic writer's temp-file decoration.
    temp = path.with_name(f".{path.name}.0123abcd.tmp")
    temp.touch()
    temp.unlink()


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(RESERVED),
    st.lists(st.booleans(), min_size=4, max_size=4),
    st.sampled_from(["", ".safetensors", ".pt", ".txt.gz", " .png"]),
)
def test_reserved_device_names_are_rejected(device, upper, extension):
    name = (
        "".join(char.upper() if up else char.lower() for char, up in zip(device, upper + [True], strict=False))
        + extension
    )
    with pytest.raises(ValueError, match="reserved"):
        validate_name(name)


# ---- names that work in one UI and silently fail in another ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("my cat", [["ComfyUI's `embedding:my cat` looks up only `my`", "`my_cat` works in every UI"]]),
        ("cat", [["already a word of the CLIP vocabulary", "diffusers", "SD.Next", "`cat_ti` works in every UI"]]),
        ("tree", [["already a word of the CLIP vocabulary", "`tree_ti`"]]),
        (
            "MyCat",
            [["capital letters", "diffusers on transformers 4 (SD.Next", "ComfyUI", "`mycat` works in every UI"]],
        ),
        ("cat(v2)", [["brackets", "emphasis", "`cat_v2` works in every UI"]]),
        ("My Cat", [["has a space", "`my_cat`"], ["capital letters", "`my_cat`"]]),
        ("Cat toy", [["has a space", "`cat_toy`"], ["capital letters", "`cat_toy`"]]),
        ("  spaced  ", []),
    ],
)
def test_name_warnings_name_the_uis_and_a_safe_alternative(name, fragments):
    warnings = name_warnings(name)
    assert len(warnings) == len(fragments)
    for warning, expected in zip(warnings, fragments, strict=True):
        assert all(fragment in warning for fragment in expected), warning
        assert "\n" not in warning and warning.endswith(".") and not warning.startswith("warning")


@pytest.mark.parametrize("name", ["zzzz1234", "my_cat", "cat_ti", "sks", "cat-toy-v2", "émilie"])
def test_names_that_work_everywhere_get_no_warning(name):
    assert name_warnings(name) == []


def test_the_vocabulary_check_is_the_real_clip_vocabulary():
    from ti_core.vocab import clip_tokenizer

    vocabulary = clip_tokenizer().get_vocab()  # what diffusers and SD.Next check a new token against
    for name in ("cat", "tree", "toy", "my", "photo", "zzzz1234", "my_cat", "cat_ti"):
        assert bool(name_warnings(name)) == (name in vocabulary), name


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="aB c()[]_-日1", min_size=1, max_size=16))
def test_the_suggested_name_draws_no_warning_and_is_valid(raw):
    if not raw.strip():
        return
    safe = suggested_name(raw)
    assert validate_name(safe) == safe
    assert name_warnings(safe) == []


@pytest.mark.parametrize(("raw", "expected"), [("..", "my_embedding"), (".cat", "cat_ti"), ("my.cat", "my_cat")])
def test_dots_are_not_carried_into_the_suggested_name(raw, expected):
    assert suggested_name(raw) == expected  # not ".._ti_ti", which is no valid name either


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="a. c()_-", min_size=1, max_size=12))
def test_the_suggested_name_of_any_text_with_dots_is_valid(raw):
    if raw.strip():
        safe = suggested_name(raw)
        assert validate_name(safe) == safe and name_warnings(safe) == []
