"""The extension's UI: it builds on the installed gradio with every public elem_id, its views say the right
things, and, in a real browser, a person can create, train, interrupt, browse and click-to-insert.

Browser tests (marked `ui`) need gradio, playwright and Debian's chromium; they skip without them, except
under TI_REQUIRE_UI=1 (CI's UI venvs), where a missing piece fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from ui_helpers import (
    UiPage,
    chromium_browser,
    free_port,
    loopback_only,
    make_dataset,
    require_chromium,
    require_module,
    served_page,
    stop_app,
)

gr = require_module("gradio")
import extension  # noqa: E402  (needs gradio)
from ti_core.config import TrainConfig  # noqa: E402
from ti_core.create import create_embedding  # noqa: E402
from ti_core.demo import DEMO_LABEL, DEMO_MODEL_ID  # noqa: E402
from ti_core.formats import load_embedding, save_embedding  # noqa: E402
from ti_ui import actions as extension_actions  # noqa: E402
from ti_ui.tabs.model import model_status_action  # noqa: E402

REQUIRED_IDS = {
    "ti_create_name",
    "ti_create_init_text",
    "ti_create_vectors",
    "ti_create_button",
    "ti_create_status",
    "ti_train_embedding",
    "ti_train_dataset",
    "ti_train_steps",
    "ti_train_button",
    "ti_train_interrupt",
    "ti_train_progress",
    "ti_train_loss_plot",
    "ti_train_norm_plot",
    "ti_train_method",
    "ti_train_optimizer",
    "ti_train_lr_scheduler",
    "ti_train_lr_cycles",
    "ti_train_preset",
    "ti_train_preset_load",
    "ti_train_preset_name",
    "ti_train_preset_save",
    "ti_train_previews",
    "ti_embeddings_list",
    "ti_embeddings_refresh",
}


def elem_ids(demo) -> set[str]:
    return {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}


# ---------------------------------------------------------------------------------------------- no browser


def test_create_ui_builds_with_every_public_elem_id(tmp_path):
    backend = extension.StandaloneBackend(embeddings_dir=tmp_path / "emb", log_dir=tmp_path / "log")
    ids = elem_ids(extension.create_ui(backend))
    assert REQUIRED_IDS | {"ti_try_prompt", "ti_root"} <= ids
    assert "ti_train_preview_txt2img" not in ids  # standalone there is no txt2img tab to take settings from


def test_host_ui_has_no_standalone_panels(tmp_path):
    ids = elem_ids(extension.create_ui(extension.Backend(tmp_path / "emb", tmp_path / "log")))
    assert ids >= REQUIRED_IDS
    assert "ti_try_prompt" not in ids and "ti_model" not in ids
    assert "ti_train_preview_txt2img" not in ids  # a host that offers no txt2img components gets no checkbox


def test_budget_text_says_what_is_left():
    assert "59 left" in extension.budget_text(16)
    assert "74 left" in extension.budget_text(1)
    assert "0 left" in extension.budget_text(75)


# What the Train tab shows before anyone touches it, as gradio 3 hands it over (numbers as floats).
TAB_DEFAULTS = {
    "data.images": "",
    "data.recursive": False,
    "data.template": "subject_filewords",
    "learning_rate": "0.005",
    "batch_size": 1.0,
    "gradient_accumulation": 1.0,
    "steps": 2000.0,
    "data.resolution": 512.0,
    "data.buckets": False,
    "data.flip": False,
    "data.shuffle_tags": False,
    "data.tag_dropout": 0.0,
    "data.latent_sampling": "once",
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "save_every": 500.0,
    "preview_every": 500.0,
    "preview_prompt": "",
    "preview_seed": 0.0,
    "preview_steps": 20.0,
    "optimizer": "adamw",
    "lr_scheduler": "schedule",
    "lr_cycles": 1.0,
    "warmup_steps": 0.0,
    "grad_clip": "disabled",
    "grad_clip_value": 0.1,
    "seed": 0.0,
    "method": "auto",
    "direction_prior": 0.0,
    "cross_init_weight": 1e-5,
    "context_regularization": 0.0,
    "data.repeats": 1.0,
    "data.alpha_weight": False,
    "norm_control": 0.0,
    "min_snr_gamma": 0.0,
    "noise_offset": 0.0,
    "timestep_min": 0.0,
    "timestep_max": 1000.0,
    "compile": False,
    "cache_latents": True,
    "validation_every": 0.0,
    "validation_samples": 4.0,
    "preview_negative_prompt": "",
    "preview_guidance": 7.0,
    "preview_sampler": "dpm++_2m",
    "preview_width": 0.0,
    "preview_height": 0.0,
    "negative_embedding": False,
    "save_optimizer_state": True,
}
# The settings that say which run this is rather than how it trains: the tab takes them from the picked
# embedding and the web UI's folders, or from its Train/Resume buttons.
RUN_IDENTITY = {"name", "embeddings_dir", "log_dir", "resume", "overwrite", "init_text", "vectors"}


def tab_values(**changes) -> list:
    values = {**TAB_DEFAULTS, **{key.replace("__", "."): value for key, value in changes.items()}}
    return [values[key] for key in extension.TRAIN_FIELDS]


def test_train_tab_defaults_make_a_valid_config(tmp_path):
    """Every Train-tab field maps to a TrainConfig key, and the tab's defaults validate."""
    assert set(TAB_DEFAULTS) == set(extension.TRAIN_FIELDS)
    backend = extension.Backend(tmp_path / "emb", tmp_path / "log")
    settings = extension.train_settings(
        tab_values(data__images=str(tmp_path)), name="cat", backend=backend, resume=True
    )
    config = TrainConfig.from_dict(settings)
    assert (config.steps, config.data.resolution, config.embeddings_dir) == (2000, 512, tmp_path / "emb")


def test_every_training_setting_has_a_train_tab_field(tmp_path):
    """What the CLI can set, the tab can set: each declared setting but the run's identity is a field of the
    built tab, under its own elem_id."""
    from ti_core.config import declared

    demo = extension.create_ui(extension.Backend(tmp_path / "emb", tmp_path / "log"))
    built = elem_ids(demo)
    missing = [item.key for item in declared() if item.key not in RUN_IDENTITY and item.elem_id not in built]
    assert not missing, f"settings with no Train tab field: {missing}"
    assert {item.key for item in declared()} - RUN_IDENTITY == set(extension.TRAIN_FIELDS)


def test_advanced_fields_reach_the_training_config(tmp_path):
    values = tab_values(
        data__images=str(tmp_path),
        min_snr_gamma=5.0,
        noise_offset=0.05,
        timestep_min=100.0,
        timestep_max=900.0,
        norm_control=2.5,
        validation_every=50.0,
        validation_samples=2.0,
        preview_negative_prompt=" blurry ",
        preview_guidance=4.5,
        data__alpha_weight=True,
        data__repeats=3.0,
        compile=True,
        cache_latents=False,
        save_optimizer_state=False,
    )
    backend = extension.Backend(tmp_path / "emb", tmp_path / "log")
    config = TrainConfig.from_dict(extension.train_settings(values, name="cat", backend=backend, resume=True))
    assert (config.min_snr_gamma, config.noise_offset, config.timestep_min, config.timestep_max) == (5, 0.05, 100, 900)
    assert (config.norm_control, config.validation_every, config.validation_samples) == (2.5, 50, 2)
    assert (config.preview_negative_prompt, config.preview_guidance) == (" blurry ", 4.5)
    assert (config.data.alpha_weight, config.data.repeats) == (True, 3)
    assert (config.compile, config.cache_latents, config.save_optimizer_state) == (True, False, False)


def test_the_preview_fields_reach_the_training_config(tmp_path):
    values = tab_values(
        data__images=str(tmp_path),
        preview_prompt="a photo of cat\ncat on a beach",
        preview_sampler="euler_a",
        preview_width=768.0,
        preview_height=512.0,
        negative_embedding=True,
    )
    backend = extension.Backend(tmp_path / "emb", tmp_path / "log")
    config = TrainConfig.from_dict(extension.train_settings(values, name="cat", backend=backend, resume=True))
    assert config.preview_prompt.splitlines() == ["a photo of cat", "cat on a beach"]
    assert (config.preview_sampler, config.preview_width, config.preview_height) == ("euler_a", 768, 512)
    assert config.negative_embedding


