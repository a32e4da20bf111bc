"""A real consumer reads our files: diffusers' load_textual_inversion gives our conditioning, and the real
AUTOMATIC1111 (the kit, when TI_A1111_DEST points at one) decodes our cards and .pt files with its own code."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ti_core.create import create_embedding
from ti_core.embedding import Embedding
from ti_core.formats import diffusers_loading_code, export_embedding, load_embedding, save_embedding
from ti_core.models import load_model
from ti_core.prompt import encode_prompts


@pytest.mark.parametrize("arch_name", ["sd1", "sd2"])
@pytest.mark.parametrize("vectors", [1, 3])
def test_diffusers_loads_our_single_encoder_file(tiny_model_dirs, tmp_path, arch_name, vectors):
    model = load_model(tiny_model_dirs[arch_name])
    embedding = create_embedding(model, "zzzz1234", "a red car", vectors)
    torch.manual_seed(1)
    for tensor in embedding.vectors.values():
        tensor += 0.1 * torch.randn_like(tensor)  # as if trained: not equal to any vocabulary row
    path = save_embedding(embedding, tmp_path)

    pipeline = load_model(tiny_model_dirs[arch_name]).pipeline()  # a fresh copy: diffusers edits its tokenizer
    pipeline.load_textual_inversion(str(path), token="zzzz1234")
    prompt = "a zzzz1234 by monet"
    theirs = pipeline.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[
        0
    ]
    ours = encode_prompts(model, [prompt], [embedding]).hidden_states
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_diffusers_loads_our_sdxl_file_into_both_encoders(tiny_model_dirs, tmp_path):
    model = load_model(tiny_model_dirs["sdxl"])
    embedding = create_embedding(model, "zzzz1234", "a red car", 2)
    path = save_embedding(embedding, tmp_path)
    tensors = load_file(path)
    assert set(tensors) == {"clip_l", "clip_g"}

    pipeline = load_model(tiny_model_dirs["sdxl"]).pipeline()
    pipeline.load_textual_inversion(
        tensors["clip_l"], token="zzzz1234", text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer
    )
    pipeline.load_textual_inversion(
        tensors["clip_g"], token="zzzz1234", text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2
    )
    prompt = "a zzzz1234 by monet"
    theirs = pipeline.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    ours = encode_prompts(model, [prompt], [embedding])
    assert (ours.hidden_states - theirs[0]).abs().max().item() <= 1e-5
    # The pooled output is not compared: diffusers adds new token ids above EOS, and CLIP's legacy
    # pooling (argmax of the ids) then pools at the embedding instead of at EOS. We keep EOS pooling.


def _trained_like(model, name: str, vectors: int):
    embedding = create_embedding(model, name, "a red car", vectors)
    torch.manual_seed(2)
    for tensor in embedding.vectors.values():
        tensor += 0.1 * torch.randn_like(tensor)
    return embedding


@pytest.mark.parametrize("arch_name", ["sd1", "sdxl"])
def test_diffusers_export_loads_with_the_printed_lines(tiny_model_dirs, tmp_path, arch_name):
    """The lines `export --to diffusers` prints, run as they are against a diffusers pipeline."""
    model = load_model(tiny_model_dirs[arch_name])
    embedding = _trained_like(model, "zzzz1234", 2)
    source = save_embedding(embedding, tmp_path / "embeddings")
    code = diffusers_loading_code(export_embedding(source, "diffusers", tmp_path / "diffusers"))

    pipe = load_model(tiny_model_dirs[arch_name]).pipeline()
    exec(code, {"pipe": pipe})  # noqa: S102 (the user's copy and paste)
    prompt = "a zzzz1234 by monet"
    theirs = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    ours = encode_prompts(model, [prompt], [embedding]).hidden_states
    assert (ours - theirs[0]).abs().max().item() <= 1e-5


# ---- the real AUTOMATIC1111 reads what we write (its own code, from the kit) ------------------------------------

_A1111_READER = r"""
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
from modules import safe
from modules.textual_inversion import image_embedding

results = {}
for job in json.load(open(sys.argv[1])):
    kind, path = job["kind"], job["path"]
    if kind == "encode":  # A1111's own "embedding as image" strips, around a plain picture, with no text chunk
        data = safe.unsafe_torch_load(job["source"], map_location="cpu")
        image_embedding.insert_image_data_embed(Image.new("RGB", (96, 64), (90, 140, 200)), data).save(path)
        continue
    if kind == "chunk":
        data = image_embedding.embedding_from_b64(Image.open(path).text["sd-ti-embedding"])
    elif kind == "pixels":
        data = image_embedding.extract_image_data_embed(Image.open(path))
    else:  # the web UI's .pt loading: its safe unpickler checks the file, then torch.load (weights_only is
        # False by default on the torch 2.1 that A1111 1.10 pins)
        safe.check_pt(path, None)
        data = safe.unsafe_torch_load(path, map_location="cpu", weights_only=False)
    params = data["string_to_param"] if "string_to_param" in data else data
    params = getattr(params, "_parameters", params)
    save_file({key: value.detach().to(torch.float32).contiguous() for key, value in params.items()}, job["out"])
    results[path] = {"name": data.get("name"), "step": data.get("step")}
