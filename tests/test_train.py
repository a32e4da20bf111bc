"""Training on tiny models (CPU, 64 px, a few steps): what a user of `train()` can observe."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import ti_core.train.loop as train_loop
import ti_core.train.loss as train_loss
import ti_core.train.outputs as train_outputs
import ti_core.train.patching as train_patching
from ti_core.config import TrainConfig
from ti_core.data import DataConfig
from ti_core.editability import DEFAULT_METHOD
from ti_core.formats import load_embedding, save_embedding
from ti_core.models import from_pipeline
from ti_core.prompt import Conditioning
from ti_core.schedule import learning_rate_at, parse_schedule
from ti_core.testing import build_tiny_pipeline
from ti_core.train import (
    Clock,
    OutOfMemoryError,
    TrainingLocked,
    diffusion_loss,
    min_snr_weights,
    train,
    vocabulary_norm_limits,
)

# Bit-reproducible CPU training needs MKL's conditional numerical reproducibility, set before MKL's first
# call: importing torch makes none, and this module is imported at collection, before any test runs.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

NAME = "tok"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four solid-colour 64 px images captioned by their file names."""
    folder = tmp_path_factory.mktemp("images")
    for index in range(4):
        Image.new("RGB", (64, 64), (200 + 10 * index, 30, 40)).save(folder / f"{index:03d}-a red square.png")
    return folder


def make_config(tmp_path, images, **overrides) -> TrainConfig:
    settings = dict(
        name=NAME,
        embeddings_dir=tmp_path / "embeddings",
        log_dir=tmp_path / "logs",
        data=DataConfig(images=images, resolution=64),
        init_text="a dog",
        vectors=2,
        steps=2,
        learning_rate="0.01",
        save_every=0,
        preview_every=0,
        preview_steps=1,
    )
    return TrainConfig(**{**settings, **overrides})


def run(model, config, **kwargs):
    events = []
    result = train(model, config, events.append, **kwargs)
    return result, events


def frozen_state(model) -> dict[str, torch.Tensor]:
    modules = {"unet": model.unet, "vae": model.vae} | {e.key: e.model for e in model.encoders}
    return {
        f"{name}.{key}": value.clone()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }


# ----------------------------------------------------------------------------------------------------------------
# The config