def test_a_bad_advanced_value_is_one_status_line(tiny_models, tmp_path):
    backend = extension.Backend(tmp_path / "emb", tmp_path / "log")
    save_embedding(create_embedding(tiny_models["sd1"], "cat", "cat", 1), tmp_path / "emb")
    status = extension.start_training(
        backend, False, "cat", *tab_values(data__images=str(tmp_path), noise_offset=-1.0)
    )
    assert status.startswith('<div class="ti-status ti-status-error">') and "noise_offset" in status


def test_bad_settings_are_one_status_line(tiny_models, tmp_path):
    backend = extension.Backend(tmp_path / "emb", tmp_path / "log")
    save_embedding(create_embedding(tiny_models["sd1"], "cat", "cat", 1), tmp_path / "emb")
    before = extension.current_job()  # an earlier test's finished run may still be the current job
    status = extension.start_training(backend, False, "cat", *tab_values())
    assert status == '<div class="ti-status ti-status-error">images: give the folder of training images</div>'
    status = extension.start_training(
        backend, False, "cat", *tab_values(data__images=str(tmp_path), learning_rate="x")
    )
    assert "ti-status-error" in status and "learning rate" in status.lower()
    assert extension.current_job() is before  # nothing started


def test_loss_plot_rows_hold_each_step_and_the_moving_average():
    frame = extension.loss_frame([(step, 1.0 / step) for step in range(1, 40)])
    each, average = (frame[frame["curve"] == curve] for curve in ("each step", "moving average"))
    assert list(each["step"]) == list(range(1, 40)) == list(average["step"])
    assert list(each["loss"])[:2] == [1.0, 0.5]
    assert average["loss"].iloc[0] == 1.0  # the average starts at the first loss, not at zero
    assert 1.0 / 39 < average["loss"].iloc[-1] < 0.1  # and trails the falling loss
    assert extension.loss_frame([]) is None  # an empty plot before the first step


def test_a_long_run_is_thinned_for_the_plot_but_keeps_its_ends():
    losses = [(step, 1.0 if step == 20_000 else 0.5) for step in range(1, 20_001)]
    frame = extension.loss_frame(losses, limit=500)
    steps = list(frame[frame["curve"] == "each step"]["step"])
    assert 400 <= len(steps) <= 501 and steps[0] == 1 and steps[-1] == 20_000
    assert frame["loss"].max() == 1.0  # the last step is drawn


def test_progress_html_shows_step_speed_and_eta():
    text = extension.progress_html(
        {
            "running": True,
            "step": 3,
            "total": 8,
            "steps_per_second": 2.5,
            "eta_seconds": 2,
            "loss": 0.25,
            "lr": 0.005,
            "message": "training",
        }
    )
    assert "Step 3 / 8" in text and "2.50 steps/s" in text and "ETA 0:02" in text and "loss 0.2500" in text


def test_progress_html_says_where_the_time_outside_the_steps_went():
    text = extension.progress_html(
        {
            "running": False,
            "step": 6,
            "total": 6,
            "steps_per_second": 2.0,
            "elapsed_seconds": 73,
            "outputs_seconds": 70,
        }
    )
    assert "2.00 steps/s" in text and "took 1:13" in text and "previews and snapshots 1:10" in text
    assert "previews" not in extension.progress_html({"running": True, "step": 1, "total": 6, "outputs_seconds": 0})


def test_cards_escape_names_and_say_whether_they_fit(tiny_models, tmp_path):
    model = tiny_models["sd1"]
    save_embedding(create_embedding(model, "a&b", "cat", 2), tmp_path)
    save_embedding(create_embedding(tiny_models["sd2"], "wide", "cat", 1), tmp_path)
    cards = [extension.card_info(path, model.widths) for path in sorted(tmp_path.glob("*.safetensors"))]
    page = extension.cards_html(cards, model.name)
    assert 'data-ti-name="a&amp;b"' in page and "a&b" not in page
    fits = {card.name: card.fits for card in cards}
    assert fits == {"a&b": True, "wide": False}


def test_find_checkpoints_lists_files_and_diffusers_folders(tmp_path, tiny_model_dirs):
    import shutil

    (tmp_path / "one.safetensors").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "two.ckpt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no")
    shutil.copytree(tiny_model_dirs["sd1"], tmp_path / "pipe")
    found = [path.relative_to(tmp_path).as_posix() for path in extension.find_checkpoints(tmp_path)]
    assert found == ["one.safetensors", "pipe", "sub/two.ckpt"]
    backend = extension.StandaloneBackend(models_dir=tmp_path, **_nowhere_else(tmp_path))
    choices = backend.model_choices()
    assert [backend._sources[label] for label in choices] == [
        str(tmp_path / "one.safetensors"),
        str(tmp_path / "pipe"),
        str(tmp_path / "sub" / "two.ckpt"),
        DEMO_MODEL_ID,
    ]
    assert choices[-1] == DEMO_LABEL and backend.selected == choices[0]  # a real model before the demo


def _nowhere_else(tmp_path) -> dict:
    """Backend arguments that keep model discovery inside tmp_path (no web UI folders, no hub cache)."""
    return {
        "embeddings_dir": tmp_path / "e",
        "log_dir": tmp_path / "l",
        "search_from": tmp_path / "cwd",
        "home": tmp_path / "home",
        "hf_cache": tmp_path / "hf",
    }


def test_with_no_model_found_the_demo_model_is_picked_and_labelled(tmp_path):
    backend = extension.StandaloneBackend(**_nowhere_else(tmp_path))
    assert backend.model_choices() == [DEMO_LABEL] and backend.selected == DEMO_LABEL
    assert "pictures are noise" in backend.status_text()
    status, _ = extension.create_action(backend, "demo_cat", "cat", 1, False)
    assert "Created demo_cat" in status and (tmp_path / "e" / "demo_cat.safetensors").is_file()


def test_a_typed_model_path_is_accepted_and_a_bad_one_is_one_line(tiny_model_dirs, tmp_path):
    backend = extension.StandaloneBackend(**_nowhere_else(tmp_path))
    backend.select_model(str(tiny_model_dirs["sd1"]))
    assert backend.current_model().architecture == "sd1"
    with pytest.raises(ValueError, match="no file or folder at .*missing.safetensors: check the path"):
        backend.select_model(str(tmp_path / "missing.safetensors"))
    assert backend.selected == str(tiny_model_dirs["sd1"])  # a mistyped path does not replace the model
    status = model_status_action(backend, str(tmp_path / "missing.safetensors"))
    assert "ti-status-error" in status and "check the path" in status and "still using" in status
    (tmp_path / "notes.txt").write_text("")
    assert "is not a checkpoint" in model_status_action(backend, str(tmp_path / "notes.txt"))
    assert "is a folder but not a diffusers model" in model_status_action(backend, str(tmp_path))
    assert "ti-status-error" not in model_status_action(backend, "someone/some-model")  # a hub id: loaded when used


def test_the_name_warning_shows_while_typing_and_after_create(tmp_path):
    assert extension_actions.name_warning_action("my_cat") == ""
    warning = extension_actions.name_warning_action("my cat")
    assert "warning:" in warning and "my_cat" in warning and "ComfyUI" in warning


def test_try_it_renders_with_a_clicked_embedding(tiny_model_dirs, tmp_path):
    backend = extension.StandaloneBackend(
        model=str(tiny_model_dirs["sd1"]), embeddings_dir=tmp_path, log_dir=tmp_path / "log"
    )
    save_embedding(create_embedding(backend.current_model(), "tiny-cat", "cat", 2), tmp_path)
    image, status = extension.try_action(backend, "a photo of tiny-cat", "", 1, 2, 64, 64, 5.0)
    assert image is not None and image.size == (64, 64)
    assert "with tiny-cat" in status


# --------------------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser():
    with chromium_browser() as browser:
        yield browser


@pytest.fixture(scope="module")
def app(tiny_model_dirs, tmp_path_factory):
    """The standalone app, started through `main` as a user would, on a free loopback port."""
    root = tmp_path_factory.mktemp("app")
    port = free_port()
    argv = [
        "--model",
        str(tiny_model_dirs["sd1"]),
        "--embeddings-dir",
        str(root / "embeddings"),
        "--log-dir",
        str(root / "logs"),
        "--port",
        str(port),
    ]
    demo = extension.main(argv, block=False)
    yield {
        "url": f"http://127.0.0.1:{port}/",
        "root": root,
        "data": make_dataset(root / "data"),
        "model": str(tiny_model_dirs["sd1"]),
    }
    stop_app(demo)


