"""Model discovery: web UI and ComfyUI folders, --models-dir and the Hugging Face cache, for the Model picker."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ti_core.demo import DEMO_MODEL_ID
from ti_core.discovery import (
    DEMO_ENTRY,
    MAX_DEPTH,
    default_entry,
    default_hf_cache,
    find_models,
    picker_entries,
)
from ti_core.models import load_model
from ti_core.testing import save_tiny_single_file


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A real tiny SD1 single-file checkpoint, and the config folder its tiny widths need."""
    return save_tiny_single_file(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def hub_repo(cache: Path, repo_id: str, model: Path | None, revision: str = "0" * 40) -> Path:
    """A repo in the hub cache layout: files in blobs/, a snapshot of symlinks to them, refs/main.
    `model` None: only the configs (what a config lookup leaves behind), no weights."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for index, file in enumerate(sorted(p for p in (model.rglob("*") if model else []) if p.is_file())):
        if model is not None:
            relative = file.relative_to(model)
            blob = touch(repo / "blobs" / f"{index:040x}", file.read_bytes())
            (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / relative).symlink_to(os.path.relpath(blob, (snapshot / relative).parent))
    if model is None:
        index = {"_class_name": "StableDiffusionPipeline"} | {
            part: ["x", "y"] for part in ("unet", "vae", "text_encoder", "tokenizer")
        }
        touch(snapshot / "model_index.json", json.dumps(index).encode())
        touch(snapshot / "unet" / "config.json", b"{}")
    touch(repo / "refs" / "main", revision.encode())
    return snapshot


def labels(entries) -> list[str]:
    return [entry.label for entry in entries]


def test_a_web_ui_in_the_home_folder_is_found_and_its_checkpoints_load(tmp_path, tiny_checkpoint):
    home = tmp_path / "home"
    models = home / "stable-diffusion-webui" / "models" / "Stable-diffusion"
    checkpoint, config = tiny_checkpoint
    shutil.copy(checkpoint, touch(models / "sd15.safetensors"))
    touch(models / "SDXL" / "base.ckpt")
    touch(models / "sd15.vae.safetensors")  # a VAE beside a model, not a model
    touch(models / ".trash" / "old.safetensors")
    touch(models / "readme.txt")
    entries = find_models(tmp_path / "elsewhere", home, [], None)
    assert labels(entries) == [
        "sd15.safetensors (web UI, ~/stable-diffusion-webui)",
        "SDXL/base.ckpt (web UI, ~/stable-diffusion-webui)",
    ]
    assert {entry.origin for entry in entries} == {"web UI"}
    model = load_model(entries[0].source, config=config)
    assert model.architecture == "sd1" and model.file_path == models / "sd15.safetensors"


def test_comfyui_above_the_current_folder_and_sdnext_diffusers(tmp_path, tiny_model_dirs):
    comfy = tmp_path / "ComfyUI"
    touch(comfy / "models" / "checkpoints" / "dreamshaper.safetensors")
    start = comfy / "custom_nodes" / "something"
    start.mkdir(parents=True)
    sdnext = tmp_path / "work" / "automatic"
    shutil.copytree(tiny_model_dirs["sdxl"], sdnext / "models" / "Diffusers" / "my-sdxl")
    hub_repo(sdnext / "models" / "Diffusers", "org/tiny-sd1", tiny_model_dirs["sd1"])
    entries = find_models(start, tmp_path / "work", [], None)
    assert labels(entries) == [
        "dreamshaper.safetensors (ComfyUI, " + str(comfy) + ")",
        "my-sdxl (SD.Next, ~/automatic)",
        "org/tiny-sd1 (SD.Next, ~/automatic)",
    ]
    assert load_model(entries[1].source).architecture == "sdxl"
    assert load_model(entries[2].source).architecture == "sd1"


def test_the_hugging_face_cache_lists_complete_sd_pipelines_only(tmp_path, tiny_model_dirs):
    cache = tmp_path / "hub"
    snapshot = hub_repo(cache, "someone/tiny-sd1", tiny_model_dirs["sd1"])
    hub_repo(cache, "runwayml/stable-diffusion-v1-5", None)  # configs only, as single-file loading leaves
    flux = touch(cache / "models--black-forest-labs--FLUX.1" / "snapshots" / "1" / "model_index.json")
    flux.write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["x", "y"]}))
    hub_repo(cache, "openai/clip-vit-large-patch14", None).joinpath("model_index.json").unlink()  # not a pipeline
    entries = find_models(tmp_path / "nowhere", None, [], cache)
    assert labels(entries) == ["someone/tiny-sd1 (Hugging Face cache)"]
    assert entries[0].source == str(snapshot) and entries[0].origin == "Hugging Face cache"
    model = load_model(entries[0].source)  # offline: the snapshot is a local diffusers folder
    assert model.architecture == "sd1"


def test_order_models_dir_first_then_web_ui_then_cache_and_each_model_once(tmp_path, tiny_model_dirs):
    home = tmp_path / "home"
    mine = touch(home / "checkpoints" / "mine.safetensors").parent
    webui = home / "stable-diffusion-webui"
    touch(webui / "models" / "Stable-diffusion" / "a.safetensors")
    cache = tmp_path / "cache"
    hub_repo(cache, "x/y", tiny_model_dirs["sd1"])
    start = webui / "extensions" / "textual-inversion"
    start.mkdir(parents=True)
    # The web UI is both a parent of the current folder and a sub-folder of home: listed once.
    entries = find_models(start, home, [mine, webui / "models" / "Stable-diffusion"], cache)
    assert labels(entries) == [
        "mine.safetensors (~/checkpoints)",
        "a.safetensors (~/stable-diffusion-webui/models/Stable-diffusion)",
        "x/y (Hugging Face cache)",
    ]
    assert [entry.origin for entry in entries] == ["models-dir", "models-dir", "Hugging Face cache"]


def test_walks_are_bounded_in_depth(tmp_path):
    models = tmp_path / "models"
    touch(models / Path(*["d"] * MAX_DEPTH) / "deep-enough.safetensors")
    touch(models / Path(*["d"] * (MAX_DEPTH + 1)) / "too-deep.safetensors")
    entries = find_models(tmp_path / "x", None, [models], None)
    assert [Path(entry.source).name for entry in entries] == ["deep-enough.safetensors"]


def test_missing_and_unreadable_places_are_skipped(tmp_path):
    assert find_models(tmp_path / "no" / "such", tmp_path / "nohome", [tmp_path / "nodir"], tmp_path / "nocache") == []


def test_the_demo_comes_last_and_is_the_default_only_when_nothing_is_found(tmp_path):
    found = find_models(tmp_path, None, [touch(tmp_path / "m" / "real.ckpt").parent], None)
    assert picker_entries(found) == [*found, DEMO_ENTRY] and DEMO_ENTRY.source == DEMO_MODEL_ID
    assert default_entry(found) == found[0] and not default_entry(found).is_demo
    assert default_entry([]) == DEMO_ENTRY and DEMO_ENTRY.is_demo


def test_default_hf_cache_follows_huggingface_hub_environment(tmp_path):
    home = tmp_path / "home"
    (home / ".cache" / "huggingface" / "hub").mkdir(parents=True)
    assert default_hf_cache({}, home) == home / ".cache" / "huggingface" / "hub"
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    assert default_hf_cache({"HF_HOME": str(tmp_path / "hf")}, home) == tmp_path / "hf" / "hub"
    assert default_hf_cache({"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HOME": "/x"}, home) == tmp_path / "hf"
    assert default_hf_cache({"HF_HOME": str(tmp_path / "none")}, home) is None
