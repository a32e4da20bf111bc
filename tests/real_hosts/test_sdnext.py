"""The extension inside the real SD.Next (vladmandic/sdnext 058a7f0, gradio 3.43.2, diffusers backend), from
this working tree, on the kit's tiny random SD1.5 (and tiny SDXL), driven through its API and headless
Chromium, in its default Modern UI and in `--theme standard`.

The tiny models suffice here: what is checked is the glue (install, listing, sharing the loaded pipeline,
leaving it as it was, the page). Memory and time of a full-size SD1.5 are measured by bench/host_memory.py
(`--host sdnext`), not here: a full-size SD.Next takes 5 GiB idle and half a minute per 2-step image on two
cores.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from a1111_kit import HttpError
from sdnext_kit import (
    DEST_ENV,
    HOST_PACKAGES,
    PORT_ENV,
    TINY_SDXL,
    Kit,
    default_dest,
    kit_folder,
    required,
)
from ui_helpers import ARTIFACTS, free_port, loopback_only, make_dataset

BASELINE_PROMPT = "a lighthouse on a cliff at dusk"
PAGE_TIMEOUT_MS = 600_000  # SD.Next's page on a busy 2-core machine


@pytest.fixture(scope="module")
def sdnext_kit() -> Kit:
    folder = kit_folder()
    if not (folder / "setup.sh").is_file():
        why = f"the sdnext host kit is not at {folder} (put ../shared beside the checkout, or set TI_SDNEXT_KIT)"
        if required():
            pytest.fail(f"TI_REQUIRE_SDNEXT=1, but {why}")
        pytest.skip(why)
    if not (required() or os.environ.get(DEST_ENV)):
        # Building SD.Next takes about 9 minutes and 3.3 GB: only when asked to.
        pytest.skip(f"set {DEST_ENV} to a built sdnext kit, or TI_REQUIRE_SDNEXT=1 to build one")
    kit = Kit(folder, Path(os.environ.get(DEST_ENV) or default_dest(folder)))
    kit.build()
    return kit


@pytest.fixture(scope="module")
def sdnext_workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdnext")
    (root / "embeddings").mkdir()
    return {"embeddings": root / "embeddings", "data": make_dataset(root / "data"), "root": root}


@pytest.fixture(scope="module")
def sdnext_installed(sdnext_kit) -> dict:
    """The extension from this working tree, on SD.Next as users get it: without the CLIP package our
    install.py adds (SD.Next has none), which an earlier start of this DEST installed."""
    if sdnext_kit.has("openai-clip"):
        sdnext_kit.pip("uninstall", "-y", "openai-clip")
    before = sdnext_kit.versions()
    sdnext_kit.install_extension()
    return {"before": before}


def _start(kit: Kit, workspace, **kwargs):
    port = int(os.environ.get(PORT_ENV) or free_port())
    server = kit.start(port, workspace["embeddings"], **kwargs)
    try:
        server.wait_ready()
        _wait_embeddings_listing(server)
    except BaseException:
        kit.stop()
        raise
    return server


def _wait_embeddings_listing(server, timeout: float = 300) -> None:
    """The API answers before SD.Next has loaded its model and embeddings: until then the listing is empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "loaded" in server.embeddings():
                return
        except (OSError, HttpError):
            pass
        time.sleep(1)


@pytest.fixture(scope="module")
def sdnext(sdnext_kit, sdnext_installed, sdnext_workspace):
    """SD.Next in its default Modern UI on the tiny SD1.5, started as a user starts it (installers run)."""
    server = _start(sdnext_kit, sdnext_workspace)
    server.baseline = server.txt2img(BASELINE_PROMPT)
    server.after = sdnext_kit.versions()
    yield server
    sdnext_kit.stop()
    sdnext_kit.set_options(embeddings_dir=None)  # SD.Next's own folder again for whoever starts it next