@pytest.fixture
def ui(browser, app):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    loopback_only(page)
    ui = UiPage(page, app["url"]).open()
    yield ui
    assert not ui.errors, f"errors in the page: {ui.errors}"
    context.close()


def _train_form(ui: UiPage, app, *, steps: int, preview_every: int) -> None:
    ui.tab("Train")
    ui.fill("ti_train_dataset", app["data"])
    ui.click("ti_train_dataset_scan")
    ui.wait_text("ti_train_dataset_info", r"4 images.*\n?.*1 skipped: broken\.png")
    ui.fill("ti_train_steps", steps)
    ui.fill("ti_train_resolution", 64)
    ui.fill("ti_train_save_every", 0)
    ui.fill("ti_train_preview_every", preview_every)
    ui.fill("ti_train_preview_steps", 2)


def _create(ui: UiPage, name: str, vectors: int) -> str:
    ui.tab("Create")
    ui.fill("ti_create_name", name)
    ui.fill("ti_create_init_text", "cat")
    ui.fill("ti_create_vectors", vectors)
    return ui.wait_text("ti_create_budget", rf"{75 - vectors} left")


@pytest.mark.ui
def test_typed_vectors_out_of_range_are_refused_in_the_page(ui, app):
    """The slider clamps a typed 0 or 76 (gradio 6 without a word): the page says what the CLI says."""
    ui.tab("Create")
    vectors = ui.field("ti_create_vectors")
    for typed in ("0", "76"):
        vectors.fill(typed)
        ui.wait_text("ti_create_vectors_error", rf"^vectors per token must be between 1 and 75, not {typed}$")
    vectors.fill("16")
    ui.page.wait_for_function("() => !document.getElementById('ti_create_vectors_error')")


@pytest.mark.ui
def test_create_shows_the_prompt_budget_and_writes_the_file(ui, app):
    assert "59 left" in _create(ui, "ui-made", 16)
    ui.wait_text("ti_create_init_info", r"Init text: 1 token, repeated to fill 16 vectors")
    ui.click("ti_create_button")
    status = ui.wait_text("ti_create_status", r"Created ui-made")
    path = app["root"] / "embeddings" / "ui-made.safetensors"
    assert str(path) in status
    assert load_embedding(path).num_vectors == 16
    ui.click("ti_create_button")  # again, without Overwrite: refused, and said so in one line
    ui.wait_text("ti_create_status", r"already exists.*Overwrite")
    ui.screenshot("create")


@pytest.mark.ui
def test_train_shows_progress_loss_plot_and_previews(ui, app):
    _create(ui, "ui-trained", 2)
    ui.click("ti_create_button")
    ui.wait_text("ti_create_status", r"Created ui-trained")
    _train_form(ui, app, steps=8, preview_every=4)
    assert ui.dropdown_value("ti_train_embedding") == "ui-trained"  # Create selected it
    ui.click("ti_train_button")
    ui.wait_text("ti_train_progress", r"Step [1-8] / 8", timeout=60)
    progress = ui.wait_text("ti_train_progress", r"Step 8 / 8.*took", timeout=90)
    assert "steps/s" in progress and "loss" in progress
    status = ui.wait_text("ti_train_status", r"Trained ui-trained to step 8")
    final = app["root"] / "embeddings" / "ui-trained.safetensors"
    assert str(final) in status
    assert ui.wait_value("ti_train_result", re.escape(str(final)))
    assert load_embedding(final).step == 8
    ui.page.wait_for_function("() => document.querySelectorAll('#ti_train_previews img').length >= 2")
    tooltip = ui.plot_tooltip("ti_train_loss_plot")  # hovering a curve tells its step and loss
    assert re.search(r"step:?\s+[1-8]\b", tooltip) and re.search(r"loss:?\s+\d", tooltip), tooltip
    axes = ui.page.locator("#ti_train_loss_plot [aria-label*=axis]")  # SVG on the newest: named
    if axes.count():
        assert {"X-axis titled 'step'", "Y-axis titled 'loss'"} <= {
            a.split(" for ")[0] for a in axes.evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
        }
    ui.page.wait_for_timeout(500)  # let the gallery's images finish loading before the picture is taken
    ui.screenshot(f"train-finished-gradio{gr.__version__.split('.')[0]}")


@pytest.mark.ui
def test_every_open_page_follows_a_run_and_a_late_one_shows_how_it_ended(ui, browser, app):
    """Progress reaches every browser session, not only the one that pressed Train: each page asks for it
    with ordinary clicks of its own (no gradio timer, which some web UIs' queues drop)."""
    _create(ui, "ui-watched", 1)
    ui.click("ti_create_button")
    ui.wait_text("ti_create_status", r"Created ui-watched")
    other_context = browser.new_context(viewport={"width": 1400, "height": 1000})
    other = UiPage(other_context.new_page(), app["url"])
    loopback_only(other.page)
    other.open().tab("Train")
    other.wait_text("ti_train_progress", r"No training run yet|Step")
    _train_form(ui, app, steps=6, preview_every=3)
    ui.choose("ti_train_embedding", "ui-watched")
    ui.click("ti_train_button")
    other.wait_text("ti_train_progress", r"Step [1-6] / 6", timeout=60)
    other.wait_text("ti_train_progress", r"Step 6 / 6.*took", timeout=90)
    other.wait_text("ti_train_status", r"Trained ui-watched to step 6")
    other.page.wait_for_function("() => document.querySelectorAll('#ti_train_previews img').length >= 2")
    ui.wait_text("ti_train_status", r"Trained ui-watched to step 6")
    late = UiPage(other_context.new_page(), app["url"])  # opened after the run: shows how it ended
    loopback_only(late.page)
    late.open().tab("Train")
    late.wait_text("ti_train_progress", r"Step 6 / 6.*took", timeout=30)
    late.wait_text("ti_train_status", r"Trained ui-watched to step 6")
    assert not other.errors and not late.errors
    other_context.close()


@pytest.mark.ui
def test_interrupt_saves_the_embedding_and_says_so(ui, app):
    _create(ui, "ui-interrupted", 1)
    ui.click("ti_create_button")
    ui.wait_text("ti_create_status", r"Created ui-interrupted")
    _train_form(ui, app, steps=5000, preview_every=0)
    ui.click("ti_train_button")
    ui.wait_text("ti_train_progress", r"Step [1-9]\d* / 5000", timeout=60)
    ui.click("ti_train_interrupt")
    status = ui.wait_text("ti_train_status", r"Training interrupted at step \d+", timeout=60)
    final = app["root"] / "embeddings" / "ui-interrupted.safetensors"
    assert str(final) in status
    step = int(re.search(r"step (\d+)", status).group(1))
    assert 0 < step < 5000 and load_embedding(final).step == step
    ui.wait_text("ti_train_progress", rf"Step {step} / 5000")
    ui.screenshot("train-interrupted")

    ui.click("ti_train_button")  # Train again would start over: refused, pointing at Resume
    ui.wait_text("ti_train_status", rf"already trained to step {step}: press Resume")
    ui.fill("ti_train_steps", step + 2)
    ui.click("ti_train_resume")
    ui.wait_text("ti_train_status", rf"Trained ui-interrupted to step {step + 2}", timeout=60)
    assert load_embedding(final).step == step + 2


@pytest.mark.ui
def test_library_card_click_adds_then_removes_the_token(ui, app):
    model_dir = app["root"] / "embeddings"
    from ti_core.models import load_model

    save_embedding(create_embedding(load_model(app["model"]), "ui-card", "dog", 3), model_dir, overwrite=True)
    ui.tab("Embeddings")
    ui.click("ti_embeddings_refresh")
    card = ui.page.locator('#ti_embeddings_list .ti-card[data-ti-name="ui-card"]')
    card.wait_for(timeout=30_000)
    assert "3 vectors" in card.inner_text()
    ui.fill("ti_try_prompt", "a photo of")
    card.click()
    ui.wait_value("ti_try_prompt", r"^a photo of ui-card$")
    ui.wait_text("ti_embeddings_insert_status", r"Added ui-card to the Try-it prompt")
    ui.screenshot("library")
    card.focus()
    ui.page.keyboard.press("Enter")  # the card is a button: the keyboard works too
    ui.wait_value("ti_try_prompt", r"^a photo of$")
    ui.wait_text("ti_embeddings_insert_status", r"Removed ui-card")
    ui.fill("ti_try_prompt", "a photo, (ui-card:1.2)")  # weighted with the web UIs' attention syntax
    card.click()
    ui.wait_value("ti_try_prompt", r"^a photo$")
    ui.fill("ti_try_prompt", "a photo of")
    card.click()
    for elem_id, value in (("ti_try_width", 64), ("ti_try_height", 64), ("ti_try_steps", 2)):
        ui.fill(elem_id, value)
    ui.click("ti_try_button")  # what the click inserted reaches the model
    ui.wait_text("ti_try_status", r"with ui-card", timeout=60)


