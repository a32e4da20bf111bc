"""Embedding files: every layout other tools write loads with identical vectors; ours is written atomically."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ti_core
from ti_core import atomic, image_data
from ti_core.embedding import Embedding
from ti_core.formats import (
    EmbeddingFileError,
    atomic_write,
    diffusers_loading_code,
    export_a1111_pt,
    export_diffusers,
    export_embedding,
    list_embeddings,
    load_embedding,
    read_embedding,
    save_embedding,
    save_embedding_card,
    save_embedding_png,
    save_embedding_to,
)
from ti_core.inspect import describe

SD1 = {"clip_l": 768}
SD2 = {"clip_h": 1024}
SDXL = {"clip_l": 768, "clip_g": 1280}


def _vectors(count: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, width, generator=generator)


@pytest.fixture
def sd1() -> Embedding:
    return Embedding("cat toy", {"clip_l": _vectors(3, 768, 1)}, step=120, metadata={"init_text": "a cat"})


@pytest.fixture
def sd2() -> Embedding:
    return Embedding("sd2-style", {"clip_h": _vectors(2, 1024, 2)}, step=7)


@pytest.fixture
def sdxl() -> Embedding:
    return Embedding("xl thing", {"clip_l": _vectors(4, 768, 3), "clip_g": _vectors(4, 1280, 4)}, step=50)


def _equal(loaded: Embedding, vectors: dict[str, torch.Tensor]) -> None:
    assert set(loaded.vectors) == set(vectors)
    for key, tensor in vectors.items():
        assert loaded.vectors[key].dtype == torch.float32
        assert torch.equal(loaded.vectors[key], tensor.to(torch.float32)), key


def _a1111_pt(tensor: torch.Tensor, **extra) -> dict:
    """What A1111's Embedding.save writes (its training tensor still requires grad)."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": tensor.clone().requires_grad_()},
        "name": "stored-name",
        "step": 1234,
        "sd_checkpoint": "abcdef0123",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
        **extra,
    }


def _a1111_png(path: Path, data: dict) -> None:
    """A1111's preview-with-chunk writer: embedding_to_b64 with its EmbeddingEncoder."""

    class EmbeddingEncoder(json.JSONEncoder):
        def default(self, obj):
            if isinstance(obj, torch.Tensor):
                return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
            return json.JSONEncoder.default(self, obj)

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data, cls=EmbeddingEncoder).encode()))
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, "PNG", pnginfo=info)


# --------------------------------------------------------------------------------------------------------------
# Reading what other tools write

SINGLE_LAYOUTS = {
    "kohya emb_params": lambda t: {"emb_params": t},
    "onetrainer emp_params": lambda t: {"emp_params": t},
    "onetrainer with output embedding": lambda t: {"emp_params": t, "emp_params_out": torch.zeros_like(t)},
    "diffusers token": lambda t: {"<cat-toy>": t},
    "diffusers token named *_out": lambda t: {"cat_out": t},
}


@pytest.mark.parametrize("layout", SINGLE_LAYOUTS)
@pytest.mark.parametrize(("width", "key"), [(768, "clip_l"), (1024, "clip_h"), (1280, "clip_g"), (32, "clip_l")])
def test_single_tensor_safetensors(tmp_path, layout, width, key):
    tensor = _vectors(2, width, 5)
    path = tmp_path / "my token.safetensors"
    save_file(SINGLE_LAYOUTS[layout](tensor), path)
    loaded = load_embedding(path)
    assert loaded.name == "my token"
    _equal(loaded, {key: tensor})


def test_one_dimensional_tensor_becomes_one_vector(tmp_path):
    tensor = _vectors(1, 768, 6)[0]
    save_file({"emb_params": tensor}, tmp_path / "one.safetensors")
    torch.save({"<one>": tensor}, tmp_path / "one.bin")
    for suffix in (".safetensors", ".bin"):
        loaded = load_embedding(tmp_path / f"one{suffix}")
        assert loaded.vectors["clip_l"].shape == (1, 768)
        assert torch.equal(loaded.vectors["clip_l"][0], tensor)


def test_half_precision_file_loads_as_float32(tmp_path):
    tensor = _vectors(2, 768, 7).half()
    save_file({"emb_params": tensor}, tmp_path / "half.safetensors")
    _equal(load_embedding(tmp_path / "half.safetensors"), {"clip_l": tensor.float()})


@pytest.mark.parametrize("with_out", [False, True])
def test_sdxl_safetensors(tmp_path, sdxl, with_out):
    tensors = dict(sdxl.vectors)
    if with_out:  # OneTrainer's output embeddings are not ours to load
        tensors |= {"clip_l_out": torch.ones(4, 768), "clip_g_out": torch.ones(4, 1280)}
    path = tmp_path / "kohya-xl.safetensors"
    save_file(tensors, path, metadata={"ss_something": "x"})
    loaded = load_embedding(path, widths=SDXL)
    assert loaded.name == "kohya-xl"
    _equal(loaded, sdxl.vectors)
    assert loaded.metadata["ss_something"] == "x"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("width", [768, 1024])
