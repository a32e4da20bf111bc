"""The extension inside the real Stable Diffusion WebUI Forge (the forge host kit: offline, CPU, gradio 4.40,
random full-size SD1.5), driven as a user would: its install.py as Forge's launcher runs it, the tab in headless
Chromium, Forge's own API, prompt box and card list; then the tiny checkpoint, whose UNet differs from SD1's
in its blocks, through the `.yaml` beside it.

The same checks as the real AUTOMATIC1111's (test_a1111.py), on one Forge server for the module: training runs
on Forge's own loaded model (no second copy: the memory figures say so), Forge's API lists a new embedding
without a refresh, its weights stay bitwise the same and it generates the same image afterwards.
Env: TI_FORGE_KIT (default ../shared/hosts/forge), TI_FORGE_DEST (a built Forge, reused; setup.sh finishes
whatever it lacks), TI_FORGE_PORT, TI_FORGE_CHECKPOINT (the checkpoint Forge starts on; default the full-size
SD1.5, which the memory figures need), TI_REQUIRE_FORGE=1 (CI: a missing kit fails instead of skipping).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from a1111_kit import BASELINE_PROMPT
from forge_kit import (
    DEST_ENV,
    HOST_PACKAGES,
    PORT_ENV,
    ForgeKit,
    default_dest,
    forge_page_class,
    kit_folder,
    required,
)
from PIL import Image
from ui_helpers import free_port, loopback_only, make_dataset

from bench.host_memory import GIB, measure_run, settled_rss
from ti_core.formats import load_embedding

TOKEN = "zzforge"
TRAIN_BODY = {"data": {"resolution": 64}, "save_every": 0, "preview_every": 0, "preview_steps": 1}
LONG = 1800
IDLE_MARGIN = 1.5 * 10**9  # the peak of a run over the web UI's idle RSS (a second SD1.5 copy is 4+ GB)
GROWTH_MARGIN = 0.5 * 10**9  # RSS after the third run over after the first


@dataclass
class Facts:
    baseline: tuple[dict, bytes] | None = None
    idle_rss: int = 0
    created_sha256: str | None = None
    runs: list = field(default_factory=list)  # bench.host_memory.RunMemory of each run
    figures: list[str] = field(default_factory=list)


def _report(config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line(f"[forge] {line}")
        else:
            print(f"[forge] {line}", flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- fixtures (one Forge for this module) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def forge_kit(request) -> ForgeKit:
    folder = kit_folder()
    if not (folder / "setup.sh").is_file():
        why = f"the forge host kit is not at {folder} (put ../shared beside the checkout, or set TI_FORGE_KIT)"
        if required():
            pytest.fail(f"TI_REQUIRE_FORGE=1, but {why}")
        pytest.skip(why)
    kit = ForgeKit(folder, Path(os.environ.get(DEST_ENV) or default_dest(folder)))
    started = time.monotonic()
    done = kit.build()
    _report(request.config, f"Forge in {kit.dest}: {', '.join(done) or 'reused'} ({time.monotonic() - started:.0f} s)")
    return kit


@pytest.fixture(scope="module")
def forge_installed(forge_kit, request) -> dict:
    """The extension from this working tree in Forge's extensions/, its install.py run twice as Forge runs it."""
    forge_kit.install_extension()
    before = forge_kit.versions()
    first = forge_kit.run_installer()
    after = forge_kit.versions()
    second = forge_kit.run_installer()
    _report(request.config, f"install.py: first {first.seconds:.1f} s, second {second.seconds:.1f} s")
    return {"before": before, "first": first, "after": after, "second": second, "after_second": forge_kit.versions()}


@pytest.fixture(scope="module")
def forge_workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("forge")
    (root / "embeddings").mkdir()
    return {"embeddings": root / "embeddings", "data": make_dataset(root / "data"), "root": root}


@pytest.fixture(scope="module")
def facts() -> Facts:
    return Facts()