def test_config_round_trips_through_json(tmp_path, images):
    config = make_config(tmp_path, images, learning_rate="0.005:100, 1e-3", norm_control=1.5, grad_clip="value")
    text = json.dumps(config.to_dict())
    assert TrainConfig.from_dict(json.loads(text)) == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"learning_rate": "fast"}, "Invalid learning rate schedule: 'fast'"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of no, fp16, bf16"),
        ({"grad_clip": "sometimes"}, "grad_clip must be one of disabled, value, norm"),
        ({"vectors": 76}, "vectors must be between 1 and 75"),
        ({"batch_size": 2.5}, "batch_size must be a whole number"),
        ({"flip": True}, "unknown training setting: flip"),
        ({"data": {"images": "x", "flipp": True}}, "unknown data setting: flipp"),
        ({"name": "a/b"}, "path separator"),
        ({"timestep_min": 500, "timestep_max": 100}, "timestep_min < timestep_max"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(tmp_path, images, change, message):
    values = {**make_config(tmp_path, images).to_dict(), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.from_dict(values)


# ----------------------------------------------------------------------------------------------------------------
# Learning, and nothing but the vectors


def test_training_lowers_a_fixed_validation_loss(tmp_path, images):
    # Random tiny UNets barely listen to the prompt (directly optimising the conditioning lowers their loss
    # by 0.03 %), so cross-attention is amplified until the prompt matters, as it does in a trained model.
    pipeline = build_tiny_pipeline("sd1")
    with torch.no_grad():
        for name, module in pipeline.unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(100)
    model = from_pipeline(pipeline, "amplified")
    config = make_config(
        tmp_path,
        images,
        steps=30,
        batch_size=2,
        vectors=4,
        learning_rate="0.05",
        validation_every=30,
        validation_samples=4,
    )
    start = load_start_vectors(model, config)
    result, events = run(model, config)
    validation = [event.loss for event in events if event.kind == "validation"]
    assert result.stopped == "done"
    assert len(validation) == 2  # before the first step and after the last
    assert validation[1] < 0.99 * validation[0]  # 0.983 here; untrained or ascending it would be >= 1
    trained = load_embedding(result.embedding_path)
    assert not torch.allclose(trained.vectors["clip_l"], start["clip_l"])


def load_start_vectors(model, config):
    from ti_core.create import create_embedding

    return create_embedding(model, config.name, config.init_text, config.vectors).vectors


def test_only_the_vectors_change_and_every_encoder_learns(tmp_path, images, tiny_model, arch):
    before = frozen_state(tiny_model)
    config = make_config(tmp_path, images, learning_rate="0.05")
    start = load_start_vectors(tiny_model, config)
    result, events = run(tiny_model, config)
    after = frozen_state(tiny_model)
    assert result.stopped == "done", result.message
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(not p.requires_grad for p in tiny_model.unet.parameters())
    trained = load_embedding(result.embedding_path, widths=tiny_model.widths)
    assert trained.step == 2
    assert set(trained.vectors) == set(tiny_model.widths)  # SDXL: clip_l and clip_g both trained
    for key, vectors in trained.vectors.items():
        assert vectors.shape == start[key].shape
        assert not torch.allclose(vectors, start[key]), key
    assert all(math.isfinite(event.loss) for event in events if event.kind == "step")


def test_the_model_predicts_exactly_as_before_after_a_run(tmp_path, images, tiny_models):
    """Training changes the UNet's attention calls and memory layout for speed; whoever uses the model next
    (the host's txt2img) must get bit-identical predictions, from a model that looks as it did."""
    model = tiny_models["sd1"]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        before = model.unet(latents, 500, encoder_hidden_states=context).sample
    result, _ = run(model, make_config(tmp_path, images))
    assert result.stopped == "done", result.message
    with torch.no_grad():
        after = model.unet(latents, 500, encoder_hidden_states=context).sample
    assert torch.equal(before, after)
    assert not any("forward" in vars(module) for module in model.unet.modules())
    assert all(p.is_contiguous() for p in model.unet.parameters())


def test_outputs_of_a_run(tmp_path, images, tiny_models):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model = tiny_models["sd1"]
    model.unet.set_attn_processor(AttnProcessor())  # the slow pre-SDPA attention, as a host might leave it
    config = make_config(tmp_path, images, save_every=1, preview_every=2, validation_every=1, validation_samples=2)
    result, events = run(model, config)
    assert all(isinstance(p, AttnProcessor2_0) for p in model.unet.attn_processors.values())  # PyTorch SDPA
    folder = tmp_path / "logs" / NAME
    assert result.log_dir == folder
    assert sorted(path.name for path in (tmp_path / "embeddings").iterdir()) == [
        f"{NAME}.preview.png",
        f"{NAME}.safetensors",
    ]
    for name in (
        f"{NAME}-1.safetensors",
        f"{NAME}-2.safetensors",
        f"{NAME}-best.safetensors",
        f"{NAME}.optim.safetensors",
    ):
        assert (folder / name).is_file(), name
    assert load_embedding(folder / f"{NAME}-1.safetensors").step == 1
    with Image.open(folder / "images" / f"{NAME}-2.png") as image:
        assert image.size == (64, 64)
    with Image.open(tmp_path / "embeddings" / f"{NAME}.preview.png") as image:
        assert image.size == (64, 64)
    ran = dataclasses.replace(config, method=DEFAULT_METHOD)  # "auto" is recorded as the method it meant
    assert TrainConfig.from_dict(json.loads((folder / "settings.json").read_text())) == ran
    with open(folder / "loss.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2]
    assert set(rows[0]) == {"step", "epoch", "loss", "learning_rate", "seconds", "validation_loss"}
    assert all(float(row["loss"]) > 0 and float(row["validation_loss"]) > 0 for row in rows)
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp") or path.name == ".lock"]

    final = load_embedding(result.embedding_path)
    assert TrainConfig.from_dict(json.loads(final.metadata["training_settings"])) == ran
    assert final.metadata["architecture"] == "sd1"
    assert final.metadata["init_text"] == "a dog"
    assert final.metadata["base_model"] == model.name
    assert "base_model_hash" in final.metadata

    kinds = [event.kind for event in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert {"snapshot", "preview", "validation"} <= set(kinds)
    steps = [event for event in events if event.kind == "step"]
    assert [event.step for event in steps] == [1, 2] and all(event.total == 2 for event in steps)
    assert steps[-1].steps_per_second > 0 and steps[-1].eta_seconds == 0
    assert next(event for event in events if event.kind == "preview").image.size == (64, 64)


def test_steps_per_second_and_the_eta_count_training_steps_only():
    """A preview or a snapshot is not a training step: 2 steps/s with a 30 s preview every 2 steps is
    still 2 steps/s, with 1 s left at step 4 of 6 (counting the previews gave 0.12 steps/s, "ETA 0:24")."""
    now = [100.0]
    clock = Clock(0, 6, now=lambda: now[0])
    seen = []
    for step in range(1, 5):
        now[0] += 0.5  # the step
        clock.tick(step)
        seen.append((clock.rate, clock.eta))  # what the step event reports
        with clock.outside_steps():
            now[0] += 30.0 if step % 2 == 0 else 0.0  # the preview after steps 2 and 4
    assert seen == [(2.0, 2.5), (2.0, 2.0), (2.0, 1.5), (2.0, 1.0)]
    assert (clock.outputs_seconds, clock.elapsed) == (60.0, 62.0)  # the wall clock still has it all

    resumed = Clock(10, 20, now=lambda: now[0])
    now[0] += 4.0
    resumed.tick(12)
    assert (resumed.rate, resumed.eta) == (0.5, 16.0)  # counts this run's steps, not the resumed ones


def test_a_slow_preview_in_a_run_leaves_steps_per_second_and_the_eta_alone(tmp_path, images, tiny_models, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(train_loop, "Clock", functools.partial(Clock, now=lambda: now[0]))
    real_loss = train_loop.batch_loss

    def one_second_step(*args, **kwargs):
        now[0] += 1.0
        return real_loss(*args, **kwargs)

    def slow_preview(*args, **kwargs):
        now[0] += 1000.0
        return Image.new("RGB", (64, 64))

    monkeypatch.setattr(train_loop, "batch_loss", one_second_step)
    monkeypatch.setattr(train_outputs, "render_preview", slow_preview)
    result, events = run(tiny_models["sd1"], make_config(tmp_path, images, steps=6, preview_every=2))
    assert result.stopped == "done"
    steps = [event for event in events if event.kind == "step"]
    assert [(event.steps_per_second, event.eta_seconds) for event in steps] == [(1.0, 6.0 - s) for s in range(1, 7)]
    assert [event.outputs_seconds for event in steps] == [0, 0, 1000, 1000, 2000, 2000]


# ----------------------------------------------------------------------------------------------------------------
# The loss


def stub_model(prediction_type: str, output):
    unet = lambda noisy, timesteps, encoder_hidden_states, **extra: SimpleNamespace(sample=output(noisy, timesteps))  # noqa: E731
    return SimpleNamespace(prediction_type=prediction_type, unet=unet)


@pytest.fixture(scope="module")
def noise_scheduler(tiny_models):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(tiny_models["sd2"].scheduler.config)


def loss_inputs():
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    return Conditioning(torch.zeros(2, 77, 8)), latents, noise, torch.tensor([10, 700])


def test_epsilon_models_learn_the_noise_and_v_models_the_velocity(noise_scheduler):
    conditioning, latents, noise, timesteps = loss_inputs()
    velocity = noise_scheduler.get_velocity(latents, noise, timesteps)
    predicts_noise = lambda noisy, t: noise  # noqa: E731
    predicts_velocity = lambda noisy, t: velocity  # noqa: E731
    args = (noise_scheduler, conditioning, latents, noise, timesteps)
    assert diffusion_loss(stub_model("epsilon", predicts_noise), *args) == 0
    assert diffusion_loss(stub_model("v_prediction", predicts_velocity), *args) == 0
    assert diffusion_loss(stub_model("v_prediction", predicts_noise), *args) > 0.1
    assert diffusion_loss(stub_model("epsilon", predicts_velocity), *args) > 0.1


def test_alpha_weights_count_only_the_opaque_part(noise_scheduler):
    conditioning, latents, noise, timesteps = loss_inputs()
    left_wrong = noise.clone()
    left_wrong[..., :4] += 1.0  # error 1 on the left half, 0 on the right
    model = stub_model("epsilon", lambda noisy, t: left_wrong)
    args = (model, noise_scheduler, conditioning, latents, noise, timesteps)
    right = torch.zeros(2, 1, 8, 8)
    right[..., 4:] = 1.0
    assert diffusion_loss(*args) == pytest.approx(0.5)
    assert diffusion_loss(*args, weights=torch.ones(2, 1, 8, 8)) == pytest.approx(0.5)
    assert diffusion_loss(*args, weights=right) == pytest.approx(0.0)
    assert diffusion_loss(*args, weights=1.0 - right) == pytest.approx(1.0)


def test_min_snr_weights(noise_scheduler):
    timesteps = torch.tensor([5, 999])  # very low noise (SNR >> 5), almost pure noise (SNR << 1)
    alphas = noise_scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    epsilon = min_snr_weights(noise_scheduler, timesteps, 5.0, v_prediction=False)
    velocity = min_snr_weights(noise_scheduler, timesteps, 5.0, v_prediction=True)
    assert epsilon[0] == pytest.approx(5.0 / snr[0]) and epsilon[1] == pytest.approx(1.0)
    assert velocity[0] == pytest.approx(5.0 / (snr[0] + 1)) and velocity[1] == pytest.approx(snr[1] / (snr[1] + 1))


# ----------------------------------------------------------------------------------------------------------------
# Reproducibility and resume


RESUMABLE = dict(
    steps=4,
    gradient_accumulation=2,
    learning_rate="0.02:2, 0.01",
    warmup_steps=2,
    grad_clip="norm",
    grad_clip_value=1.0,
    seed=3,
    data=None,  # filled per test
)


def resumable_config(tmp_path, images, **overrides):
    data = DataConfig(images=images, resolution=64, flip=True, shuffle_tags=True, latent_sampling="random")
    return make_config(tmp_path, images, **{**RESUMABLE, "data": data, **overrides})


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, images, tiny_models):
    """0 -> 4 steps in one go."""
    folder = tmp_path_factory.mktemp("reference")
    model = tiny_models["sd2"]
    result, events = run(model, resumable_config(folder, images))
    return load_embedding(result.embedding_path, widths=model.widths), events, folder


def test_the_same_seed_gives_the_same_vectors(tmp_path, images, tiny_models, reference_run):
    reference, _, _ = reference_run
    model = tiny_models["sd2"]
    result, _ = run(model, resumable_config(tmp_path, images))
    again = load_embedding(result.embedding_path, widths=model.widths)
    assert torch.equal(again.vectors["clip_h"], reference.vectors["clip_h"])


def test_learning_rate_follows_the_schedule_and_warmup(reference_run):
    _, events, _ = reference_run
    schedule = parse_schedule(RESUMABLE["learning_rate"])
    expected = [learning_rate_at(schedule, step, warmup_steps=2) for step in range(4)]
    assert [event.lr for event in events if event.kind == "step"] == pytest.approx(expected)
    assert expected == pytest.approx([0.01, 0.02, 0.01, 0.01])


def test_resume_continues_exactly(tmp_path, images, tiny_models, reference_run):
    reference, reference_events, _ = reference_run
    model = tiny_models["sd2"]
    # Step 1 of 4 ends mid-epoch (4 images, 2 micro-batches a step), in the warmup and the first stage.
    first, _ = run(model, resumable_config(tmp_path, images, steps=1))
    assert first.step == 1
    second, events = run(model, resumable_config(tmp_path, images, resume=True))
    assert second.step == 4, second.message
    assert "optimizer state restored" in events[0].message
    resumed = load_embedding(second.embedding_path, widths=model.widths)
    assert resumed.step == 4
    torch.testing.assert_close(resumed.vectors["clip_h"], reference.vectors["clip_h"], rtol=0, atol=1e-6)
    with open(tmp_path / "logs" / NAME / "loss.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert losses == pytest.approx([event.loss for event in reference_events if event.kind == "step"], rel=1e-4)


def test_resume_with_foreign_optimizer_state_starts_a_fresh_optimizer(tmp_path, images, tiny_models):
    model = tiny_models["sd1"]
    first, _ = run(model, make_config(tmp_path, images, steps=1))
    edited = load_embedding(first.embedding_path)
    edited.vectors = {key: tensor + 0.5 for key, tensor in edited.vectors.items()}
    save_embedding(edited, tmp_path / "embeddings", overwrite=True)
    result, events = run(model, make_config(tmp_path, images, steps=2, resume=True))
    assert result.stopped == "done"
    assert "starting a fresh optimizer" in events[0].message


def test_existing_embedding_needs_resume_or_overwrite(tmp_path, images, tiny_models):
    model = tiny_models["sd1"]
    run(model, make_config(tmp_path, images, steps=1))
    with pytest.raises(FileExistsError, match="resume"):
        train(model, make_config(tmp_path, images, steps=2))
    with pytest.raises(ValueError, match="already trained to step 1"):
        train(model, make_config(tmp_path, images, steps=1, resume=True))
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(model, make_config(tmp_path, images, name="other", resume=True))


def _a1111_pt(model, folder, name, step, subfolder=""):
    """An A1111 `.pt` embedding (the web UI's own Train tab writes these) trained to `step`."""
    from ti_core.create import create_embedding
    from ti_core.formats import export_a1111_pt

    embedding = create_embedding(model, name, "a cat", 2)
    embedding.step = step
    target = folder / subfolder / f"{name}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    return export_a1111_pt(embedding, target), embedding


def test_resuming_an_a1111_pt_embedding_continues_it_as_safetensors(tmp_path, images, tiny_models):
    """Resume finds the web UI's own `tok.pt`, continues from its step, and leaves exactly one `tok` for the
    web UI: the new `.safetensors`; the `.pt` is kept, unchanged, in the run's log folder."""
    from ti_core.formats import embeddings_named

    model = tiny_models["sd1"]
    folder = tmp_path / "embeddings"
    pt_path, original = _a1111_pt(model, folder, NAME, step=2)
    pt_bytes = pt_path.read_bytes()
    result, events = run(model, make_config(tmp_path, images, steps=4, resume=True))
    assert result.stopped == "done", result.message
    assert embeddings_named(folder, NAME) == [folder / f"{NAME}.safetensors"]
    trained = load_embedding(folder / f"{NAME}.safetensors", widths=model.widths)
    assert trained.step == 4
    assert not torch.allclose(trained.vectors["clip_l"], original.vectors["clip_l"])
    kept = tmp_path / "logs" / NAME / f"{NAME}.pt"
    assert kept.read_bytes() == pt_bytes
    assert "from step 2" in events[0].message and f"resumed from {NAME}.pt" in events[0].message


def test_resuming_a_pt_that_is_already_done_changes_nothing(tmp_path, images, tiny_models):
    model = tiny_models["sd1"]
    folder = tmp_path / "embeddings"
    pt_path, _ = _a1111_pt(model, folder, NAME, step=5)
    with pytest.raises(ValueError, match="already trained to step 5"):
        train(model, make_config(tmp_path, images, steps=4, resume=True))
    assert sorted(path.name for path in folder.iterdir()) == [f"{NAME}.pt"]


def test_a_name_another_file_already_gives_is_refused(tmp_path, images, tiny_models):
    """`old/TOK.pt` is the token `tok` to the web UIs (file stem, any subfolder, CLIP lowercases): creating or
    training a new `tok` would make two, so it is refused before anything is written; resume lists both."""
    model = tiny_models["sd1"]
    folder = tmp_path / "embeddings"
    _a1111_pt(model, folder, NAME.upper(), step=1, subfolder="old")
    with pytest.raises(FileExistsError, match=r"already exists \(old/TOK\.pt .*resume to continue"):
        train(model, make_config(tmp_path, images, steps=1))
    with pytest.raises(FileExistsError, match="already exists"):
        from ti_core.create import create_embedding

        save_embedding(create_embedding(model, NAME, "a dog", 1), folder)
    assert not (folder / f"{NAME}.safetensors").exists()
    _a1111_pt(model, folder, NAME, step=1)  # and a second one: which one would a resume mean?
    with pytest.raises(FileExistsError, match="several files are named"):
        train(model, make_config(tmp_path, images, steps=2, resume=True))


# ----------------------------------------------------------------------------------------------------------------
# Stopping: interrupt, exceptions, NaN, out of memory, a second run


def test_interrupt_saves_the_current_step(tmp_path, images, tiny_models):
    cancel = threading.Event()
    events = []

    def callback(event):
        events.append(event)
        if event.kind == "step" and event.step == 2:
            cancel.set()

    result = train(tiny_models["sd1"], make_config(tmp_path, images, steps=5), callback, cancel=cancel)
    assert result.stopped == "interrupted" and result.step == 2
    assert result.message.startswith("Training interrupted at step 2; saved ")
    assert load_embedding(result.embedding_path).step == 2
    assert events[-1].kind == "interrupted"
    assert (tmp_path / "logs" / NAME / f"{NAME}.optim.safetensors").is_file()  # resumable


def fail_on_call(monkeypatch, name: str, call: int, error: BaseException):
    original = getattr(train_loss, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(train_loss, name, wrapper)


def test_an_exception_saves_the_last_good_step_and_reports_it(tmp_path, images, tiny_models, monkeypatch):
    fail_on_call(monkeypatch, "encode_tokenized", 3, RuntimeError("boom"))
    result, events = run(tiny_models["sd1"], make_config(tmp_path, images, steps=5))
    assert result.stopped == "error" and result.step == 2
    assert isinstance(result.error, RuntimeError)
    assert "RuntimeError at step 3: boom" in result.message
    assert events[-1].kind == "error" and "boom" in events[-1].message
    assert load_embedding(result.embedding_path).step == 2
    assert not (tmp_path / "logs" / NAME / ".lock").exists()


def test_out_of_memory_suggests_what_to_change(tmp_path, images, tiny_models, monkeypatch):
    fail_on_call(monkeypatch, "encode_tokenized", 1, OutOfMemoryError("CUDA out of memory"))
    result, _ = run(tiny_models["sd1"], make_config(tmp_path, images))
    assert result.stopped == "error" and result.step == 0
    for advice in ("smaller batch size", "gradient checkpointing", "lower resolution"):
        assert advice in result.message


def test_a_nan_loss_stops_and_keeps_the_last_finite_vectors(tmp_path, images, tiny_models, monkeypatch):
    original = train_loss.diffusion_loss
    calls = []

    def nan_on_third(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_loss, "diffusion_loss", nan_on_third)
    result, _ = run(tiny_models["sd1"], make_config(tmp_path, images, steps=5))
    assert result.stopped == "nan" and result.step == 2
    assert "the loss became nan at step 3" in result.message
    saved = load_embedding(result.embedding_path)
    assert saved.step == 2 and all(torch.isfinite(v).all() for v in saved.vectors.values())


def test_a_diverging_learning_rate_stops_with_finite_vectors(tmp_path, images, tiny_models):
    result, _ = run(tiny_models["sd1"], make_config(tmp_path, images, steps=6, learning_rate="1e30", method="plain"))
    assert result.stopped == "nan" and result.step < 6
    saved = load_embedding(result.embedding_path)
    assert saved.step == result.step and all(torch.isfinite(v).all() for v in saved.vectors.values())


def test_a_second_run_of_the_same_embedding_is_refused(tmp_path, images, tiny_models):
    lock = tmp_path / "logs" / NAME / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getpid()))  # a live process: this one, as a second UI thread would be
    with pytest.raises(TrainingLocked, match="already being trained by process"):
        train(tiny_models["sd1"], make_config(tmp_path, images))
    assert lock.read_text() == str(os.getpid())
    assert not (tmp_path / "embeddings").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, images, tiny_models):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "logs" / NAME / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(finished.stdout.strip())
    result, _ = run(tiny_models["sd1"], make_config(tmp_path, images, steps=1))
    assert result.stopped == "done"
    assert not lock.exists()


# ----------------------------------------------------------------------------------------------------------------
# Options


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, images, tiny_models, monkeypatch):
    model = tiny_models["sd2"]
    plain, _ = run(model, make_config(tmp_path / "plain", images, learning_rate="0.05"))
    recomputed = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k)
    )
    checkpointed, _ = run(
        model, make_config(tmp_path / "ckpt", images, learning_rate="0.05", gradient_checkpointing=True)
    )
    assert recomputed  # the UNet's blocks really were checkpointed
    start = load_start_vectors(model, make_config(tmp_path, images))["clip_h"]
    a, b = (load_embedding(r.embedding_path, widths=model.widths).vectors["clip_h"] for r in (plain, checkpointed))
    assert not torch.allclose(b, start)  # gradients did reach the vectors through the checkpointed blocks
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not model.unet.is_gradient_checkpointing  # switched off again afterwards