def _open(browser, server, tab_button: str, shown: str = "#ti_root"):
    """A page of SD.Next, usable (its splash gone), with `tab_button` clicked (ours by default) and `shown`
    on screen."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    loopback_only(page)  # the page runs offline: anything else is refused at once, not waited for
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url + "/", timeout=120_000)
    page.wait_for_selector("#splash", state="detached", timeout=PAGE_TIMEOUT_MS)
    page.locator(tab_button).first.click()
    page.wait_for_selector(shown, state="visible", timeout=120_000)
    return context, page, errors


def _ours(page):
    from ui_helpers import UiPage

    ui = UiPage(page, "")
    return ui


def _api_run(server, name: str, data: Path, steps: int = 4) -> dict:
    started = time.time()
    server.call("POST", "/ti/v1/train", {"name": name, "data": {"images": str(data), "resolution": 64},
                                        "steps": steps, "preview_every": 0, "save_every": 0})  # fmt: skip
    return server.wait_run(started, timeout=1200)


# ---- install, listing, the prompt ---------------------------------------------------------------------


def test_sdnext_runs_install_py_which_adds_only_what_is_missing(sdnext, sdnext_kit, sdnext_installed):
    before, after = sdnext_installed["before"], sdnext.after
    changed = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
    assert not changed & set(HOST_PACKAGES), {name: (before.get(name), after.get(name)) for name in changed}
    assert all(before.get(name) is None for name in changed), changed  # added, never replaced
    assert f"Extension installed packages: {sdnext_kit.extension.name}" in sdnext_kit.installed_line()


def test_an_untrained_embedding_gives_the_pixels_of_its_init_text(sdnext):
    created = sdnext.call("POST", "/ti/v1/create", {"name": "sdn-tree", "init_text": "tree", "vectors": 1})
    assert "sdn-tree" in str(created)
    assert "sdn-tree" in sdnext.embeddings()["loaded"]  # SD.Next lists it at once, no restart or refresh
    _info, with_embedding = sdnext.txt2img("a sdn-tree on a hill")
    _info, with_words = sdnext.txt2img("a tree on a hill")
    assert with_embedding == with_words


# ---- a run on SD.Next's own pipeline -----------------------------------------------------------------


def test_a_run_trains_on_the_loaded_pipeline_and_leaves_it_as_it_was(sdnext, sdnext_workspace):
    digest_before = sdnext.call("GET", "/ti-test/v1/weights-digest")
    snapshot = _api_run(sdnext, "sdn-api", sdnext_workspace["data"])
    assert snapshot["stopped"] == "done", snapshot
    digest_after = sdnext.call("GET", "/ti-test/v1/weights-digest")
    assert digest_after["sha256"] == digest_before["sha256"]  # SD.Next's weights, bitwise
    assert digest_after["model_id"] == digest_before["model_id"]  # the same pipeline: not unloaded, reloaded
    assert "sdn-api" in sdnext.embeddings()["loaded"]
    log = sdnext.log.read_text(errors="replace")
    assert "shared with the trainer (no copy)" in log or "cannot be shared" not in log
    assert sdnext.txt2img(BASELINE_PROMPT)[1] == sdnext.baseline[1]  # it generates as before


# ---- the page: Modern UI --------------------------------------------------------------------------------


def test_modern_ui_tab_progress_in_two_sessions_cards_and_layout(sdnext, sdnext_workspace, browser):
    button = 'button[tabitemid*="#tab_ti_tab_tabitem"]'
    sdnext.call("POST", "/ti/v1/create", {"name": "sdn-ui", "init_text": "cat", "vectors": 1})
    first, page, errors = _open(browser, sdnext, button)
    second, other, other_errors = _open(browser, sdnext, button)
    try:
        label = page.locator(button).first
        assert "Textual Inversion" in (label.inner_text() + (label.get_attribute("title") or ""))
        ui, watcher = _ours(page), _ours(other)
        ui.tab("Train")
        watcher.tab("Train")
        # The loss plot stays in its column: the form beside it can be clicked and typed into.
        ui.field("ti_train_dataset").click(timeout=120_000)  # nothing covers it (no "intercepts pointer events")
        form = page.locator("#ti_train_settings").first.bounding_box()
        for plot_id in ("ti_train_loss_plot", "ti_train_norm_plot"):
            plot = page.locator(f"#{plot_id}").first.bounding_box()
            assert not _overlap(plot, form), (plot_id, plot, form)  # beside the form or under it, as the width allows
        ui.fill("ti_train_dataset", sdnext_workspace["data"])
        ui.fill("ti_train_steps", 3)
        ui.fill("ti_train_resolution", 64)
        ui.fill("ti_train_preview_every", 0)
        ui.fill("ti_train_save_every", 0)
        ui.choose("ti_train_embedding", "sdn-ui")
        ui.click("ti_train_button")
        watcher.wait_text("ti_train_progress", r"Step [1-3] / 3", timeout=600)
        ui.wait_text("ti_train_progress", r"Step 3 / 3.*took", timeout=600)
        watcher.wait_text("ti_train_progress", r"Step 3 / 3.*took", timeout=60)
        status = watcher.wait_text("ti_train_status", r"Trained sdn-ui to step 3")
        _assert_readable(page, "ti_train_status")
        assert "sdn-ui" in sdnext.embeddings()["loaded"]
        assert "sdn-ui" in status

        ui.tab("Embeddings")
        card = page.locator('#ti_embeddings_list .ti-card[data-ti-name="sdn-ui"]')
        card.wait_for(timeout=60_000)
        assert "no model loaded" not in card.inner_text()  # cards say whether it fits the loaded model
        card.click()
        ui.wait_text("ti_embeddings_insert_status", r"Added sdn-ui to the Generate prompt")
        assert re.search(r"\bsdn-ui\b", page.locator("#control_prompt textarea").first.input_value())
        assert "sdn-ui" not in page.locator("#txt2img_prompt textarea").first.input_value()
        assert not errors and not other_errors, errors + other_errors
    finally:
        first.close()
        second.close()


def _overlap(a: dict, b: dict) -> bool:
    def apart(start_a, size_a, start_b, size_b):
        return start_a + size_a <= start_b + 1 or start_b + size_b <= start_a + 1

    return not (apart(a["x"], a["width"], b["x"], b["width"]) or apart(a["y"], a["height"], b["y"], b["height"]))


def _assert_readable(page, elem_id: str) -> None:
    """The text differs clearly in lightness from what it is drawn on (dark themes included)."""
    colours = page.locator(f"#{elem_id} .ti-status").first.evaluate(
        """element => {
            const rgb = text => (text.match(/[\\d.]+/g) || []).slice(0, 4).map(Number);
            let node = element, background = null;
            while (node && node.nodeType === 1) {
                const value = rgb(getComputedStyle(node).backgroundColor);
                if (value.length === 3 || (value.length === 4 && value[3] > 0.5)) { background = value; break; }
                node = node.parentElement;
            }
            return {text: rgb(getComputedStyle(element).color), background: background || [255, 255, 255]};
        }"""
    )

    def lightness(rgb):
        return (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255

    assert abs(lightness(colours["text"]) - lightness(colours["background"])) > 0.35, colours


# ---- SDXL and the standard theme (a restart each) ---------------------------------------------------------


@pytest.fixture(scope="module")
def sdnext_standard_sdxl(sdnext, sdnext_kit, sdnext_workspace):
    """SD.Next restarted on the tiny SDXL in `--theme standard` (after the Modern UI tests)."""
    sdnext_kit.stop()
    server = _start(sdnext_kit, sdnext_workspace, model=TINY_SDXL, theme="standard")
    yield server
    sdnext_kit.stop()
    sdnext_kit.set_options(theme_type=None, embeddings_dir=None)


def test_sdxl_in_the_standard_theme(sdnext_standard_sdxl, sdnext_workspace, browser):
    server = sdnext_standard_sdxl
    digest_before = server.call("GET", "/ti-test/v1/weights-digest")
    snapshot = _api_run(server, "sdn-xl", sdnext_workspace["data"], steps=2)
    assert snapshot["stopped"] == "done", snapshot
    digest_after = server.call("GET", "/ti-test/v1/weights-digest")
    assert (digest_after["sha256"], digest_after["model_id"]) == (digest_before["sha256"], digest_before["model_id"])
    assert "sdn-xl" in server.embeddings()["loaded"]

    context, page, errors = _open(
        browser, server, "#tabs > .tab-nav button:text-is('Text')", shown="#txt2img_prompt textarea"
    )
    try:
        page.wait_for_timeout(1500)  # ti.js notes the generate view on screen
        page.locator("#tabs > .tab-nav button", has_text="Textual Inversion").first.click()
        ui = _ours(page)
        ui.tab("Train")
        ui.wait_text("ti_train_progress", r"Step 2 / 2.*took", timeout=60)  # a page opened after the run
        ui.tab("Embeddings")
        card = page.locator('#ti_embeddings_list .ti-card[data-ti-name="sdn-xl"]')
        card.wait_for(timeout=60_000)
        card.click()
        ui.wait_text("ti_embeddings_insert_status", r"Added sdn-xl to the txt2img prompt")
        assert re.search(r"\bsdn-xl\b", page.locator("#txt2img_prompt textarea").first.input_value())

        # The previews take the Text tab's (txt2img's) settings as typed there; SD.Next's defaults there
        # (sampler "Default", guidance -1: the model's own, seed -1) keep the tab's fields, and say so.
        page.locator("#tabs > .tab-nav button:text-is('Text')").first.click()
        page.locator("#txt2img_prompt textarea").first.fill("a photo of sdn-xl\nin the rain")
        ui.fill("txt2img_steps", 3)
        size = (int(float(ui.value("txt2img_width"))), int(float(ui.value("txt2img_height"))))
        page.locator("#tabs > .tab-nav button", has_text="Textual Inversion").first.click()
        ui.tab("Train")
        ui.choose("ti_train_embedding", "sdn-xl")
        for elem_id, value in (("ti_train_dataset", sdnext_workspace["data"]), ("ti_train_steps", 3),
                               ("ti_train_resolution", 64), ("ti_train_preview_every", 0), ("ti_train_save_every", 0),
                               ("ti_train_preview_seed", 77)):  # fmt: skip
            ui.fill(elem_id, value)
        ui.check("ti_train_preview_txt2img")
        started = time.time()
        ui.click("ti_train_resume")
        status = ui.wait_text("ti_train_status", r"Previews from the txt2img tab|to step 3|rror")
        snapshot = server.wait_run(started, timeout=1200)
        assert snapshot["stopped"] == "done", (snapshot, status)
        saved = json.loads((Path(snapshot["log_folder"]) / "settings.json").read_text(encoding="utf-8"))
        taken = {key: saved[key] for key in ("preview_prompt", "preview_sampler", "preview_steps", "preview_seed")}
        assert taken == {
            "preview_prompt": "a photo of sdn-xl in the rain",
            "preview_sampler": "dpm++_2m",  # the field's: "Default" has no counterpart
            "preview_steps": 3,
            "preview_seed": 77,
        }, saved
        assert (saved["preview_guidance"], saved["preview_width"], saved["preview_height"]) == (7.0, *size), saved
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "sdnext-standard-train-previews-from-txt2img.png"), full_page=True)
        assert not errors, errors
    finally:
        context.close()