def test_a1111_pt(tmp_path, legacy, width):
    tensor = _vectors(5, width, 8)
    path = tmp_path / "a1111-emb.pt"
    torch.save(_a1111_pt(tensor), path, _use_new_zipfile_serialization=not legacy)
    loaded = load_embedding(path)
    assert loaded.name == "a1111-emb"  # the token is the file stem, not the stored name
    assert loaded.step == 1234
    assert loaded.metadata == {"sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "v1-5-pruned-emaonly"}
    _equal(loaded, {"clip_l" if width == 768 else "clip_h": tensor})
    assert not loaded.vectors[next(iter(loaded.vectors))].requires_grad


def test_a1111_pt_without_checkpoint_fields(tmp_path):
    tensor = _vectors(1, 768, 9)
    torch.save(_a1111_pt(tensor, sd_checkpoint=None, sd_checkpoint_name=None, step=None), tmp_path / "old.pt")
    loaded = load_embedding(tmp_path / "old.pt")
    assert loaded.step == 0 and loaded.metadata == {}
    _equal(loaded, {"clip_l": tensor})


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_diffusers_bin(tmp_path, legacy):
    tensor = _vectors(3, 1024, 10)
    torch.save({"<sks>": tensor}, tmp_path / "learned_embeds.bin", _use_new_zipfile_serialization=not legacy)
    loaded = load_embedding(tmp_path / "learned_embeds.bin", widths=SD2)
    assert loaded.name == "learned_embeds"
    _equal(loaded, {"clip_h": tensor})


def test_bare_tensor_pt(tmp_path):
    tensor = _vectors(2, 768, 11)
    torch.save(tensor, tmp_path / "bare.pt")
    _equal(load_embedding(tmp_path / "bare.pt"), {"clip_l": tensor})


def _textual_inversion_pt(tensor: torch.Tensor, old_torch: bool = False) -> dict:
    """What the original textual_inversion repository's EmbeddingManager.save writes."""
    parameters = torch.nn.ParameterDict({"*": torch.nn.Parameter(tensor.clone())})
    if old_torch:  # torch 1.11's ParameterDict kept its parameters in _parameters only: no _keys
        del parameters.__dict__["_keys"]
    return {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": parameters}


@pytest.mark.parametrize("old_torch", [False, True], ids=["torch2", "torch1.11"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_original_textual_inversion_parameterdict_pt(tmp_path, legacy, old_torch):
    tensor = _vectors(2, 768, 30)
    path = tmp_path / "sculpture.pt"
    torch.save(_textual_inversion_pt(tensor, old_torch), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(Exception, match="Unsupported global"):  # what torch's own safe loader says
        torch.load(path, weights_only=True)
    loaded, layout = read_embedding(path)
    assert loaded.name == "sculpture" and loaded.step == 0
    _equal(loaded, {"clip_l": tensor})
    assert layout == "textual-inversion-pt (ParameterDict, original textual_inversion repository)"
    assert list_embeddings(tmp_path) == [path]


class _NumpyTensor:
    """Pickles as torch pickles a tensor of a device without storage: its data as a numpy array."""

    def __init__(self, array: numpy.ndarray):
        self.array = array

    def __reduce__(self):
        return (torch._utils._rebuild_device_tensor_from_numpy, (self.array, torch.float32, "xla:0", False))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_rebuilt_from_numpy_arrays(tmp_path, legacy):
    array = _vectors(3, 1024, 31).numpy().astype(numpy.float16)
    data = {"string_to_param": {"*": _NumpyTensor(array)}, "name": "np", "step": numpy.int64(42)}
    torch.save(data, tmp_path / "numpy.pt", _use_new_zipfile_serialization=not legacy)
    loaded = load_embedding(tmp_path / "numpy.pt")
    assert loaded.step == 42  # a numpy integer, as numpy-based tools store the step
    _equal(loaded, {"clip_h": torch.from_numpy(array).float()})


def test_kohya_pt_files(tmp_path, sdxl):
    """kohya's trainers write .pt files with the same keys as their .safetensors files."""
    tensor = _vectors(2, 768, 32)
    torch.save({"emb_params": tensor}, tmp_path / "kohya.pt")
    loaded, layout = read_embedding(tmp_path / "kohya.pt")
    _equal(loaded, {"clip_l": tensor})
    assert layout == "emb_params (kohya .pt)"
    torch.save(dict(sdxl.vectors), tmp_path / "kohya-xl.pt")
    loaded, layout = read_embedding(tmp_path / "kohya-xl.pt", widths=SDXL)
    _equal(loaded, sdxl.vectors)
    assert layout == "sdxl (clip_l + clip_g), kohya .pt"


def test_layout_names(tmp_path, sd1, sdxl):
    tensor = _vectors(1, 768, 33)
    files = {
        "ours.safetensors": (lambda p: save_embedding_to(sd1, p), "emb_params (kohya/A1111), ti_core"),
        "ours-xl.safetensors": (lambda p: save_embedding_to(sdxl, p), "sdxl (clip_l + clip_g), ti_core"),
        "kohya.safetensors": (lambda p: save_file({"emb_params": tensor}, p), "emb_params (kohya/A1111)"),
        "onetrainer.safetensors": (
            lambda p: save_file({"emp_params": tensor, "emp_params_out": tensor.clone()}, p),
            "emp_params (OneTrainer)",
        ),
        "onetrainer-xl.safetensors": (
            lambda p: save_file(
                {**sdxl.vectors, "clip_l_out": torch.ones(4, 768), "clip_g_out": torch.ones(4, 1280)}, p
            ),
            "sdxl (clip_l + clip_g), OneTrainer",
        ),
        "learned_embeds.safetensors": (lambda p: save_file({"<cat>": tensor}, p), "single tensor (diffusers)"),
        "learned_embeds.bin": (lambda p: torch.save({"<cat>": tensor}, p), "diffusers-bin"),
        "a1111.pt": (lambda p: torch.save(_a1111_pt(tensor), p), "a1111-pt"),
        "bare.pt": (lambda p: torch.save(tensor, p), "bare tensor (.pt)"),
        "chunk.png": (lambda p: _a1111_png(p, _a1111_pt(tensor)), "a1111-image (text chunk)"),
    }
    for filename, (write, expected) in files.items():
        write(tmp_path / filename)
        assert read_embedding(tmp_path / filename)[1] == expected, filename
        assert describe(tmp_path / filename, load_embedding(tmp_path / filename))["format"] == expected


@pytest.mark.parametrize(
    ("tensors", "shown"),
    [
        ({"clip_l": (2, 768), "clip_g": (2, 1280), "t5": (2, 4096)}, "t5 [2, 4096]"),  # OneTrainer, SD3
        ({"clip_l": (1, 768), "t5": (1, 4096), "t5_out": (1, 4096)}, "t5 [1, 4096]"),  # OneTrainer, Flux
        ({"emb_params": (3, 4096)}, "emb_params [3, 4096]"),  # a single T5-XXL-wide tensor
    ],
)
def test_t5_embeddings_get_one_line_saying_what_they_are_for(tmp_path, tensors, shown):
    path = tmp_path / "flux-thing.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in tensors.items()}, path)
    for widths in (None, SD1, SDXL):
        message = _load_error(path, widths=widths)
        assert f"is a T5 text-encoder embedding ({shown}), for SD3 or Flux models" in message
        assert "it is not for SD1, SD2 or SDXL" in message


def test_a1111_png_chunk(tmp_path):
    tensor = _vectors(3, 768, 12)
    path = tmp_path / "image file.png"
    _a1111_png(path, _a1111_pt(tensor, name="name in chunk"))
    loaded = load_embedding(path)
    assert loaded.name == "name in chunk"  # as A1111: data['name'] wins for images
    assert loaded.step == 1234
    _equal(loaded, {"clip_l": tensor})


@pytest.mark.parametrize("which", ["sd1", "sd2", "sdxl"])
def test_png_round_trip(tmp_path, which, request):
    embedding = request.getfixturevalue(which)
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    image.info["parameters"] = "a photo of cat toy"
    path = save_embedding_png(embedding, tmp_path / "preview-with-chunk.png", image)
    loaded = load_embedding(path)
    _equal(loaded, embedding.vectors)
    if which != "sdxl":
        assert loaded.name == embedding.name and loaded.step == embedding.step
    with Image.open(path) as reopened:
        assert reopened.size == (64, 64)
        assert reopened.info["parameters"] == "a photo of cat toy"
    with pytest.raises(ValueError, match="png"):
        save_embedding_png(embedding, tmp_path / "x.webp", image)


def test_png_round_trip_largest_sdxl(tmp_path):
    # 75 vectors x 2048 numbers is a 5 MB chunk: still a tEXt chunk Pillow reads back.
    embedding = Embedding("big", {"clip_l": _vectors(75, 768, 13), "clip_g": _vectors(75, 1280, 14)})
    path = save_embedding_png(embedding, tmp_path / "big.png", Image.new("RGB", (8, 8)))
    _equal(load_embedding(path, widths=SDXL), embedding.vectors)


def _strip_chunk(source: Path, target: Path, **save_options) -> Path:
    """A copy of an image without its text chunks, as an editor or a converter writes it."""
    with Image.open(source) as image:
        image.convert("RGB").save(target, **save_options)
    with Image.open(target) as image:
        assert "sd-ti-embedding" not in image.info
    return target


@pytest.mark.parametrize("which", ["sd1", "sd2", "sdxl"])
def test_card_carries_the_embedding_in_chunk_and_pixels(tmp_path, which, request):
    embedding = request.getfixturevalue(which)
    card = save_embedding_card(embedding, tmp_path / "card.png")
    loaded, layout = read_embedding(card)
    assert layout == "a1111-image (text chunk)"
    _equal(loaded, embedding.vectors)
    copies = [
        _strip_chunk(card, tmp_path / "resaved.png"),
        _strip_chunk(card, tmp_path / "converted.webp", lossless=True),
    ]
    for copy in copies:
        loaded, layout = read_embedding(copy)
        assert layout == "a1111-image (pixels)", copy.name
        _equal(loaded, embedding.vectors)
        assert loaded.name == (embedding.name if which != "sdxl" else copy.stem)  # SDXL's payload has no name
    assert list_embeddings(tmp_path) == sorted([card, *copies])


def test_card_around_a_preview_picture(tmp_path, sd1):
    picture = Image.new("RGB", (320, 200), (200, 30, 30))
    card = save_embedding_card(sd1, tmp_path / "card.png", picture)
    with Image.open(card) as image:
        assert image.height == 200 and image.width > 320
        middle = image.convert("RGB").getpixel((image.width // 2, 100))
    assert middle == (200, 30, 30)  # the picture itself, between the strips and caption bands
    _equal(load_embedding(_strip_chunk(card, tmp_path / "copy.png")), sd1.vectors)


def test_largest_sdxl_card_round_trips(tmp_path):
    embedding = Embedding("big", {"clip_l": _vectors(75, 768, 34), "clip_g": _vectors(75, 1280, 35)})
    card = save_embedding_card(embedding, tmp_path / "big.png")
    _equal(load_embedding(_strip_chunk(card, tmp_path / "copy.png"), widths=SDXL), embedding.vectors)


def test_a_lossy_copy_or_a_plain_picture_is_not_an_embedding(tmp_path, sd1):
    card = save_embedding_card(sd1, tmp_path / "card.png")
    lossy = _strip_chunk(card, tmp_path / "lossy.webp", quality=90)
    assert "no embedding in its pixels" in _load_error(lossy)
    striped = Image.new("RGB", (64, 64), (90, 90, 90))
    for x in (10, 20):  # two black columns, but no data between them
        striped.paste((0, 0, 0), (x, 0, x + 1, 64))
    striped.save(tmp_path / "striped.png")
    assert "no embedding in its pixels" in _load_error(tmp_path / "striped.png")
    assert list_embeddings(tmp_path) == [card]


def test_the_key_stream_is_the_lcg_of_the_image_format():
    expected, state = [], 0
    for _ in range(50_000):
        state = (1664525 * state + 1013904223) % 2**32
        expected.append(state % 255)
    assert expected[:5] == [253, 242, 127, 44, 157]
    assert image_data.key_stream(50_000).tolist() == [value & 0x0F for value in expected]


def test_widths_pick_the_matching_encoder(tmp_path):
    save_file({"emb_params": _vectors(2, 48, 15)}, tmp_path / "tiny.safetensors")
    assert set(load_embedding(tmp_path / "tiny.safetensors", widths={"clip_h": 48}).vectors) == {"clip_h"}
    assert set(load_embedding(tmp_path / "tiny.safetensors", widths={"clip_l": 48}).vectors) == {"clip_l"}


@pytest.mark.parametrize(
    ("width", "what"),
    [(768, "an SD1 embedding"), (1024, "an SD2 embedding"), (1280, "only the clip_g half of an SDXL embedding")],
)
def test_one_tensor_does_not_fit_sdxl(tmp_path, width, what):
    """The web UIs skip a one-tensor file on SDXL (not 768 + 1280 wide): it is no half-embedding here either."""
    path = tmp_path / "single.safetensors"
    save_file({"emb_params": _vectors(2, width, 15)}, path)
    message = _load_error(path, widths=SDXL)
    assert f"does not fit this SDXL model: it is {what}" in message
    assert "SDXL needs clip_l [N, 768] + clip_g [N, 1280]; the web UIs skip it" in message


# --------------------------------------------------------------------------------------------------------------
# Our writer


def test_save_single_encoder_layout_and_metadata(tmp_path, sd1):
    settings = {"learning_rate": 0.005, "batch_size": 2}
    path = save_embedding(
        sd1,
        tmp_path,
        metadata={"base_model": "v1-5", "base_model_hash": "ab" * 32, "training_settings": settings, "none": None},
    )
    assert path == tmp_path / "cat toy.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
        tensor = handle.get_tensor("emb_params")
        header = handle.metadata()
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 768)
    assert torch.equal(tensor, sd1.vectors["clip_l"])
    assert header["name"] == "cat toy"
    assert header["step"] == "120"
    assert header["vectors"] == "3"
    assert header["init_text"] == "a cat"
    assert header["base_model"] == "v1-5"
    assert header["tool"] == f"ti_core {ti_core.__version__}"
    assert json.loads(header["training_settings"]) == settings
    assert "none" not in header

    loaded = load_embedding(path, widths=SD1)
    assert loaded.name == sd1.name and loaded.step == 120
    _equal(loaded, sd1.vectors)
    assert loaded.metadata["init_text"] == "a cat" and "name" not in loaded.metadata


def test_save_sdxl_layout(tmp_path, sdxl):
    path = save_embedding(sdxl, tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["clip_g", "clip_l"]
        assert all(handle.get_tensor(key).dtype == torch.float32 for key in handle.keys())  # noqa: SIM118
        assert handle.metadata()["vectors"] == "4"
    _equal(load_embedding(path, widths=SDXL), sdxl.vectors)


def test_save_sd2_round_trip(tmp_path, sd2):
    _equal(load_embedding(save_embedding(sd2, tmp_path), widths=SD2), sd2.vectors)


def test_writer_copies_views_and_gradients(tmp_path):
    table = torch.randn(100, 768, requires_grad=True)
    embedding = Embedding("view", {"clip_l": table[10:12]})
    path = export_a1111_pt(embedding, tmp_path / "view.pt")
    assert path.stat().st_size < 100 * 768 * 4 / 4  # only the two rows were written, not the whole table
    _equal(load_embedding(path), {"clip_l": table[10:12].detach()})


def test_metadata_argument_overrides_and_identity_fields_win(tmp_path, sd1):
    sd1.metadata.update(name="stale", tool="ti_core 0.0.1")
    path = save_embedding_to(sd1, tmp_path / "snap" / "cat toy-100.safetensors", metadata={"init_text": "a dog"})
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header["name"] == "cat toy" and header["init_text"] == "a dog"
    assert header["tool"] == f"ti_core {ti_core.__version__}"


def test_cannot_store_unrelated_encoders(tmp_path):
    embedding = Embedding("mixed", {"clip_l": torch.zeros(1, 768), "clip_h": torch.zeros(1, 1024)})
    with pytest.raises(ValueError, match="cannot store"):
        save_embedding(embedding, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_invalid_name_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="separator"):
        save_embedding(Embedding("../evil", {"clip_l": torch.zeros(1, 768)}), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_rules(tmp_path, sd1):
    path = save_embedding(sd1, tmp_path)
    changed = Embedding(sd1.name, {"clip_l": torch.zeros(3, 768)})
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite to replace it") as caught:
        save_embedding(changed, tmp_path)
    assert str(path) in str(caught.value)
    _equal(load_embedding(path), sd1.vectors)
    save_embedding(changed, tmp_path, overwrite=True)
    _equal(load_embedding(path), changed.vectors)
    for writer in (export_diffusers, export_a1111_pt, save_embedding_to):
        target = tmp_path / f"x{'.pt' if writer is export_a1111_pt else '.safetensors'}"
        writer(sd1, target)
        writer(sd1, target)  # explicit-path writers replace by default
        with pytest.raises(FileExistsError):
            writer(sd1, target, overwrite=False)


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_atomic_write_failure_in_replace_keeps_the_old_file(tmp_path, sd1, monkeypatch):
    path = save_embedding(sd1, tmp_path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_embedding(Embedding(sd1.name, {"clip_l": torch.zeros(3, 768)}), tmp_path, overwrite=True)
    assert _names(tmp_path) == ["cat toy.safetensors"]
    assert path.read_bytes() == before
    with pytest.raises(OSError, match="disk full"):
        save_embedding(Embedding("new one", {"clip_l": torch.zeros(1, 768)}), tmp_path)
    assert _names(tmp_path) == ["cat toy.safetensors"]


def test_atomic_write_failure_while_writing_leaves_nothing(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"good")

    def half_then_fail(temp: Path) -> None:
        temp.write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, half_then_fail)
    assert _names(tmp_path) == ["data.bin"] and target.read_bytes() == b"good"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda temp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert _names(tmp_path) == ["data.bin"]
    atomic_write(tmp_path / "new" / "deeper.txt", lambda temp: temp.write_text("ok"))
    assert (tmp_path / "new" / "deeper.txt").read_text() == "ok"
    assert _names(tmp_path / "new") == ["deeper.txt"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_atomic_write_honours_the_umask(tmp_path, sd1):
    path = save_embedding(sd1, tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# --------------------------------------------------------------------------------------------------------------
# Exports and consumers


def test_export_diffusers(tmp_path, sd1, sdxl):
    path = export_diffusers(sd1, tmp_path / "learned_embeds.safetensors", token="<cat-toy>")
    tensors = load_file(path)
    assert list(tensors) == ["<cat-toy>"]
    assert torch.equal(tensors["<cat-toy>"], sd1.vectors["clip_l"])
    assert list(load_file(export_diffusers(sd1, tmp_path / "default.safetensors"))) == ["cat toy"]
    with pytest.raises(ValueError, match="text encoders"):
        export_diffusers(sdxl, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        export_diffusers(sd1, tmp_path / "x.bin")


def test_export_a1111_pt(tmp_path, sd1, sdxl):
    sd1.metadata.update(base_model="v1-5-pruned", base_model_hash="0123456789abcdef" * 4)
    path = export_a1111_pt(sd1, tmp_path / "cat toy.pt")
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"]
    assert torch.equal(data["string_to_param"]["*"], sd1.vectors["clip_l"])
    assert (data["name"], data["step"]) == ("cat toy", 120)
    assert (data["sd_checkpoint"], data["sd_checkpoint_name"]) == ("0123456789", "v1-5-pruned")
    loaded = load_embedding(path)
    _equal(loaded, sd1.vectors)
    assert loaded.step == 120 and loaded.metadata["sd_checkpoint"] == "0123456789"
    assert not zipfile.is_zipfile(path)  # torch's legacy serialisation, which every web UI's safe loader reads
    xl = export_a1111_pt(sdxl, tmp_path / "xl.pt")  # kohya's SDXL layout; A1111 wants nothing but the tensors
    assert sorted(torch.load(xl, map_location="cpu", weights_only=True)) == ["clip_g", "clip_l"]
    assert not zipfile.is_zipfile(xl)
    _equal(load_embedding(xl, widths=SDXL), sdxl.vectors)


def test_export_embedding_each_format_reads_back(tmp_path, sd1, sdxl):
    source = save_embedding(sd1, tmp_path / "embeddings")
    out = tmp_path / "exports"
    (diffusers,) = export_embedding(source, "diffusers", out / "d")
    assert diffusers == out / "d" / "cat toy.safetensors"
    assert list(load_file(diffusers)) == ["cat toy"]  # the key is the token load_textual_inversion adds
    (pt,) = export_embedding(source, "a1111-pt", out / "pt")
    assert pt == out / "pt" / "cat toy.pt" and not zipfile.is_zipfile(pt)
    (card,) = export_embedding(source, "image", out / "img")
    assert card == out / "img" / "cat toy.png"
    for path in (diffusers, pt, card):
        loaded = load_embedding(path, widths=SD1)
        _equal(loaded, sd1.vectors)
        assert loaded.name == "cat toy"
    assert load_embedding(pt).step == 120 and load_embedding(card).step == 120
    xl_source = save_embedding(sdxl, tmp_path / "embeddings")
    xl_files = export_embedding(xl_source, "diffusers", out / "xl")
    assert xl_files == [out / "xl" / "xl thing_clip_l.safetensors", out / "xl" / "xl thing_clip_g.safetensors"]
    for path, key in zip(xl_files, ("clip_l", "clip_g"), strict=True):
        assert torch.equal(load_file(path)["xl thing"], sdxl.vectors[key])
    for to in ("a1111-pt", "image"):
        (path,) = export_embedding(xl_source, to, out / f"xl-{to}")
        _equal(load_embedding(path, widths=SDXL), sdxl.vectors)


def test_image_export_uses_the_preview(tmp_path, sd1):
    source = save_embedding(sd1, tmp_path / "embeddings")
    Image.new("RGB", (300, 300), (20, 160, 40)).save(source.with_name("cat toy.preview.png"))
    (card,) = export_embedding(source, "image", tmp_path / "out")
    with Image.open(card) as image:
        assert image.height == 300 and image.convert("RGB").getpixel((image.width // 2, 150)) == (20, 160, 40)
    other = tmp_path / "other.png"
    Image.new("RGB", (100, 80), (1, 2, 250)).save(other)
    (card,) = export_embedding(source, "image", tmp_path / "out2", preview=other)
    with Image.open(card) as image:
        assert image.height == 80 and image.convert("RGB").getpixel((image.width // 2, 40)) == (1, 2, 250)


def test_diffusers_loading_code_names_each_file_and_encoder(tmp_path, sd2, sdxl):
    single = export_embedding(save_embedding(sd2, tmp_path / "e"), "diffusers", tmp_path / "out")
    lines = diffusers_loading_code(single).splitlines()
    assert lines[0].startswith("# pipe: ")
    assert lines[1:] == [f'pipe.load_textual_inversion("{single[0].absolute()}", token="sd2-style")']
    pair = export_embedding(save_embedding(sdxl, tmp_path / "e"), "diffusers", tmp_path / "out")
    assert diffusers_loading_code(pair).splitlines()[1:] == [
        f'pipe.load_textual_inversion("{pair[0].absolute()}", token="xl thing", '
        "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
        f'pipe.load_textual_inversion("{pair[1].absolute()}", token="xl thing", '
        "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
    ]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_export_refusals_write_nothing(tmp_path, sd1):
    folder = tmp_path / "embeddings"
    source = save_embedding(sd1, folder)
    (tmp_path / "out").mkdir()
    export_embedding(source, "a1111-pt", tmp_path / "out")
    before = _tree(tmp_path)
    cases = [
        ((source, "ckpt", tmp_path / "out2"), ValueError, "unknown export format 'ckpt'"),
        ((source, "diffusers", folder), FileExistsError, "is the file being exported"),
        ((source, "a1111-pt", folder), FileExistsError, "already holds cat toy.safetensors"),
        ((source, "a1111-pt", tmp_path / "out"), FileExistsError, "pass --overwrite to replace it"),
        ((source, "image", source), NotADirectoryError, "is not a folder"),
        ((tmp_path / "missing.safetensors", "image", tmp_path / "out2"), EmbeddingFileError, "cannot be read"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            export_embedding(*args)
        assert "\n" not in str(caught.value)
    assert _tree(tmp_path) == before
    export_embedding(source, "a1111-pt", tmp_path / "out", overwrite=True)


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_exports_stay_inside_the_chosen_folder(tmp_path, sd1):
    source = save_embedding(sd1, tmp_path / "embeddings")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat toy.pt").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(ValueError, match="outside"):
        export_embedding(source, "a1111-pt", out, overwrite=True)
    evil = tmp_path / "evil.png"  # an image's stored name is its token: here one that climbs out
    _a1111_png(evil, _a1111_pt(sd1.vectors["clip_l"], name="../../escaped"))
    with pytest.raises(ValueError, match="cannot export it under its stored name"):
        export_embedding(evil, "a1111-pt", out)
    assert sorted(path.name for path in tmp_path.rglob("*")) == sorted(
        ["embeddings", "cat toy.safetensors", "out", "cat toy.pt", "evil.png"]
    )


def _a1111_reads(path: Path) -> tuple[int, int]:
    """A1111's load_from_file + create_embedding_from_data (modules/textual_inversion), for .safetensors/.pt:
    returns (shape, vectors), the shape being checked against 768 (SD1), 1024 (SD2) or 2048 (SDXL)."""
    data = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().to(torch.float32)
        return vec.shape[-1], vec.shape[0]
    if isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        vec = {key: value.detach().to(torch.float32) for key, value in data.items()}
        return vec["clip_g"].shape[-1] + vec["clip_l"].shape[-1], vec["clip_g"].shape[0]
    if isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        if len(emb.shape) == 1:
            emb = emb.unsqueeze(0)
        return emb.shape[-1], emb.shape[0]
    raise AssertionError(f"Couldn't identify {path.name} as neither textual inversion embedding nor diffuser concept.")


def test_real_consumers_read_our_files(tmp_path, sd1, sd2, sdxl):
    single = load_file(save_embedding(sd1, tmp_path))
    assert list(single) == ["emb_params"]  # A1111 asserts exactly one tensor in non-SDXL files
    xl = load_file(save_embedding(sdxl, tmp_path))
    assert sorted(xl) == ["clip_g", "clip_l"]
    assert _a1111_reads(tmp_path / "cat toy.safetensors") == (768, 3)
    assert _a1111_reads(save_embedding(sd2, tmp_path)) == (1024, 2)
    assert _a1111_reads(tmp_path / "xl thing.safetensors") == (2048, 4)
    assert _a1111_reads(export_a1111_pt(sd1, tmp_path / "cat.pt")) == (768, 3)
    assert _a1111_reads(export_diffusers(sd1, tmp_path / "cat-diffusers.safetensors")) == (768, 3)


def test_diffusers_load_textual_inversion_reads_our_files(tmp_path):
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextModel

    from ti_core.testing import text_config
    from ti_core.vocab import clip_tokenizer

    class Host(TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict = {}

        def __init__(self):
            self.tokenizer = clip_tokenizer()
            self.text_encoder = CLIPTextModel(text_config(32))

    host = Host()
    embedding = Embedding("tiny", {"clip_l": _vectors(2, 32, 16)})
    for token, path in [
        ("<ours>", save_embedding(embedding, tmp_path)),
        ("<exported>", export_diffusers(embedding, tmp_path / "d.safetensors", token="<exported>")),
    ]:
        host.load_textual_inversion(str(path), token=token)
        ids = host.tokenizer.convert_tokens_to_ids([token, f"{token}_1"])
        assert torch.equal(host.text_encoder.get_input_embeddings().weight[ids], embedding.vectors["clip_l"])


# --------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the file


def _load_error(path: Path, **kwargs) -> str:
    with pytest.raises(EmbeddingFileError) as caught:
        load_embedding(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message
    return message


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_never_runs(tmp_path, suffix, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    payload = {"string_to_param": {"*": torch.zeros(1, 768)}, "name": _Payload(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    assert "refusing" in _load_error(path)
    assert not marker.exists()
    assert list_embeddings(tmp_path) == [path]  # listed (by suffix) but never unpickled unsafely
    assert not marker.exists()


class _NestedPickle:
    """A payload hidden in a second pickle, the way plain pickle.dump stores a tensor's storage."""

    def __init__(self, marker: Path):
        self.inner = pickle.dumps(_Payload(marker))

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.inner,))


def _payload_places(marker: Path) -> dict:
    """Code payloads where an embedding file has room for them next to its tensors."""
    hooked = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 768))})
    hooked.__dict__["_forward_hooks"] = OrderedDict({0: _Payload(marker)})
    objects = numpy.empty(2, dtype=object)
    objects[:] = [_Payload(marker), 1.0]
    return {
        "in a ParameterDict's hooks": {"string_to_param": hooked},
        "as a numpy array of objects": {"string_to_param": {"*": _NumpyTensor(objects)}},
        "in a nested pickle": {"string_to_param": {"*": _NestedPickle(marker)}},
        "in another field": {
            "string_to_param": {"*": torch.nn.Parameter(torch.zeros(1, 768))},
            "step": OrderedDict({"x": _Payload(marker)}),
        },
    }


@pytest.mark.parametrize("place", _payload_places(Path("x")))
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_code_payloads_next_to_allowed_classes_never_run(tmp_path, place, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_payload_places(marker)[place], path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    message = _load_error(path)
    assert "holds pickled code or objects other than tensors" in message and "refusing to load it" in message
    assert not marker.exists()


def test_zero_byte_files(tmp_path):
    for suffix in (".safetensors", ".pt", ".bin", ".png", ".webp"):
        path = tmp_path / f"empty{suffix}"
        path.touch()
        assert "empty" in _load_error(path)


def test_corrupt_files(tmp_path):
    junk = os.urandom(64)
    for suffix in (".safetensors", ".pt", ".bin", ".png", ".webp"):
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(junk)
        _load_error(path)


def test_truncated_files(tmp_path, sd1):
    good = save_embedding(sd1, tmp_path)
    for suffix, write in [
        (".safetensors", lambda p: save_file({"emb_params": sd1.vectors["clip_l"]}, p)),
        (".pt", lambda p: torch.save(_a1111_pt(sd1.vectors["clip_l"]), p)),
        (".bin", lambda p: torch.save({"x": sd1.vectors["clip_l"]}, p, _use_new_zipfile_serialization=False)),
        (".png", lambda p: save_embedding_png(sd1, p, Image.new("RGB", (16, 16)))),
    ]:
        path = tmp_path / f"whole{suffix}"
        write(path)
        data = path.read_bytes()
        for cut in (len(data) // 2, len(data) - 7):
            broken = tmp_path / f"cut-{cut}{suffix}"
            broken.write_bytes(data[:cut])
            if suffix == ".png" and cut == len(data) - 7:
                # Only the image data after the chunk is lost: the embedding itself is intact.
                _equal(load_embedding(broken), sd1.vectors)
            else:
                _load_error(broken)
    _equal(load_embedding(good), sd1.vectors)


def test_wrong_width(tmp_path, sd1, sd2, sdxl):
    message = _load_error(save_embedding(sd1, tmp_path), widths=SD2)
    assert "has width 768 but this model's text encoder is 1024 wide (an SD1 embedding on an SD2 model?)" in message
    message = _load_error(save_embedding(sd2, tmp_path), widths=SDXL)
    assert "does not fit this SDXL model: it is an SD2 embedding (one 1024-wide tensor)" in message
    message = _load_error(save_embedding(sdxl, tmp_path), widths=SD1)
    assert "SDXL embedding" in message and "on an SD1 model?" in message
    message = _load_error(tmp_path / "xl thing.safetensors", widths={"clip_l": 32, "clip_g": 40})
    assert "clip_l has width 768, not 32" in message
    save_file({"emb_params": _vectors(2, 32, 15)}, tmp_path / "tiny.safetensors")
    message = _load_error(tmp_path / "tiny.safetensors", widths={"clip_l": 32, "clip_g": 48})
    assert "does not fit this SDXL model: it is a single 32-wide tensor, and SDXL needs clip_l [N, 32]" in message
    torch.save(_a1111_pt(torch.zeros(1, 64)), tmp_path / "odd.pt")
    assert "has width 64 but this model's text encoder is 32 wide" in _load_error(
        tmp_path / "odd.pt", widths={"clip_l": 32}
    )


def test_unknown_layouts(tmp_path):
    cases = {
        "two.safetensors": lambda p: save_file({"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}, p),
        "none.safetensors": lambda p: save_file({}, p, metadata={"name": "x"}),
        "ints.safetensors": lambda p: save_file({"emb_params": torch.zeros(1, 768, dtype=torch.int64)}, p),
        "cube.safetensors": lambda p: save_file({"emb_params": torch.zeros(1, 2, 768)}, p),
        "novectors.safetensors": lambda p: save_file({"emb_params": torch.zeros(0, 768)}, p),
        "xl-extra.safetensors": lambda p: save_file(
            {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280), "t5": torch.zeros(1, 4)}, p
        ),
        "xl-counts.safetensors": lambda p: save_file(
            {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(2, 1280)}, p
        ),
        "values.bin": lambda p: torch.save({"<tok>": torch.zeros(1, 768), "step": 3}, p),
        "list.pt": lambda p: torch.save([torch.zeros(1, 768)], p),
        "terms.pt": lambda p: torch.save({"string_to_param": {"*": torch.zeros(1, 8), "#": torch.zeros(1, 8)}}, p),
        "empty-dict.pt": lambda p: torch.save({}, p),
    }
    for filename, write in cases.items():
        path = tmp_path / filename
        write(path)
        _load_error(path)


def test_images_without_the_chunk(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert "no 'sd-ti-embedding'" in _load_error(plain)
    webp = tmp_path / "plain.webp"
    Image.new("RGB", (8, 8)).save(webp)
    _load_error(webp)
    bad = tmp_path / "bad-chunk.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", "not base64 json!")
    Image.new("RGB", (8, 8)).save(bad, pnginfo=info)
    assert "base64 JSON" in _load_error(bad)


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "unsupported file type" in _load_error(tmp_path / "notes.txt")
    assert "cannot be read" in _load_error(tmp_path / "missing.safetensors")
    (tmp_path / "folder.pt").mkdir()
    _load_error(tmp_path / "folder.pt")


# --------------------------------------------------------------------------------------------------------------
# Listing


def test_list_embeddings(tmp_path, sd1, sdxl):
    expected = [
        save_embedding(sd1, tmp_path),
        save_embedding(sdxl, tmp_path / "sdxl" / "deep"),
        export_a1111_pt(sd1, tmp_path / "old" / "a.pt"),
        export_diffusers(sd1, tmp_path / "learned.safetensors"),
        save_embedding_png(sd1, tmp_path / "chunk.png", Image.new("RGB", (8, 8))),
    ]
    torch.save({"tok": torch.zeros(1, 768)}, tmp_path / "UPPER.BIN")
    expected.append(tmp_path / "UPPER.BIN")
    Image.new("RGB", (8, 8)).save(tmp_path / "cat toy.preview.png")
    save_embedding_png(sd1, tmp_path / "chunked.preview.png", Image.new("RGB", (8, 8)))
    Image.new("RGB", (8, 8)).save(tmp_path / "just a picture.png")
    (tmp_path / "zero.safetensors").touch()
    (tmp_path / "cat toy.pt.optim").write_bytes(b"state")
    (tmp_path / "cat toy.optim.safetensors").write_bytes(b"state")
    (tmp_path / ".cat toy.safetensors.1a2b3c4d.tmp").write_bytes(b"partial")
    (tmp_path / ".hidden.safetensors").write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.pt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    if os.name != "nt":
        (tmp_path / "sdxl" / "loop").symlink_to(tmp_path / "sdxl")
    found = list_embeddings(tmp_path)
    assert sorted(found) == sorted(expected)
    assert all(load_embedding(path).num_vectors >= 1 for path in found)
    assert list_embeddings(tmp_path / "missing") == []