@pytest.mark.ui
def test_a_negative_embeddings_card_goes_into_the_negative_prompt(ui, app, tiny_models):
    """An embedding trained as a negative embedding (its recorded settings say so) is marked on its card, and
    a click puts its token into the negative prompt of the view, not the prompt."""
    embedding = create_embedding(tiny_models["sd1"], "ui-neg", "blurry", 2)
    embedding.metadata["training_settings"] = json.dumps({"negative_embedding": True})
    save_embedding(embedding, app["root"] / "embeddings", overwrite=True)
    ui.tab("Embeddings")
    ui.click("ti_embeddings_refresh")
    card = ui.page.locator('#ti_embeddings_list .ti-card[data-ti-name="ui-neg"]')
    card.wait_for(timeout=30_000)
    assert "negative" in card.inner_text()
    ui.fill("ti_try_prompt", "a photo of")
    ui.fill("ti_try_negative", "lowres")
    card.click()
    ui.wait_value("ti_try_negative", r"^lowres ui-neg$")
    assert ui.value("ti_try_prompt") == "a photo of"
    ui.wait_text("ti_embeddings_insert_status", r"Added ui-neg to the Try-it negative prompt")
    card.click()
    ui.wait_value("ti_try_negative", r"^lowres$")


@pytest.mark.ui
def test_a_reloaded_page_shows_new_embeddings_without_refresh(ui, app, tiny_models):
    """An embedding written after the page was built (by another tab, the CLI, a copy) is in the Train
    picker and among the cards once the page is reloaded; nobody presses Refresh."""
    save_embedding(create_embedding(tiny_models["sd1"], "ui-reloaded", "dog", 2), app["root"] / "embeddings")
    ui.page.reload()
    ui.page.wait_for_selector("#ti_root", timeout=30_000)
    ui.tab("Train")
    options = _wait_for_option(ui, "ti_train_embedding", "ui-reloaded")
    assert ui.dropdown_value("ti_train_embedding") in options  # one is picked, ready to train
    card = ui.page.locator('#ti_embeddings_list .ti-card[data-ti-name="ui-reloaded"]')
    if ui.page.locator("#ti_embeddings_list").count():  # the hidden tab is built (gradio 3; 6 waits): filled
        card.wait_for(state="attached", timeout=10_000)
    ui.tab("Embeddings")
    card.wait_for(timeout=30_000)
    assert "2 vectors" in card.inner_text()


def _wait_for_option(ui: UiPage, elem_id: str, name: str, timeout: float = 30) -> list[str]:
    """Wait until the dropdown offers `name` (the page fills it after loading); returns its options."""
    deadline = time.monotonic() + timeout
    while name not in (options := ui.dropdown_options(elem_id)):
        assert time.monotonic() < deadline, f"#{elem_id} offers only {options}"
        ui.page.wait_for_timeout(300)
    return options


@pytest.mark.ui
def test_the_demo_model_flow_create_train_preview_card_into_try_it(browser, tmp_path, monkeypatch):
    """A newcomer with no checkpoint anywhere: the demo model is picked; Create, Train 10 steps with a
    preview, then the card's click puts the token into the Try-it prompt."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    port = free_port()
    demo = extension.main(["--port", str(port)], block=False)  # no --model, no folders: the defaults
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        loopback_only(page)
        ui = UiPage(page, f"http://127.0.0.1:{port}/").open()
        assert ui.dropdown_value("ti_model") == DEMO_LABEL
        ui.wait_text("ti_model_status", r"pictures are noise")
        ui.tab("Create")
        ui.fill("ti_create_name", "My Cat")
        ui.wait_text("ti_create_name_warning", r"warning: .*my_cat")  # live, while typing
        ui.fill("ti_create_name", "zzdemo")
        ui.fill("ti_create_init_text", "cat")
        ui.click("ti_create_button")
        ui.wait_text("ti_create_status", r"Created zzdemo", timeout=90)
        assert ui.text("ti_create_name_warning").strip() == ""
        ui.tab("Train")
        ui.fill("ti_train_dataset", make_dataset(tmp_path / "data"))
        ui.fill("ti_train_steps", 10)
        ui.fill("ti_train_resolution", 64)
        ui.fill("ti_train_save_every", 0)
        ui.fill("ti_train_preview_every", 5)
        ui.fill("ti_train_preview_steps", 2)
        ui.click("ti_train_button")
        ui.wait_text("ti_train_status", r"Trained zzdemo to step 10", timeout=180)
        page.wait_for_function("() => document.querySelectorAll('#ti_train_previews img').length >= 2")
        assert load_embedding(tmp_path / "embeddings" / "zzdemo.safetensors").step == 10
        ui.tab("Embeddings")
        ui.click("ti_embeddings_refresh")
        card = page.locator('#ti_embeddings_list .ti-card[data-ti-name="zzdemo"]')
        card.wait_for(timeout=30_000)
        ui.fill("ti_try_prompt", "a painting of")
        card.click()
        ui.wait_value("ti_try_prompt", r"^a painting of zzdemo$")
        # Try it starts at the demo model's own 64 px (not 512, minutes on a CPU) and shows it scaled up.
        assert ui.value("ti_try_width") == ui.value("ti_try_height") == "64"
        ui.click("ti_try_button")
        ui.wait_text("ti_try_status", r"seed 0, 20 steps with zzdemo", timeout=120)
        shown = page.locator("#ti_try_image img").first
        shown.wait_for(timeout=30_000)
        assert shown.evaluate("img => img.naturalWidth") == 64 and shown.bounding_box()["width"] >= 200
        ui.screenshot("demo-model")
        assert not ui.errors, f"errors in the page: {ui.errors}"
        context.close()
    finally:
        stop_app(demo)


@pytest.mark.ui
def test_export_button_writes_the_file_and_shows_the_diffusers_lines(ui, app, tiny_models):
    save_embedding(create_embedding(tiny_models["sd1"], "ui-export", "dog", 2), app["root"] / "embeddings")
    ui.tab("Embeddings")
    ui.click("ti_embeddings_refresh")
    ui.page.locator("#ti_inspect").get_by_text("Inspect and export").first.click()
    ui.choose("ti_inspect_name", "ui-export")  # waits until the page offers it
    ui.fill("ti_export_dir", str(app["root"] / "exports"))
    ui.click("ti_export_button")
    status = ui.wait_text("ti_export_status", r"Exported ui-export as diffusers")
    assert "load_textual_inversion" in status
    exported = app["root"] / "exports" / "ui-export.safetensors"
    assert exported.is_file() and load_embedding(exported).num_vectors == 2


def test_inspect_shows_norms_and_the_nearest_tokens(tiny_models, tmp_path):
    backend = extension.StandaloneBackend(embeddings_dir=tmp_path, log_dir=tmp_path / "log")
    backend._model = tiny_models["sd1"]  # as if loaded: inspect never loads a model by itself
    save_embedding(create_embedding(tiny_models["sd1"], "like-a-cat", "cat", 1), tmp_path)
    page = extension.inspect_action(backend, "like-a-cat")
    assert "<td>clip_l</td><td>0</td>" in page
    assert "cat (1.00)" in page  # an untrained vector is exactly the token it started from


def test_a_model_that_fails_to_load_is_one_status_line(tmp_path):
    backend = extension.StandaloneBackend(model=str(tmp_path / "missing"), embeddings_dir=tmp_path, log_dir=tmp_path)
    status, _ = extension.create_action(backend, "cat", "cat", 1, False)
    assert status.count("<div") == 1 and "missing" in status and "ti-status-error" in status


def test_standalone_binds_loopback_unless_told_to_listen(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(extension, "launch", lambda backend, *, host, port, block: seen.update(host=host, port=port))
    extension.main(["--embeddings-dir", str(tmp_path), "--port", "7999"], block=False)
    assert seen == {"host": "127.0.0.1", "port": 7999}
    extension.main(["--embeddings-dir", str(tmp_path), "--listen"], block=False)
    assert seen["host"] == "0.0.0.0"


@pytest.mark.ui
def test_inside_a_host_page_cards_write_to_the_last_focused_prompt(browser, tiny_models, tmp_path):
    """A web UI renders our Blocks inside its own page and injects ti.js; its prompts are txt2img's."""
    save_embedding(create_embedding(tiny_models["sd1"], "host-card", "dog", 1), tmp_path / "emb")
    backend = extension.Backend(tmp_path / "emb", tmp_path / "log")
    tab = extension.create_ui(backend)  # built before the page, as A1111 calls on_ui_tabs callbacks
    save_embedding(create_embedding(tiny_models["sd1"], "host-later", "cat", 1), tmp_path / "emb")  # after the build
    with gr.Blocks() as host_page:
        gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
        gr.Textbox(label="Negative prompt", elem_id="txt2img_neg_prompt")
        tab.render()
        host_page.load(None, None, None, **extension.js_kwargs(extension.client_script()))  # the host's <head> script
    with served_page(browser, host_page) as ui:
        page = ui.page
        ui.open()
        ui.tab("Embeddings")  # opening the tab fills the library
        card = page.locator('#ti_embeddings_list .ti-card[data-ti-name="host-card"]')
        card.wait_for(timeout=30_000)
        assert "no model loaded" in card.inner_text()  # the base Backend has none: no fit badge, no failure
        card.click()
        ui.wait_value("txt2img_prompt", r"^host-card$")
        ui.wait_text("ti_embeddings_insert_status", r"Added host-card to the txt2img prompt")
        ui.field("txt2img_neg_prompt").fill("blurry")
        card.click()
        ui.wait_value("txt2img_neg_prompt", r"^blurry host-card$")
        card.click()
        ui.wait_value("txt2img_neg_prompt", r"^blurry$")
        assert ui.value("txt2img_prompt") == "host-card"
        # The page load fills the Train picker inside the host's page too, with what the folder holds now.
        ui.tab("Train")
        _wait_for_option(ui, "ti_train_embedding", "host-later")
        # The progress poller runs inside the host's page too: it shows how the last run ended.
        _failed_run(tmp_path)
        ui.wait_text("ti_train_status", r"Training failed: no model in this test")
        assert not ui.errors