@pytest.fixture(scope="module")
def forge(forge_kit, forge_installed, forge_workspace, facts, request):
    """Forge on the full-size random SD1.5 (the tiny checkpoint selectable), with the extension."""
    port = int(os.environ.get(PORT_ENV) or free_port())
    started = time.monotonic()
    for line in forge_kit.make_full_checkpoint():
        _report(request.config, line)
    checkpoint = Path(os.environ.get("TI_FORGE_CHECKPOINT") or forge_kit.full_checkpoint)
    server = forge_kit.start(port, forge_workspace["embeddings"], checkpoint)
    try:
        server.wait_ready()
        facts.baseline = server.txt2img(BASELINE_PROMPT)  # Forge loads its model at the first generation
        facts.idle_rss = settled_rss(server.pid)
        _report(
            request.config,
            f"Forge up with its model in {time.monotonic() - started:.0f} s, idle RSS {facts.idle_rss / GIB:.2f} GiB",
        )
        yield server
    finally:
        if not server.alive():
            _report(request.config, f"Forge had exited; its log ends:\n{server.log_tail()}")
        forge_kit.stop()
        for line in facts.figures:
            _report(request.config, line)


@pytest.fixture(scope="module")
def forge_page(forge, browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    tab = context.new_page()
    loopback_only(tab)
    yield forge_page_class()(tab, forge.url + "/").open()
    context.close()


def _train_by_route(forge, workspace, facts, name: str, steps: int, **extra) -> dict:
    body = {**TRAIN_BODY, "name": name, "steps": steps, **extra}
    body["data"] = {**TRAIN_BODY["data"], "images": str(workspace["data"])}
    figures, snapshot = measure_run(
        forge.url, forge.pid, lambda: forge.call("POST", "/ti/v1/train", body), timeout=LONG
    )
    facts.runs.append(figures)
    facts.figures.append(f"route run {name} ({steps} steps): {figures.line()}")
    return snapshot


def _ensure_created(forge, workspace, facts) -> Path:
    path = workspace["embeddings"] / f"{TOKEN}.safetensors"
    if not path.exists():
        forge.call("POST", "/ti/v1/create", {"name": TOKEN, "init_text": "tree"}, timeout=LONG)
        facts.created_sha256 = _sha256(path)
    return path


# ---- 1. install.py ------------------------------------------------------------------------------------


def test_install_py_as_forges_launcher_runs_it_moves_nothing_forge_pinned(forge_installed):
    first = forge_installed["first"]
    output = f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    assert first.returncode == 0 and "Traceback" not in output, output
    assert "Error running install.py" not in output, output  # Forge's report of a failed installer
    moved = {
        name: (forge_installed["before"].get(name), forge_installed["after"].get(name))
        for name in HOST_PACKAGES
        if forge_installed["before"].get(name) != forge_installed["after"].get(name)
    }
    assert not moved, f"install.py changed Forge's packages (before, after): {moved}"
    second = forge_installed["second"]
    assert second.returncode == 0 and forge_installed["after_second"] == forge_installed["after"]
    assert "[textual-inversion-trainer]" not in second.stdout, second.stdout


# ---- 2. the tab, Create, and Forge's own lists ------------------------------------------------------------


def test_create_in_the_tab_is_listed_by_forges_api_and_cards_without_a_refresh(
    forge_page, forge, forge_workspace, facts
):
    page = forge_page
    page.open_ours()
    problem = page.page.locator("#ti_problem")
    assert not problem.count(), f"the tab reports a problem: {problem.first.inner_text()}"
    page.tab("Create")
    page.fill("ti_create_name", TOKEN)
    page.fill("ti_create_init_text", "tree")
    page.click("ti_create_button")
    status = page.wait_outcome("ti_create_status", rf"Created {TOKEN}", timeout=LONG)
    assert f"Created {TOKEN}" in status, status
    facts.created_sha256 = _sha256(forge_workspace["embeddings"] / f"{TOKEN}.safetensors")

    loaded = forge.embeddings()["loaded"]  # Forge's API database: read at start-up, reloaded by us
    assert TOKEN in loaded, f"/sdapi/v1/embeddings does not list {TOKEN}: {forge.embeddings()}"
    assert loaded[TOKEN]["vectors"] == 1 and loaded[TOKEN]["shape"] == 768
    page.host_card(TOKEN).wait_for(state="visible", timeout=60_000)  # Forge's extra-networks cards
    page.screenshot("forge-extra-networks-card")


# ---- 3. Train in the tab; Forge's prompt uses the file ------------------------------------------------------


def test_train_in_the_tab_shows_live_progress_and_the_prompt_uses_the_file(forge_page, forge, forge_workspace, facts):
    page = forge_page
    path = _ensure_created(forge, forge_workspace, facts)
    # The previews take txt2img's settings as typed there (nothing saved): a two-line prompt is one prompt.
    page.type_prompt(f"a photo of {TOKEN}\nin the snow")
    page.txt2img_settings()
    page.choose("txt2img_sampling", "DPM++ 2M")
    page.choose("txt2img_scheduler", "Karras")
    page.fill("txt2img_steps", 2)
    for side in ("txt2img_width", "txt2img_height"):  # small previews: full-size ones take minutes on a CPU
        page.fill(side, 64)
    shown = {
        elem_id: float(page.value(elem_id)) for elem_id in ("txt2img_cfg_scale", "txt2img_width", "txt2img_height")
    }
    page.open_ours()
    page.tab("Train")
    page.click("ti_train_refresh")
    page.choose("ti_train_embedding", TOKEN)
    page.fill("ti_train_dataset", forge_workspace["data"])
    page.fill("ti_train_steps", 4)
    page.fill("ti_train_resolution", 64)
    page.fill("ti_train_save_every", 0)
    page.fill("ti_train_preview_every", 2)
    page.fill("ti_train_preview_seed", 77)
    page.check("ti_train_preview_txt2img")

    figures, snapshot = measure_run(forge.url, forge.pid, lambda: page.click("ti_train_button"), timeout=LONG)
    facts.runs.append(figures)
    facts.figures.append(f"tab run ({TOKEN}, 4 steps, 2 previews): {figures.line()}")
    assert snapshot["stopped"] == "done", snapshot.get("message")
    status = page.wait_outcome("ti_train_status", rf"Trained {TOKEN} to step 4", timeout=120)
    assert f"Trained {TOKEN} to step 4" in status, status
    assert load_embedding(path).step == 4 and len(snapshot["losses"]) == 4
    page.page.wait_for_function(
        "() => document.querySelectorAll('#ti_train_previews img').length >= 2", timeout=60_000
    )
    saved = json.loads((Path(snapshot["log_folder"]) / "settings.json").read_text(encoding="utf-8"))
    taken = {key: saved[key] for key in ("preview_prompt", "preview_sampler", "preview_steps", "preview_seed")}
    assert taken == {
        "preview_prompt": f"a photo of {TOKEN} in the snow",
        "preview_sampler": "dpm++_2m_karras",
        "preview_steps": 2,
        "preview_seed": 77,  # txt2img's seed is -1 (random): the field's stays, so previews compare
    }, saved
    as_shown = (shown["txt2img_cfg_scale"], int(shown["txt2img_width"]), int(shown["txt2img_height"]))
    assert (saved["preview_guidance"], saved["preview_width"], saved["preview_height"]) == as_shown, saved
    page.screenshot("forge-train-finished")
    page.check("ti_train_preview_txt2img", False)  # the later runs use the tab's own preview fields

    assert _sha256(path) != facts.created_sha256
    info, _ = forge.txt2img(f"a photo of {TOKEN} in a park")
    assert (info.get("extra_generation_params") or {}).get("TI") == TOKEN, info.get("extra_generation_params")


# ---- 4. the card: fit, and a click into the visible prompt -------------------------------------------------


def test_the_card_says_it_fits_and_a_click_puts_the_token_into_the_prompt(forge_page, forge, forge_workspace, facts):
    page = forge_page
    _ensure_created(forge, forge_workspace, facts)
    page.type_prompt("a photo of")
    page.open_ours()
    page.tab("Embeddings")
    card = page.page.locator(f'#ti_embeddings_list .ti-card[data-ti-name="{TOKEN}"]')
    card.wait_for(timeout=60_000)
    assert "ti-fits" in (card.get_attribute("class") or "") or card.locator(".ti-fits").count(), card.inner_html()
    card.click()
    page.wait_text("ti_embeddings_insert_status", rf"Added {TOKEN} to the txt2img prompt")
    assert page.prompt() == f"a photo of {TOKEN}"


# ---- 5. Forge's model: shared, never written, the same images after ---------------------------------------


def test_a_run_leaves_forges_weights_bitwise_unchanged_and_the_same_image_after(forge, forge_workspace, facts):
    before = forge.call("GET", "/ti-test/v1/weights-digest", timeout=LONG)
    assert "sha256" in before, before
    snapshot = _train_by_route(forge, forge_workspace, facts, "zzdigest", 2, init_text="stone", overwrite=True)
    assert snapshot["stopped"] == "done", snapshot.get("message")
    after = forge.call("GET", "/ti-test/v1/weights-digest", timeout=LONG)
    assert (after["sha256"], after["tensors"]) == (before["sha256"], before["tensors"]), "Forge's weights changed"
    forge.txt2img("a different prompt first")
    info, pixels = forge.txt2img(BASELINE_PROMPT)
    assert pixels == facts.baseline[1], "txt2img with the same prompt and seed gives another image after training"
    log = forge.log.read_text(errors="replace")
    assert "cannot be shared" not in log, [line for line in log.splitlines() if "cannot be shared" in line]


def test_forges_memory_stays_near_idle_during_runs_and_does_not_grow(forge, forge_workspace, facts):
    while len(facts.runs) < 3:
        _train_by_route(forge, forge_workspace, facts, "zzmemory", 2, init_text="stone", overwrite=True)
    peaks = [run.peak - facts.idle_rss for run in facts.runs]
    after = [run.rss_after for run in facts.runs]
    facts.figures.append(
        f"idle {facts.idle_rss / GIB:.2f} GiB; peak over idle per run: "
        + ", ".join(f"{peak / GIB:.2f}" for peak in peaks)
        + " GiB; RSS after each run: "
        + ", ".join(f"{rss / GIB:.2f}" for rss in after)
        + " GiB; first step: "
        + ", ".join(f"{run.first_step_seconds:.1f}" if run.first_step_seconds else "-" for run in facts.runs)
        + " s"
    )
    assert max(peaks) <= IDLE_MARGIN, f"a run took Forge {max(peaks) / GIB:.2f} GiB over its idle RSS"
    assert after[2] - after[0] <= GROWTH_MARGIN, (
        f"Forge's RSS grew from {after[0] / GIB:.2f} to {after[2] / GIB:.2f} GiB"
    )


# ---- 6. the tiny checkpoint: SD1's widths, other blocks, its .yaml beside it ---------------------------------


def test_the_tiny_checkpoint_with_its_yaml_creates_and_trains(forge_kit, forge, forge_workspace, facts):
    models = forge.call("GET", "/sdapi/v1/sd-models")
    titles = {Path(model["filename"]).name: model["title"] for model in models}
    assert forge_kit.tiny_checkpoint.name in titles, titles
    forge.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": titles[forge_kit.tiny_checkpoint.name]})
    try:
        forge.txt2img("a cabin")  # Forge loads the newly selected model at the next generation
        created = forge.call("POST", "/ti/v1/create", {"name": "zztiny", "init_text": "tree"}, timeout=LONG)
        assert "error" not in created, created
        path = Path(created["path"])
        assert path.is_file() and "zztiny" in forge.embeddings()["loaded"]
        # Set to sample with zero terminal SNR, Forge's model trains on that schedule; the previews take
        # their full settings through the route (two prompts side by side, DDIM, a set size).
        forge.call("POST", "/sdapi/v1/options", {"sd_noise_schedule": "Zero Terminal SNR"})
        previews = {"preview_every": 2, "preview_prompt": "a tree\na house", "preview_sampler": "ddim",
                    "preview_width": 64, "preview_height": 48}  # fmt: skip
        snapshot = _train_by_route(forge, forge_workspace, facts, "zztiny", 2, resume=True, **previews)
        assert snapshot["stopped"] == "done", snapshot.get("message")
        assert load_embedding(path).step == 2
        settings = json.loads((Path(snapshot["log_folder"]) / "settings.json").read_text())
        assert settings["model"]["zero_terminal_snr"] is True and settings["preview_sampler"] == "ddim"
        with Image.open(snapshot["previews"][-1]) as preview:
            assert preview.size == (2 * 64, 48)  # the two prompts side by side
    finally:
        forge.call("POST", "/sdapi/v1/options", {"sd_noise_schedule": "Default"})
        forge.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": titles[forge_kit.full_checkpoint.name]})


def test_no_script_errors_in_the_page(forge_page):
    assert not forge_page.errors, f"errors in Forge's page: {forge_page.errors}"