def test_norm_control_caps_vector_norms_at_the_vocabulary_median(tmp_path, images, tiny_models):
    model = tiny_models["sd1"]
    limit = vocabulary_norm_limits(model, 1.0)["clip_l"]
    plain = {"learning_rate": "1.0", "init_text": "", "method": "plain"}
    loose, _ = run(model, make_config(tmp_path / "loose", images, **plain))
    capped, _ = run(model, make_config(tmp_path / "capped", images, **plain, norm_control=1.0))
    loose_norms = load_embedding(loose.embedding_path).vectors["clip_l"].norm(dim=1)
    capped_norms = load_embedding(capped.embedding_path).vectors["clip_l"].norm(dim=1)
    assert loose_norms.max() > 1.5 * limit  # without it, two big steps overshoot the vocabulary's norms
    assert capped_norms.max() <= limit * (1 + 1e-5)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_bf16_frozen_weights_as_on_a_gpu(tmp_path, images, tiny_model_dirs, arch, monkeypatch):
    """The GPU path, run on the CPU: UNet and text encoders cast to bf16, VAE kept, vectors float32, with
    snapshots, previews, validation and (SDXL) checkpointing. A dtype mismatch anywhere would stop the run."""
    from ti_core.models import load_model

    model = load_model(tiny_model_dirs[arch])  # its own copy: the cast is in place
    monkeypatch.setattr(train_patching, "casts_frozen_weights", lambda device: True)
    config = make_config(
        tmp_path, images, mixed_precision="bf16", steps=3, save_every=1, preview_every=2, preview_steps=2,
        validation_every=1, validation_samples=2, gradient_checkpointing=arch == "sdxl",
    )  # fmt: skip
    result, events = run(model, config)
    assert result.stopped == "done", result.message
    assert model.unet.dtype == torch.bfloat16 and model.vae.dtype == torch.float32
    losses = [event.loss for event in events if event.kind == "step"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    trained = load_embedding(result.embedding_path, widths=model.widths)
    start = load_start_vectors(model, config)
    for key, vectors in trained.vectors.items():
        assert vectors.dtype == torch.float32 and not torch.allclose(vectors, start[key].float()), key
    assert (tmp_path / "logs" / NAME / "images" / f"{NAME}-2.png").is_file()


def test_fp16_on_cpu_is_refused_and_bf16_trains(tmp_path, images, tiny_models):
    model = tiny_models["sd1"]
    with pytest.raises(ValueError, match="fp16 mixed precision needs a GPU"):
        train(model, make_config(tmp_path, images, mixed_precision="fp16"))
    result, events = run(model, make_config(tmp_path, images, mixed_precision="bf16", steps=1))
    assert result.stopped == "done"
    assert math.isfinite(next(event.loss for event in events if event.kind == "step"))
    assert load_embedding(result.embedding_path).vectors["clip_l"].dtype == torch.float32


def test_compiled_training_follows_the_eager_loss_trajectory(tmp_path, images, tiny_models, monkeypatch):
    """`compile=True` changes how the steps run, not what they compute: the same seed gives the same losses and
    moves the vectors the same way, with validation and a preview on the way (they run eagerly), and the model
    is handed back as it came. Compiled with AOT autograd's eager backend: what compiling the trainer's step can
    get wrong (the spliced vectors captured as constants instead of inputs, gradients through the splice hook,
    stale guards) happens before inductor; its kernels are PyTorch's to test, and their C++ build takes minutes."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = tiny_models["sd1"]
    settings = dict(steps=4, validation_every=2, validation_samples=1, preview_every=4)
    eager, eager_events = run(model, make_config(tmp_path / "eager", images, **settings))
    compiled, compiled_events = run(model, make_config(tmp_path / "compiled", images, compile=True, **settings))
    assert eager.stopped == compiled.stopped == "done", compiled.message

    def losses(events, kind="step"):
        return [event.loss for event in events if event.kind == kind]

    assert len(losses(compiled_events)) == 4 and len(losses(compiled_events, "validation")) == 3
    assert losses(compiled_events) == pytest.approx(losses(eager_events), rel=1e-3)
    assert losses(compiled_events, "validation") == pytest.approx(losses(eager_events, "validation"), rel=1e-3)
    start = load_start_vectors(model, make_config(tmp_path, images))["clip_l"]
    after_eager = load_embedding(eager.embedding_path).vectors["clip_l"]
    after_compiled = load_embedding(compiled.embedding_path).vectors["clip_l"]
    # Adam divides each gradient component by its own size, so last-bit differences grow to a fraction of a
    # step; the two runs must still have moved the vectors the same way.
    assert (after_compiled - after_eager).norm() < 0.05 * (after_eager - start).norm()
    assert not any("forward" in vars(module) for module in [model.unet, *(e.model for e in model.encoders)])


def test_tensorboard_event_files_hold_the_loss_lr_norm_and_previews(tmp_path, images, tiny_models):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(tmp_path, images, steps=3, preview_every=2, validation_every=1, validation_samples=1)
    result, events = run(tiny_models["sd1"], config)
    folder = tmp_path / "logs" / NAME / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*")), "no event file beside loss.csv"
    log = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    log.Reload()
    steps = [event for event in events if event.kind == "step"]
    losses = log.Scalars("train/loss")
    assert [item.step for item in losses] == [1, 2, 3]
    assert [item.value for item in losses] == pytest.approx([event.loss for event in steps], rel=1e-6)
    assert [item.value for item in log.Scalars("train/learning_rate")] == pytest.approx([0.01] * 3)
    assert [item.value for item in log.Scalars("train/norm_ratio")] == pytest.approx(
        [event.norm_ratio for event in steps], rel=1e-6
    )
    assert [item.step for item in log.Scalars("validation/loss")] == [0, 1, 2, 3]
    (preview,) = log.Images("preview")
    assert (preview.step, preview.width, preview.height) == (2, 64, 64)


def test_without_tensorboard_no_event_files_are_written(tmp_path, images, tiny_models, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    result, _ = run(tiny_models["sd1"], make_config(tmp_path, images))
    assert result.stopped == "done"
    assert not (tmp_path / "logs" / NAME / "tensorboard").exists()
    assert (tmp_path / "logs" / NAME / "loss.csv").is_file()


RESUMED_OPTIMIZERS = [
    dict(optimizer="adafactor"),
    dict(optimizer="prodigy", learning_rate="1.0"),
    dict(lr_scheduler="constant"),
    dict(lr_scheduler="constant_with_warmup"),
    dict(lr_scheduler="linear"),
    dict(lr_scheduler="cosine"),
    dict(lr_scheduler="cosine_with_restarts", lr_cycles=2),
]


def _optimizer_file(folder) -> tuple[dict[str, torch.Tensor], list[dict]]:
    from safetensors import safe_open

    with safe_open(str(folder / "logs" / NAME / f"{NAME}.optim.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        return tensors, json.loads(handle.metadata()["param_groups"])


def _lr_column(folder) -> list[float]:
    with open(folder / "logs" / NAME / "loss.csv", newline="") as handle:
        return [float(row["learning_rate"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("settings", RESUMED_OPTIMIZERS, ids=lambda s: "-".join(map(str, s.values())))
def test_each_optimizer_and_named_schedule_resumes_exactly(tmp_path, images, tiny_models, settings):
    if settings.get("optimizer") == "prodigy":
        pytest.importorskip("prodigyopt")
    model = tiny_models["sd2"]
    settings = {"learning_rate": "0.02", **settings, "steps": 6}
    whole, whole_events = run(model, resumable_config(tmp_path / "whole", images, **settings))
    assert whole.stopped == "done", whole.message
    first, _ = run(model, resumable_config(tmp_path / "parts", images, **{**settings, "steps": 3}))
    start = load_embedding(first.embedding_path, widths=model.widths)
    second, events = run(model, resumable_config(tmp_path / "parts", images, **settings, resume=True))
    assert second.step == 6, second.message
    assert "optimizer state restored" in events[0].message
    reference = load_embedding(whole.embedding_path, widths=model.widths)
    resumed = load_embedding(second.embedding_path, widths=model.widths)
    assert not torch.equal(start.vectors["clip_h"], reference.vectors["clip_h"])  # the steps after 3 did train
    torch.testing.assert_close(resumed.vectors["clip_h"], reference.vectors["clip_h"], rtol=0, atol=1e-6)
    # The optimizer ends in the same state: its tensors and its groups' numbers (Prodigy's d, d_numerator, k).
    whole_state, resumed_state = (_optimizer_file(tmp_path / part) for part in ("whole", "parts"))
    assert len(resumed_state[1]) == len(whole_state[1])
    for resumed_group, whole_group in zip(resumed_state[1], whole_state[1], strict=True):
        assert resumed_group == pytest.approx(whole_group, rel=1e-5)
    assert resumed_state[0].keys() == whole_state[0].keys()
    for key, tensor in whole_state[0].items():
        torch.testing.assert_close(resumed_state[0][key], tensor, rtol=1e-5, atol=1e-7)
    assert _lr_column(tmp_path / "parts") == _lr_column(tmp_path / "whole")
    assert _lr_column(tmp_path / "whole") == pytest.approx([e.lr for e in whole_events if e.kind == "step"], rel=1e-5)


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts"])
def test_named_schedules_give_diffusers_rates_step_by_step(tmp_path, images, tiny_models, name):
    from diffusers.optimization import get_scheduler

    config = resumable_config(
        tmp_path, images, learning_rate="0.02", lr_scheduler=name, lr_cycles=2, steps=6, warmup_steps=2
    )
    _, events = run(tiny_models["sd1"], config)
    # diffusers' own scheduler, stepped once after each optimizer step as in its training scripts.
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.02)
    extra = {"num_cycles": 2} if name == "cosine_with_restarts" else {}
    scheduler = get_scheduler(name, holder, num_warmup_steps=2, num_training_steps=6, **extra)
    expected = []
    for _ in range(6):
        expected.append(scheduler.get_last_lr()[0])
        holder.step()
        scheduler.step()
    assert [event.lr for event in events if event.kind == "step"] == pytest.approx(expected, rel=1e-12)


def test_resume_with_another_optimizer_starts_it_fresh(tmp_path, images, tiny_models):
    model = tiny_models["sd1"]
    run(model, make_config(tmp_path, images, steps=1))
    result, events = run(model, make_config(tmp_path, images, steps=2, resume=True, optimizer="adafactor"))
    assert result.stopped == "done"
    assert "the saved optimizer state is AdamW's, starting a fresh adafactor" in events[0].message


def test_missing_optimizer_packages_are_one_line_errors(tmp_path, images, monkeypatch):
    import importlib.util

    from ti_core.train.optimizers import make_optimizer, usable_optimizers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "prodigyopt" else real(name))
    with pytest.raises(ValueError, match=r"^optimizer prodigy needs the prodigyopt package: pip install prodigyopt$"):
        make_optimizer("prodigy", [torch.zeros(2, requires_grad=True)], torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^optimizer adamw8bit needs a CUDA GPU"):
            make_optimizer("adamw8bit", [torch.zeros(2, requires_grad=True)], torch.device("cpu"))
        assert usable_optimizers(("adamw", "adafactor", "prodigy", "adamw8bit")) == ["adamw", "adafactor"]


def test_a_named_schedule_takes_one_rate(tmp_path, images):
    with pytest.raises(ValueError, match="lr_scheduler cosine takes one learning rate"):
        make_config(tmp_path, images, learning_rate="0.01:10, 0.001", lr_scheduler="cosine")


def test_an_adamw_state_saved_before_the_optimizer_setting_is_restored(tmp_path, images, tiny_models):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = tiny_models["sd1"]
    run(model, make_config(tmp_path, images, steps=1))
    path = tmp_path / "logs" / NAME / f"{NAME}.optim.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    old = {key: metadata[key] for key in ("vectors_sha256", "step", "optimizer")}  # the fields files had then
    assert old["optimizer"] == "AdamW"
    save_file(load_file(str(path)), str(path), metadata=old)
    result, events = run(model, make_config(tmp_path, images, steps=2, resume=True))
    assert result.stopped == "done"
    assert "optimizer state restored" in events[0].message