class _BesideTxt2img(extension.StandaloneBackend):
    """The standalone backend in a page with a web UI's txt2img tab, taken as the web-UI glue takes it."""

    has_try_it = has_model_picker = inject_assets = False

    def __init__(self, capture, **kwargs) -> None:
        super().__init__(**kwargs)
        self.capture = capture

    def txt2img_components(self):
        return self.capture.components()

    def txt2img_preview_settings(self, txt2img, fields):
        from ti_host.txt2img import preview_from_txt2img

        return preview_from_txt2img(self.capture.named_values(txt2img), fields)


@pytest.mark.ui
@pytest.mark.usefixtures("one_thread")
def test_train_takes_the_previews_from_the_txt2img_tab_as_typed_when_ticked(
    browser, tiny_models, tiny_model_dirs, tmp_path
):
    """A web UI builds txt2img (the glue keeps its components), then our tab, and renders both in one page."""
    from ti_host.txt2img import Txt2imgCapture

    capture = Txt2imgCapture()
    with gr.Blocks() as txt2img_tab:  # A1111 1.10's components, with their elem_ids
        for component in (
            gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=3),
            gr.Textbox(label="Negative prompt", elem_id="txt2img_neg_prompt", lines=3),
            gr.Dropdown(["DPM++ 2M", "Euler a", "Heun"], value="Euler a", elem_id="txt2img_sampling"),
            gr.Dropdown(["Automatic", "Karras"], value="Automatic", elem_id="txt2img_scheduler"),
            gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps"),
            gr.Slider(1.0, 30.0, value=7.0, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale"),
            gr.Number(label="Seed", value=-1, precision=0, elem_id="txt2img_seed"),
            gr.Slider(64, 2048, value=64, step=8, label="Width", elem_id="txt2img_width"),
            gr.Slider(64, 2048, value=64, step=8, label="Height", elem_id="txt2img_height"),
        ):
            capture.capture(component)
    emb, logs = tmp_path / "emb", tmp_path / "log"
    save_embedding(create_embedding(tiny_models["sd1"], "from-txt2img", "cat", 1), emb)
    backend = _BesideTxt2img(capture, model=str(tiny_model_dirs["sd1"]), embeddings_dir=emb, log_dir=logs)
    tab = extension.create_ui(backend)
    with gr.Blocks() as host_page:
        txt2img_tab.render()
        tab.render()
        host_page.load(None, None, None, **extension.js_kwargs(extension.client_script()))
    with served_page(browser, host_page) as ui:
        ui.open()
        ui.fill("txt2img_prompt", "a photo of from-txt2img\nin the snow")  # typed, never saved anywhere
        ui.fill("txt2img_neg_prompt", "blurry")
        ui.fill("txt2img_steps", 3)
        ui.fill("txt2img_cfg_scale", 5.5)
        ui.tab("Train")
        ui.choose("ti_train_embedding", "from-txt2img")
        ui.fill("ti_train_dataset", make_dataset(tmp_path / "data"))
        ui.fill("ti_train_steps", 2)
        ui.fill("ti_train_resolution", 64)
        ui.fill("ti_train_save_every", 0)
        ui.fill("ti_train_preview_every", 2)
        ui.fill("ti_train_preview_prompt", "the field's own prompt")
        ui.fill("ti_train_preview_seed", 1234)
        ui.check("ti_train_preview_txt2img")
        ui.click("ti_train_button")
        status = ui.wait_text("ti_train_status", r"Previews from the txt2img tab")
        assert "euler_a, 3 steps, CFG 5.5, seed 1234, 64x64" in status, status
        assert "the txt2img seed is random, so previews keep seed 1234" in status, status
        ui.wait_text("ti_train_status", r"Trained from-txt2img to step 2", timeout=120)
        saved = json.loads((logs / "from-txt2img" / "settings.json").read_text(encoding="utf-8"))
        assert saved["preview_prompt"] == "a photo of from-txt2img in the snow"
        assert saved["preview_negative_prompt"] == "blurry"
        assert (saved["preview_sampler"], saved["preview_steps"], saved["preview_guidance"]) == ("euler_a", 3, 5.5)
        assert (saved["preview_seed"], saved["preview_width"], saved["preview_height"]) == (1234, 64, 64)
        ui.screenshot(f"train-previews-from-txt2img-gradio{gr.__version__.split('.')[0]}")
        assert not ui.errors


@pytest.mark.ui
def test_a_card_goes_to_the_prompt_of_the_view_the_user_came_from(browser, tiny_models, tmp_path):
    """In a web UI the cards are on our tab, where every generate view is hidden: the token goes to the
    prompt of the view last on screen (txt2img, img2img, SD.Next's control view), or to the box last
    focused there, not to the first prompt in the page; the status names the box."""
    save_embedding(create_embedding(tiny_models["sd1"], "view-card", "dog", 1), tmp_path / "emb")
    tab = extension.create_ui(extension.Backend(tmp_path / "emb", tmp_path / "log"))
    with gr.Blocks() as host_page:
        with gr.Tabs():
            with gr.Tab("Text"):
                gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
            with gr.Tab("Image"):
                gr.Textbox(label="Prompt", elem_id="img2img_prompt")
                gr.Textbox(label="Negative prompt", elem_id="img2img_neg_prompt")
            with gr.Tab("Control"):
                gr.Textbox(label="Prompt", elem_id="control_prompt")
                gr.Textbox(label="Negative prompt", elem_id="control_neg_prompt")
            with gr.Tab("Textual Inversion"):
                tab.render()
        host_page.load(None, None, None, **extension.js_kwargs(extension.client_script()))
    with served_page(browser, host_page) as ui:
        page = ui.page
        page.goto(ui.url)
        page.wait_for_selector("#txt2img_prompt", timeout=30_000)
        card = page.locator('#ti_embeddings_list .ti-card[data-ti-name="view-card"]')

        def host_tab(label):
            page.get_by_role("tab", name=label).or_(page.locator(".tab-nav button", has_text=label)).first.click()

        def click_card():
            host_tab("Textual Inversion")
            ui.tab("Embeddings")
            card.wait_for(timeout=30_000)
            card.click()

        host_tab("Control")
        ui.field("control_prompt").wait_for(timeout=10_000)
        page.wait_for_timeout(600)  # the script notes the view on screen a few times a second
        click_card()
        ui.wait_text("ti_embeddings_insert_status", r"Added view-card to the control prompt")
        assert ui.value("control_prompt") == "view-card"
        host_tab("Image")
        ui.field("img2img_neg_prompt").fill("blurry")  # typed in: the focused box wins
        click_card()
        ui.wait_value("img2img_neg_prompt", r"^blurry view-card$")
        ui.wait_text("ti_embeddings_insert_status", r"Added view-card to the img2img negative prompt")
        assert ui.value("img2img_prompt") == "" and ui.value("control_prompt") == "view-card"
        assert ui.value("txt2img_prompt") == ""
        assert not ui.errors


