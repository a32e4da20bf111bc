"""v-prediction zero-terminal-SNR checkpoints (NoobAI-XL v-pred and its merges): detected from the file, trained
on the rescaled schedule with the v target, overridable, and recorded in the run's settings.json."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
from PIL import Image

from ti_core.config import TrainConfig
from ti_core.data import DataConfig
from ti_core.models import load_model
from ti_core.testing import build_tiny_pipeline, save_ldm_checkpoint, tiny_ldm_state_dict
from ti_core.train import min_snr_weights, train
from ti_core.zero_snr import sidecar_zero_terminal_snr, zero_terminal_snr_from_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    """A tiny SDXL as the diffusers folder it was written from, and as single files: plain, and marked
    v-pred + ztsnr the way NoobAI-XL v-pred marks itself (zero-size "v_pred" and "ztsnr" tensors)."""
    root = tmp_path_factory.mktemp("ztsnr")
    pipeline = build_tiny_pipeline("sdxl")
    folder = root / "model-diffusers"
    pipeline.save_pretrained(folder, safe_serialization=True)
    state = tiny_ldm_state_dict(pipeline, "sdxl")
    plain = save_ldm_checkpoint(state, root / "plain.safetensors")
    marks = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    marked = save_ldm_checkpoint({**state, **marks}, root / "noob-vpred.safetensors")
    return folder, plain, marked


def _training_scheduler(model):
    return DDPMScheduler.from_config(model.scheduler.config)  # what the trainer makes from the model's


def test_a_marked_checkpoint_trains_v_on_the_zero_terminal_snr_schedule(sdxl_files):
    folder, plain, marked = sdxl_files
    model = load_model(marked, config=folder)
    assert (model.prediction_type, model.zero_terminal_snr) == ("v_prediction", True)

    scheduler = _training_scheduler(model)
    base = DDPMScheduler.from_config({**model.scheduler.config, "rescale_betas_zero_snr": False})
    expected = torch.cumprod(1.0 - rescale_zero_terminal_snr(base.betas), dim=0)  # diffusers' own definition
    assert torch.allclose(scheduler.alphas_cumprod, expected)
    assert scheduler.alphas_cumprod[-1] == 0 and base.alphas_cumprod[-1] > 0
    # At the last timestep the input is pure noise and the v target is -x0 (v = sqrt(a) ε - sqrt(1 - a) x0).
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    last = torch.tensor([scheduler.config.num_train_timesteps - 1])
    assert torch.allclose(scheduler.add_noise(latents, noise, last), noise)
    assert torch.allclose(scheduler.get_velocity(latents, noise, last), -latents)

    unmarked = load_model(plain, config=folder)
    assert (unmarked.prediction_type, unmarked.zero_terminal_snr) == ("epsilon", False)
    assert _training_scheduler(unmarked).alphas_cumprod[-1] > 0


def test_the_user_overrides_what_the_file_says(sdxl_files):
    folder, plain, marked = sdxl_files
    assert load_model(marked, config=folder, zero_terminal_snr=False).zero_terminal_snr is False
    forced = load_model(plain, config=folder, zero_terminal_snr=True)
    assert forced.zero_terminal_snr and _training_scheduler(forced).alphas_cumprod[-1] == 0
    # Sampling starts from the pure-noise timestep ("trailing" spacing), as the schedule's paper prescribes.
    assert forced.scheduler.config.timestep_spacing == "trailing"
    assert load_model(folder, zero_terminal_snr=True).zero_terminal_snr  # a diffusers folder too


@pytest.mark.parametrize(
    ("keys", "metadata", "expected"),
    [
        ({"ztsnr"}, {}, True),
        (set(), {"modelspec.zero_terminal_snr": "true"}, True),
        (set(), {"modelspec.zero_terminal_snr": "False"}, False),
        (set(), {"modelspec.prediction_type": "v"}, None),
    ],
)
def test_checkpoint_markers(keys, metadata, expected):
    assert zero_terminal_snr_from_checkpoint(keys, metadata) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model:\n  params:\n    parameterization: v\n    rescale_betas_zero_snr: true\n", True),
        ("zero_terminal_snr: False\n", False),
        ("model:\n  params:\n    parameterization: v\n", None),
    ],
)
def test_sidecar_yaml(tmp_path, text, expected):
    (tmp_path / "m.yaml").write_text(text, encoding="utf-8")
    assert sidecar_zero_terminal_snr(tmp_path / "m.safetensors") is expected


def test_min_snr_weights_stay_finite_at_zero_snr(sdxl_files):
    folder, _, marked = sdxl_files
    scheduler = _training_scheduler(load_model(marked, config=folder))
    timesteps = torch.tensor([5, 999])
    epsilon = min_snr_weights(scheduler, timesteps, 5.0, v_prediction=False)
    velocity = min_snr_weights(scheduler, timesteps, 5.0, v_prediction=True)
    assert torch.isfinite(epsilon).all() and epsilon[1] == 1.0  # min(SNR, γ)/SNR → 1 as SNR → 0
    assert torch.isfinite(velocity).all() and velocity[1] == 0.0


def test_a_run_records_the_prediction_type_and_zero_terminal_snr(sdxl_files, tmp_path):
    folder, _, marked = sdxl_files
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (40, 60 + 50 * index, 200)).save(images / f"{index}.png")
    config = TrainConfig(
        name="noobtok",
        embeddings_dir=tmp_path / "embeddings",
        log_dir=tmp_path / "logs",
        data=DataConfig(images=images, resolution=64),
        init_text="cat",
        steps=2,
        min_snr_gamma=5.0,
        timestep_min=990,  # the last timesteps, where zero terminal SNR differs most
        save_every=0,
        preview_every=0,
    )
    result = train(load_model(marked, config=folder), config, lambda event: None)
    assert result.stopped == "done", result.message
    folder = tmp_path / "logs" / "noobtok"
    with open(folder / "loss.csv", newline="", encoding="utf-8") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    settings = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    assert settings["model"]["prediction_type"] == "v_prediction"
    assert settings["model"]["zero_terminal_snr"] is True
    # Still a --config for the next run (with the method "auto" was resolved to).
    assert TrainConfig.from_dict(settings) == dataclasses.replace(config, method=settings["method"])