print(json.dumps(results))
"""


def _a1111_kit() -> Path:
    dest = os.environ.get("TI_A1111_DEST")
    if not dest:
        pytest.skip("TI_A1111_DEST is not set (the folder of a built AUTOMATIC1111 kit, see ../shared/hosts/a1111)")
    dest = Path(dest)
    if not (dest / "venv" / "bin" / "python").is_file() or not (dest / "webui" / "modules" / "safe.py").is_file():
        pytest.skip(f"TI_A1111_DEST={dest} is not a built AUTOMATIC1111 kit (no venv/bin/python or webui/)")
    return dest


def _run_a1111(dest: Path, jobs: list[dict], folder: Path) -> dict:
    job_file = folder / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(dest / "webui")}
    result = subprocess.run(
        [str(dest / "venv" / "bin" / "python"), "-c", _A1111_READER, str(job_file)],
        cwd=dest / "webui",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a1111_reads_our_cards_and_pt_files_and_we_read_its_images(tmp_path):
    dest = _a1111_kit()
    sd1 = Embedding("cat toy", {"clip_l": torch.randn(3, 768)}, step=120)
    sdxl = Embedding("xl", {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, step=9)
    folder = tmp_path / "files"
    sources = {key: save_embedding(embedding, folder / key) for key, embedding in (("sd1", sd1), ("sdxl", sdxl))}
    expected: dict[str, dict[str, torch.Tensor]] = {}
    jobs = []

    def job(kind: str, path: Path, vectors: dict[str, torch.Tensor]) -> None:
        out = tmp_path / f"read-{len(jobs)}.safetensors"
        jobs.append({"kind": kind, "path": str(path), "out": str(out)})
        expected[str(out)] = vectors

    for key, embedding in (("sd1", sd1), ("sdxl", sdxl)):
        (card,) = export_embedding(sources[key], "image", tmp_path / f"card-{key}")
        pixels_only = tmp_path / f"card-{key}" / "copy.png"
        with Image.open(card) as image:
            image.convert("RGB").save(pixels_only)
        (pt,) = export_embedding(sources[key], "a1111-pt", tmp_path / f"pt-{key}")
        single = {"*": embedding.vectors["clip_l"]} if key == "sd1" else embedding.vectors
        job("chunk", card, single)
        job("pixels", pixels_only, single)
        job("pt", pt, single)
    # The original textual_inversion repository's layout, as the torch of its day wrote it: a zip of data.pkl,
    # data/<n> and version only (A1111's safe loader refuses the newer entries of today's torch, whatever the
    # file holds).
    parameter_dict = tmp_path / "original.pt"
    original = {
        "string_to_token": {"*": torch.tensor(265)},
        "string_to_param": torch.nn.ParameterDict({"*": torch.ones(1, 768)}),
    }
    torch.save(original, tmp_path / "today.pt")
    with zipfile.ZipFile(tmp_path / "today.pt") as today, zipfile.ZipFile(parameter_dict, "w") as older:
        for entry in today.infolist():
            if entry.filename.split("/", 1)[1].split("/")[0] in ("data.pkl", "data", "version"):
                older.writestr(entry, today.read(entry))
    job("pt", parameter_dict, {"*": torch.ones(1, 768)})
    a1111_image = tmp_path / "a1111-made.png"
    jobs.append({"kind": "encode", "path": str(a1111_image), "source": str(tmp_path / "pt-sd1" / "cat toy.pt")})

    results = _run_a1111(dest, jobs, tmp_path)
    for out, vectors in expected.items():
        theirs = load_file(out)
        assert sorted(theirs) == sorted(vectors), out
        assert all(torch.equal(theirs[key], vectors[key]) for key in vectors), out
    assert results[str(tmp_path / "card-sd1" / "copy.png")] == {"name": "cat toy", "step": 120}
    assert results[str(tmp_path / "pt-sd1" / "cat toy.pt")] == {"name": "cat toy", "step": 120}
    # A1111's own pixel-only image embedding, read by us as the web UI reads it.
    loaded = load_embedding(a1111_image)
    assert loaded.name == "cat toy" and loaded.step == 120
    assert torch.equal(loaded.vectors["clip_l"], sd1.vectors["clip_l"])
    assert torch.equal(load_embedding(parameter_dict).vectors["clip_l"], torch.ones(1, 768))