def _failed_run(tmp_path):
    def no_model():
        raise ValueError("no model in this test")

    (tmp_path / "images").mkdir(exist_ok=True)
    config = TrainConfig.from_dict(
        {"name": "nothing", "embeddings_dir": str(tmp_path), "data": {"images": str(tmp_path / "images")}}
    )
    assert extension.TrainingJob.start(no_model, config).wait(30)


def test_the_host_sees_progress_and_its_interrupt_button_stops_the_run(monkeypatch, tiny_models, tmp_path):
    import ti_core.train
    from ti_core.train import TrainEvent, TrainResult

    def fake_train(model, config, callback=None, *, cancel=None, accelerator=None):
        for step in range(1, 1000):
            if cancel.is_set():
                return TrainResult(None, step - 1, "interrupted", f"Training interrupted at step {step - 1}", tmp_path)
            callback(TrainEvent("step", step, config.steps, loss=0.1, lr=0.005))
            time.sleep(0.01)
        return TrainResult(None, 999, "done", "done", tmp_path)

    class Host(extension.Backend):
        reports: list = []

        def current_model(self):
            return tiny_models["sd1"]

        def report(self, snapshot):
            self.reports.append(snapshot["step"])

        def interrupt_requested(self):  # the host's own Interrupt button, pressed once it has shown progress
            return any(self.reports)

    monkeypatch.setattr(ti_core.train, "train", fake_train)
    host = Host(tmp_path / "emb", tmp_path / "log")
    save_embedding(create_embedding(tiny_models["sd1"], "cat", "cat", 1), host.embeddings_dir)
    images = make_dataset(tmp_path / "images")
    status = extension.start_training(host, False, "cat", *tab_values(data__images=str(images), steps=999))
    assert "Training cat to step 999" in status
    assert extension.current_job().wait(30)
    stopped_at = extension.current_job().snapshot()["step"]
    # The host's progress followed the run (several times a second, not once per step) and its button stopped it.
    assert host.reports == sorted(host.reports) and 0 < host.reports[-1] == stopped_at < 999
    assert extension.current_job().snapshot()["message"] == f"Training interrupted at step {stopped_at}"


TESTS = Path(__file__).resolve().parent
BROWSER_AFTER_THE_REAL_HOSTS = """
import sys

sys.path.insert(0, {tests!r})
from ui_helpers import chromium_browser


def test_a_browser_opens_after_the_real_host_tests():
    with chromium_browser() as browser:
        page = browser.new_page()
        page.set_content("<p id=shown>opened</p>")
        assert page.inner_text("#shown") == "opened"
"""


