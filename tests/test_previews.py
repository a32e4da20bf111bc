"""Training previews on the tiny models: the settings they take (prompts, sampler, size), a negative embedding's
side-by-side previews, and the grid that compares a run's previews by step."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ti_core.config import PREVIEW_SAMPLERS, TrainConfig
from ti_core.data import DataConfig
from ti_core.formats import load_embedding
from ti_core.preview import SAMPLERS, render_image, sampling_scheduler
from ti_core.train import train
from ti_core.train.outputs import STEP_GRID_ROWS, step_grid
from ti_core.train.run_folder import RunFolder
from ti_core.zero_snr import with_zero_terminal_snr

NAME = "tok"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for index in range(2):
        Image.new("RGB", (64, 64), (200, 30 + 40 * index, 40)).save(folder / f"{index:03d}-a red square.png")
    return folder


def make_config(tmp_path, images, **overrides) -> TrainConfig:
    settings = dict(
        name=NAME, embeddings_dir=tmp_path / "embeddings", log_dir=tmp_path / "logs",
        data=DataConfig(images=images, resolution=64), init_text="a dog", vectors=1, steps=2,
        learning_rate="0.05", preview_every=1, preview_steps=2,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_every_sampler_renders_and_they_differ(tiny_models):
    model = tiny_models["sd1"]
    assert set(SAMPLERS) == set(PREVIEW_SAMPLERS)
    rendered = {
        name: pixels(render_image(model, "a dog", "", {}, seed=0, steps=3, width=64, height=64, guidance=5.0,
                                  sampler=name))
        for name in PREVIEW_SAMPLERS
    }  # fmt: skip
    assert all(image.shape == (64, 64, 3) for image in rendered.values())
    assert not np.array_equal(rendered["dpm++_2m"], rendered["euler_a"])  # the sampler was used, not a default
    assert not np.array_equal(rendered["euler"], rendered["ddim"])


def test_a_preview_sampler_keeps_the_models_schedule(tiny_models):
    """A v-prediction zero-terminal-SNR model samples its previews with its own schedule and target."""
    model = tiny_models["sd1"]
    ztsnr = with_zero_terminal_snr(model.scheduler, True)
    ztsnr.register_to_config(prediction_type="v_prediction")
    for name in PREVIEW_SAMPLERS:
        made = sampling_scheduler(name, ztsnr)
        assert made.config.prediction_type == "v_prediction", name
        assert made.config.rescale_betas_zero_snr, name
    with pytest.raises(ValueError, match="unknown preview sampler 'dpm'"):
        sampling_scheduler("dpm", model.scheduler)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"preview_width": 50}, "preview_width must be a multiple of 8"),
        ({"preview_height": -8}, "preview_height must be between 0 and 4096"),
        ({"preview_sampler": "heun"}, "preview_sampler must be one of dpm\\+\\+_2m"),
    ],
)
def test_bad_preview_settings_are_refused_in_one_line(tmp_path, images, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        make_config(tmp_path, images, **overrides)
    assert "\n" not in str(error.value)


def test_previews_take_their_prompts_size_and_sampler(tmp_path, images, tiny_models):
    """Two prompts side by side at the preview size; the same settings give the same image again (the
    preview shows the vectors, not chance), and the run's previews are compared by step in one grid."""
    model = tiny_models["sd1"]
    config = make_config(
        tmp_path, images, preview_prompt="a photo of tok\n\n  tok on a beach  \n", preview_width=48,
        preview_height=32, preview_sampler="euler_a", preview_negative_prompt="blurry", preview_guidance=4.0,
    )  # fmt: skip
    events = []
    result = train(model, config, events.append)
    assert result.stopped == "done"
    previews = [event for event in events if event.kind == "preview"]
    assert [event.step for event in previews] == [1, 2]
    image = previews[-1].image
    assert image.size == (96, 32)  # two prompts of 48 x 32; the empty line is no prompt
    left, right = pixels(image)[:, :48], pixels(image)[:, 48:]
    assert not np.array_equal(left, right)
    final = [load_embedding(result.embedding_path)]
    again = render_image(
        model, "tok on a beach", "blurry", final, seed=0, steps=2, width=48, height=32, guidance=4.0, sampler="euler_a"
    )
    assert np.abs(pixels(again) - right).max() <= 2  # the final preview is the final vectors with those settings

    grid_path = tmp_path / "logs" / NAME / "images" / f"{NAME}-by-step.png"
    with Image.open(grid_path) as grid:
        grid_pixels = pixels(grid)
    assert grid_pixels.shape[0] == 2 * 32  # a row per preview step
    label_width = grid_pixels.shape[1] - 96
    assert label_width > 0  # "step 1", "step 2" on the left
    assert np.array_equal(grid_pixels[32:, label_width:], pixels(image))  # the last row is the last preview