@pytest.mark.ui
def test_without_the_host_kit_the_real_host_tests_skip_and_later_browser_tests_run(tmp_path):
    """The README's test command on a clone without the kit: tests/real_hosts skips, saying why, and opens no
    browser that would stop the next module's (playwright's sync API refuses to start inside a running one)."""
    require_chromium()
    require_module("playwright.sync_api")
    probe = tmp_path / "test_browser_probe.py"
    probe.write_text(BROWSER_AFTER_THE_REAL_HOSTS.format(tests=str(TESTS)), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TI_", "PYTEST_"))}
    for host in ("A1111", "FORGE", "SDNEXT"):  # none of the web UI kits beside this clone
        env[f"TI_{host}_KIT"] = str(tmp_path / "no-kit")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", str(TESTS / "real_hosts"), str(probe)],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-3000:]
    assert re.search(r"\b1 passed\b", summary) and "skipped" in summary and "error" not in summary, summary
    for host in ("a1111", "forge", "sdnext"):
        assert f"the {host} host kit is not at {tmp_path / 'no-kit'}" in done.stdout


# ------------------------------------------------------------------------ the Train tab's loose ends, no browser


def unchanged(update) -> bool:
    """gr.update() with nothing in it: the component keeps what it shows."""
    return isinstance(update, dict) and {key for key in update if key != "__type__"} == set()


class TinyBackend(extension.Backend):
    def __init__(self, model, root):
        super().__init__(root / "embeddings", root / "log")
        self.model = model

    def current_model(self):
        return self.model


def test_the_train_picker_preselects_the_embedding_written_last(tiny_models, tmp_path):
    import os

    backend = TinyBackend(tiny_models["sd1"], tmp_path)
    for name, stamp in {"zz_old": 1_500_000_000, "mm_new": 1_500_000_100, "aa_older": 1_000_000_000}.items():
        path = save_embedding(create_embedding(tiny_models["sd1"], name, "cat", 1), backend.embeddings_dir)
        os.utime(path, (stamp, stamp))
    assert extension_actions.page_load_action(backend)[0]["value"] == "mm_new"  # not aa_older, the first by name
    status, picker = extension.create_action(backend, "bb_just_made", "cat", 1, False)
    assert picker["value"] == "bb_just_made" and "(1 vector," in status
    assert extension_actions.page_load_action(backend)[0]["value"] == "bb_just_made"  # after a reload too


@pytest.mark.parametrize("vectors", [0, 76, 2.5])
def test_typed_vectors_out_of_range_are_the_clis_one_line_error(tmp_path, vectors):
    backend = extension.StandaloneBackend(**_nowhere_else(tmp_path))
    status, picker = extension.create_action(backend, "typed", "cat", vectors, False)
    assert status == (
        f'<div class="ti-status ti-status-error">vectors per token must be between 1 and 75, not {vectors}</div>'
    )
    assert unchanged(picker) and not (tmp_path / "e").exists()


def test_an_invalid_name_says_why_instead_of_suggesting_a_worse_one():
    status = extension_actions.name_warning_action("..")
    assert "ti-status-error" in status and "contains &#x27;..&#x27;" in status and "_ti" not in status


def test_export_with_the_default_folder_works_for_every_format(tiny_models, tmp_path):
    backend = TinyBackend(tiny_models["sd1"], tmp_path)
    save_embedding(create_embedding(tiny_models["sd1"], "circle_ti", "circle", 1), backend.embeddings_dir)
    for to in ("diffusers", "a1111-pt", "image"):
        status = extension_actions.export_action(backend, "circle_ti", to, "", False)
        assert "ti-status-ok" in status, status
    exports = tmp_path / "log" / "exports"
    assert sorted(path.relative_to(exports).as_posix() for path in exports.rglob("*.*")) == [
        "a1111-pt/circle_ti.pt",
        "diffusers/circle_ti.safetensors",
        "image/circle_ti.png",
    ]


def test_try_it_starts_at_the_models_own_resolution(tmp_path):
    backend = extension.StandaloneBackend(**_nowhere_else(tmp_path))  # the demo model: 64 px
    demo = extension.create_ui(backend)
    sizes = {
        block.elem_id: block.value
        for block in demo.blocks.values()
        if getattr(block, "elem_id", None) in ("ti_try_width", "ti_try_height")
    }
    assert sizes == {"ti_try_width": 64, "ti_try_height": 64}


def test_a_start_that_fails_on_its_input_is_one_line_and_leaves_no_folder(tiny_models, tmp_path, capfd):
    backend = TinyBackend(tiny_models["sd1"], tmp_path)
    save_embedding(create_embedding(tiny_models["sd1"], "cat", "cat", 1), backend.embeddings_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    before = extension.current_job()
    for folder, message in [
        (tmp_path / "missing", f"images: {tmp_path / 'missing'} is not a folder"),
        (tmp_path / "empty", f"no images (.png, .jpg, .jpeg, .webp, .bmp) in {tmp_path / 'empty'}"),
    ]:
        status = extension.start_training(backend, False, "cat", *tab_values(data__images=str(folder), steps=2))
        assert "ti-status-error" in status and message in status, status
    assert extension.current_job() is before  # refused before any run started
    assert not (tmp_path / "log").exists()

    # A run that fails inside (the files changed after the click): one console line, no traceback, no folder.
    config = TrainConfig.from_dict(
        {"name": "cat", "embeddings_dir": str(backend.embeddings_dir), "log_dir": str(backend.log_dir),
         "resume": True, "data": {"images": str(tmp_path / "empty"), "resolution": 64}}
    )  # fmt: skip
    capfd.readouterr()
    job = extension.TrainingJob.start(backend.current_model, config)
    assert job.wait(60)
    err = capfd.readouterr().err
    (line,) = err.strip().splitlines()
    assert line == f"Training cat failed: no images (.png, .jpg, .jpeg, .webp, .bmp) in {tmp_path / 'empty'}"
    assert not (tmp_path / "log").exists()


def _train_values(images, **changes):
    settings = {"data__images": str(images), "data__resolution": 64, "save_every": 0, "preview_every": 1,
                "preview_steps": 1, **changes}  # fmt: skip
    return tab_values(**settings)


def _poll_until_done(seen):
    job = extension.current_job()
    assert job.wait(300)
    return extension.poll_training(seen)


@pytest.mark.usefixtures("one_thread")
def test_compare_snapshots_shows_the_grid_first_and_keeps_the_loss_history(tiny_models, tmp_path):
    from ti_ui.actions import compare_action

    backend = TinyBackend(tiny_models["sd1"], tmp_path)
    images = make_dataset(tmp_path / "images")
    save_embedding(create_embedding(tiny_models["sd1"], "cat", "cat", 1), backend.embeddings_dir)
    assert "no snapshots" in compare_action(backend, "cat", list(extension.TRAIN_FIELDS), *_train_values(images))
    values = _train_values(images, steps=3, save_every=1, preview_every=0)
    assert "Training cat" in extension.start_training(backend, False, "cat", *values)
    _, _, _, _, _, *_, seen = _poll_until_done({})
    fields = dict(zip(extension.TRAIN_FIELDS, values, strict=True))
    fields.update({"data.images": "", "preview_prompt": "cat on grass"})  # a comparison needs no dataset
    status = compare_action(backend, "cat", list(fields), *fields.values())
    assert "Comparing the snapshots of cat" in status
    progress, plot, gallery, status, result, *_, norm_plot, seen = _poll_until_done(seen)
    assert "Compared 3 snapshots of cat" in status and "ti-status-ok" in status
    assert [caption for _, caption in gallery] == ["cat-snapshots"]
    assert list(plot[plot["curve"] == "each step"]["step"]) == [1, 2, 3]  # the run's loss history stays
    assert unchanged(norm_plot) and result.endswith("cat.safetensors")  # the run's norms and file stay
    with Image.open(tmp_path / "log" / "cat" / "images" / "cat-snapshots.png") as grid:
        assert grid.height == 3 * 64


@pytest.mark.usefixtures("one_thread")
def test_after_resume_and_refusals_the_plot_and_previews_show_the_whole_history(tiny_models, tmp_path):
    backend = TinyBackend(tiny_models["sd1"], tmp_path)
    images = make_dataset(tmp_path / "images")
    save_embedding(create_embedding(tiny_models["sd1"], "cat", "cat", 1), backend.embeddings_dir)
    assert "Training cat to step 2" in extension.start_training(backend, False, "cat", *_train_values(images, steps=2))
    progress, plot, gallery, status, result, *_, seen = _poll_until_done({})
    assert list(plot[plot["curve"] == "each step"]["step"]) == [1, 2]
    assert [caption for _, caption in gallery] == ["cat-by-step", "cat-2", "cat-1"]  # the comparison first

    status = extension.start_training(backend, True, "cat", *_train_values(images, steps=4))
    assert "Resuming cat to step 4" in status
    progress, plot, gallery, status, result, *_, seen = _poll_until_done(seen)
    assert list(plot[plot["curve"] == "each step"]["step"]) == [1, 2, 3, 4]  # not only the resumed steps
    assert [caption for _, caption in gallery] == ["cat-by-step", "cat-4", "cat-3", "cat-2", "cat-1"]
    with Image.open(tmp_path / "log" / "cat" / "images" / "cat-by-step.png") as grid:
        assert grid.height == 4 * 64  # the resumed run's grid compares all four steps
    assert "Step 4 / 4" in progress and "ti-status-ok" in status

    # A refused Resume (nothing left to train) is one line; the finished run stays on screen.
    job = extension.current_job()
    status = extension.start_training(backend, True, "cat", *_train_values(images, steps=4))
    assert "already trained to step 4: set Steps above 4" in status and extension.current_job() is job
    assert all(unchanged(update) for update in extension.poll_training(seen)[:8])

    # A run refused inside the job (before its first step) shows its refusal and leaves the rest as it was.
    (tmp_path / "other").mkdir()
    _failed_run(tmp_path / "other")
    progress, plot, gallery, status, result, *buttons, seen = extension.poll_training(seen)
    assert "no model in this test" in status and "ti-status-error" in status
    assert unchanged(progress) and unchanged(plot) and unchanged(gallery) and unchanged(result)
    # A page opened now shows that embedding's own history (none) and no stale "Step 0 / 10".
    progress, plot, gallery, *_ = extension.poll_training({})
    assert "Step 0" not in progress and plot is None and gallery == []


def test_an_interrupted_run_is_said_as_a_warning_not_faint_text(monkeypatch, tiny_models, tmp_path):
    import ti_core.train
    from ti_core.train import TrainEvent, TrainResult

    def interrupted(model, config, callback=None, *, cancel=None, accelerator=None):
        callback(TrainEvent("start", 0, config.steps, message="start"))
        callback(TrainEvent("step", 1, config.steps, loss=0.1, lr=0.005))
        return TrainResult(None, 1, "interrupted", "Training interrupted at step 1", tmp_path)

    monkeypatch.setattr(ti_core.train, "train", interrupted)
    backend = TinyBackend(tiny_models["sd1"], tmp_path)
    save_embedding(create_embedding(tiny_models["sd1"], "cat", "cat", 1), backend.embeddings_dir)
    extension.start_training(backend, False, "cat", *_train_values(make_dataset(tmp_path / "images"), steps=5))
    status = _poll_until_done({})[3]
    assert status == '<div class="ti-status ti-status-warning">Training interrupted at step 1</div>'


@pytest.mark.ui
def test_in_the_page_the_train_tab_keeps_the_embeddings_history(ui, app):
    """Created last, so preselected after a reload; trained, resumed, then a refused resume: the previews
    and the progress still show all of it, with the refusal above."""
    _create(ui, "zz-history", 1)
    ui.click("ti_create_button")
    ui.wait_text("ti_create_status", r"Created zz-history")
    ui.open()  # a reloaded page: the picker holds the embedding created last, not the first by name
    ui.tab("Train")
    picked = "() => document.querySelector('#ti_train_embedding input').value"
    ui.page.wait_for_function(f"{picked} !== ''", timeout=30_000)  # the page fills it after loading
    assert ui.dropdown_value("ti_train_embedding") == "zz-history"
    _train_form(ui, app, steps=2, preview_every=1)
    ui.fill("ti_train_preview_steps", 1)
    ui.click("ti_train_button")
    ui.wait_text("ti_train_status", r"Trained zz-history to step 2", timeout=120)
    ui.fill("ti_train_steps", 4)
    ui.click("ti_train_resume")
    ui.wait_text("ti_train_status", r"Trained zz-history to step 4", timeout=120)
    previews = "() => document.querySelectorAll('#ti_train_previews img').length"
    ui.page.wait_for_function(f"{previews} === 5")  # steps 1-4 (not only the resumed 3 and 4) and their grid
    ui.click("ti_train_resume")  # nothing left to train: refused
    ui.wait_text("ti_train_status", r"already trained to step 4: set Steps above 4")
    ui.page.wait_for_timeout(2500)  # two polls: nothing of the finished run is wiped
    assert ui.page.evaluate(previews) == 5
    assert re.search(r"Step 4 / 4.*took", ui.text("ti_train_progress"))
    ui.screenshot("train-history-after-a-refused-resume")


@pytest.mark.usefixtures("one_thread")
def test_the_train_tab_plots_the_norm_ratio_and_warns_past_the_threshold(tiny_models, tmp_path):
    from ti_core.editability import NORM_WARNING_RATIO

    backend = TinyBackend(tiny_models["sd1"], tmp_path)
    images = make_dataset(tmp_path / "images")
    save_embedding(create_embedding(tiny_models["sd1"], "loud", "", 1), backend.embeddings_dir)
    values = _train_values(images, steps=3, preview_every=0, method="plain", learning_rate="0.5")
    assert "Training loud" in extension.start_training(backend, False, "loud", *values)
    progress, *_, norm_plot, _seen = _poll_until_done({})
    vector = norm_plot[norm_plot["curve"] == "largest vector"]
    assert list(vector["step"]) == [1, 2, 3] and vector["norm"].iloc[-1] > NORM_WARNING_RATIO
    assert set(norm_plot[norm_plot["curve"] == "warning threshold"]["norm"]) == {NORM_WARNING_RATIO}
    assert "× the vocabulary" in progress and "may overpower other words" in progress

    save_embedding(create_embedding(tiny_models["sd1"], "quiet", "cat", 1), backend.embeddings_dir)
    values = _train_values(images, steps=3, preview_every=0, learning_rate="0.5")  # auto: directional
    assert "Training quiet" in extension.start_training(backend, False, "quiet", *values)
    progress, *_, norm_plot, _seen = _poll_until_done({})
    assert list(norm_plot[norm_plot["curve"] == "largest vector"]["norm"]) == pytest.approx([1.0] * 3, rel=1e-3)
    assert "may overpower" not in progress


# ------------------------------------------------------------------------------ snapshots, rename and delete


def _run_with_snapshots(tiny_models, root):
    """`cat` in root/emb and its run's snapshots at steps 20 and 40 in root/log/cat (vectors of 20 and 40)."""
    import torch

    embedding = create_embedding(tiny_models["sd1"], "cat", "cat", 1)
    save_embedding(embedding, root / "emb")
    for step in (20, 40):
        vectors = {key: torch.full_like(tensor, float(step)) for key, tensor in embedding.vectors.items()}
        snapshot = type(embedding)(name="cat", vectors=vectors, step=step)
        save_embedding(snapshot, root / "log" / "cat")
        (root / "log" / "cat" / "cat.safetensors").rename(root / "log" / "cat" / f"cat-{step}.safetensors")
    return extension.Backend(root / "emb", root / "log")


def _first_value(path) -> float:
    return float(next(iter(load_embedding(path).vectors.values()))[0, 0])


def test_a_snapshot_picked_in_the_train_tab_becomes_the_embedding(tiny_models, tmp_path):
    backend = _run_with_snapshots(tiny_models, tmp_path)
    assert extension_actions.snapshot_steps(backend, "cat") == (["20", "40"], "40")
    status = extension_actions.promote_action(backend, "cat", "20")
    assert "ti-status-ok" in status and "step 20" in status
    assert _first_value(tmp_path / "emb" / "cat.safetensors") == 20.0
    assert (tmp_path / "textual_inversion_trash" / "cat.safetensors").is_file()  # the old one kept
    status = extension_actions.promote_action(backend, "cat", "30")
    assert "ti-status-error" in status and "cat-30.safetensors" in status


def test_rename_and_delete_in_the_embeddings_tab_refresh_the_cards(tiny_models, tmp_path):
    backend = _run_with_snapshots(tiny_models, tmp_path)
    save_embedding(create_embedding(tiny_models["sd1"], "dog", "dog", 1), tmp_path / "emb")
    status, cards, picker = extension_actions.rename_action(backend, "cat", "dog")
    assert "ti-status-error" in status and "already exists" in status and "cat" in cards
    status, cards, picker = extension_actions.rename_action(backend, "cat", "kitty")
    assert "ti-status-ok" in status and "kitty" in cards and picker["choices"] == ["dog", "kitty"]
    status, cards, picker = extension_actions.delete_action(backend, "kitty")
    assert "ti-status-ok" in status and "textual_inversion_trash" in status and picker["choices"] == ["dog"]
    assert (tmp_path / "textual_inversion_trash" / "kitty.safetensors").is_file()
    assert sorted(path.name for path in (tmp_path / "emb").iterdir()) == ["dog.safetensors"]


@pytest.mark.ui
def test_in_the_page_a_card_is_renamed_deleted_and_a_snapshot_promoted(ui, app, tiny_models):
    root = app["root"]
    _run_with_snapshots(tiny_models, root / "page")
    (root / "embeddings").mkdir(exist_ok=True)
    (root / "page" / "emb" / "cat.safetensors").rename(root / "embeddings" / "snapcat.safetensors")
    (root / "logs" / "snapcat").mkdir(parents=True)
    for step in (20, 40):
        source = root / "page" / "log" / "cat" / f"cat-{step}.safetensors"
        source.rename(root / "logs" / "snapcat" / f"snapcat-{step}.safetensors")
    ui.page.reload()
    ui.tab("Train")
    ui.choose("ti_train_embedding", "snapcat")
    ui.page.wait_for_function("() => document.querySelector('#ti_snapshot_pick input')?.value === '40'")
    ui.click("ti_snapshot_promote")
    ui.wait_text("ti_snapshot_status", r"snapcat\.safetensors is now the snapshot of step 40")
    assert _first_value(root / "embeddings" / "snapcat.safetensors") == 40.0
    ui.tab("Embeddings")
    ui.click("ti_embeddings_refresh")
    ui.page.locator("#ti_inspect").get_by_text("rename and delete").first.click()
    ui.choose("ti_inspect_name", "snapcat")
    ui.fill("ti_embeddings_rename_name", "snapcat2")
    ui.click("ti_embeddings_rename")
    ui.wait_text("ti_embeddings_file_status", r"Renamed snapcat to snapcat2")
    ui.wait_text("ti_embeddings_list", r"snapcat2")
    ui.choose("ti_inspect_name", "snapcat2")
    ui.click("ti_embeddings_delete")
    ui.wait_text("ti_embeddings_file_status", r"Moved snapcat2 to .*textual_inversion_trash")
    assert not (root / "embeddings" / "snapcat2.safetensors").exists()
    assert (root / "textual_inversion_trash" / "snapcat2.safetensors").is_file()


@pytest.mark.ui
def test_presets_load_into_the_fields_and_save_beside_the_log_folder(ui, app):
    ui.tab("Train")
    assert {"SDXL subject", "style (8-16 vectors)", "subject (1-4 vectors)"} <= set(
        ui.dropdown_options("ti_train_preset")
    )
    ui.page.locator("#ti_train_advanced .label-wrap").first.click()  # open Advanced
    if not torch.cuda.is_available():
        assert "adamw8bit" not in ui.dropdown_options("ti_train_optimizer")
    ui.choose("ti_train_preset", "style (8-16 vectors)")
    ui.click("ti_train_preset_load")
    ui.wait_text("ti_train_status", r"Loaded preset style \(8-16 vectors\)")
    ui.wait_value("ti_train_steps", r"^3000$")
    assert ui.dropdown_value("ti_train_lr_scheduler") == "cosine"
    assert ui.value("ti_train_learning_rate") == "0.002"

    ui.fill("ti_train_steps", 1234)
    ui.choose("ti_train_optimizer", "adafactor")
    ui.fill("ti_train_preset_name", "bad/name")
    ui.click("ti_train_preset_save")
    ui.wait_text("ti_train_status", r"^preset name: .*path separator")
    ui.fill("ti_train_preset_name", "my style")
    ui.click("ti_train_preset_save")
    ui.wait_text("ti_train_status", r"Saved preset .*my style\.json")
    saved = json.loads((app["root"] / "presets" / "my style.json").read_text())
    assert (saved["steps"], saved["optimizer"], saved["lr_scheduler"]) == (1234, "adafactor", "cosine")
    assert "images" not in saved["data"] and "name" not in saved
    assert ui.dropdown_value("ti_train_preset") == "my style"

    ui.choose("ti_train_preset", "subject (1-4 vectors)")
    ui.click("ti_train_preset_load")
    ui.wait_value("ti_train_steps", r"^1500$")
    ui.choose("ti_train_preset", "my style")
    ui.click("ti_train_preset_load")
    ui.wait_value("ti_train_steps", r"^1234$")
    assert ui.dropdown_value("ti_train_optimizer") == "adafactor"