def test_a_negative_embeddings_previews_compare_without_and_with_it(tmp_path, images, tiny_models):
    """Each preview: the prompt without the embedding (the same at every step), and with the token in the
    negative prompt. The default prompt is the caption alone (no token in the positive prompt)."""
    model = tiny_models["sd1"]
    config = make_config(tmp_path, images, negative_embedding=True, preview_steps=3)
    events = []
    assert train(model, config, events.append).stopped == "done"
    first, last = (pixels(event.image) for event in events if event.kind == "preview")
    assert first.shape[0] == 2 * 64 and first.shape[1] > 64  # two rows, labelled on the left
    label_width = first.shape[1] - 64
    without_first, without_last = first[:64, label_width:], last[:64, label_width:]
    assert np.array_equal(without_first, without_last)
    plain = render_image(model, "a red square", "", {}, seed=0, steps=3, width=64, height=64, guidance=7.0)
    assert np.abs(pixels(plain) - without_last).max() <= 2  # (the run samples with the model as it trains it)
    with_it = last[64:, label_width:]
    assert np.abs(with_it - without_last).max() > 8  # the token in the negative prompt changes the image


def test_the_step_grid_spreads_its_rows_over_the_run(tmp_path, images):
    config = make_config(tmp_path, images, steps=100)
    run = RunFolder(config, write=True)
    (run.folder / "images").mkdir(parents=True)
    for step in range(5, 101, 5):  # 20 previews of 8 x 8, coloured by step
        Image.new("RGB", (8, 8), (step * 2, 0, 0)).save(run.image_path(step))
    Image.new("RGB", (16, 16)).save(run.folder / "images" / "other-10.png")  # another embedding's: not counted
    grid = pixels(step_grid(run))
    assert grid.shape[0] == STEP_GRID_ROWS * 8
    reds = [int(grid[row * 8 + 4, -4, 0]) for row in range(STEP_GRID_ROWS)]
    steps = [red // 2 for red in reds]
    assert steps[0] == 5 and steps[-1] == 100 and steps == sorted(steps) and len(set(steps)) == STEP_GRID_ROWS


def test_no_step_grid_from_a_single_preview(tmp_path, images):
    run = RunFolder(make_config(tmp_path, images), write=True)
    (run.folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(run.image_path(1))
    assert step_grid(run) is None


def test_compare_renders_each_snapshot_with_the_preview_settings(tmp_path, images, tiny_models):
    """A row per snapshot, each the snapshot's vectors rendered like a preview; empty prompts fall back to the
    prompts the run's previews used."""
    import dataclasses
    import json

    from ti_core.train import compare_snapshots, render_preview

    model = tiny_models["sd1"]
    config = make_config(tmp_path, images, steps=3, save_every=1, preview_every=0, preview_prompt="tok in the snow")
    assert train(model, config).stopped == "done"
    folder = tmp_path / "logs" / NAME
    assert json.loads((folder / "settings.json").read_text())["preview_prompts"] == ["tok in the snow"]
    asked = dataclasses.replace(config, preview_prompt="", preview_width=48, preview_height=32)
    events = []
    result = compare_snapshots(model, asked, events.append)
    assert result.stopped == "done" and "Compared 3 snapshots" in result.message
    assert [event.kind for event in events] == ["start", "step", "step", "step", "preview", "done"]
    assert events[0].step == 3  # the run's last logged step: the tab keeps the whole loss history
    with Image.open(folder / "images" / f"{NAME}-snapshots.png") as grid:
        rows = pixels(grid)
    assert rows.shape[0] == 3 * 32
    left = rows.shape[1] - 48
    for row, step in enumerate((1, 2, 3)):
        snapshot = load_embedding(folder / f"{NAME}-{step}.safetensors")
        expected = render_preview(model, NAME, snapshot.vectors, ["tok in the snow"], asked)
        assert np.abs(rows[row * 32 : (row + 1) * 32, left:] - pixels(expected)).max() <= 2, step
    assert not np.array_equal(rows[:32, left:], rows[64:, left:])  # the snapshots differ


def test_compare_without_snapshots_says_how_to_get_them(tmp_path, images, tiny_models):
    from ti_core.train import compare_snapshots

    with pytest.raises(ValueError, match=r"tok has no snapshots in .*: train with 'Save a copy every N steps'"):
        compare_snapshots(tiny_models["sd1"], make_config(tmp_path, images))


def test_compare_runs_as_a_job_and_its_grid_is_among_the_previews(tmp_path, images, tiny_models):
    from ti_core.jobs import TrainingJob
    from ti_core.train import compare_snapshots

    model = tiny_models["sd1"]
    config = make_config(tmp_path, images, steps=2, save_every=1, preview_every=0)
    assert train(model, config).stopped == "done"
    job = TrainingJob.start(lambda: model, config, work=compare_snapshots)
    assert job.wait(300)
    state = job.snapshot()
    assert state["stopped"] == "done", state["message"]
    assert state["previews"] == [str(tmp_path / "logs" / NAME / "images" / f"{NAME}-snapshots.png")]
    assert state["start_step"] == 2 and state["final_path"] == str(tmp_path / "embeddings" / f"{NAME}.safetensors")
